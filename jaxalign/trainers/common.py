"""Setup shared by the SFT, reward and DPO trainers: data sources, iterators, export."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxalign.data import BatchIterator
from jaxalign.models import Transformer, save_pretrained


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
    """A function returning a fresh iterator over the first `train.eval_batches` eval batches."""
    if dataset is None:
        return None
    batch_size = min(config.train.batch_size, len(dataset.examples))
    batch_size -= batch_size % (jax.device_count() // _model_parallel(config))

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
            if i >= config.train.eval_batches:
                break
            yield batch

    return batches


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
