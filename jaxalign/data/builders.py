"""One builder per algorithm: source rows -> tokenised examples, a collate function, and stats.

dataset = build_sft_dataset("train.jsonl", tokenizer, max_length=1024, pack=True)
batches = BatchIterator(dataset.examples, batch_size=64, collate=dataset.collate, seed=0)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxalign.data.batching import (
    DEFAULT_BUCKETS,
    Buckets,
    collate_preference,
    collate_preference_shared,
    collate_prompts,
    collate_sft,
    pack_examples,
)
from jaxalign.data.errors import DataError, OnBadRow, OnLongRow, RowStats
from jaxalign.data.formats import (
    CONVERSATIONAL,
    PREFERENCE_FORMATS,
    PROMPT_FORMATS,
    SFT_FORMATS,
    check_format,
    is_conversational,
    row_format,
)
from jaxalign.data.sources import Source, load_rows
from jaxalign.data.tokenize import render_prompt, tokenize_preference, tokenize_prompt, tokenize_sft

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TokenizedDataset:
    """Tokenised examples and what a trainer needs to batch them.

    Attributes:
      examples: per-example dicts of int32 arrays (see `tokenize_*`; packed rows for packed SFT).
      stats: `{"rows_read", "rows_kept", "skipped": {reason: n}, "dropped": {reason: n},
        "truncated": {field: n}, "examples"}` (`examples` differs from `rows_kept` when packed).
      collate: list of examples -> fixed-shape numpy batch (contract in `jaxalign.data.batching`).
      buckets: the padded lengths batches can take (`buckets.lengths`), one compilation each.
      texts: prompt datasets only: the rendered prompt text of each example, by index.
      rows: prompt datasets only: each example's row as read, with `prompt` as given (a string or
        a message list; for `messages` rows, the turns before the trailing assistant reply) and
        every other column, e.g. an `answer` that reward functions check against.
    """

    examples: list[dict[str, Any]]
    stats: dict[str, Any]
    collate: Callable[[Sequence[dict[str, Any]]], dict[str, np.ndarray]]
    buckets: Buckets
    texts: list[str] | None = None
    rows: list[dict[str, Any]] | None = None


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad_token nor an eos_token to pad with")
    return int(pad)


def _tokenize_all(
    source: Source,
    split: str,
    stats: RowStats,
    tokenize_row: Callable[[dict[str, Any], str], Any],
    *,
    formats: tuple[str, ...],
    algorithm: str,
) -> list[Any]:
    """Tokenised rows (`None`s dropped); the first row's format must be one `algorithm` takes
    (else `DataError`, whatever `on_bad_row` says: a whole dataset of the wrong kind is no bad row),
    and is recorded in `stats.formats` with every other row's."""
    kept = []
    for row, where in load_rows(source, split=split, stats=stats):
        if not stats.formats:
            check_format(row, where, formats, algorithm)
        try:
            kind = row_format(row)
            if kind != CONVERSATIONAL and is_conversational(row):
                kind += " (conversational)"
            stats.formats[kind] += 1
            example = tokenize_row(row, where)
        except DataError as error:
            stats.bad_row(error)
            continue
        if example is not None:
            kept.append(example)
    stats.rows_kept = len(kept)
    return kept


def build_sft_dataset(
    source: Source,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    split: str = "train",
    on_bad_row: OnBadRow = "error",
    on_long_row: OnLongRow = "truncate",
    pack: bool = False,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    algorithm: str = "sft",
) -> TokenizedDataset:
    """SFT examples from `{text}`, `{prompt, completion}` (strings or message lists) or
    `{messages}` rows; `pack=True` packs them into rows of `max_length` (segment ids 1..k,
    positions restarting per example)."""
    stats = RowStats(on_bad_row, on_long_row)

    def tokenize_row(row: dict[str, Any], where: str) -> dict[str, np.ndarray] | None:
        return tokenize_sft(row, tokenizer, max_length=max_length, where=where, stats=stats)

    examples = _tokenize_all(
        source, split, stats, tokenize_row, formats=SFT_FORMATS, algorithm=algorithm
    )
    if pack:
        examples = pack_examples(examples, length=max_length)
    stats.log_summary("sft")
    bucket_set = Buckets(buckets, max_length=max_length, name="sft")
    return TokenizedDataset(
        examples=examples,
        stats={**stats.as_dict(), "examples": len(examples)},
        collate=functools.partial(collate_sft, buckets=bucket_set, pad_id=_pad_id(tokenizer)),
        buckets=bucket_set,
    )


