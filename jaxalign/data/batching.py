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

Packed preference batch (either layout above, built from `pack_preference_pairs` rows and collated
with `max_pairs=K`): a row holds up to K pairs one after another, pair k (0-based) as segment k + 1
of `*attention_mask` with positions restarting at 0 (two-row layout: pair k's chosen sequence is
segment k + 1 of the chosen row and its rejected sequence segment k + 1 of the rejected row)::

  pair_mask                                         float32 [B, K]  1 on the row's pairs, 0 on
                                                                    empty slots
  reference_chosen_logps, reference_rejected_logps  float32 [B, K]  (optional, 0 on empty slots)

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


def _best_fit(
    sizes: Sequence[int], *, length: int, max_items: int | None = None
) -> list[list[int]]:
    """Indices of the items of each row, best-fit decreasing; each row in index order.

    Longest first, each item goes into the open row with the least room that still fits it (a new
    row if none does); a row holding `max_items` items is closed. Deterministic.
    """
    if sizes and max(sizes) > length:
        raise ValueError(f"an example of {max(sizes)} tokens does not fit a packed row of {length}")
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (room left, row index), sorted
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        slot = bisect.bisect_left(open_rows, (sizes[index], -1))
        if slot == len(open_rows):
            rows.append([index])
            room, row_index = length - sizes[index], len(rows) - 1
        else:
            room, row_index = open_rows.pop(slot)
            rows[row_index].append(index)
            room -= sizes[index]
        if room > 0 and (max_items is None or len(rows[row_index]) < max_items):
            bisect.insort(open_rows, (room, row_index))
    return [sorted(members) for members in rows]


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
    packed = []
    for members in _best_fit(sizes, length=length):
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


_PAIR_PARTS = ("prompt", "chosen", "rejected")
_REFERENCE_KEYS = ("reference_chosen_logps", "reference_rejected_logps")


def pair_size(prompt: int, chosen: int, rejected: int, *, shared: bool) -> int:
    """Tokens a pair takes in a row: `prompt + chosen + rejected` in a shared-prompt row, else the
    longer of its two sequences (its chosen and rejected rows are packed side by side)."""
    return prompt + chosen + rejected if shared else prompt + max(chosen, rejected)


def pack_preference_pairs(
    examples: Sequence[Example], *, length: int, max_pairs: int, shared: bool
) -> list[Example]:
    """Packs preference pairs into rows of at most `length` tokens and `max_pairs` pairs.

    Best-fit decreasing on `pair_size` (as `pack_examples`); a row's pairs keep dataset order.

    Returns:
      rows with the pairs' `prompt_ids`, `chosen_ids` and `rejected_ids` concatenated,
      `pair_lengths` (int32 `[k, 3]`: each pair's prompt, chosen and rejected token counts) and,
      when the pairs carry them, `reference_chosen_logps` / `reference_rejected_logps` (float32
      `[k]`). Collate them with `max_pairs` (see the module docstring).
    """
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    lengths = np.asarray(
        [[len(example[f"{part}_ids"]) for part in _PAIR_PARTS] for example in examples], np.int32
    ).reshape(-1, 3)
    sizes = [int(pair_size(*counts, shared=shared)) for counts in lengths]
    with_reference = _REFERENCE_KEYS[0] in examples[0] if examples else False
    packed = []
    for members in _best_fit(sizes, length=length, max_items=max_pairs):
        row = {
            f"{part}_ids": np.concatenate([examples[i][f"{part}_ids"] for i in members]).astype(
                np.int32
            )
            for part in _PAIR_PARTS
        }
        row["pair_lengths"] = lengths[members]
        if with_reference:
            for key in _REFERENCE_KEYS:
                row[key] = np.asarray([examples[i][key] for i in members], np.float32)
        packed.append(row)
    return packed


