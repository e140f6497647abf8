"""Masked statistics, advantage estimators (GAE, GRPO, RLOO) and the adaptive KL controller.

All functions are pure and jittable. Token-level arrays are `[B, T]` with a `mask` that is 1 on
response tokens; group-level arrays are `[B]` with `B = num_prompts · group_size` and the
`group_size` samples of one prompt in consecutive rows.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def masked_sum(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """`Σ x·mask` over `axis` (all axes if None)."""
    return jnp.sum(x * mask.astype(x.dtype), axis=axis)


def masked_mean(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """`Σ x·mask / Σ mask` over `axis`; 0 where the mask is empty (instead of nan)."""
    count = jnp.sum(mask.astype(x.dtype), axis=axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
    """Variance of the masked entries of `x` (all axes).

    `var = Σ mask·(x − μ)² / Σ mask`, times Bessel's `n/(n−1)` if `unbiased` (n = Σ mask).
    """
    mask = mask.astype(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = jnp.sum(mask)
        var = var * count / jnp.maximum(count - 1.0, 1.0)
    return var


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True) -> Array:
    """Normalise the masked entries of `x` to mean 0 and (unbiased) variance 1.

    `x̂ = (x − μ)/sqrt(σ² + 1e-8)`, plus `μ` back if `not shift_mean` (scale only). Statistics use
    only masked entries; masked-out positions of the output are 0.
    """
    mask = mask.astype(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


def gae(
    rewards: Array,
    values: Array,
    mask: Array,
    *,
    gamma: float,
    lam: float,
) -> tuple[Array, Array]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over response tokens.

    `δ_t = r_t + γ·V_{t+1} − V_t`, `Â_t = Σ_{l≥0} (γλ)^l δ_{t+l} = δ_t + γλ·Â_{t+1}`,
    returns `R_t = Â_t + V_t` (the TD(λ) target for the value head).

    The episode of row b is the masked prefix `t < L_b`; the state after its last token is
    terminal, so `V_{L_b} = 0` and `Â_{L_b} = 0`. Computed with a reverse `lax.scan` over time.

    Args:
      rewards: `[B, T]` per-token rewards (e.g. −β·KL per token, plus the score on the last token).
      values: `[B, T]` value estimates `V_t`.
      mask: `[B, T]` 1 on valid response tokens (contiguous from t=0), then 0.
      gamma: discount γ.
      lam: GAE λ.

    Returns:
      `(advantages, returns)`, each `[B, T]`, 0 where `mask == 0`.
    """
    dtype = jnp.result_type(rewards, values, jnp.float32)
    mask = mask.astype(dtype)
    # Scan over time: [B, T] -> [T, B].
    rewards_tb, values_tb, mask_tb = (
        jnp.swapaxes(a.astype(dtype), 0, 1) for a in (rewards, values, mask)
    )

    def step(carry: tuple[Array, Array], inputs: tuple[Array, Array, Array]):
        next_value, next_advantage = carry  # both 0 past the end of the episode
        reward, value, valid = inputs
        delta = reward + gamma * next_value - value
        advantage = (delta + gamma * lam * next_advantage) * valid
        return (value * valid, advantage), advantage

    batch_zeros = jnp.zeros(rewards.shape[0], dtype)
    _, advantages_tb = jax.lax.scan(
        step, (batch_zeros, batch_zeros), (rewards_tb, values_tb, mask_tb), reverse=True
    )
    advantages = jnp.swapaxes(advantages_tb, 0, 1)
    returns = (advantages + values.astype(dtype)) * mask
    return advantages, returns


def _grouped(scores: Array, group_size: int) -> Array:
    """`[B]` -> `[B / group_size, group_size]`, checking the shapes (static, so at trace time)."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a group baseline, got {group_size}.")
    if scores.ndim != 1 or scores.shape[0] % group_size:
        raise ValueError(
            f"scores must be [num_prompts * group_size]; got shape {scores.shape} "
            f"with group_size={group_size}."
        )
    return scores.reshape(-1, group_size)


def group_relative_advantages(
    scores: Array,
    group_size: int,
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> Array:
    """GRPO outcome advantages (Shao et al. 2024, DeepSeekMath, §4.1.2).

    Within each group of `G = group_size` samples of one prompt:
    `Â_i = (r_i − mean(r)) / (std(r) + eps)` with the unbiased (ddof=1) std, as in TRL;
    without `normalize_std` (Dr. GRPO, Liu et al. 2025) `Â_i = r_i − mean(r)`.

    Args:
      scores: `[B]` scalar rewards, `B = num_prompts·G`, groups in consecutive rows.

    Returns:
      `[B]` advantages.
    """
    grouped = _grouped(scores, group_size)
    advantages = grouped - jnp.mean(grouped, axis=-1, keepdims=True)
    if normalize_std:
        advantages = advantages / (jnp.std(grouped, axis=-1, ddof=1, keepdims=True) + eps)
    return advantages.reshape(scores.shape)


def rloo_advantages(scores: Array, group_size: int) -> Array:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024; Kool et al. 2019).

    `Â_i = r_i − (1/(G−1))·Σ_{j≠i} r_j = G/(G−1)·(r_i − mean(r))` within each group of G.

    Args:
      scores: `[B]` scalar rewards, `B = num_prompts·G`, groups in consecutive rows.

    Returns:
      `[B]` advantages.
    """
    grouped = _grouped(scores, group_size)
    leave_one_out_mean = (jnp.sum(grouped, axis=-1, keepdims=True) - grouped) / (group_size - 1)
    return (grouped - leave_one_out_mean).reshape(scores.shape)


ADVANTAGE_ESTIMATORS: tuple[str, ...] = ("grpo", "rloo")
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")


