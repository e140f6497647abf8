"""Data pipeline (numpy, host side): rows -> tokens -> fixed-shape batches.

`sources` reads rows with their `file:line`; `tokenize` turns a row into ids and loss masks;
`batching` pads to buckets / packs and defines the batch contracts; `iterator` yields the
process-local slice of each global batch, resumably; `builders` wires them per algorithm.
"""

from jaxalign.data.batching import (
    DEFAULT_BUCKETS,
    Buckets,
    collate_preference,
    collate_preference_shared,
    collate_prompts,
    collate_sft,
    pack_examples,
)
from jaxalign.data.builders import (
    TokenizedDataset,
    build_preference_dataset,
    build_prompt_dataset,
    build_sft_dataset,
)
from jaxalign.data.errors import DataError, RowStats
from jaxalign.data.iterator import BatchIterator
from jaxalign.data.sources import load_rows
from jaxalign.data.tokenize import (
    PreferenceText,
    chat_segments,
    render_prompt,
    split_preference,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)

__all__ = [
    "DEFAULT_BUCKETS",
    "BatchIterator",
    "Buckets",
    "DataError",
    "PreferenceText",
    "RowStats",
    "TokenizedDataset",
    "build_preference_dataset",
    "build_prompt_dataset",
    "build_sft_dataset",
    "chat_segments",
    "collate_preference",
    "collate_preference_shared",
    "collate_prompts",
    "collate_sft",
    "load_rows",
    "pack_examples",
    "render_prompt",
    "split_preference",
    "tokenize_preference",
    "tokenize_prompt",
    "tokenize_sft",
]
