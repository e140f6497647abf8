"""PPO losses, entropy and KL estimators against hand-computed numbers and NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import entropy_from_logits, kl_penalty, ppo_policy_loss, ppo_value_loss


def test_ppo_policy_loss_hand_computed():
    # ε = 0.2; old log-probs 0 so ratio = exp(logprobs). One token per quadrant plus a masked one:
    #  t  ratio  A    -A·ρ   -A·clip(ρ)   loss = max   clipped?
    #  0  1.0    +1   -1.0   -1.0         -1.0         no
    #  1  1.5    +1   -1.5   -1.2         -1.2         yes
    #  2  0.5    -1   +0.5   +0.8         +0.8         yes
    #  3  1.5    -1   +1.5   +1.2         +1.5         no
    #  4  0.5    +1   -0.5   -0.8         -0.5         no
    #  5  1.1    -2   (masked out)
    ratios = np.array([[1.0, 1.5, 0.5, 1.5, 0.5, 1.1]], np.float32)
    old_logprobs = np.zeros_like(ratios)
    advantages = np.array([[1.0, 1.0, -1.0, -1.0, 1.0, -2.0]], np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 0]])

    # Jitted in one program: eager op-by-op dispatch dominates test time on CPU.
    loss_and_grad = jax.jit(
        jax.value_and_grad(
            lambda lp: ppo_policy_loss(lp, old_logprobs, advantages, mask, clip_eps=0.2),
            has_aux=True,
        )
    )
    (loss_sum, stats), grad = loss_and_grad(np.log(ratios))

    np.testing.assert_allclose(float(loss_sum), -1.0 - 1.2 + 0.8 + 1.5 - 0.5, rtol=1e-6)
    assert float(stats["clipfrac_sum"]) == 2.0
    assert float(stats["token_count"]) == 5.0
    np.testing.assert_allclose(float(stats["ratio_sum"]), 1.0 + 1.5 + 0.5 + 1.5 + 0.5, rtol=1e-6)
    # approxkl = 0.5·log(ρ)²: 0.5·(0 + 0.16440195 + 0.48045301 + 0.16440195 + 0.48045301)
    np.testing.assert_allclose(float(stats["approxkl_sum"]), 0.64485496, rtol=1e-6)

    # d loss / d logp = -A·ρ on unclipped tokens, 0 where the clip is active or masked.
    np.testing.assert_allclose(np.asarray(grad)[0], [-1.0, 0.0, 0.0, 1.5, -0.5, 0.0], rtol=1e-6)


def test_ppo_policy_loss_at_old_policy_is_minus_advantage_sum():
    rng = np.random.default_rng(0)
    logprobs = jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)
    advantages = jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)
    mask = jnp.asarray(rng.integers(0, 2, size=(3, 7)))
    loss_sum, stats = jax.jit(lambda *a: ppo_policy_loss(*a, clip_eps=0.1))(
        logprobs, logprobs, advantages, mask
    )
    np.testing.assert_allclose(float(loss_sum), -float(jnp.sum(advantages * mask)), rtol=1e-5)
    assert float(stats["clipfrac_sum"]) == 0.0
    assert float(stats["approxkl_sum"]) == 0.0
    assert float(stats["token_count"]) == float(mask.sum())


def test_ppo_value_loss_hand_computed():
    # ε = 0.2, v_clip = v_old + clip(v − v_old, ±0.2):
    #  t  v    v_old  R    v_clip  (v−R)²  (v_clip−R)²  loss = 0.5·max   clipped?
    #  0  1.0  1.0    2.0  1.0     1.0     1.0          0.5              no
    #  1  1.5  1.0    2.0  1.2     0.25    0.64         0.32             yes
    #  2  1.5  1.0    1.0  1.2     0.25    0.04         0.125            no
    #  3  5.0  0.0    0.0  (masked out)
    values = np.array([[1.0, 1.5, 1.5, 5.0]], np.float32)
    old_values = np.array([[1.0, 1.0, 1.0, 0.0]], np.float32)
    returns = np.array([[2.0, 2.0, 1.0, 0.0]], np.float32)
    mask = np.array([[1.0, 1.0, 1.0, 0.0]], np.float32)

    loss_and_grad = jax.jit(
        jax.value_and_grad(
            lambda v: ppo_value_loss(v, old_values, returns, mask, clip_eps=0.2), has_aux=True
        )
    )
    (loss_sum, stats), grad = loss_and_grad(values)

    np.testing.assert_allclose(float(loss_sum), 0.5 + 0.32 + 0.125, rtol=1e-6)
    assert float(stats["value_clipfrac_sum"]) == 1.0
    np.testing.assert_allclose(float(stats["value_error_sum"]), 1.0 + 0.25 + 0.25, rtol=1e-6)
    assert float(stats["token_count"]) == 3.0

    # Gradient: (v − R) on unclipped-max tokens; 0 where the clipped error wins (v_clip is flat).
    np.testing.assert_allclose(np.asarray(grad)[0], [-1.0, 0.0, 0.5, 0.0], rtol=1e-6)


def test_entropy_from_logits_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(2, 3, 11)).astype(np.float32)
    probs = np.exp(logits.astype(np.float64))
    probs /= probs.sum(-1, keepdims=True)
    expected = -(probs * np.log(probs)).sum(-1)
    entropy = jax.jit(entropy_from_logits)(logits)
    assert entropy.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(entropy), expected, rtol=1e-5, atol=1e-6)
    # Uniform distribution: log V; bf16 input is computed in float32.
    uniform = entropy_from_logits(jnp.zeros((4, 32000), jnp.bfloat16))
    assert uniform.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(uniform), math.log(32000), rtol=1e-6)


def test_entropy_with_masked_vocab_is_finite_with_finite_grads():
    logits = np.array([[0.5, 0.5, -np.inf, -np.inf]], np.float32)
    entropy, grad = jax.jit(jax.value_and_grad(lambda x: jnp.sum(entropy_from_logits(x))))(logits)
    np.testing.assert_allclose(float(entropy), math.log(2), rtol=1e-6)
    assert np.isfinite(np.asarray(grad)).all()


def test_kl_estimators_hand_values():
    logprobs = jnp.array([-1.0, -2.0, -0.5])
    ref_logprobs = jnp.array([-1.5, -1.0, -0.5])
    # log r = ref − logp = [-0.5, 1.0, 0.0]
    np.testing.assert_allclose(
        np.asarray(kl_penalty(logprobs, ref_logprobs, "k1")), [0.5, -1.0, 0.0]
    )
    np.testing.assert_allclose(
        np.asarray(kl_penalty(logprobs, ref_logprobs, "k2")), [0.125, 0.5, 0.0], rtol=1e-6
    )
    # k3 = e^{log r} − 1 − log r: e^-0.5 − 0.5 = 0.10653066, e − 2 = 0.71828183
    np.testing.assert_allclose(
        np.asarray(kl_penalty(logprobs, ref_logprobs, "k3")),
        [0.10653066, 0.71828183, 0.0],
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="'k4'"):
        kl_penalty(logprobs, ref_logprobs, "k4")


def test_kl_estimators_on_samples():
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(6))
    q = rng.dirichlet(np.ones(6))
    true_kl = float(np.sum(p * np.log(p / q)))
    samples = rng.choice(6, size=200_000, p=p)
    logprobs = np.log(p)[samples].astype(np.float32)
    ref_logprobs = np.log(q)[samples].astype(np.float32)
    k1, k2, k3 = (
        np.asarray(kl_penalty(logprobs, ref_logprobs, kind)) for kind in ("k1", "k2", "k3")
    )
    np.testing.assert_allclose(k1.mean(), true_kl, rtol=0.05)
    np.testing.assert_allclose(k3.mean(), true_kl, rtol=0.05)
    assert k3.min() >= 0.0 and k2.min() >= 0.0
    # k1 is unbiased but not pointwise non-negative.
    assert k1.min() < 0.0
