"""Masked statistics, GAE, group advantages and the KL controller against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.advantages import (
    KLControllerState,
    gae,
    group_relative_advantages,
    kl_controller_init,
    kl_controller_update,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    rloo_advantages,
)


def _prefix_mask(lengths: list[int], seq_len: int) -> np.ndarray:
    return (np.arange(seq_len)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


# ----------------------------------------------------------------------------- masked statistics


def test_masked_sum_mean_var():
    x = np.array([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]], np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 0]])

    @jax.jit  # one program instead of op-by-op dispatch
    def stats(x, mask):
        return {
            "sum": masked_sum(x, mask),
            "mean": masked_mean(x, mask),
            "row_means": masked_mean(x, mask, axis=1),
            "biased_var": masked_var(x, mask, unbiased=False),
            "var": masked_var(x, mask),
            "empty_mean": masked_mean(x, jnp.zeros_like(mask)),
        }

    out = jax.device_get(stats(x, mask))
    assert out["sum"] == 10.0
    assert out["mean"] == 2.5
    np.testing.assert_allclose(out["row_means"], [1.5, 3.5])
    # values 1, 2, 3, 4: biased var 1.25, unbiased 5/3
    np.testing.assert_allclose(out["biased_var"], 1.25, rtol=1e-6)
    np.testing.assert_allclose(out["var"], 5.0 / 3.0, rtol=1e-6)
    # An empty mask gives 0, not nan.
    assert out["empty_mean"] == 0.0


def test_masked_whiten():
    rng = np.random.default_rng(0)
    x = rng.normal(loc=3.0, scale=2.0, size=(4, 9)).astype(np.float32)
    mask = _prefix_mask([9, 5, 1, 7], 9)
    x[mask == 0] = 1e6  # padding must not leak into the statistics
    valid = x[mask == 1].astype(np.float64)

    whiten = jax.jit(masked_whiten, static_argnames="shift_mean")
    whitened = np.asarray(whiten(x, mask))
    expected = (valid - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(whitened[mask == 1], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(whitened[mask == 0], 0.0)

    scaled = np.asarray(whiten(x, mask, shift_mean=False))
    np.testing.assert_allclose(scaled[mask == 1], expected + valid.mean(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- GAE


def _gae_double_loop(rewards, values, mask, gamma, lam):
    """Â_t = Σ_{l=0}^{L−1−t} (γλ)^l δ_{t+l}, δ_t = r_t + γ·V_{t+1} − V_t, with V_L = 0."""
    batch, seq_len = rewards.shape
    advantages = np.zeros((batch, seq_len))
    returns = np.zeros((batch, seq_len))
    for b in range(batch):
        length = int(mask[b].sum())
        for t in range(length):
            total = 0.0
            for step in range(length - t):
                k = t + step
                next_value = values[b, k + 1] if k + 1 < length else 0.0
                delta = rewards[b, k] + gamma * next_value - values[b, k]
                total += (gamma * lam) ** step * delta
            advantages[b, t] = total
            returns[b, t] = total + values[b, t]
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_double_loop(gamma, lam):
    rng = np.random.default_rng(int(100 * gamma + 10 * lam))
    seq_len = 10
    mask = _prefix_mask([10, 4, 1, 0, 7], seq_len)
    rewards = rng.normal(size=mask.shape).astype(np.float32)
    values = rng.normal(size=mask.shape).astype(np.float32)

    advantages, returns = jax.jit(lambda r, v, m: gae(r, v, m, gamma=gamma, lam=lam))(
        jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask)
    )
    expected_advantages, expected_returns = _gae_double_loop(rewards, values, mask, gamma, lam)
    assert advantages.shape == returns.shape == mask.shape
    np.testing.assert_allclose(np.asarray(advantages), expected_advantages, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(returns), expected_returns, rtol=1e-5, atol=1e-5)


def test_gae_hand_computed():
    # One 2-token episode, γ = 0.5, λ = 0.5: δ_1 = 1 − 2 = −1, δ_0 = 0 + 0.5·2 − 1 = 0,
    # Â_1 = −1, Â_0 = 0 + 0.25·(−1) = −0.25; returns Â + V = [0.75, 1.0]; padding 0.
    advantages, returns = gae(
        jnp.array([[0.0, 1.0, 9.0]]),
        jnp.array([[1.0, 2.0, 9.0]]),
        jnp.array([[1, 1, 0]]),
        gamma=0.5,
        lam=0.5,
    )
    np.testing.assert_allclose(np.asarray(advantages), [[-0.25, -1.0, 0.0]])
    np.testing.assert_allclose(np.asarray(returns), [[0.75, 1.0, 0.0]])


# ----------------------------------------------------------------------------- group advantages


def test_group_relative_advantages_hand():
    @jax.jit  # one program instead of op-by-op dispatch
    def evaluate(scores, pair):
        return (
            group_relative_advantages(scores, 3),
            group_relative_advantages(pair, 2),
            group_relative_advantages(scores, 3, normalize_std=False),
            group_relative_advantages(3 * scores, 3, normalize_std=False),
        )

    scores = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], np.float32)
    grpo, grpo_pair, centred, centred_scaled = jax.device_get(
        evaluate(scores, np.array([0.0, 4.0], np.float32))
    )
    # group 1: mean 2, unbiased std 1; group 2: constant -> 0.
    np.testing.assert_allclose(grpo, [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], rtol=1e-5)
    # mean 2, std(ddof=1) = sqrt(8): ±2 / 2.8284271
    np.testing.assert_allclose(grpo_pair, [-0.70710678, 0.70710678], rtol=1e-5)
    np.testing.assert_allclose(centred, [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(centred_scaled, [-3.0, 0.0, 3.0, 0.0, 0.0, 0.0])


def test_rloo_advantages_hand():
    rloo = jax.jit(rloo_advantages, static_argnums=1)
    # group [1, 2, 3]: leave-one-out baselines (2+3)/2, (1+3)/2, (1+2)/2 -> [-1.5, 0, 1.5];
    # group [5, 5, 5]: 0.
    scores = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], np.float32)
    np.testing.assert_allclose(np.asarray(rloo(scores, 3)), [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])
    # group [0, 0, 0, 4]: baselines 4/3, 4/3, 4/3, 0 -> [-4/3, -4/3, -4/3, 4]
    np.testing.assert_allclose(
        np.asarray(rloo(np.array([0.0, 0.0, 0.0, 4.0], np.float32), 4)),
        [-4 / 3, -4 / 3, -4 / 3, 4.0],
        rtol=1e-6,
    )


def test_group_shape_errors():
    with pytest.raises(ValueError, match="group_size"):
        group_relative_advantages(jnp.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(jnp.zeros(4), 1)


# ----------------------------------------------------------------------------- KL controller


def test_kl_controller_hand_computed():
    state = kl_controller_init(0.1)
    assert isinstance(state, KLControllerState)
    # Pure and jittable: the state is a pytree.
    update = jax.jit(lambda s, kl: kl_controller_update(s, kl, 256, target=6.0, horizon=10000))
    # KL 9 vs target 6: e = clip(0.5) = 0.2; β = 0.1·(1 + 0.2·256/10000) = 0.100512
    np.testing.assert_allclose(float(update(state, 9.0).beta), 0.100512, rtol=1e-6)
    # KL 5.4 vs target 6: e = -0.1; β = 0.1·(1 − 0.1·256/10000) = 0.099744
    np.testing.assert_allclose(float(update(state, 5.4).beta), 0.099744, rtol=1e-6)
    # KL 1 vs target 6: e = clip(-5/6) = -0.2; β = 0.1·(1 − 0.2·0.0256) = 0.099488
    np.testing.assert_allclose(float(update(state, 1.0).beta), 0.099488, rtol=1e-6)
    # Fixed controller (target=None): unchanged.
    fixed = kl_controller_update(state, 100.0, 256, target=None, horizon=10000)
    assert fixed is state
