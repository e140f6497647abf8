"""A deterministic, resumable, process-sharded batch iterator over tokenised examples."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


class BatchIterator:
    """Yields this process's slice of each global batch, epoch after epoch.

    Epoch e visits the examples in `np.random.default_rng([seed, e]).permutation(n)` order (dataset
    order when `shuffle=False`), so the order depends only on `(seed, epoch)`: every process
    computes the same global batch and takes rows `[i * B / P, (i + 1) * B / P)` of it, where
    `B = batch_size` is the global batch, `i = process_index`, `P = process_count`.

    `state_dict()` (`{"epoch", "position", "seed"}`, position = batches already taken in this
    epoch) restored with `load_state_dict` continues with exactly the batches an uninterrupted run
    would have seen.

    With `drop_last=False` the last batch of an epoch is smaller (the remainder); across processes
    the remainder must split evenly, which is checked at construction.

    Attributes:
      last_batch_indices: dataset indices of the rows of the batch just yielded (process-local),
        e.g. to look up prompt texts, which batches do not carry.
      source_stats: the dataset's row counts (read, kept, skipped, dropped, truncated), when the
        caller sets them, for the start-up summary.
      num_examples: examples per epoch.
    """

    def __init__(
        self,
        examples: Sequence[Any],
        *,
        batch_size: int,
        collate: Callable[[list[Any]], Batch],
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        num_epochs: int | None = None,
    ):
        """Args as in the class docstring; `num_epochs=None` iterates forever."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise ValueError(
                f"process_index {process_index} not in [0, process_count={process_count})"
            )
        if batch_size % process_count:
            raise ValueError(
                f"global batch_size {batch_size} is not divisible by process_count {process_count}; "
                f"each process needs batch_size / process_count rows"
            )
        if not examples:
            raise ValueError("no examples to iterate over")
        remainder = len(examples) % batch_size
        if not drop_last and remainder % process_count:
            raise ValueError(
                f"drop_last=False leaves a last batch of {remainder} rows, which does not split "
                f"over {process_count} processes; use drop_last=True or a divisible dataset size"
            )
        if len(examples) < batch_size and drop_last:
            raise ValueError(f"{len(examples)} examples cannot fill one batch of {batch_size}")
        self.examples = examples
        self.batch_size = batch_size
        self.collate = collate
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.process_index = process_index
        self.process_count = process_count
        self.num_epochs = num_epochs
        self.epoch = 0
        self.position = 0
        self.last_batch_indices: np.ndarray = np.zeros((0,), np.int64)
        # The dataset's row counts (`TokenizedDataset.stats`), if the caller records them.
        self.source_stats: dict[str, Any] | None = None
        self._order_epoch: int | None = None
        self._order = np.zeros((0,), np.int64)

    @property
    def batches_per_epoch(self) -> int:
        full, remainder = divmod(len(self.examples), self.batch_size)
        return full if self.drop_last or not remainder else full + 1

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.examples)
            self._order = (
                np.random.default_rng([self.seed, epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        order = self._epoch_order(self.epoch)
        global_rows = order[self.position * self.batch_size : (self.position + 1) * self.batch_size]
        per_process = len(global_rows) // self.process_count
        local_rows = global_rows[
            self.process_index * per_process : (self.process_index + 1) * per_process
        ]
        self.position += 1
        self.last_batch_indices = local_rows
        if self.process_count == 1:
            return self.collate([self.examples[i] for i in local_rows])
        # Collate the global batch so every process pads to the same bucket, then keep our rows.
        global_batch = self.collate([self.examples[i] for i in global_rows])
        start = self.process_index * per_process
        return {name: value[start : start + per_process] for name, value in global_batch.items()}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restores a `state_dict()`; the saved seed wins so the batch order is the saved one."""
        if int(state["seed"]) != self.seed:
            logger.warning(
                "resuming data order with the checkpoint's seed %s, not the configured %s",
                state["seed"],
                self.seed,
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order_epoch = None
