"""Data setup shared by the trainers: sources, datasets, iterators, eval batches, export."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxalign.data import BatchIterator, build_preference_dataset, build_prompt_dataset
from jaxalign.models import Transformer, save_pretrained

logger = logging.getLogger(__name__)


def data_source(spec: str) -> str | list[str]:
    """`data.train`/`data.eval`: one path or hub name, or several comma-separated files."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else parts


def train_iterator(dataset: Any, config: ml_collections.ConfigDict) -> BatchIterator:
    if len(dataset.examples) < config.train.batch_size:
        raise ValueError(
            f"data.train has {len(dataset.examples)} usable examples, fewer than "
            f"train.batch_size={config.train.batch_size}"
        )
    return BatchIterator(
        dataset.examples,
        batch_size=config.train.batch_size,
        collate=dataset.collate,
        seed=config.seed,
        shuffle=config.data.shuffle,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def eval_batches_fn(dataset: Any, config: ml_collections.ConfigDict):
    """A function returning a fresh iterator over the first `train.eval_batches` eval batches.

    Evaluation runs in the training *microbatch* size (`train.batch_size / grad_accum_steps` rows,
    the most one forward is known to fit), `train.eval_batches × grad_accum_steps` of them: the same
    rows as `train.eval_batches` full batches, without the memory of one.
    """
    if dataset is None:
        return None
    accum = config.optimizer.grad_accum_steps
    batch_size = min(config.train.batch_size // accum, len(dataset.examples))
    batch_size -= batch_size % (jax.device_count() // _model_parallel(config))
    num_batches = config.train.eval_batches * accum
    if batch_size < 1:
        raise ValueError(
            f"data.eval has {len(dataset.examples)} usable examples, fewer than one per "
            f"data-parallel device"
        )

    def batches() -> Iterator[dict[str, np.ndarray]]:
        iterator = BatchIterator(
            dataset.examples,
            batch_size=batch_size,
            collate=dataset.collate,
            seed=0,
            shuffle=False,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_epochs=1,
        )
        for i, batch in enumerate(iterator):
            if i >= num_batches:
                break
            yield batch

    return batches


def preference_datasets(
    config: ml_collections.ConfigDict, tokenizer: Any, *, share_prompt: bool = False
) -> tuple[Any, Any]:
    """Train and (optional) eval preference datasets; `share_prompt`: one row per pair."""

    def dataset(spec: str, split: str):
        return build_preference_dataset(
            data_source(spec),
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


def prompt_dataset(config: ml_collections.ConfigDict, tokenizer: Any) -> Any:
    """The prompts online RL samples from (`data.train`), with their rows for reward functions."""
    prompts = build_prompt_dataset(
        data_source(config.data.train),
        tokenizer,
        max_prompt_length=config.data.max_prompt_length,
        split=config.data.train_split,
        on_bad_row=config.data.on_bad_row,
        buckets=tuple(config.data.buckets),
    )
    logger.info("prompts: %s", prompts.stats)
    return prompts


def pair_tokens(batch: dict[str, np.ndarray]) -> int:
    """Tokens the step runs: both rows of each pair, or one shared-prompt row."""
    if "branch_ids" in batch:
        return int((batch["attention_mask"] != 0).sum())
    return int(
        (batch["chosen_attention_mask"] != 0).sum() + (batch["rejected_attention_mask"] != 0).sum()
    )


def _model_parallel(config: ml_collections.ConfigDict) -> int:
    from jaxalign.config import mesh_axis_sizes

    axes = mesh_axis_sizes(config.mesh, jax.device_count())
    return jax.device_count() // (axes["data"] * axes["fsdp"])


def exporter(model: Transformer, tokenizer: Any):
    """`(params, out_dir) -> None`: a Hugging Face model directory with the tokenizer beside it."""

    def export(params: Any, out_dir: Path) -> None:
        save_pretrained(model, params, out_dir)
        if jax.process_index() == 0:
            tokenizer.save_pretrained(str(out_dir))

    return export
