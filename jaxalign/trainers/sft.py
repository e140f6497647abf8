"""Supervised fine-tuning: maximise log π(completion | prompt) on completion tokens only."""

from __future__ import annotations

import logging
from pathlib import Path

import ml_collections

from jaxalign.data import build_sft_dataset
from jaxalign.models import Transformer, sequence_token_logprobs
from jaxalign.trainers import common, engine
from jaxalign.trainers.setup import setup_run

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
    setup = setup_run(config)

    def dataset(spec: str, split: str):
        return build_sft_dataset(
            common.data_source(spec),
            setup.tokenizer,
            max_length=config.data.max_length,
            split=split,
            on_bad_row=config.data.on_bad_row,
            pack=config.data.pack,
            buckets=tuple(config.data.buckets),
        )

    train_data = dataset(config.data.train, config.data.train_split)
    logger.info("SFT data: %s", train_data.stats)
    eval_data = dataset(config.data.eval, config.data.eval_split) if config.data.eval else None
    return engine.train_offline(
        config,
        workdir,
        setup,
        loss_fn=sft_loss_fn(setup.model, chunk_size=config.model.logits_chunk_size or None),
        train_data=train_data,
        eval_data=eval_data,
        tokens_per_batch=lambda b: int((b["attention_mask"] != 0).sum()),
    )
