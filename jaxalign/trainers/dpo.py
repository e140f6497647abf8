"""Direct Preference Optimisation (Rafailov et al. 2023) and its variants on the shared engine.

The reference is the same module with a second, frozen params tree (sharded like the policy), or
its log-probs are precomputed once over the dataset (`dpo.precompute_reference`) so training holds
one model in memory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxalign import sharding as shd
from jaxalign.data import BatchIterator
from jaxalign.losses import dpo_loss
from jaxalign.models import Transformer
from jaxalign.optim import make_optimizer
from jaxalign.trainers import common, engine
from jaxalign.trainers.pairwise import response_logps
from jaxalign.trainers.reward import pair_tokens, preference_datasets

logger = logging.getLogger(__name__)

REFERENCE_FREE_TYPES = ("simpo", "orpo")


def dpo_variant_kwargs(dpo_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if dpo_cfg.reference_free:
        kwargs["reference_free"] = True
    if dpo_cfg.rpo_alpha:
        kwargs["rpo_alpha"] = dpo_cfg.rpo_alpha
    if dpo_cfg.loss_type == "simpo":
        kwargs["simpo_gamma"] = dpo_cfg.simpo_gamma
    return kwargs


def needs_reference_model(dpo_cfg: ml_collections.ConfigDict) -> bool:
    return not (dpo_cfg.reference_free or dpo_cfg.loss_type in REFERENCE_FREE_TYPES)


def dpo_loss_fn(model: Transformer, dpo_cfg: ml_collections.ConfigDict, *, chunk_size: int | None):
    """Per-pair DPO-family loss; the reference log-probs come from the batch or the frozen params."""
    variant_kwargs = dpo_variant_kwargs(dpo_cfg)
    use_reference = needs_reference_model(dpo_cfg)

    def loss_fn(params, batch, ref_params, rng):
        del rng
        chosen, rejected, chosen_len, rejected_len = response_logps(
            model, params, batch, chunk_size=chunk_size
        )
        if not use_reference:
            ref_chosen = ref_rejected = jnp.zeros_like(chosen)
        elif "reference_chosen_logps" in batch:
            ref_chosen, ref_rejected = (
                batch["reference_chosen_logps"],
                batch["reference_rejected_logps"],
            )
        else:
            ref_chosen, ref_rejected, _, _ = response_logps(
                model, jax.lax.stop_gradient(ref_params), batch, chunk_size=chunk_size
            )
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=dpo_cfg.beta,
            loss_type=dpo_cfg.loss_type,
            label_smoothing=dpo_cfg.label_smoothing,
            chosen_lengths=chosen_len,
            rejected_lengths=rejected_len,
            **variant_kwargs,
        )
        metrics = {
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32).sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": chosen.sum(),
            "logps/rejected": rejected.sum(),
        }
        return losses.sum(), {"denominator": jnp.float32(chosen.shape[0]), "metrics": metrics}

    return loss_fn


def precompute_reference_logps(
    model: Transformer,
    ref_params: Any,
    dataset: Any,
    mesh: Any,
    *,
    batch_size: int,
    chunk_size: int | None,
) -> None:
    """Adds `reference_chosen_logps`/`reference_rejected_logps` to every example, in one pass."""
    logps_fn = jax.jit(lambda p, b: response_logps(model, p, b, chunk_size=chunk_size)[:2])
    iterator = BatchIterator(
        dataset.examples,
        batch_size=batch_size,
        collate=dataset.collate,
        seed=0,
        shuffle=False,
        drop_last=False,
        num_epochs=1,
    )
    for batch in iterator:
        indices = iterator.last_batch_indices
        rows = len(indices)
        pad = batch_size - rows
        if pad:  # a short last batch repeats its last row up to the full batch (dropped below):
            # it splits over the mesh and reuses the full batch's compilation.
            batch = {
                k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in batch.items()
            }
        chosen, rejected = jax.device_get(logps_fn(ref_params, shd.shard_batch(batch, mesh)))
        for row, index in enumerate(indices):
            dataset.examples[index]["reference_chosen_logps"] = np.float32(chosen[row])
            dataset.examples[index]["reference_rejected_logps"] = np.float32(rejected[row])


def train(config: ml_collections.ConfigDict, workdir: Path) -> engine.RunResult:
    mesh = engine.make_mesh(config.mesh)
    rules = config.mesh.logical_rules
    dpo_cfg = config.dpo
    model, params, param_shardings = engine.load_model(
        config.model, mesh, rules, name_or_path=config.model.name_or_path, seed=config.seed
    )
    tokenizer = engine.load_run_tokenizer(config, model)
    model = engine.with_special_tokens(model, tokenizer)
    train_data, eval_data = preference_datasets(
        config, tokenizer, share_prompt=dpo_cfg.share_prompt
    )
    chunk_size = config.model.logits_chunk_size or None

    ref_params = None
    if needs_reference_model(dpo_cfg):
        if dpo_cfg.reference_name_or_path:
            _, ref_params, _ = engine.load_model(
                config.model,
                mesh,
                rules,
                name_or_path=dpo_cfg.reference_name_or_path,
                seed=config.seed,
            )
        else:  # the policy's initial weights; a copy, since the train step donates the state
            ref_params = jax.tree.map(jnp.copy, params)
        if dpo_cfg.precompute_reference:
            for data in (train_data, eval_data):
                if data is not None:
                    precompute_reference_logps(
                        model,
                        ref_params,
                        data,
                        mesh,
                        # the step's microbatch: the most rows one forward is known to fit
                        batch_size=config.train.batch_size // config.optimizer.grad_accum_steps,
                        chunk_size=chunk_size,
                    )
            ref_params = None  # training now holds one model

    tx, schedule = make_optimizer(config.optimizer, total_steps=config.train.num_steps)
    state, state_shardings = engine.create_train_state(
        params, param_shardings, model, tx, mesh, rules, seed=config.seed
    )
    loss_fn = dpo_loss_fn(model, dpo_cfg, chunk_size=chunk_size)
    step = engine.make_train_step(
        loss_fn, tx, grad_accum_steps=config.optimizer.grad_accum_steps, schedule=schedule
    )
    frozen_shardings = param_shardings if ref_params is not None else None
    return engine.run_training(
        config=config,
        workdir=workdir,
        mesh=mesh,
        state=state,
        state_shardings=state_shardings,
        train_step=engine.jit_train_step(step, state_shardings, mesh, frozen_shardings),
        frozen=ref_params,
        train_iterator=common.train_iterator(train_data, config),
        eval_step=jax.jit(engine.make_eval_step(loss_fn)),
        eval_batches=common.eval_batches_fn(eval_data, config),
        tokens_per_batch=pair_tokens,
        export=common.exporter(model, tokenizer),
    )
