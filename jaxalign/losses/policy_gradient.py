"""PPO losses, entropy and per-token KL estimators for RLHF.

Token-level losses return *sums* over masked tokens plus `token_count`, so that gradient
accumulation and data sharding never bias a mean: the caller divides once, at the end.
"""

import jax
import jax.numpy as jnp

Array = jax.Array

KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def ppo_policy_loss(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    mask: Array,
    *,
    clip_eps: float,
) -> tuple[Array, dict[str, Array]]:
    """PPO clipped surrogate policy loss (Schulman et al. 2017, eq. 7), summed over tokens.

    With `ρ_t = exp(log π(a_t) − log π_old(a_t))` and advantage `A_t`, per token:
    `ℓ_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε))` (the negated clipped objective `L^CLIP`).

    Args:
      logprobs: `[B, T]` log-probs of the sampled tokens under the current policy.
      old_logprobs: `[B, T]` log-probs under the policy that sampled them (no gradient needed).
      advantages: `[B, T]` advantages `A_t` (treated as constants).
      mask: `[B, T]` 1 on response tokens, 0 on prompt/padding.
      clip_eps: ε.

    Returns:
      `(loss_sum, stats)`: `loss_sum = Σ_t mask_t·ℓ_t`; `stats` holds gradient-free sums
      `clipfrac_sum` (tokens where the clipped branch is active), `approxkl_sum`
      (`0.5·(log π − log π_old)²`), `ratio_sum`, and `token_count = Σ mask`.
    """
    mask = mask.astype(logprobs.dtype)
    old_logprobs = jax.lax.stop_gradient(old_logprobs)
    advantages = jax.lax.stop_gradient(advantages)
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    token_losses = jnp.maximum(unclipped, clipped)
    stats = {
        "clipfrac_sum": jnp.sum((clipped > unclipped) * mask),
        "approxkl_sum": jnp.sum(0.5 * log_ratio**2 * mask),
        "ratio_sum": jnp.sum(ratio * mask),
        "token_count": jnp.sum(mask),
    }
    return jnp.sum(token_losses * mask), jax.lax.stop_gradient(stats)


def ppo_value_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    mask: Array,
    *,
    clip_eps: float,
) -> tuple[Array, dict[str, Array]]:
    """Clipped value-function loss (PPO2 / Ziegler et al. 2019 baselines), summed over tokens.

    `v_clip = v_old + clip(v − v_old, −ε, ε)`, per token
    `ℓ_t = 0.5·max((v_t − R_t)², (v_clip,t − R_t)²)`.

    Args:
      values: `[B, T]` current value predictions `v`.
      old_values: `[B, T]` values at rollout time `v_old`.
      returns: `[B, T]` return targets `R` (e.g. from `gae`).
      mask: `[B, T]` 1 on response tokens.
      clip_eps: ε, in the units of the value.

    Returns:
      `(loss_sum, stats)` with gradient-free sums `value_clipfrac_sum` (tokens where the clipped
      error is the larger), `value_error_sum` (`Σ (v − R)²`) and `token_count`.
    """
    mask = mask.astype(values.dtype)
    old_values = jax.lax.stop_gradient(old_values)
    returns = jax.lax.stop_gradient(returns)
    values_clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    unclipped_error = (values - returns) ** 2
    clipped_error = (values_clipped - returns) ** 2
    token_losses = 0.5 * jnp.maximum(unclipped_error, clipped_error)
    stats = {
        "value_clipfrac_sum": jnp.sum((clipped_error > unclipped_error) * mask),
        "value_error_sum": jnp.sum(unclipped_error * mask),
        "token_count": jnp.sum(mask),
    }
    return jnp.sum(token_losses * mask), jax.lax.stop_gradient(stats)


def entropy_from_logits(logits: Array) -> Array:
    """Entropy of the categorical `softmax(logits)` over the last axis.

    `H = −Σ_v p_v·log p_v` with `log p = log_softmax(logits)`, computed in at least float32.
    Entries with `p_v = 0` (e.g. `-inf` logits masking padded vocabulary) contribute 0, with
    finite gradients.

    Args:
      logits: `[..., V]`.

    Returns:
      `[...]` entropies in nats.
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    logp = jax.nn.log_softmax(logits, axis=-1)
    probs = jnp.exp(logp)
    safe_logp = jnp.where(probs > 0, logp, 0.0)  # avoid 0·(−inf) = nan
    return -jnp.sum(probs * safe_logp, axis=-1)


def kl_penalty(logprobs: Array, ref_logprobs: Array, kind: str = "k1") -> Array:
    """Per-token estimator of `KL(π ‖ π_ref)` from samples `a ~ π` (Schulman 2020,
    "Approximating KL Divergence").

    With `log r = log π_ref(a) − log π(a)`:
    - `k1 = −log r = log π − log π_ref`: unbiased, high variance, can be negative.
    - `k2 = 0.5·(log r)²`: biased, low variance, ≥ 0.
    - `k3 = (r − 1) − log r`: unbiased, low variance, ≥ 0 (computed as `expm1(log r) − log r`).

    Args:
      logprobs: `[...]` log-probs of the sampled tokens under the policy.
      ref_logprobs: `[...]` log-probs of the same tokens under the reference.
      kind: one of `KL_ESTIMATORS`.

    Returns:
      `[...]` per-token estimates (unmasked; the caller masks and sums).
    """
    log_ratio = ref_logprobs - logprobs
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return jnp.expm1(log_ratio) - log_ratio
    raise ValueError(f"Unknown KL estimator kind {kind!r}; allowed: {KL_ESTIMATORS}.")
