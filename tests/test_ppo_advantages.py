"""`jaxalign.trainers.ppo.compute_advantages` against a hand-written NumPy reference.

Per-token reward r_t = −β·KL_t, plus the score on the last response token (the EOS, or the last
generated token of a row that ran out of tokens); optional reward whitening (scale only); GAE(γ, λ)
with V = 0 after the last token; optional advantage whitening. Written with loops, in float64,
from the equations (Ziegler et al. 2019; Schulman et al. 2016), not from the library's code.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxalign.trainers import ppo

BATCH, NEW_TOKENS = 4, 7
# Response lengths: EOS at token 3, at 5, at the very last slot, and one row with no EOS at all
# (all 7 tokens generated): its score goes on its last token too.
LENGTHS = (3, 5, 7, 7)


def kl_reference(logprobs: np.ndarray, ref_logprobs: np.ndarray, kind: str) -> np.ndarray:
    """Schulman's estimators of KL(π ‖ π_ref) from a ~ π, with r = π_ref(a) / π(a)."""
    ratio = np.exp(ref_logprobs - logprobs)
    if kind == "k1":
        return -np.log(ratio)
    if kind == "k2":
        return 0.5 * np.log(ratio) ** 2
    return ratio - 1 - np.log(ratio)


def whiten_reference(x: np.ndarray, mask: np.ndarray, shift_mean: bool) -> np.ndarray:
    values = x[mask == 1]
    mean, var = values.mean(), values.var(ddof=1)  # unbiased, over every valid token
    out = (x - mean) / np.sqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def advantages_reference(
    logprobs, ref_logprobs, values, scores, lengths, *, beta, kind, gamma, lam, whiten_rewards
):
    """(rewards, advantages, returns, kl) with per-row Python loops over time."""
    batch, steps = logprobs.shape
    mask = (np.arange(steps)[None] < np.asarray(lengths)[:, None]).astype(np.float64)
    kl = kl_reference(logprobs, ref_logprobs, kind) * mask
    rewards = -beta * kl
    for row, length in enumerate(lengths):
        rewards[row, length - 1] += scores[row]
    if whiten_rewards:
        rewards = whiten_reference(rewards, mask, shift_mean=False)
    advantages, returns = np.zeros_like(rewards), np.zeros_like(rewards)
    for row, length in enumerate(lengths):
        next_value = next_advantage = 0.0  # terminal after the last token
        for t in reversed(range(length)):
            delta = rewards[row, t] + gamma * next_value - values[row, t]
            next_advantage = delta + gamma * lam * next_advantage
            advantages[row, t] = next_advantage
            returns[row, t] = next_advantage + values[row, t]
            next_value = values[row, t]
    return rewards, advantages, returns, kl, mask


@pytest.fixture(scope="module")
def rollout():
    rng = np.random.default_rng(0)
    shape = (BATCH, NEW_TOKENS)
    logprobs = -rng.uniform(0.1, 3.0, shape)
    ref_logprobs = logprobs + rng.normal(0, 0.5, shape)  # KL_t of either sign under k1
    values = rng.normal(0, 1, shape)
    scores = np.array([1.5, -0.7, 0.3, 2.0])
    # The trainer adds `ppo.missing_eos_penalty` to rows that did not finish before the call; here
    # row 3 (no EOS) carries it: its raw score 3.0 plus a penalty of -1.0.
    scores[3] = 3.0 - 1.0
    return logprobs, ref_logprobs, values, scores


@pytest.fixture(scope="module")
def advantage_fn():
    """One jitted `compute_advantages` per static setting (estimator, γ, λ, whitening)."""
    cache = {}

    def get(**static):
        key = tuple(sorted(static.items()))
        if key not in cache:
            cache[key] = jax.jit(
                lambda scored, scores, mask, beta: ppo.compute_advantages(
                    scored, scores, mask, beta, **static
                )
            )
        return cache[key]

    return get


CASES = {
    # (kl_estimator, gamma, lam, whiten_rewards, whiten_advantages)
    "k1": ("k1", 1.0, 0.95, False, False),
    "k2-discounted": ("k2", 0.9, 0.8, False, False),
    "k3-whitened-advantages": ("k3", 1.0, 0.95, False, True),
    "k1-whitened-rewards": ("k1", 0.99, 1.0, True, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compute_advantages_matches_numpy_reference(rollout, advantage_fn, case):
    kind, gamma, lam, whiten_rewards, whiten_advantages = CASES[case]
    logprobs, ref_logprobs, values, scores = rollout
    beta = 0.2
    rewards, advantages, returns, kl, mask = advantages_reference(
        logprobs,
        ref_logprobs,
        values,
        scores,
        LENGTHS,
        beta=beta,
        kind=kind,
        gamma=gamma,
        lam=lam,
        whiten_rewards=whiten_rewards,
    )
    if whiten_advantages:
        advantages = whiten_reference(advantages, mask, shift_mean=True)

    scored = {
        "old_logprobs": np.float32(logprobs),
        "ref_logprobs": np.float32(ref_logprobs),
        "old_values": np.float32(values),
    }
    fn = advantage_fn(
        kl_estimator=kind,
        gamma=gamma,
        lam=lam,
        whiten_rewards=whiten_rewards,
        whiten_advantages=whiten_advantages,
    )
    out = jax.device_get(fn(scored, np.float32(scores), np.float32(mask), np.float32(beta)))

    np.testing.assert_allclose(out["advantages"], advantages, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["returns"], returns, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["kl_sum"], kl.sum(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["mean_kl"], kl.sum() / BATCH, rtol=1e-5)
    np.testing.assert_allclose(out["mean_non_score_reward"], -beta * kl.sum() / BATCH, rtol=1e-5)
    assert np.all(out["advantages"][mask == 0] == 0) and np.all(out["returns"][mask == 0] == 0)
    if kind != "k1":  # k2 and k3 are >= 0 per token; k1 is not
        assert np.all(kl >= 0)
    else:
        assert np.any(kl < 0)


def test_score_lands_on_the_last_token_and_kl_on_every_token(advantage_fn):
    """γ = λ = 1, V = 0, no whitening: Â_t = Σ_{s≥t} r_s, so r_t = Â_t − Â_{t+1} is observable."""
    rng = np.random.default_rng(1)
    logprobs = -rng.uniform(0.1, 2.0, (BATCH, NEW_TOKENS))
    ref_logprobs = logprobs - 0.5  # k1 KL of exactly +0.5 per token
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    mask = (np.arange(NEW_TOKENS)[None] < np.asarray(LENGTHS)[:, None]).astype(np.float32)
    fn = advantage_fn(
        kl_estimator="k1", gamma=1.0, lam=1.0, whiten_rewards=False, whiten_advantages=False
    )
    scored = {
        "old_logprobs": np.float32(logprobs),
        "ref_logprobs": np.float32(ref_logprobs),
        "old_values": np.zeros((BATCH, NEW_TOKENS), np.float32),
    }
    out = jax.device_get(fn(scored, np.float32(scores), mask, np.float32(0.1)))
    advantages = np.asarray(out["advantages"], np.float64)
    rewards = advantages - np.pad(advantages[:, 1:], ((0, 0), (0, 1)))
    for row, length in enumerate(LENGTHS):
        expected = np.where(np.arange(NEW_TOKENS) < length, -0.1 * 0.5, 0.0)
        expected[length - 1] += scores[row]
        np.testing.assert_allclose(rewards[row], expected, atol=1e-5, err_msg=f"row {row}")
    np.testing.assert_allclose(out["kl_sum"], 0.5 * np.asarray(LENGTHS), rtol=1e-5)
