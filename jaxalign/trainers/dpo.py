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
from jax.experimental import multihost_utils

from jaxalign import sharding as shd
from jaxalign.data import BatchIterator
from jaxalign.losses import dpo_loss
from jaxalign.models import Transformer
from jaxalign.models.moe import router_loss_terms
from jaxalign.trainers import common, engine
from jaxalign.trainers.pairwise import flat_pairs, pair_weights, response_logps
from jaxalign.trainers.setup import load_reference, setup_run

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


def dpo_loss_fn(
    model: Transformer,
    dpo_cfg: ml_collections.ConfigDict,
    *,
    chunk_size: int | None,
    reference_model: Any = None,
):
    """Per-pair DPO-family loss; the reference log-probs come from the batch or the frozen params
    run through `reference_model` (default: `model`; with LoRA, the base with adapters off)."""
    reference_model = model if reference_model is None else reference_model
    variant_kwargs = dpo_variant_kwargs(dpo_cfg)
    use_reference = needs_reference_model(dpo_cfg)

    def loss_fn(params, batch, ref_params, rng):
        del rng
        chosen, rejected, chosen_len, rejected_len, chosen_logits, rejected_logits, router_stats = (
            response_logps(
                model,
                params,
                batch,
                chunk_size=chunk_size,
                return_router_stats=True,
                with_mean_logits=True,
            )
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
                reference_model, jax.lax.stop_gradient(ref_params), batch, chunk_size=chunk_size
            )
        # Per pair, [P]: one per row, or K slots per packed row of which `weights` marks the real.
        weights = pair_weights(batch)
        chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected = flat_pairs(
            chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected
        )
        # An empty slot gets a stand-in pair (log-prob -1 over 1 token) that no loss type divides
        # by zero on or takes the log of 0 for; its weight 0 then drops it, gradient included.
        real = weights > 0
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            jnp.where(real, chosen, -1.0),
            jnp.where(real, rejected, -1.0),
            ref_chosen,
            ref_rejected,
            beta=dpo_cfg.beta,
            loss_type=dpo_cfg.loss_type,
            label_smoothing=dpo_cfg.label_smoothing,
            chosen_lengths=jnp.where(real, chosen_len, 1.0),
            rejected_lengths=jnp.where(real, rejected_len, 1.0),
            **variant_kwargs,
        )
        metrics = {
            "rewards/chosen": (chosen_rewards * weights).sum(),
            "rewards/rejected": (rejected_rewards * weights).sum(),
            "rewards/accuracies": ((chosen_rewards > rejected_rewards) * weights).sum(),
            "rewards/margins": ((chosen_rewards - rejected_rewards) * weights).sum(),
            "logps/chosen": chosen.sum(),  # 0 on empty slots
            "logps/rejected": rejected.sum(),
        }
        num_pairs = weights.sum()
        router_loss, router_metrics = router_loss_terms(model.config, router_stats, num_pairs)
        metrics.update(router_metrics)
        # TRL's logits/chosen, logits/rejected: mean logit over response tokens and vocabulary.
        weighted = {
            "logits/chosen": (chosen_logits.sum(), chosen_len.sum()),
            "logits/rejected": (rejected_logits.sum(), rejected_len.sum()),
        }
        aux = {"denominator": num_pairs, "metrics": metrics, "weighted": weighted}
        return (losses * weights).sum() + router_loss, aux

    return loss_fn


def precompute_reference_logps(
    model: Transformer,
    ref_params: Any,
    dataset: Any,
    mesh: Any,
    *,
    batch_size: int,
    chunk_size: int | None,
    rules: Any = None,
) -> None:
    """Adds `reference_chosen_logps`/`reference_rejected_logps` to every example, in one pass.

    `batch_size` is global: each process feeds its slice of every batch, and every process gets
    every example's values (any process may draw any example in a later epoch). With `rules`
    (`config.mesh.logical_rules`) the forward runs in `sharding.activation_context`, as training
    steps do.
    """
    logps_fn = jax.jit(lambda p, b: response_logps(model, p, b, chunk_size=chunk_size)[:2])
    if rules is not None:
        logps_fn = shd.in_activation_context(logps_fn, mesh, rules)
    # Full batches only: the last one is filled up with the last example (written twice), so
    # every batch splits over the processes and the mesh and reuses one compilation.
    num_examples = len(dataset.examples)
    filler = [dataset.examples[-1]] * (-num_examples % batch_size)
    iterator = BatchIterator(
        dataset.examples + filler,
        batch_size=batch_size,
        collate=dataset.collate,
        seed=0,
        shuffle=False,
        num_epochs=1,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    for batch in iterator:
        indices = np.minimum(iterator.last_batch_indices, num_examples - 1)
        logps = shd.local_rows(logps_fn(ref_params, shd.shard_batch(batch, mesh)), mesh)
        if jax.process_count() > 1:
            indices, *logps = multihost_utils.process_allgather((indices, *logps))
        indices = np.ravel(indices)
        # [rows, 1] for one pair per row, [rows, K] for packed rows (their first k slots are real).
        chosen, rejected = (np.reshape(x, (indices.size, -1)) for x in logps)
        for index, row_chosen, row_rejected in zip(indices, chosen, rejected, strict=True):
            example = dataset.examples[index]
            if "pair_lengths" in example:
                num_pairs = len(example["pair_lengths"])
                example["reference_chosen_logps"] = row_chosen[:num_pairs].astype(np.float32)
                example["reference_rejected_logps"] = row_rejected[:num_pairs].astype(np.float32)
            else:
                example["reference_chosen_logps"] = np.float32(row_chosen[0])
                example["reference_rejected_logps"] = np.float32(row_rejected[0])


def train(config: ml_collections.ConfigDict, workdir: Path) -> engine.RunResult:
    dpo_cfg = config.dpo
    setup = setup_run(config)
    train_data, eval_data = common.preference_datasets(
        config, setup.tokenizer, share_prompt=dpo_cfg.share_prompt
    )
    chunk_size = config.model.logits_chunk_size or None
    ref_params = None
    if needs_reference_model(dpo_cfg):
        ref_params = load_reference(config, setup, dpo_cfg.reference_name_or_path)
        if dpo_cfg.precompute_reference:
            for data in (train_data, eval_data):
                if data is not None:
                    precompute_reference_logps(
                        setup.reference_model,
                        ref_params,
                        data,
                        setup.mesh,
                        # the step's microbatch: the most rows one forward is known to fit
                        batch_size=config.train.batch_size // config.optimizer.grad_accum_steps,
                        chunk_size=chunk_size,
                        rules=config.mesh.logical_rules,
                    )
            ref_params = None  # training now holds one model
    return engine.train_offline(
        config,
        workdir,
        setup,
        loss_fn=dpo_loss_fn(
            setup.model, dpo_cfg, chunk_size=chunk_size, reference_model=setup.reference_model
        ),
        train_data=train_data,
        eval_data=eval_data,
        frozen=ref_params,
        frozen_shardings=None if ref_params is None else setup.reference_shardings,
        tokens_per_batch=common.pair_tokens,
    )
