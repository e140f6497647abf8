"""Fixed-shape numpy batches for jit: bucketed padding, packing, and the batch contracts.

Every batch is a dict of numpy arrays (no strings, no ragged lists); ids, masks and positions are
int32, loss masks float32. Sequence length T is the smallest bucket that fits the longest row, so a
jitted step compiles once per bucket, not once per batch.

SFT batch (right padded)::

  input_ids      int32   [B, T]
  attention_mask int32   [B, T]  segment ids: 1 on every real token of an unpacked row, 1..k for
                                 the k examples of a packed row, 0 on padding
  positions      int32   [B, T]  0.. per segment (restarts in packed rows), 0 on padding
  loss_mask      float32 [B, T]  1 where token t is a target predicted from t-1: the trainer
                                 scores input_ids[:, 1:] with logits[:, :-1] weighted by
                                 loss_mask[:, 1:]

Preference batch (right padded, one T for chosen and rejected so they concatenate into 2B)::

  chosen_input_ids, chosen_attention_mask, chosen_positions       int32   [B, T]
  chosen_loss_mask                                                float32 [B, T]
  rejected_input_ids, rejected_attention_mask, rejected_positions int32   [B, T]
  rejected_loss_mask                                              float32 [B, T]
  reference_chosen_logps, reference_rejected_logps                float32 [B]  (only if the
                                                                  dataset carries them)

Shared-prompt preference batch (right padded; the prompt once per pair)::

  input_ids, attention_mask, positions   int32   [B, T]  prompt + chosen + rejected; positions
                                                         restart after the prompt for rejected
  branch_ids                             int32   [B, T]  0 prompt (and padding), 1 chosen,
                                                         2 rejected: rejected does not see chosen
  chosen_loss_mask, rejected_loss_mask   float32 [B, T]  1 on that response's tokens
  reference_chosen_logps, reference_rejected_logps  (as above, optional)

Prompt batch (left padded, so generation appends on the right)::

  prompt_input_ids, prompt_attention_mask, prompt_positions       int32   [B, P]
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_BUCKETS: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)

Example = dict[str, Any]
Batch = dict[str, np.ndarray]


class Buckets:
    """The padded lengths batches may take: `lengths` below `max_length`, plus `max_length`.

    `fit(n)` is the smallest of them >= n; the first use of each length is logged once, so the
    log shows which shapes a run compiles for.
    """

    def __init__(self, lengths: Sequence[int], *, max_length: int, name: str = "data"):
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.lengths: tuple[int, ...] = tuple(
            sorted({int(n) for n in lengths if 0 < n < max_length} | {max_length})
        )
        self.max_length = max_length
        self.name = name
        self._used: set[int] = set()

    def fit(self, length: int) -> int:
        index = bisect.bisect_left(self.lengths, length)
        if index == len(self.lengths):
            raise ValueError(
                f"{self.name}: a row of {length} tokens exceeds max_length {self.max_length}"
            )
        bucket = self.lengths[index]
        if bucket not in self._used:
            self._used.add(bucket)
            logger.info(
                "%s: first batch padded to length %d (buckets %s)", self.name, bucket, self.lengths
            )
        return bucket

    def __repr__(self) -> str:
        return f"Buckets({self.lengths}, name={self.name!r})"


# ---------------------------------------------------------------------------------------------
# Packing.


def pack_examples(examples: Sequence[Example], *, length: int) -> list[Example]:
    """Packs SFT examples into rows of at most `length` tokens, best-fit decreasing.

    Longest first, each example goes into the open row with the least room that still fits it
    (a new row if none does). Within a row, examples keep their dataset order. Deterministic.

    Returns:
      rows with `input_ids`, `loss_mask`, `segment_ids` (1..k per example) and `positions`
      (restarting at 0 for each example), all int32 of the packed (unpadded) length. The first
      token of every segment has loss 0: it is not predicted from the previous example.
    """
    sizes = [len(example["input_ids"]) for example in examples]
    if sizes and max(sizes) > length:
        raise ValueError(f"an example of {max(sizes)} tokens does not fit a packed row of {length}")
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (room left, row index), sorted
    for index in sorted(range(len(examples)), key=lambda i: (-sizes[i], i)):
        slot = bisect.bisect_left(open_rows, (sizes[index], -1))
        if slot == len(open_rows):
            rows.append([index])
            room, row_index = length - sizes[index], len(rows) - 1
        else:
            room, row_index = open_rows.pop(slot)
            rows[row_index].append(index)
            room -= sizes[index]
        if room > 0:
            bisect.insort(open_rows, (room, row_index))
    packed = []
    for members in rows:
        members = sorted(members)
        loss_masks = [np.asarray(examples[i]["loss_mask"], np.int32).copy() for i in members]
        for mask in loss_masks:
            mask[0] = 0
        packed.append(
            {
                "input_ids": np.concatenate([examples[i]["input_ids"] for i in members]).astype(
                    np.int32
                ),
                "loss_mask": np.concatenate(loss_masks),
                "segment_ids": np.concatenate(
                    [np.full(sizes[i], k, np.int32) for k, i in enumerate(members, start=1)]
                ),
                "positions": np.concatenate([np.arange(sizes[i], dtype=np.int32) for i in members]),
            }
        )
    return packed


# ---------------------------------------------------------------------------------------------
# Collation.


def _pad_right(rows: Sequence[np.ndarray], length: int, value: float, dtype: Any) -> np.ndarray:
    out = np.full((len(rows), length), value, dtype=dtype)
    for b, row in enumerate(rows):
        out[b, : len(row)] = row
    return out


def collate_sft(examples: Sequence[Example], *, buckets: Buckets, pad_id: int) -> Batch:
    """Right-pads SFT examples (packed or not) to `buckets.fit(longest)`; see module docstring."""
    length = buckets.fit(max(len(example["input_ids"]) for example in examples))
    segment_ids = [
        example.get("segment_ids", np.ones(len(example["input_ids"]), np.int32))
        for example in examples
    ]
    positions = [
        example.get("positions", np.arange(len(example["input_ids"]), dtype=np.int32))
        for example in examples
    ]
    return {
        "input_ids": _pad_right([e["input_ids"] for e in examples], length, pad_id, np.int32),
        "attention_mask": _pad_right(segment_ids, length, 0, np.int32),
        "positions": _pad_right(positions, length, 0, np.int32),
        "loss_mask": _pad_right([e["loss_mask"] for e in examples], length, 0.0, np.float32),
    }


def collate_preference(examples: Sequence[Example], *, buckets: Buckets, pad_id: int) -> Batch:
    """Builds `prompt + chosen` and `prompt + rejected` rows, right-padded to one shared bucket."""
    length = buckets.fit(
        max(
            len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"]))
            for e in examples
        )
    )
    batch: Batch = {}
    for side in ("chosen", "rejected"):
        ids, masks = [], []
        for example in examples:
            prompt, response = example["prompt_ids"], example[f"{side}_ids"]
            ids.append(np.concatenate([prompt, response]))
            mask = np.concatenate(
                [np.zeros(len(prompt), np.float32), np.ones(len(response), np.float32)]
            )
            mask[0] = 0.0  # nothing predicts the first token
            masks.append(mask)
        batch[f"{side}_input_ids"] = _pad_right(ids, length, pad_id, np.int32)
        batch[f"{side}_attention_mask"] = _pad_right(
            [np.ones(len(r), np.int32) for r in ids], length, 0, np.int32
        )
        batch[f"{side}_positions"] = _pad_right(
            [np.arange(len(r), dtype=np.int32) for r in ids], length, 0, np.int32
        )
        batch[f"{side}_loss_mask"] = _pad_right(masks, length, 0.0, np.float32)
    _reference_logps(examples, batch)
    return batch


def _reference_logps(examples: Sequence[Example], batch: Batch) -> None:
    reference_keys = ("reference_chosen_logps", "reference_rejected_logps")
    with_reference = sum(reference_keys[0] in example for example in examples)
    if with_reference == len(examples):
        for key in reference_keys:
            batch[key] = np.asarray([example[key] for example in examples], np.float32)
    elif with_reference:
        raise ValueError("some examples carry reference log-probs and some do not")


def collate_preference_shared(
    examples: Sequence[Example], *, buckets: Buckets, pad_id: int
) -> Batch:
    """One `prompt + chosen + rejected` row per pair, right-padded: the prompt is run once.

    Rejected tokens take positions P, P+1, ... as if they followed the prompt directly, and
    `branch_ids` keeps them from attending to the chosen tokens, so every token sees exactly what
    it sees in `collate_preference`'s two rows.
    """
    length = buckets.fit(
        max(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    )
    ids, positions, branches, chosen_masks, rejected_masks = [], [], [], [], []
    for example in examples:
        prompt, chosen, rejected = (example[f"{k}_ids"] for k in ("prompt", "chosen", "rejected"))
        n_prompt, n_chosen, n_rejected = len(prompt), len(chosen), len(rejected)
        ids.append(np.concatenate([prompt, chosen, rejected]))
        positions.append(
            np.concatenate(
                [np.arange(n_prompt + n_chosen), n_prompt + np.arange(n_rejected)]
            ).astype(np.int32)
        )
        branches.append(np.repeat(np.int32([0, 1, 2]), [n_prompt, n_chosen, n_rejected]))
        chosen_mask = np.repeat(np.float32([0, 1, 0]), [n_prompt, n_chosen, n_rejected])
        rejected_mask = np.repeat(np.float32([0, 0, 1]), [n_prompt, n_chosen, n_rejected])
        if n_prompt == 0:  # nothing predicts a response's first token
            chosen_mask[0] = 0.0
            rejected_mask[n_chosen] = 0.0
        chosen_masks.append(chosen_mask)
        rejected_masks.append(rejected_mask)
    batch: Batch = {
        "input_ids": _pad_right(ids, length, pad_id, np.int32),
        "attention_mask": _pad_right([np.ones(len(r), np.int32) for r in ids], length, 0, np.int32),
        "positions": _pad_right(positions, length, 0, np.int32),
        "branch_ids": _pad_right(branches, length, 0, np.int32),
        "chosen_loss_mask": _pad_right(chosen_masks, length, 0.0, np.float32),
        "rejected_loss_mask": _pad_right(rejected_masks, length, 0.0, np.float32),
    }
    _reference_logps(examples, batch)
    return batch


def collate_prompts(examples: Sequence[Example], *, buckets: Buckets, pad_id: int) -> Batch:
    """Left-pads prompts to `buckets.fit(longest)`; positions count real tokens from 0."""
    length = buckets.fit(max(len(example["prompt_ids"]) for example in examples))
    ids = np.full((len(examples), length), pad_id, np.int32)
    mask = np.zeros((len(examples), length), np.int32)
    for b, example in enumerate(examples):
        n = len(example["prompt_ids"])
        ids[b, length - n :] = example["prompt_ids"]
        mask[b, length - n :] = 1
    positions = np.maximum(np.cumsum(mask, axis=1, dtype=np.int32) - 1, 0).astype(np.int32)
    return {"prompt_input_ids": ids, "prompt_attention_mask": mask, "prompt_positions": positions}
