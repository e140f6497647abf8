"""Tokenizers through `transformers.AutoTokenizer` (local directory or hub id), chat templates included."""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(path_or_hub_id: str | os.PathLike, **kwargs: Any) -> PreTrainedTokenizerBase:
    """Loads a tokenizer; gives it a pad token (eos) if it has none, since batches are padded."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path_or_hub_id), **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {str(path_or_hub_id)!r}: {e}") from e
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {path_or_hub_id!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
