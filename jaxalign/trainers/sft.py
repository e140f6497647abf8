"""Supervised fine-tuning: maximise log π(completion | prompt) on completion tokens only."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import ml_collections

from jaxalign.data import build_sft_dataset
from jaxalign.models import Transformer, sequence_token_logprobs
from jaxalign.optim import make_optimizer
from jaxalign.trainers import common, engine

logger = logging.getLogger(__name__)


def sft_loss_fn(model: Transformer, *, chunk_size: int | None):
    """Σ_t −log π(x_t | x_<t)·loss_mask_t, with denominator Σ loss_mask (mean token NLL)."""

    def loss_fn(params, batch, frozen, rng):
        del frozen, rng
        logprobs, _ = sequence_token_logprobs(
            model,
            params,
            batch["input_ids"],
            batch["attention_mask"],
            batch["positions"],
            chunk_size=chunk_size,
            with_entropy=False,
        )
        mask = batch["loss_mask"]
        tokens = mask.sum()
        return -(logprobs * mask).sum(), {
            "denominator": tokens,
            "metrics": {},
            "counts": {"tokens": tokens},
        }

    return loss_fn


def train(config: ml_collections.ConfigDict, workdir: Path) -> engine.RunResult:
    mesh = engine.make_mesh(config.mesh)
    rules = config.mesh.logical_rules
    model, params, param_shardings = engine.load_model(
        config.model, mesh, rules, name_or_path=config.model.name_or_path, seed=config.seed
    )
    tokenizer = engine.load_run_tokenizer(config, model)
    model = engine.with_special_tokens(model, tokenizer)

    def dataset(spec: str, split: str):
        return build_sft_dataset(
            common.data_source(spec),
            tokenizer,
            max_length=config.data.max_length,
            split=split,
            on_bad_row=config.data.on_bad_row,
            pack=config.data.pack,
            buckets=tuple(config.data.buckets),
        )

    train_data = dataset(config.data.train, config.data.train_split)
    logger.info("SFT data: %s", train_data.stats)
    eval_data = dataset(config.data.eval, config.data.eval_split) if config.data.eval else None

    tx, schedule = make_optimizer(config.optimizer, total_steps=config.train.num_steps)
    state, state_shardings = engine.create_train_state(
        params, param_shardings, model, tx, mesh, rules, seed=config.seed
    )
    loss_fn = sft_loss_fn(model, chunk_size=config.model.logits_chunk_size or None)
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
        tokens_per_batch=lambda b: int((b["attention_mask"] != 0).sum()),
        export=common.exporter(model, tokenizer),
    )
