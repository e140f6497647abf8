"""Loss functions: pairwise preference losses (DPO family, Bradley–Terry), PPO and GRPO-family
policy losses."""

from jaxalign.losses.policy_gradient import (
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    KL_ESTIMATORS,
    GRPOLossOutput,
    entropy_from_logits,
    grpo_policy_loss,
    kl_penalty,
    ppo_policy_loss,
    ppo_value_loss,
)
from jaxalign.losses.preference import (
    DPO_LOSS_TYPES,
    DPO_VARIANT_KWARGS,
    bradley_terry_loss,
    dpo_loss,
    preference_metrics,
)

__all__ = [
    "DPO_LOSS_TYPES",
    "DPO_VARIANT_KWARGS",
    "GRPO_LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "KL_ESTIMATORS",
    "GRPOLossOutput",
    "bradley_terry_loss",
    "dpo_loss",
    "entropy_from_logits",
    "grpo_policy_loss",
    "kl_penalty",
    "ppo_policy_loss",
    "ppo_value_loss",
    "preference_metrics",
]
