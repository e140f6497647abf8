"""Data setup shared by the trainers: sources, datasets, iterators, eval batches, export."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxalign import hub
from jaxalign.data import BatchIterator, build_preference_dataset, build_prompt_dataset
from jaxalign.data.batching import pack_preference_pairs, padding_fraction
from jaxalign.data.sources import HubDataset
from jaxalign.models import Transformer, save_pretrained

logger = logging.getLogger(__name__)


def data_source(spec: str, data_cfg: ml_collections.ConfigDict | None = None) -> Any:
    """`data.train`/`data.eval`: one path or hub name, or several comma-separated ones.

    A name that is not a local path is a hub dataset, read with `data.subset`, `data.data_files`
    and `data.revision` when `data_cfg` (`config.data`) is given.
    """
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if data_cfg is not None:
        hub_options = dict(
            subset=data_cfg.subset, data_files=data_cfg.data_files, revision=data_cfg.revision
        )
        parts = [p if os.path.exists(p) else HubDataset(p, **hub_options) for p in parts]
    return parts[0] if len(parts) == 1 else parts


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full global batches in one pass over the examples (the iterator drops the remainder)."""
    return max(num_examples // batch_size, 1)


def resolve_num_steps(config: ml_collections.ConfigDict, num_examples: int) -> None:
    """With `train.num_epochs > 0`, sets `train.num_steps` to that many passes over the data."""
    if config.train.num_epochs > 0:
        per_epoch = steps_per_epoch(num_examples, config.train.batch_size)
        config.train.num_steps = max(1, math.ceil(config.train.num_epochs * per_epoch))
        logger.info(
            "train.num_epochs=%g: %d steps (%d per epoch)",
            config.train.num_epochs,
            config.train.num_steps,
            per_epoch,
        )


def train_iterator(dataset: Any, config: ml_collections.ConfigDict) -> BatchIterator:
    if len(dataset.examples) < config.train.batch_size:
        raise ValueError(
            f"data.train has {len(dataset.examples)} usable examples, fewer than "
            f"train.batch_size={config.train.batch_size}"
        )
    iterator = BatchIterator(
        dataset.examples,
        batch_size=config.train.batch_size,
        collate=dataset.collate,
        seed=config.seed,
        shuffle=config.data.shuffle,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    iterator.source_stats = dataset.stats  # for the engine's start-up summary
    return iterator


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

    def dataset(spec: str, split: str, *, report: bool = False):
        pairs = build_preference_dataset(
            data_source(spec, config.data),
            tokenizer,
            max_length=config.data.max_length,
            max_prompt_length=config.data.max_prompt_length,
            split=split,
            on_bad_row=config.data.on_bad_row,
            on_long_row=config.data.on_long_row,
            buckets=tuple(config.data.buckets),
            share_prompt=share_prompt,
            algorithm=config.algorithm,
        )
        if not config.data.pack:
            return pairs
        packed = packed_preference_dataset(
            pairs, max_pairs=config.data.max_pairs_per_row, shared=share_prompt
        )
        if report:
            logger.info(
                "%s",
                packing_report(
                    pairs, packed, batch_size=config.train.batch_size, shared=share_prompt
                ),
            )
        return packed

    train_data = dataset(config.data.train, config.data.train_split, report=True)
    logger.debug("preference data: %s", train_data.stats)
    eval_data = dataset(config.data.eval, config.data.eval_split) if config.data.eval else None
    return train_data, eval_data


def packed_preference_dataset(data: Any, *, max_pairs: int, shared: bool) -> Any:
    """`data` (a preference `TokenizedDataset`) with its pairs packed into rows of its longest
    bucket, at most `max_pairs` to a row (`pack_preference_pairs`); its collate adds the per-pair
    slots. `stats["examples"]` counts rows; `stats["pairs"]` the pairs."""
    examples = pack_preference_pairs(
        data.examples, length=data.buckets.max_length, max_pairs=max_pairs, shared=shared
    )
    return dataclasses.replace(
        data,
        examples=examples,
        stats={**data.stats, "examples": len(examples), "pairs": len(data.examples)},
        collate=functools.partial(data.collate, max_pairs=max_pairs),
    )


def packing_report(pairs: Any, packed: Any, *, batch_size: int, shared: bool) -> str:
    """One line: pairs per packed row and the padding share of the batches' token slots (at
    `batch_size` rows per batch), one pair per row and packed (`padding_fraction`)."""
    before, after = (
        padding_fraction(data.examples, buckets=data.buckets, batch_size=batch_size, shared=shared)
        for data in (pairs, packed)
    )
    return (
        f"preference packing: {len(pairs.examples)} pairs -> {len(packed.examples)} rows of <= "
        f"{packed.buckets.max_length} tokens ({len(pairs.examples) / len(packed.examples):.2f} "
        f"pairs per row); padding {before:.1%} of the token slots one pair per row, {after:.1%} "
        f"packed (batches of {batch_size})"
    )


def prompt_dataset(config: ml_collections.ConfigDict, tokenizer: Any) -> Any:
    """The prompts online RL samples from (`data.train`), with their rows for reward functions."""
    prompts = build_prompt_dataset(
        data_source(config.data.train, config.data),
        tokenizer,
        max_prompt_length=config.data.max_prompt_length,
        split=config.data.train_split,
        on_bad_row=config.data.on_bad_row,
        on_long_row=config.data.on_long_row,
        buckets=tuple(config.data.buckets),
        algorithm=config.algorithm,
    )
    logger.debug("prompts: %s", prompts.stats)
    # Online trainers build their optimizer after this: num_epochs resolves in time.
    resolve_num_steps(config, len(prompts.examples))
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


def exporter(model: Transformer, tokenizer: Any, config: ml_collections.ConfigDict | None = None):
    """`(params, out_dir) -> None`: a Hugging Face model directory with the tokenizer and a
    generated model card (`README.md`, from `config` when given) beside it. The engine rewrites the
    card with the final metrics once training ends."""

    def export(params: Any, out_dir: Path) -> None:
        save_pretrained(model, params, out_dir)
        if jax.process_index() == 0:
            tokenizer.save_pretrained(str(out_dir))
            card_config = json.loads(config.to_json_best_effort()) if config is not None else {}
            hub.write_model_card(out_dir, card_config)

    return export
