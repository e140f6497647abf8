"""PPO end to end on a tiny SFT'd policy with programmatic rewards (Python judges)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxalign.models import from_pretrained, save_pretrained
from jaxalign.train import run
from jaxalign.trainers import ppo

ROOT = Path(__file__).resolve().parents[1]


def _load_config(name: str, arg: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def sft_policy(tiny_data_dir, tmp_path_factory) -> Path:
    """A briefly SFT'd tiny policy (random init cannot spell the rewarded word)."""
    config = _load_config("sft_tiny", str(tiny_data_dir))
    config.train.num_steps = 40
    config.train.checkpoint_every = 40
    config.data.on_bad_row = "skip"
    config.data.eval = ""
    result = run(config, tmp_path_factory.mktemp("sft"))
    return result.export_dir


def _ppo_config(tiny_data_dir: Path, policy: Path, **overrides):
    config = _load_config("ppo_tiny", str(tiny_data_dir))
    config.model.name_or_path = str(policy)
    config.ppo.reward_model = "judge:token_count:was"
    config.ppo.missing_eos_penalty = 0.0
    config.ppo.max_new_tokens = 16
    config.optimizer.learning_rate = 1e-3
    config.train.batch_size = 32
    config.train.log_every = 1
    config.train.export_hf = False
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_ppo_raises_programmatic_reward_and_large_beta_holds_kl(
    tiny_data_dir, sft_policy, tmp_path
):
    config = _ppo_config(tiny_data_dir, sft_policy, train__num_steps=12)
    run(config, tmp_path / "ppo")
    history = _metrics(tmp_path / "ppo")
    scores = [m["objective/score"] for m in history]
    kls = [m["objective/kl"] for m in history]
    assert len(scores) == 12
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.5, scores
    assert all(np.isfinite(kls)) and kls[-1] > 0.0
    for key in (
        "policy/clipfrac",
        "policy/approxkl",
        "val/error",
        "val/clipfrac",
        "eos_rate",
        "objective/entropy",
        "objective/kl_coef",
        "response_length",
        "rollout_tokens_per_sec",
    ):
        assert key in history[-1], key

    # Same run with β = 50: the KL penalty dominates and the policy stays near the reference.
    config = _ppo_config(tiny_data_dir, sft_policy, train__num_steps=6, ppo__kl_coef=50.0)
    run(config, tmp_path / "ppo_large_beta")
    large_beta_kls = [m["objective/kl"] for m in _metrics(tmp_path / "ppo_large_beta")]
    assert abs(large_beta_kls[-1]) < 0.25 * kls[5], (large_beta_kls, kls)
    assert max(abs(k) for k in large_beta_kls) < 1.0, large_beta_kls


def test_interrupted_ppo_equals_uninterrupted(tiny_data_dir, sft_policy, tmp_path):
    """Policy, critic, optimiser states, RNG, data position and the adaptive β all resume."""
    overrides = dict(
        train__num_steps=4, train__checkpoint_every=2, ppo__adaptive_kl=True, ppo__kl_target=0.1
    )
    straight = run(_ppo_config(tiny_data_dir, sft_policy, **overrides), tmp_path / "straight")

    first = _ppo_config(tiny_data_dir, sft_policy, **{**overrides, "train__num_steps": 2})
    run(first, tmp_path / "resumed")
    resumed = run(_ppo_config(tiny_data_dir, sft_policy, **overrides), tmp_path / "resumed")

    straight_state, resumed_state = jax.device_get(straight.state), jax.device_get(resumed.state)
    assert set(straight_state.params) == {"policy", "critic"}
    for part in ("params", "opt_state", "rng", "step"):  # params: policy and critic
        jax.tree.map(
            lambda a, b, part=part: np.testing.assert_array_equal(a, b, err_msg=part),
            getattr(straight_state, part),
            getattr(resumed_state, part),
        )
    ppo_cfg = first.ppo  # the optimizer steps num_epochs x num_minibatches times an iteration
    assert int(resumed_state.step) == 4 * ppo_cfg.num_epochs * ppo_cfg.num_minibatches
    a, b = _metrics(tmp_path / "straight")[-1], _metrics(tmp_path / "resumed")[-1]
    assert a["objective/kl_coef"] == b["objective/kl_coef"]
    assert a["objective/score"] == b["objective/score"]


@pytest.fixture(scope="module")
def reward_model_dir(sft_policy, tmp_path_factory) -> Path:
    """A scalar-head checkpoint (`*ForSequenceClassification`): the SFT backbone plus a score
    head, every weight perturbed, so it differs from anything the trainer would initialise."""
    model, params = from_pretrained(sft_policy, head="scalar")
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    noisy = [
        x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return save_pretrained(
        model, jax.tree.unflatten(treedef, noisy), tmp_path_factory.mktemp("rm") / "hf"
    )


def test_ppo_with_a_reward_model_directory_and_critic_from_it(
    tiny_data_dir, sft_policy, reward_model_dir, tmp_path, monkeypatch
):
    """`ppo.reward_model=<dir>` scores the rollouts; `ppo.critic_init=reward` starts the critic
    from that checkpoint; `ppo.missing_eos_penalty` is added to the score of every response
    without EOS. A learning rate of 1e-12 keeps the trained weights at their initial values."""
    penalty = -0.75
    scores_seen = []
    compute_advantages = ppo.compute_advantages

    def spy(scored, scores, *args, **kwargs):  # `scores`: what the advantages are computed from
        jax.debug.callback(lambda s: scores_seen.append(np.asarray(s)), scores)
        return compute_advantages(scored, scores, *args, **kwargs)

    monkeypatch.setattr(ppo, "compute_advantages", spy)
    config = _ppo_config(
        tiny_data_dir,
        sft_policy,
        train__num_steps=1,
        ppo__reward_model=str(reward_model_dir),
        ppo__critic_init="reward",
        ppo__missing_eos_penalty=penalty,
        optimizer__learning_rate=1e-12,
    )
    result = run(config, tmp_path / "ppo_rm")
    history = _metrics(tmp_path / "ppo_rm")
    assert len(history) == 1 and len(scores_seen) == 1

    _, rm_params = from_pretrained(reward_model_dir)
    _, policy_params = from_pretrained(sft_policy)
    params = jax.device_get(result.state.params)
    close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-8)  # noqa: E731
    jax.tree.map(close, params["critic"], rm_params)  # score head included
    jax.tree.map(close, params["policy"], policy_params)

    for record, scores in zip(history, scores_seen, strict=True):
        # The reward model's scores (logged raw), penalised where no EOS was generated.
        assert np.isfinite(record["objective/score"]) and record["objective/score"] != 0
        assert record["eos_rate"] < 1, record["eos_rate"]  # some rows are penalised
        expected = record["objective/score"] + penalty * (1 - record["eos_rate"])
        assert np.mean(scores) == pytest.approx(expected, abs=1e-5)
        assert np.isfinite(record["val/error"])