def row_pairs(example: Example) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`(prompt_ids, chosen_ids, rejected_ids)` of each pair of a row: one for a plain pair, k for
    a `pack_preference_pairs` row."""
    if "pair_lengths" not in example:
        return [tuple(example[f"{part}_ids"] for part in _PAIR_PARTS)]
    bounds = np.cumsum(example["pair_lengths"], axis=0)[:-1]
    parts = [np.split(example[f"{part}_ids"], bounds[:, j]) for j, part in enumerate(_PAIR_PARTS)]
    return list(zip(*parts, strict=True))


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


def _pair_rows(
    examples: Sequence[Example], max_pairs: int | None
) -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    rows = [row_pairs(example) for example in examples]
    most = max(len(row) for row in rows)
    if most > (max_pairs or 1):
        raise ValueError(
            f"a row holds {most} preference pairs; collate packed rows with max_pairs >= {most}"
        )
    return rows


def _sequence(prompt: np.ndarray, response: np.ndarray, segment: int) -> tuple[np.ndarray, ...]:
    """`(ids, segment ids, positions, loss mask)` of one `prompt + response` sequence."""
    n = len(prompt) + len(response)
    mask = np.repeat(np.float32([0, 1]), [len(prompt), len(response)])
    mask[0] = 0.0  # nothing predicts a sequence's first token
    return (
        np.concatenate([prompt, response]),
        np.full(n, segment, np.int32),
        np.arange(n, dtype=np.int32),
        mask,
    )


def _concat_columns(parts: Sequence[tuple[np.ndarray, ...]]) -> list[np.ndarray]:
    return [np.concatenate(column) for column in zip(*parts, strict=True)]


def collate_preference(
    examples: Sequence[Example], *, buckets: Buckets, pad_id: int, max_pairs: int | None = None
) -> Batch:
    """Builds `prompt + chosen` and `prompt + rejected` rows, right-padded to one shared bucket.

    A packed row's pairs become segments 1..k of its chosen row and, in the same order, of its
    rejected row; `max_pairs` adds the per-pair arrays of the module docstring.
    """
    rows = _pair_rows(examples, max_pairs)
    sides = {
        side: [
            _concat_columns([_sequence(pair[0], pair[i], k) for k, pair in enumerate(row, start=1)])
            for row in rows
        ]
        for i, side in enumerate(("chosen", "rejected"), start=1)
    }
    length = buckets.fit(max(len(row[0]) for side_rows in sides.values() for row in side_rows))
    batch: Batch = {}
    for side, side_rows in sides.items():
        ids, segments, positions, masks = zip(*side_rows, strict=True)
        batch[f"{side}_input_ids"] = _pad_right(ids, length, pad_id, np.int32)
        batch[f"{side}_attention_mask"] = _pad_right(segments, length, 0, np.int32)
        batch[f"{side}_positions"] = _pad_right(positions, length, 0, np.int32)
        batch[f"{side}_loss_mask"] = _pad_right(masks, length, 0.0, np.float32)
    _pair_arrays(examples, rows, batch, max_pairs)
    return batch


def _pair_arrays(
    examples: Sequence[Example], rows: Sequence[list], batch: Batch, max_pairs: int | None
) -> None:
    """Adds `pair_mask` (with `max_pairs`) and the reference log-probs (if all rows carry them)."""
    if max_pairs is not None:
        counts = np.asarray([len(row) for row in rows])
        batch["pair_mask"] = (np.arange(max_pairs) < counts[:, None]).astype(np.float32)
    with_reference = sum(_REFERENCE_KEYS[0] in example for example in examples)
    if with_reference == len(examples):
        for key in _REFERENCE_KEYS:
            values = [np.asarray(example[key], np.float32).reshape(-1) for example in examples]
            if max_pairs is None:
                batch[key] = np.concatenate(values)
            else:
                batch[key] = _pad_right(values, max_pairs, 0.0, np.float32)
    elif with_reference:
        raise ValueError("some examples carry reference log-probs and some do not")


def _shared_pair(
    prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, segment: int
) -> tuple[np.ndarray, ...]:
    """`(ids, segment ids, positions, branch ids, chosen mask, rejected mask)` of one pair."""
    counts = [len(prompt), len(chosen), len(rejected)]
    positions = np.concatenate([np.arange(counts[0] + counts[1]), counts[0] + np.arange(counts[2])])
    chosen_mask = np.repeat(np.float32([0, 1, 0]), counts)
    rejected_mask = np.repeat(np.float32([0, 0, 1]), counts)
    if counts[0] == 0:  # nothing predicts a response's first token
        chosen_mask[0] = 0.0
        rejected_mask[counts[1]] = 0.0
    return (
        np.concatenate([prompt, chosen, rejected]),
        np.full(sum(counts), segment, np.int32),
        positions.astype(np.int32),
        np.repeat(np.int32([0, 1, 2]), counts),
        chosen_mask,
        rejected_mask,
    )


def collate_preference_shared(
    examples: Sequence[Example], *, buckets: Buckets, pad_id: int, max_pairs: int | None = None
) -> Batch:
    """One `prompt + chosen + rejected` row per pair, right-padded: the prompt is run once.

    Rejected tokens take positions P, P+1, ... as if they followed the prompt directly, and
    `branch_ids` keeps them from attending to the chosen tokens, so every token sees exactly what
    it sees in `collate_preference`'s two rows. A packed row holds its pairs one after another as
    segments 1..k; `max_pairs` adds the per-pair arrays of the module docstring.
    """
    rows = _pair_rows(examples, max_pairs)
    columns = [
        _concat_columns([_shared_pair(*pair, k) for k, pair in enumerate(row, start=1)])
        for row in rows
    ]
    length = buckets.fit(max(len(row[0]) for row in columns))
    ids, segments, positions, branches, chosen_masks, rejected_masks = zip(*columns, strict=True)
    batch: Batch = {
        "input_ids": _pad_right(ids, length, pad_id, np.int32),
        "attention_mask": _pad_right(segments, length, 0, np.int32),
        "positions": _pad_right(positions, length, 0, np.int32),
        "branch_ids": _pad_right(branches, length, 0, np.int32),
        "chosen_loss_mask": _pad_right(chosen_masks, length, 0.0, np.float32),
        "rejected_loss_mask": _pad_right(rejected_masks, length, 0.0, np.float32),
    }
    _pair_arrays(examples, rows, batch, max_pairs)
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


# ---------------------------------------------------------------------------------------------
# Padding.


def row_token_counts(example: Example, *, shared: bool = False) -> tuple[int, ...]:
    """Real tokens of the rows an example becomes: `(sft row,)`, `(shared-prompt row,)` or
    `(chosen row, rejected row)`, for plain and packed examples alike."""
    if "input_ids" in example:
        return (len(example["input_ids"]),)
    pairs = row_pairs(example)
    if shared:
        return (sum(len(p) + len(c) + len(r) for p, c, r in pairs),)
    return sum(len(p) + len(c) for p, c, _ in pairs), sum(len(p) + len(r) for p, _, r in pairs)


def padding_fraction(
    examples: Sequence[Example],
    *,
    buckets: Buckets,
    batch_size: int,
    shared: bool = False,
    seed: int = 0,
) -> float:
    """Share of the token slots of an epoch's batches that are padding, `1 − Σ real / Σ B·T`.

    Batches are `batch_size` examples in `BatchIterator`'s shuffled order of epoch 0 for `seed`
    (the last, smaller one included), each padded to the smallest bucket that fits its longest
    row, as the collate functions pad them; `shared` as in `row_token_counts`. Counts tokens only
    (no collation), so it is cheap enough for a start-up log line.
    """
    if not examples:
        return 0.0
    counts = np.asarray([row_token_counts(example, shared=shared) for example in examples])
    order = np.random.default_rng([seed, 0]).permutation(len(examples))
    real = slots = 0
    for start in range(0, len(order), batch_size):
        rows = counts[order[start : start + batch_size]]
        index = min(bisect.bisect_left(buckets.lengths, int(rows.max())), len(buckets.lengths) - 1)
        real += int(rows.sum())
        slots += rows.size * buckets.lengths[index]
    return 1.0 - real / slots
