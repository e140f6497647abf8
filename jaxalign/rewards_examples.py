"""Verifiable rewards: TRL-signature reward functions that check completions by a program.

Use them by spec, e.g. `--config.grpo.reward_funcs=jaxalign.rewards_examples:exact_match_reward,
jaxalign.rewards_examples:answer_format_reward --config.grpo.reward_weights=1.0,0.2`. Each takes
TRL's keyword arguments (`prompts`, `completions`, `completion_ids`, the dataset's columns) and
returns one float per completion, or None where it does not apply (no `answer` for the row).
Completions may be texts or, for conversational data, `[{"role": "assistant", "content": ...}]`.

The answer of a completion is the content of its last `<answer>…</answer>` block if it has one,
else what follows its last `####` (GSM8K's convention), else the whole text; answers compare
after `normalize_answer` (case, surrounding punctuation and whitespace do not count).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the contents of a message list."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message["content"]) for message in completion)


def extract_answer(text: str) -> str:
    """The last `<answer>…</answer>` content, else the text after the last `####`, else `text`."""
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1]
    if "####" in text:
        return text.rsplit("####", 1)[1]
    return text


def normalize_answer(text: str) -> str:
    """Lower case, inner whitespace collapsed, surrounding whitespace and punctuation removed."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


def exact_match_reward(
    completions: Sequence[Any], answer: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """1.0 where the completion's extracted answer equals the `answer` column (both normalised),
    else 0.0; None for rows without an answer."""
    return [
        None
        if expected is None
        else float(
            normalize_answer(extract_answer(completion_text(completion)))
            == normalize_answer(str(expected))
        )
        for completion, expected in zip(completions, answer, strict=True)
    ]


def numeric_match_reward(
    completions: Sequence[Any], answer: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """1.0 where the last number in the completion's extracted answer equals the last number of
    the `answer` column (as floats; thousands separators ignored), else 0.0; None for rows whose
    answer has no number."""
    rewards: list[float | None] = []
    for completion, expected in zip(completions, answer, strict=True):
        expected_text = "" if expected is None else str(expected).replace(",", "")
        expected_numbers = _NUMBER.findall(expected_text)
        if not expected_numbers:
            rewards.append(None)
            continue
        numbers = _NUMBER.findall(extract_answer(completion_text(completion)).replace(",", ""))
        rewards.append(float(bool(numbers) and float(numbers[-1]) == float(expected_numbers[-1])))
    return rewards


def answer_format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 where the completion holds exactly one non-empty `<answer>…</answer>` block, else 0.0
    (a format reward, as in DeepSeek-R1's training; Guo et al. 2025, §2.2.2)."""
    rewards = []
    for completion in completions:
        tagged = _ANSWER_TAG.findall(completion_text(completion))
        rewards.append(float(len(tagged) == 1 and bool(tagged[0].strip())))
    return rewards