def _nanstd(x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
    """Unbiased (ddof=1) std of the non-NaN entries; NaN where fewer than two (TRL's `nanstd`)."""
    count = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True)
    squares = (x - jnp.nanmean(x, axis=axis, keepdims=True)) ** 2
    var = jnp.nansum(squares, axis=axis, keepdims=True) / (count - 1)
    std = jnp.sqrt(jnp.where(count > 1, var, jnp.nan))
    return std if keepdims else jnp.squeeze(std, axis)


def grpo_advantages(
    rewards: Array,
    group_size: int,
    *,
    estimator: str = "grpo",
    scale_rewards: str = "group",
    eps: float = 1e-4,
) -> Array:
    """Critic-free outcome advantages of the GRPO family, as TRL's `GRPOTrainer` computes them.

    Within each group of `G = group_size` completions of one prompt, with a baseline `b_i`:

        Â_i = (r_i − b_i) / (σ + eps)

    - `estimator="grpo"` (Shao et al. 2024, DeepSeekMath §4.1.2): `b_i = mean_j r_j`.
    - `estimator="rloo"` (Ahmadian et al. 2024; Kool et al. 2019): the leave-one-out mean
      `b_i = (1/(G−1))·Σ_{j≠i} r_j`.
    - `scale_rewards="group"`: σ = std of the group's rewards; `"batch"`: σ = std of all the
      rewards in the batch (more robust with low-variance groups); `"none"`: no division
      (Dr. GRPO, Liu et al. 2025, §3.2: dividing by σ weights questions by their difficulty).
      Stds are unbiased (ddof=1), as in TRL.

    A NaN reward marks an unscorable completion (every reward function returned None): it is
    left out of its group's mean, leave-one-out mean and std, and its advantage is 0, as in TRL.
    A group whose rewards are all equal gets advantages 0.

    Jittable (`group_size`, `estimator`, `scale_rewards` static).

    Args:
      rewards: `[B]` scalar rewards, `B = num_prompts·G`, the G completions of a prompt in
        consecutive rows (`jnp.repeat` order).
      group_size: G ≥ 2.
      estimator: one of `ADVANTAGE_ESTIMATORS`.
      scale_rewards: one of `SCALE_REWARDS`.
      eps: added to σ (TRL: 1e-4).

    Returns:
      `[B]` float32 advantages, 0 for unscorable rows.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"Unknown estimator {estimator!r}; allowed: {ADVANTAGE_ESTIMATORS}.")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"Unknown scale_rewards {scale_rewards!r}; allowed: {SCALE_REWARDS}.")
    rewards = jnp.asarray(rewards, jnp.float32)
    grouped = _grouped(rewards, group_size)
    scorable = ~jnp.isnan(grouped)
    count = jnp.sum(scorable, axis=-1, keepdims=True)
    total = jnp.sum(jnp.where(scorable, grouped, 0.0), axis=-1, keepdims=True)
    if estimator == "grpo":
        baseline = total / count
    else:  # NaN (then advantage 0) for a completion without a scorable sibling
        baseline = (total - grouped) / (count - 1)
    advantages = grouped - baseline
    if scale_rewards == "group":
        advantages = advantages / (_nanstd(grouped, axis=-1, keepdims=True) + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (_nanstd(rewards) + eps)
    advantages = jnp.where(jnp.isnan(advantages), 0.0, advantages)
    return advantages.reshape(rewards.shape)


def groups_with_equal_rewards(rewards: Array, group_size: int, *, atol: float = 1e-8) -> Array:
    """`[B / G]` bool: groups whose scorable rewards are all equal (within `atol`).

    Their GRPO advantages are all 0, so they carry no gradient signal: DAPO's dynamic sampling
    (Yu et al. 2025, §3.2) drops them, and their fraction is TRL's `frac_reward_zero_std`.
    NaN rewards (unscorable) are ignored; a group without two scorable rewards counts as equal.

    Args:
      rewards: `[B]`, groups of `group_size` in consecutive rows.
    """
    grouped = _grouped(jnp.asarray(rewards, jnp.float32), group_size)
    spread = jnp.nanmax(grouped, axis=-1) - jnp.nanmin(grouped, axis=-1)
    return ~(spread > atol)  # NaN spread (all unscorable) compares False: equal


# ---------------------------------------------------------------------------------------------
# Adaptive KL controller
# ---------------------------------------------------------------------------------------------


class KLControllerState(NamedTuple):
    """State of the KL-penalty coefficient controller (a pytree)."""

    beta: Array  # scalar β, the coefficient of the per-token KL penalty


def kl_controller_init(init_beta: float) -> KLControllerState:
    """Initial controller state with `β = init_beta`."""
    return KLControllerState(beta=jnp.asarray(init_beta, jnp.float32))


def kl_controller_update(
    state: KLControllerState,
    current_kl: Array | float,
    n_steps: Array | int,
    *,
    target: float | None,
    horizon: float,
) -> KLControllerState:
    """Adaptive KL coefficient (Ziegler et al. 2019, §2.2), a pure update.

    `e = clip(KL / KL_target − 1, −0.2, 0.2)`, `β ← β·(1 + e·n_steps / horizon)`.
    `target=None` is the fixed-β controller (state returned unchanged).

    Args:
      state: current `KLControllerState`.
      current_kl: observed mean KL(π ‖ π_ref) per sequence.
      n_steps: number of samples (episodes) since the last update.
      target: KL_target, or None for a fixed β.
      horizon: K_β, the time scale of the adaptation.

    Returns:
      The new state.
    """
    if target is None:
        return state
    error = jnp.clip(current_kl / target - 1.0, -0.2, 0.2)
    return KLControllerState(beta=state.beta * (1.0 + error * n_steps / horizon))