def build_preference_dataset(
    source: Source,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int,
    split: str = "train",
    on_bad_row: OnBadRow = "error",
    on_long_row: OnLongRow = "truncate",
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    share_prompt: bool = False,
    algorithm: str = "dpo",
) -> TokenizedDataset:
    """Preference pairs (string, chat-messages or Anthropic-HH rows) for DPO / reward models.

    `share_prompt=True` collates each pair as one `prompt + chosen + rejected` row
    (`collate_preference_shared`, up to `2 * max_length` tokens) instead of two rows.
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})"
        )
    stats = RowStats(on_bad_row, on_long_row)

    def tokenize_row(row: dict[str, Any], where: str) -> dict[str, Any] | None:
        return tokenize_preference(
            row,
            tokenizer,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            where=where,
            stats=stats,
        )

    examples = _tokenize_all(
        source, split, stats, tokenize_row, formats=PREFERENCE_FORMATS, algorithm=algorithm
    )
    with_reference = sum("reference_chosen_logps" in example for example in examples)
    if 0 < with_reference < len(examples):
        raise ValueError(
            f"only {with_reference} of {len(examples)} preference rows carry reference log-probs "
            "(reference_chosen_logps/reference_rejected_logps); all or none must"
        )
    stats.log_summary("preference")
    if share_prompt:  # prompt + both responses: at most 2 * max_length - 1 tokens
        # Shared rows vary more in length; 1.5x steps between the buckets bound the padding.
        shared_buckets = {int(n * step) for n in buckets for step in (1, 1.5)}
        bucket_set = Buckets(shared_buckets, max_length=2 * max_length, name="preference (shared)")
        collate = collate_preference_shared
    else:
        bucket_set = Buckets(buckets, max_length=max_length, name="preference")
        collate = collate_preference
    return TokenizedDataset(
        examples=examples,
        stats={**stats.as_dict(), "examples": len(examples)},
        collate=functools.partial(collate, buckets=bucket_set, pad_id=_pad_id(tokenizer)),
        buckets=bucket_set,
    )


def build_prompt_dataset(
    source: Source,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int,
    split: str = "train",
    on_bad_row: OnBadRow = "error",
    on_long_row: OnLongRow = "truncate",
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    algorithm: str = "ppo",
) -> TokenizedDataset:
    """Left-padded prompts for PPO rollouts / evaluation, from `prompt` (string or messages) or
    `messages` (trailing assistant turns removed) rendered with `add_generation_prompt=True`.
    `texts[i]` is the rendered prompt of `examples[i]` (untruncated)."""
    stats = RowStats(on_bad_row, on_long_row)

    def tokenize_row(row: dict[str, Any], where: str) -> tuple[dict[str, np.ndarray], str, dict]:
        text = render_prompt(row, tokenizer, where=where)
        example = tokenize_prompt(
            {"prompt": text},
            tokenizer,
            max_prompt_length=max_prompt_length,
            where=where,
            stats=stats,
        )
        return None if example is None else (example, text, _prompt_row(row))

    pairs = _tokenize_all(
        source, split, stats, tokenize_row, formats=PROMPT_FORMATS, algorithm=algorithm
    )
    stats.log_summary("prompt")
    bucket_set = Buckets(buckets, max_length=max_prompt_length, name="prompt")
    return TokenizedDataset(
        examples=[example for example, _, _ in pairs],
        stats={**stats.as_dict(), "examples": len(pairs)},
        collate=functools.partial(collate_prompts, buckets=bucket_set, pad_id=_pad_id(tokenizer)),
        buckets=bucket_set,
        texts=[text for _, text, _ in pairs],
        rows=[row for _, _, row in pairs],
    )


def _prompt_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row with `prompt` as given; a `messages` row's prompt is its turns before the reply."""
    row = dict(row)
    if row.get("prompt") is None and row.get("messages") is not None:
        messages = list(row.pop("messages"))
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()
        row["prompt"] = messages
    return row
