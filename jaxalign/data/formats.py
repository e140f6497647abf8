"""The dataset formats TRL documents, recognised from a row's columns, and which trainer takes which.

| format                 | columns                                   | trainers            |
|------------------------|-------------------------------------------|---------------------|
| language modeling      | `text`                                    | sft                 |
| prompt-completion      | `prompt`, `completion` (strings or lists) | sft; ppo/grpo (prompt) |
| conversational         | `messages`                                | sft; ppo/grpo (turns before the reply) |
| preference             | `chosen`, `rejected` (+ `prompt`, or implicit) | dpo, reward; ppo/grpo (prompt) |
| unpaired preference    | `prompt`, `completion`, `label`           | ppo/grpo (prompt) only |
| prompt-only            | `prompt`                                  | ppo/grpo            |

A column counts as present when it is not None (parquet and `datasets` fill missing ones with None).
`docs/data.md` shows one example row of each.
"""

from __future__ import annotations

from typing import Any

from jaxalign.data.errors import DataError

LANGUAGE_MODELING = "language modeling"
PROMPT_COMPLETION = "prompt-completion"
CONVERSATIONAL = "conversational"
PREFERENCE = "preference"
UNPAIRED_PREFERENCE = "unpaired preference"
STEPWISE = "stepwise supervision"
PROMPT_ONLY = "prompt-only"
UNKNOWN = "unknown"

# What each kind of dataset builder accepts.
SFT_FORMATS = (LANGUAGE_MODELING, PROMPT_COMPLETION, CONVERSATIONAL)
PREFERENCE_FORMATS = (PREFERENCE,)
PROMPT_FORMATS = (PROMPT_ONLY, PROMPT_COMPLETION, CONVERSATIONAL, PREFERENCE, UNPAIRED_PREFERENCE)

_COLUMNS = {
    LANGUAGE_MODELING: "{text}",
    PROMPT_COMPLETION: "{prompt, completion}",
    CONVERSATIONAL: "{messages}",
    PREFERENCE: "{prompt?, chosen, rejected}",
    UNPAIRED_PREFERENCE: "{prompt, completion, label}",
    STEPWISE: "{prompt, completions, labels}",
    PROMPT_ONLY: "{prompt}",
}


def row_format(row: dict[str, Any]) -> str:
    """The TRL dataset format of `row`, by its (non-None) columns; `UNKNOWN` if none fits."""
    has = {key for key, value in row.items() if value is not None}
    if {"chosen", "rejected"} <= has:
        return PREFERENCE
    if {"completions", "labels"} <= has:
        return STEPWISE
    if {"completion", "label"} <= has:
        return UNPAIRED_PREFERENCE
    if "messages" in has:
        return CONVERSATIONAL
    if {"prompt", "completion"} <= has:
        return PROMPT_COMPLETION
    if "text" in has:
        return LANGUAGE_MODELING
    if "prompt" in has:
        return PROMPT_ONLY
    return UNKNOWN


def is_conversational(row: dict[str, Any]) -> bool:
    """True when the row's text columns are message lists (TRL's "conversational" type)."""
    return any(
        isinstance(row.get(key), list) for key in ("messages", "prompt", "completion", "chosen")
    )


def check_format(row: dict[str, Any], where: str, accepted: tuple[str, ...], algorithm: str) -> str:
    """`row_format(row)` if `algorithm` takes it, else a `DataError` saying which formats it takes."""
    found = row_format(row)
    if found in accepted:
        return found
    columns = sorted(key for key, value in row.items() if value is not None)
    what = f"{found} rows" if found != UNKNOWN else f"rows with columns {columns}"
    if found != UNKNOWN:
        what += f" {_COLUMNS[found]}"
    takes = "; ".join(f"{name} {_COLUMNS[name]}" for name in accepted)
    detail = f"{what} are not supported by {algorithm}, which takes {takes} (see docs/data.md)"
    raise DataError(where, None, "unsupported_format", detail)
