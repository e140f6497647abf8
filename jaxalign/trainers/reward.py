"""Reward model: a scalar head trained on preference pairs with the Bradley–Terry loss."""

from __future__ import annotations

import logging
from pathlib import Path

import ml_collections

from jaxalign.losses import bradley_terry_loss
from jaxalign.models import Transformer
from jaxalign.models.moe import router_loss_terms
from jaxalign.trainers import common, engine
from jaxalign.trainers.pairwise import flat_pairs, pair_rewards, pair_weights
from jaxalign.trainers.setup import setup_run

logger = logging.getLogger(__name__)


def reward_loss_fn(model: Transformer, *, margin: float, center_coef: float):
    """Σ_pairs −log σ(r_c − r_r − m) + λ(r_c + r_r)² (Ouyang et al. 2022 eq. 1), per pair."""

    def loss_fn(params, batch, frozen, rng):
        del frozen, rng
        chosen, rejected, router_stats = pair_rewards(
            model, params, batch, return_router_stats=True
        )
        # Per pair, [P]: one per row, or K slots per packed row of which `weights` marks the real.
        weights = pair_weights(batch)
        chosen, rejected = flat_pairs(chosen, rejected)
        losses = bradley_terry_loss(
            chosen, rejected, margin=margin or None, center_coef=center_coef
        )
        metrics = {
            "accuracy": ((chosen > rejected) * weights).sum(),
            "margin": ((chosen - rejected) * weights).sum(),
            "chosen_reward": (chosen * weights).sum(),
            "rejected_reward": (rejected * weights).sum(),
        }
        num_pairs = weights.sum()
        router_loss, router_metrics = router_loss_terms(model.config, router_stats, num_pairs)
        metrics.update(router_metrics)
        aux = {"denominator": num_pairs, "metrics": metrics}
        return (losses * weights).sum() + router_loss, aux

    return loss_fn


def train(config: ml_collections.ConfigDict, workdir: Path) -> engine.RunResult:
    setup = setup_run(config, head="scalar")
    train_data, eval_data = common.preference_datasets(config, setup.tokenizer)
    loss_fn = reward_loss_fn(
        setup.model, margin=config.reward.margin, center_coef=config.reward.center_coef
    )
    return engine.train_offline(
        config,
        workdir,
        setup,
        loss_fn=loss_fn,
        train_data=train_data,
        eval_data=eval_data,
        tokens_per_batch=common.pair_tokens,
    )
