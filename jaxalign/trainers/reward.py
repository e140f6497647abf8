"""Reward model: a scalar head trained on preference pairs with the Bradley–Terry loss."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from jaxalign.data import build_preference_dataset
from jaxalign.losses import bradley_terry_loss
from jaxalign.models import Transformer
from jaxalign.optim import make_optimizer
from jaxalign.trainers import common, engine
from jaxalign.trainers.pairwise import pair_rewards

logger = logging.getLogger(__name__)


def reward_loss_fn(model: Transformer, *, margin: float, center_coef: float):
    """Σ_pairs −log σ(r_c − r_r − m) + λ(r_c + r_r)² (Ouyang et al. 2022 eq. 1), per pair."""

    def loss_fn(params, batch, frozen, rng):
        del frozen, rng
        chosen, rejected = pair_rewards(model, params, batch)
        losses = bradley_terry_loss(
            chosen, rejected, margin=margin or None, center_coef=center_coef
        )
        metrics = {
            "accuracy": (chosen > rejected).astype(jnp.float32).sum(),
            "margin": (chosen - rejected).sum(),
            "chosen_reward": chosen.sum(),
            "rejected_reward": rejected.sum(),
        }
        return losses.sum(), {"denominator": jnp.float32(chosen.shape[0]), "metrics": metrics}

    return loss_fn


def preference_datasets(
    config: ml_collections.ConfigDict, tokenizer, *, share_prompt: bool = False
):
    """Train and (optional) eval preference datasets; `share_prompt`: one row per pair."""

    def dataset(spec: str, split: str):
        return build_preference_dataset(
            common.data_source(spec),
            tokenizer,
            max_length=config.data.max_length,
            max_prompt_length=config.data.max_prompt_length,
            split=split,
            on_bad_row=config.data.on_bad_row,
            buckets=tuple(config.data.buckets),
            share_prompt=share_prompt,
        )

    train_data = dataset(config.data.train, config.data.train_split)
    logger.info("preference data: %s", train_data.stats)
    eval_data = dataset(config.data.eval, config.data.eval_split) if config.data.eval else None
    return train_data, eval_data


def pair_tokens(batch) -> int:
    """Tokens the step runs: both rows of each pair, or one shared-prompt row."""
    if "branch_ids" in batch:
        return int((batch["attention_mask"] != 0).sum())
    return int(
        (batch["chosen_attention_mask"] != 0).sum() + (batch["rejected_attention_mask"] != 0).sum()
    )


def train(config: ml_collections.ConfigDict, workdir: Path) -> engine.RunResult:
    mesh = engine.make_mesh(config.mesh)
    rules = config.mesh.logical_rules
    model, params, param_shardings = engine.load_model(
        config.model,
        mesh,
        rules,
        name_or_path=config.model.name_or_path,
        head="scalar",
        seed=config.seed,
    )
    tokenizer = engine.load_run_tokenizer(config, model)
    model = engine.with_special_tokens(model, tokenizer)
    train_data, eval_data = preference_datasets(config, tokenizer)

    tx, schedule = make_optimizer(config.optimizer, total_steps=config.train.num_steps)
    state, state_shardings = engine.create_train_state(
        params, param_shardings, model, tx, mesh, rules, seed=config.seed
    )
    loss_fn = reward_loss_fn(
        model, margin=config.reward.margin, center_coef=config.reward.center_coef
    )
    step = engine.make_train_step(
        loss_fn, tx, grad_accum_steps=config.optimizer.grad_accum_steps, schedule=schedule
    )
    return engine.run_training(
        config=config,
        workdir=workdir,
        mesh=mesh,
        state=state,
        state_shardings=state_shardings,
        train_step=engine.jit_train_step(step, state_shardings, mesh, None),
        frozen=None,
        train_iterator=common.train_iterator(train_data, config),
        eval_step=jax.jit(engine.make_eval_step(loss_fn)),
        eval_batches=common.eval_batches_fn(eval_data, config),
        tokens_per_batch=pair_tokens,
        export=common.exporter(model, tokenizer),
    )
