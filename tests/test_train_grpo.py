"""GRPO end to end on the tiny SFT'd review model with a verifiable reward (configs/grpo_tiny.py),
and the online-RL guarantees the shared engine loop gives it and PPO."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxalign.train import run
from jaxalign.trainers import grpo

ROOT = Path(__file__).resolve().parents[1]


def _load_config(name: str, arg: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def sft_policy(tiny_data_dir, tmp_path_factory) -> Path:
    """A tiny policy SFT'd long enough to write reviews that name an aspect now and then."""
    config = _load_config("sft_tiny", str(tiny_data_dir))
    config.train.num_steps = 300
    config.train.checkpoint_every = 300
    config.train.log_every = 100
    config.data.on_bad_row = "skip"
    config.data.eval = ""
    return run(config, tmp_path_factory.mktemp("sft")).export_dir


def _grpo_config(tiny_data_dir: Path, policy: Path, **overrides):
    config = _load_config("grpo_tiny", str(tiny_data_dir))
    config.model.name_or_path = str(policy)
    config.train.log_every = 1
    config.train.export_hf = False
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


def _metrics(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "reward" in m]


# A reward function written for TRL's GRPOTrainer: keyword arguments, an extra dataset column.
def keyword_in_completion(prompts, completions, keyword, **kwargs):
    assert "completion_ids" in kwargs and len(prompts) == len(completions)
    return [float(k in c) for c, k in zip(completions, keyword, strict=True)]


def broken_reward(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def test_grpo_raises_verifiable_reward_without_reference(
    tiny_data_dir, sft_policy, tmp_path, monkeypatch
):
    def no_reference(*args, **kwargs):
        raise AssertionError("beta = 0 must not load a reference model")

    monkeypatch.setattr(grpo, "load_reference", no_reference)
    config = _grpo_config(
        tiny_data_dir,
        sft_policy,
        train__num_steps=30,
        grpo__reward_funcs="test_train_grpo:keyword_in_completion",
    )
    result = run(config, tmp_path)
    rewards = [m["reward"] for m in _metrics(tmp_path)]
    assert len(rewards) == 30
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    # Seed 0 goes from ~0.1 to ~0.7; require a clear rise, not that exact curve.
    assert last > first + 0.25, rewards
    assert result.stopped_early is None
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(result.state.params)))


def _state_leaves(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def test_grpo_resume_is_bit_exact_with_kl_and_several_updates(tiny_data_dir, sft_policy, tmp_path):
    """β > 0 (a reference), μ = 2 updates per rollout (old log-probs), clip-higher, GSPO ratios,
    DAPO dynamic sampling with refills: interrupted after 2 iterations, resumed to 4."""
    overrides = dict(
        train__num_steps=4,
        train__checkpoint_every=2,
        grpo__beta=0.05,
        grpo__num_iterations=2,
        grpo__importance_sampling_level="sequence",
        grpo__dynamic_sampling=True,
        grpo__max_refill_batches=1,
        grpo__mask_truncated_completions=True,
    )
    whole = run(_grpo_config(tiny_data_dir, sft_policy, **overrides), tmp_path / "whole")
    metrics = _metrics(tmp_path / "whole")
    assert all(np.isfinite(m["kl"]) for m in metrics) and metrics[-1]["kl"] > 0
    assert {"dynamic_sampling/dropped_groups", "clip_ratio/region_mean"} <= set(metrics[-1])

    first = _grpo_config(tiny_data_dir, sft_policy, **{**overrides, "train__num_steps": 2})
    run(first, tmp_path / "resumed")
    resumed = run(_grpo_config(tiny_data_dir, sft_policy, **overrides), tmp_path / "resumed")
    for a, b in zip(_state_leaves(whole.state), _state_leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_faulty_reward_function_is_named(tiny_data_dir, sft_policy, tmp_path):
    config = _grpo_config(
        tiny_data_dir,
        sft_policy,
        train__num_steps=1,
        grpo__reward_funcs="test_train_grpo:broken_reward",
    )
    with pytest.raises(ValueError, match=r"'broken_reward'.*127 rewards for 128 completions"):
        run(config, tmp_path)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_online_rl_stops_on_consecutive_nonfinite_updates(
    algorithm, tiny_data_dir, sft_policy, tmp_path
):
    """A learning rate that overflows fp32 makes every update non-finite: the engine loop skips
    them, keeps finite params and stops after `train.max_consecutive_nonfinite` of them."""
    if algorithm == "grpo":
        config = _grpo_config(tiny_data_dir, sft_policy, train__num_steps=6)
    else:
        config = _load_config("ppo_tiny", str(tiny_data_dir))
        config.model.name_or_path = str(sft_policy)
        config.ppo.reward_model = "judge:token_count:was"
        config.ppo.max_new_tokens = 8
        config.train.batch_size = 8
        config.train.num_steps = 6
        config.train.export_hf = False
        config.ppo.num_epochs, config.ppo.num_minibatches = 1, 1
    config.optimizer.learning_rate = 1e39
    config.train.max_consecutive_nonfinite = 2
    result = run(config, tmp_path)
    assert result.stopped_early == "2 consecutive non-finite steps"
    params = jax.device_get(result.state.params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
