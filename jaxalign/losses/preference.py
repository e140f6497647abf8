"""Pairwise preference losses: DPO and its variants, Bradley–Terry reward-model loss.

Every function is a pure, jittable function of `[batch]` arrays. Inputs are *summed* response
log-probabilities (`log π(y|x) = Σ_t log π(y_t | x, y_<t)` over response tokens) and, where a
loss needs it, response token counts. Losses are returned per example; the caller reduces.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
DPO_VARIANT_KWARGS: tuple[str, ...] = ("reference_free", "rpo_alpha", "simpo_gamma")

# Loss types that never look at the reference model.
_REFERENCE_FREE_TYPES = ("simpo", "orpo")
# Loss types that need response lengths (they work on length-averaged log-probs).
_LENGTH_NORMALISED_TYPES = ("ipo", "simpo", "orpo")
# Loss types that read `label_smoothing`.
_SMOOTHED_TYPES = ("sigmoid", "robust")


def _validate_dpo_args(
    loss_type: str,
    label_smoothing: Any,
    variant_kwargs: Mapping[str, Any],
    chosen_lengths: Array | None,
    rejected_lengths: Array | None,
) -> None:
    """Fail loudly on configuration errors (Python-level, so it runs once at trace time)."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"Unknown DPO loss_type {loss_type!r}; allowed: {DPO_LOSS_TYPES}.")
    unknown = sorted(set(variant_kwargs) - set(DPO_VARIANT_KWARGS))
    if unknown:
        raise ValueError(
            f"Unknown dpo_loss keyword argument(s) {unknown}; allowed variant kwargs: "
            f"{DPO_VARIANT_KWARGS}."
        )
    if "simpo_gamma" in variant_kwargs and loss_type != "simpo":
        raise ValueError(f"simpo_gamma only applies to loss_type='simpo', got {loss_type!r}.")
    if loss_type in _LENGTH_NORMALISED_TYPES and (
        chosen_lengths is None or rejected_lengths is None
    ):
        raise ValueError(
            f"loss_type={loss_type!r} averages log-probs over the response, so it requires "
            "chosen_lengths and rejected_lengths ([B] response token counts)."
        )
    if variant_kwargs.get("rpo_alpha") is not None and chosen_lengths is None:
        raise ValueError(
            "rpo_alpha adds a per-token NLL of the chosen response; pass chosen_lengths."
        )
    # Only concrete numbers can be checked; a traced value is the caller's responsibility.
    if isinstance(label_smoothing, int | float):
        if label_smoothing != 0.0 and loss_type not in _SMOOTHED_TYPES:
            raise ValueError(
                f"label_smoothing is only used by loss_type in {_SMOOTHED_TYPES}, "
                f"got {label_smoothing} with {loss_type!r}."
            )
        if loss_type == "sigmoid" and not 0.0 <= label_smoothing <= 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}.")
        if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
            raise ValueError(
                f"loss_type='robust' divides by 1 - 2ε; label_smoothing must be in [0, 0.5), "
                f"got {label_smoothing}."
            )


def _log_odds(avg_logps: Array) -> Array:
    """`log(p / (1 - p))` from `log p`, stable for `log p` near 0: `log p − log(−expm1(log p))`."""
    return avg_logps - jnp.log(-jnp.expm1(avg_logps))


def dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    reference_chosen_logps: Array,
    reference_rejected_logps: Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    **variant_kwargs: Any,
) -> tuple[Array, Array, Array]:
    """Direct preference optimisation loss and its variants, per example.

    With summed log-probs `π_c = log π(y_c|x)`, `ref_c = log π_ref(y_c|x)` (same for rejected `r`)
    and the implicit-reward margin `h = (π_c − ref_c) − (π_r − ref_r)`:

    - `sigmoid` (DPO, Rafailov et al. 2023, eq. 7; with conservative label smoothing ε, cDPO):
      `−(1−ε)·logσ(βh) − ε·logσ(−βh)`.
    - `ipo` (Azar et al. 2023, ΨPO with Ψ = identity): `(h̄ − 1/(2β))²`, where `h̄` uses length-averaged
      log-ratios `(π_c − ref_c)/|c| − (π_r − ref_r)/|r|`.
    - `hinge` (SLiC-HF, Zhao et al. 2023): `relu(1 − βh)`.
    - `robust` (rDPO, Chowdhury et al. 2024, unbiased loss under label noise ε), ε = label_smoothing < 0.5:
      `((1−ε)·(−logσ(βh)) − ε·(−logσ(−βh))) / (1 − 2ε)`.
    - `simpo` (Meng et al. 2024), reference-free:
      `−logσ(β·π_c/|c| − β·π_r/|r| − γ)`, γ = `simpo_gamma` (default 0.5).
    - `orpo` (Hong et al. 2024, `L_SFT + λ·L_OR`), reference-free, with `p̄ = π/|y|` and
      `log_odds = p̄ − log(1 − exp(p̄))`: `−π_c/|c| + β·(−logσ(log_odds_c − log_odds_r))`;
      β plays ORPO's λ (as in TRL).

    Variant kwargs:
    - `reference_free=False`: treat reference log-probs as 0 (the reference is uniform).
    - `rpo_alpha=None`: RPO (Pang et al. 2024, DPO + NLL) adds `α·(−π_c/|c|)`, the per-token NLL of the
      chosen response; requires `chosen_lengths`.
    - `simpo_gamma=0.5`: SimPO target reward margin γ.

    Args:
      policy_chosen_logps: `[B]` summed log-probs of chosen responses under the policy.
      policy_rejected_logps: `[B]` same for rejected responses.
      reference_chosen_logps: `[B]` chosen log-probs under the frozen reference (ignored by
        `simpo`/`orpo` and when `reference_free=True`).
      reference_rejected_logps: `[B]` same for rejected responses.
      beta: inverse temperature β (λ for `orpo`).
      loss_type: one of `DPO_LOSS_TYPES`.
      label_smoothing: ε, probability that a preference label is flipped (`sigmoid`, `robust`).
      chosen_lengths: `[B]` chosen response token counts (needed by `ipo`, `simpo`, `orpo`, RPO).
      rejected_lengths: `[B]` rejected response token counts (needed by `ipo`, `simpo`, `orpo`).

    Returns:
      `(losses, chosen_rewards, rejected_rewards)`, each `[B]`. Rewards are metrics (gradient is
      stopped): `β·(π − ref)` for reference-based types and `β·π/|y|` for `simpo`/`orpo`.

    Raises:
      ValueError: unknown `loss_type` or kwarg, missing lengths, or an out-of-range ε.
    """
    _validate_dpo_args(loss_type, label_smoothing, variant_kwargs, chosen_lengths, rejected_lengths)
    reference_free = bool(variant_kwargs.get("reference_free", False))
    rpo_alpha = variant_kwargs.get("rpo_alpha")
    simpo_gamma = variant_kwargs.get("simpo_gamma", 0.5)

    dtype = jnp.result_type(policy_chosen_logps, policy_rejected_logps, jnp.float32)
    policy_chosen_logps = jnp.asarray(policy_chosen_logps, dtype)
    policy_rejected_logps = jnp.asarray(policy_rejected_logps, dtype)
    if reference_free:
        reference_chosen_logps = jnp.zeros_like(policy_chosen_logps)
        reference_rejected_logps = jnp.zeros_like(policy_rejected_logps)
    chosen_logratios = policy_chosen_logps - jnp.asarray(reference_chosen_logps, dtype)
    rejected_logratios = policy_rejected_logps - jnp.asarray(reference_rejected_logps, dtype)
    if chosen_lengths is not None:
        chosen_lengths = jnp.asarray(chosen_lengths, dtype)
    if rejected_lengths is not None:
        rejected_lengths = jnp.asarray(rejected_lengths, dtype)

    margin = chosen_logratios - rejected_logratios  # h, [B]
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * jax.nn.log_sigmoid(beta * margin) - eps * jax.nn.log_sigmoid(
            -beta * margin
        )
    elif loss_type == "ipo":
        avg_margin = chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths
        losses = (avg_margin - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * margin)
    elif loss_type == "robust":
        losses = (
            -(1.0 - eps) * jax.nn.log_sigmoid(beta * margin)
            + eps * jax.nn.log_sigmoid(-beta * margin)
        ) / (1.0 - 2.0 * eps)
    elif loss_type == "simpo":
        chosen_avg = policy_chosen_logps / chosen_lengths
        rejected_avg = policy_rejected_logps / rejected_lengths
        losses = -jax.nn.log_sigmoid(beta * (chosen_avg - rejected_avg) - simpo_gamma)
    else:  # orpo
        chosen_avg = policy_chosen_logps / chosen_lengths
        rejected_avg = policy_rejected_logps / rejected_lengths
        odds_ratio_loss = -jax.nn.log_sigmoid(_log_odds(chosen_avg) - _log_odds(rejected_avg))
        losses = -chosen_avg + beta * odds_ratio_loss

    if rpo_alpha is not None:
        losses = losses + rpo_alpha * (-policy_chosen_logps / chosen_lengths)

    if loss_type in _REFERENCE_FREE_TYPES:
        chosen_rewards = beta * policy_chosen_logps / chosen_lengths
        rejected_rewards = beta * policy_rejected_logps / rejected_lengths
    else:
        chosen_rewards = beta * chosen_logratios
        rejected_rewards = beta * rejected_logratios
    return losses, jax.lax.stop_gradient(chosen_rewards), jax.lax.stop_gradient(rejected_rewards)


def bradley_terry_loss(
    chosen_rewards: Array,
    rejected_rewards: Array,
    *,
    margin: Array | float | None = None,
    center_coef: float = 0.0,
) -> Array:
    """Pairwise reward-model loss, per example.

    `loss = −logσ(r_c − r_r − m) + λ·(r_c + r_r)²`

    - Bradley–Terry negative log-likelihood: Ouyang et al. 2022 (InstructGPT), eq. 1.
    - Margin `m` per pair (e.g. graded preference strength): Touvron et al. 2023 (Llama 2), eq. 2.
    - Centering `λ·(r_c + r_r)²` pins the reward's free offset near 0: Eisenstein et al. 2023
      ("Helping or Herding?"), `center_coef` = λ.

    Args:
      chosen_rewards: `[B]` scalar rewards of the chosen responses.
      rejected_rewards: `[B]` scalar rewards of the rejected responses.
      margin: `[B]` or scalar margin m; `None` means 0.
      center_coef: λ ≥ 0.

    Returns:
      `[B]` losses.
    """
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    return -jax.nn.log_sigmoid(logits) + center_coef * (chosen_rewards + rejected_rewards) ** 2


def preference_metrics(chosen_rewards: Array, rejected_rewards: Array) -> dict[str, Array]:
    """Per-example preference metrics; the trainer sums/averages them once.

    Returns:
      `accuracy`: `[B]` float, `1[r_c > r_r]` (ties count as wrong);
      `margin`: `[B]`, `r_c − r_r`.
    """
    margin = chosen_rewards - rejected_rewards
    return {"accuracy": (margin > 0).astype(jnp.float32), "margin": margin}
