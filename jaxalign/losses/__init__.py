"""Loss functions: pairwise preference losses (DPO family, Bradley–Terry) and PPO losses."""

from jaxalign.losses.policy_gradient import (
    KL_ESTIMATORS,
    entropy_from_logits,
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
    "KL_ESTIMATORS",
    "bradley_terry_loss",
    "dpo_loss",
    "entropy_from_logits",
    "kl_penalty",
    "ppo_policy_loss",
    "ppo_value_loss",
    "preference_metrics",
]
