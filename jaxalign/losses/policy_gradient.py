"""PPO and GRPO-family policy losses, entropy and per-token KL estimators for RLHF.

Token-level losses return *sums* over masked tokens plus `token_count`, so that gradient
accumulation and data sharding never bias a mean: the caller divides once, at the end.
"""

from typing import NamedTuple

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


# ---------------------------------------------------------------------------------------------
# GRPO family
# ---------------------------------------------------------------------------------------------

GRPO_LOSS_TYPES: tuple[str, ...] = ("grpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence")


class GRPOLossOutput(NamedTuple):
    """The GRPO loss as a sum and its denominator, plus gradient-free metric sums.

    The objective is `loss_sum / denominator`, with both summed over microbatches first.
    `stats` holds sums named as TRL's metrics, each divided by its own count:
    `kl` by `token_count`; `clip_ratio/low_mean`, `clip_ratio/high_mean` and
    `clip_ratio/region_mean` by `clip_count` (tokens at the token level, sequences at the
    sequence level, where one ratio serves a whole sequence).
    """

    loss_sum: Array  # []
    denominator: Array  # []
    stats: dict[str, Array]  # each []


def grpo_policy_loss(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    mask: Array,
    *,
    ref_logprobs: Array | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
) -> GRPOLossOutput:
    """Clipped policy-gradient loss of the GRPO family, as a sum and its denominator.

    Per token of completion i (Shao et al. 2024, DeepSeekMath, eq. 3, as in TRL's
    `GRPOTrainer._compute_loss`), with sequence advantage `A_i` and `s_{i,t}` the importance
    weight:

        ℓ_{i,t} = −min(s_{i,t}·A_i, clip(s_{i,t}, 1 − ε_low, 1 + ε_high)·A_i) + β·k3_{i,t}
        k3_{i,t} = exp(log π_ref − log π) − (log π_ref − log π) − 1     (only when β > 0)

    Asymmetric bounds `ε_high > ε_low` are DAPO's clip-higher (Yu et al. 2025, §3.1).

    Importance weights:
    - `"token"`: `s_{i,t} = π(y_t) / π_old(y_t)`.
    - `"sequence"` (GSPO, Zheng et al. 2025, eq. 7 and the GSPO-token form of eq. 13):
      `log s_i = (1/|y_i|)·Σ_t log(π(y_t)/π_old(y_t))`, broadcast to tokens as
      `log s_{i,t} = log π(y_t) − sg[log π(y_t)] + sg[log s_i]`. Its value is `s_i` at every
      token and `∇ s_{i,t} = s_i·∇ log π(y_t)`, so the token-mean loss has GSPO's gradient
      `s_i·A_i·(1/|y_i|)·Σ_t ∇ log π(y_t)` (TRL computes the `[B, 1]` weight directly; the
      value and gradient are the same).

    Aggregation (`loss = loss_sum / denominator` after summing both over microbatches):
    - `"grpo"`: `Σ_i (Σ_t m·ℓ / max(Σ_t m, 1))`, over `B` rows (per-sequence token mean,
      then the batch mean; DeepSeekMath eq. 3).
    - `"dr_grpo"`: `Σ_{i,t} m·ℓ`, over `B·max_completion_length` (Liu et al. 2025, Dr. GRPO:
      no length normalisation; a constant denominator).
    - `"dapo"`: `Σ_{i,t} m·ℓ`, over `Σ m` (token mean over the whole batch; Yu et al. 2025,
      §3.3 token-level loss).

    Args:
      logprobs: `[B, N]` log-probs of the completion tokens under the policy being trained.
      old_logprobs: `[B, N]` log-probs under the policy that sampled them (no gradient).
      advantages: `[B]` sequence advantages (no gradient).
      mask: `[B, N]` 1 on completion tokens that count, 0 on padding (and on completions
        dropped by `mask_truncated_completions`).
      ref_logprobs: `[B, N]` log-probs under the reference policy; required when `beta > 0`.
      beta: KL coefficient β; 0 disables the term (and `ref_logprobs` is not read).
      epsilon_low, epsilon_high: clip bounds `[1 − ε_low, 1 + ε_high]`.
      loss_type: one of `GRPO_LOSS_TYPES`.
      importance_sampling_level: one of `IMPORTANCE_SAMPLING_LEVELS`.
      max_completion_length: Dr. GRPO's constant; default N.

    Returns:
      `GRPOLossOutput(loss_sum, denominator, stats)`. `stats` (gradient-free sums):
      `kl` (`Σ m·k3`, 0 when β = 0), `clip_ratio/low_mean` (`s < 1 − ε_low` and `A < 0`),
      `clip_ratio/high_mean` (`s > 1 + ε_high` and `A > 0`), `clip_ratio/region_mean` (either),
      `token_count` (`Σ m`) and `clip_count`.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; allowed: {GRPO_LOSS_TYPES}.")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"Unknown importance_sampling_level {importance_sampling_level!r}; "
            f"allowed: {IMPORTANCE_SAMPLING_LEVELS}."
        )
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    logprobs = jnp.asarray(logprobs)
    dtype = jnp.promote_types(logprobs.dtype, jnp.float32)
    logprobs = logprobs.astype(dtype)
    valid = mask != 0
    mask = valid.astype(dtype)
    old_logprobs = jax.lax.stop_gradient(old_logprobs.astype(dtype))
    advantages = jax.lax.stop_gradient(advantages.astype(dtype))[:, None]  # [B, 1]
    token_count = jnp.sum(mask, axis=-1)  # [B]

    # Padding may hold anything (e.g. −inf): zero its log-ratio so exp stays finite.
    log_ratio = jnp.where(valid, logprobs - old_logprobs, 0.0)
    if importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        sequence_log_ratio = jnp.sum(log_ratio, axis=-1) / jnp.maximum(token_count, 1.0)
        masked_logprobs = jnp.where(valid, logprobs, 0.0)
        log_weights = (
            masked_logprobs
            - jax.lax.stop_gradient(masked_logprobs)
            + jax.lax.stop_gradient(sequence_log_ratio)[:, None]
        )
    ratio = jnp.exp(log_weights)
    clipped_ratio = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    token_losses = -jnp.minimum(ratio * advantages, clipped_ratio * advantages)

    kl = jnp.zeros_like(token_losses)
    if beta != 0.0:
        ref_log_ratio = jnp.where(
            valid, jax.lax.stop_gradient(ref_logprobs.astype(dtype)) - logprobs, 0.0
        )
        kl = jnp.expm1(ref_log_ratio) - ref_log_ratio
        token_losses = token_losses + beta * kl

    masked_losses = jnp.sum(token_losses * mask, axis=-1)  # [B]
    rows = jnp.asarray(logprobs.shape[0], dtype)
    if loss_type == "grpo":
        loss_sum = jnp.sum(masked_losses / jnp.maximum(token_count, 1.0))
        denominator = rows
    elif loss_type == "dr_grpo":
        loss_sum = jnp.sum(masked_losses)
        denominator = rows * (max_completion_length or logprobs.shape[1])
    else:  # dapo
        loss_sum = jnp.sum(masked_losses)
        denominator = jnp.sum(token_count)

    low = (ratio < 1.0 - epsilon_low) & (advantages < 0)
    high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
    if importance_sampling_level == "token":
        clip_weights, clip_count = mask, jnp.sum(token_count)
    else:
        # One ratio per sequence: count each non-empty sequence once (its first column).
        has_tokens = (token_count > 0).astype(dtype)
        clip_weights = jnp.zeros_like(mask).at[:, 0].set(has_tokens)
        clip_count = jnp.sum(has_tokens)
    stats = {
        "kl": jnp.sum(kl * mask),
        "clip_ratio/low_mean": jnp.sum(low * clip_weights),
        "clip_ratio/high_mean": jnp.sum(high * clip_weights),
        "clip_ratio/region_mean": jnp.sum((low | high) * clip_weights),
        "token_count": jnp.sum(token_count),
        "clip_count": clip_count,
    }
    return GRPOLossOutput(loss_sum, denominator, jax.lax.stop_gradient(stats))
