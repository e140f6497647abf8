"""Online RL on two CPU processes equals one process: PPO and GRPO with host-side Python rewards.

Each process samples, decodes and scores only the rollout rows it owns (`sharding.local_rows`), and
the scores go back into one global array; GRPO's reward functions also read an extra dataset column
(`keyword`) of those rows. Same harness as tests/test_multihost.py.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_multihost import read_metrics, tiny_config, training_processes

from jaxalign.train import run

COMMON = {
    "model.name_or_path": "",  # random init: equality does not need a trained policy
    "train.log_every": 1,
    "train.checkpoint_every": 1000,
    "train.export_hf": False,
    "train.num_steps": 2,
    "train.batch_size": 8,
    "optimizer.learning_rate": 1e-3,
    "optimizer.schedule": "constant",
}
JOBS = {
    "ppo": (
        "ppo_tiny.py",
        {
            "ppo.reward_model": "judge:length",
            "ppo.critic_init": "policy",
            "ppo.max_new_tokens": 8,
            "ppo.num_epochs": 1,
            "ppo.num_minibatches": 1,
        },
        ["loss", "objective/score", "objective/kl"],
    ),
    "grpo": (
        "grpo_tiny.py",
        {
            "grpo.reward_funcs": "judge:length,jaxalign.demo.keyword_task:mentions_keyword",
            "grpo.reward_weights": "1.0,2.0",
            "grpo.num_generations": 4,
            "grpo.max_new_tokens": 8,
            "grpo.beta": 0.1,
        },
        ["loss", "reward", "reward_std", "kl", "rewards/judge_length/mean"],
    ),
}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_two_processes_run_online_rl_like_one(job, tiny_data_dir, tmp_path):
    config_file, settings, names = JOBS[job]
    settings = {**COMMON, **settings}
    multi_dir, single_dir = tmp_path / "two_processes", tmp_path / "one_process"
    with training_processes(
        f"configs/{config_file}:{tiny_data_dir}",
        multi_dir,
        {**settings, "mesh.distributed": True},
        logs=tmp_path / "logs",
    ) as wait:
        reference = run(tiny_config(config_file, tiny_data_dir, settings), single_dir)
        wait()
    multi, single = read_metrics(multi_dir), read_metrics(single_dir)
    assert [r["step"] for r in multi] == [1, 2]
    for name in names:
        np.testing.assert_allclose(
            [r[name] for r in multi], [r[name] for r in single], rtol=1e-5, atol=1e-6, err_msg=name
        )
    assert any(r[names[1]] != 0 for r in single)  # the rewards are not trivially zero
    config = json.loads((multi_dir / "config.json").read_text())
    assert config["algorithm"] == job
    assert jax.device_count() == 8 and reference.stopped_early is None
