"""Reward functions in TRL's calling convention: parsing specs, scoring, errors, examples."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from jaxalign.rewards import parse_reward_funcs, reward_metrics, score_completions
from jaxalign.rewards_examples import (
    answer_format_reward,
    exact_match_reward,
    extract_answer,
    numeric_match_reward,
)

SPEC = __name__  # this module, importable by name as pytest put its directory on sys.path
CALLS: list[dict] = []


# --- Written for TRL's GRPOTrainer (its documented examples), used here unchanged. -----------


def boxed_answer_reward(completions, answer, **kwargs):
    """TRL's docs example: 1 if the `\\boxed{}` content equals the ground truth."""
    CALLS.append({"completions": completions, "answer": answer, **kwargs})
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, answer, strict=True)]


def think_format_reward(completions, **kwargs):
    """TRL's docs example for conversational data."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


# --- Faulty and partial functions. -----------------------------------------------------------


def raises_on_row_two(completions, **kwargs):
    return [1.0 / (c != "c") for c in completions]  # ZeroDivisionError at "c"


def returns_too_few(completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def returns_strings(completions, **kwargs):
    return ["1.0" if c == "b" else 0.0 for c in completions]


def only_short(completions, **kwargs):
    """Applies to completions shorter than 3 characters (None elsewhere)."""
    return [len(c) if len(c) < 3 else None for c in completions]


def only_first_letter_a(completions, **kwargs):
    return [np.float32(1.5) if c.startswith("a") else None for c in completions]


ROWS = [
    {"prompt": "What is 1+1?", "answer": "2", "level": 1},
    {"prompt": "What is 2+2?", "answer": "4", "level": 2},
    {"prompt": "What is 3+3?", "answer": "6", "level": 3},
]
COMPLETIONS = ["The answer is \\boxed{2}", "\\boxed{5}", "I think 6"]
COMPLETION_IDS = [[5, 6, 7], [8], [9, 10]]


def test_trl_reward_function_reads_extra_column_unchanged():
    CALLS.clear()
    funcs = parse_reward_funcs(f"{SPEC}:boxed_answer_reward", "")
    assert [(f.name, f.kind, f.weight) for f in funcs] == [("boxed_answer_reward", "python", 1.0)]
    total, per_func = score_completions(funcs, ROWS, COMPLETIONS, COMPLETION_IDS)
    np.testing.assert_array_equal(total, [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(per_func, [[1.0], [0.0], [0.0]])
    assert total.dtype == per_func.dtype == np.float32
    (call,) = CALLS
    assert call == {
        "completions": COMPLETIONS,
        "answer": ["2", "4", "6"],
        "prompts": ["What is 1+1?", "What is 2+2?", "What is 3+3?"],
        "completion_ids": COMPLETION_IDS,
        "level": [1, 2, 3],
    }


def test_conversational_prompts_get_message_completions():
    CALLS.clear()
    rows = [
        {"prompt": [{"role": "user", "content": f"Q{i}"}], "answer": "\\boxed{x}"} for i in range(2)
    ]
    completions = ["<think>hm</think><answer>4</answer>", "4"]
    funcs = parse_reward_funcs(f"{SPEC}:think_format_reward,judge:length", [1.0, 0.5])
    total, per_func = score_completions(funcs, rows, completions, [[1], [2]])
    # think_format: 1, 0; judge:length counts words of the content: 1, 1.
    np.testing.assert_array_equal(per_func, [[1.0, 1.0], [0.0, 1.0]])
    np.testing.assert_allclose(total, [1.5, 0.5])
    assert [f.name for f in funcs] == ["think_format_reward", "judge_length"]


def test_weights_and_none_combine_like_trl():
    funcs = parse_reward_funcs(f"{SPEC}:only_short, {SPEC}:only_first_letter_a", "2.0,-0.5")
    rows = [{"prompt": "p"}] * 4
    completions = ["ab", "abcd", "b", "bcde"]
    total, per_func = score_completions(funcs, rows, completions, [[1]] * 4)
    nan = math.nan
    np.testing.assert_array_equal(per_func, [[2, 1.5], [nan, 1.5], [1, nan], [nan, nan]])
    # nansum of weighted scores; NaN when no function applies (TRL's unscorable row).
    np.testing.assert_allclose(total, [2 * 2 - 0.5 * 1.5, -0.5 * 1.5, 2 * 1, nan])
    metrics = reward_metrics(funcs, total, per_func)
    scored_totals = [3.25, -0.75, 2.0]
    assert metrics["reward"] == pytest.approx(np.mean(scored_totals))
    assert metrics["reward_std"] == pytest.approx(np.std(scored_totals, ddof=1))
    assert metrics["rewards/only_short/mean"] == pytest.approx(1.5)
    assert metrics["rewards/only_short/std"] == pytest.approx(np.std([2, 1], ddof=1))
    assert metrics["rewards/only_first_letter_a/mean"] == pytest.approx(1.5)
    assert metrics["rewards/only_first_letter_a/std"] == 0.0


@pytest.mark.parametrize(
    "name,error,message",
    [
        ("raises_on_row_two", RuntimeError, r"raises_on_row_two.*ZeroDivisionError.*row 2 "),
        ("returns_too_few", ValueError, r"returns_too_few.* 2 rewards for 3 completions"),
        ("returns_strings", TypeError, r"returns_strings.*'1.0'.*row 1 \(prompt 'What is 2\+2\?'"),
    ],
)
def test_faulty_functions_are_named_with_the_row(name, error, message):
    funcs = parse_reward_funcs(f"{SPEC}:{name}")
    with pytest.raises(error, match=message):
        score_completions(funcs, ROWS, ["a", "b", "c"], COMPLETION_IDS)


def test_reward_model_spec_takes_scores_from_the_caller():
    funcs = parse_reward_funcs(f"/ckpt/my-rm/,{SPEC}:only_short", "1,1")
    assert (funcs[0].kind, funcs[0].name, funcs[0].path) == ("model", "my-rm", "/ckpt/my-rm/")
    total, _ = score_completions(
        funcs, ROWS, ["a", "bbbb", "c"], COMPLETION_IDS, model_scores={"my-rm": [0.5, 1.0, 2.0]}
    )
    np.testing.assert_allclose(total, [1.5, 1.0, 3.0])
    with pytest.raises(KeyError, match="my-rm"):
        score_completions(funcs, ROWS, ["a", "b", "c"], COMPLETION_IDS)


def test_bad_specs():
    with pytest.raises(ValueError, match="cannot import"):
        parse_reward_funcs("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no"):
        parse_reward_funcs(f"{SPEC}:no_such_function")
    with pytest.raises(ValueError, match="2 reward_weights for 1"):
        parse_reward_funcs(f"{SPEC}:only_short", "1,2")
    with pytest.raises(ValueError, match="metric names"):
        parse_reward_funcs(f"{SPEC}:only_short,{SPEC}:only_short")
    with pytest.raises(ValueError, match="unknown judge"):
        parse_reward_funcs("judge:nope")


def test_verifiable_reward_examples():
    completions = [
        "Let me think. <answer> Paris. </answer>",
        "The capital is paris",
        "#### 1,234",
        "<answer>12</answer><answer>13</answer>",
        "no idea",
    ]
    answers = ["paris", "Paris", "1234", "13", None]
    assert extract_answer(completions[3]) == "13"
    assert exact_match_reward(completions, answers) == [1.0, 0.0, 0.0, 1.0, None]
    assert numeric_match_reward(completions, answers) == [None, None, 1.0, 1.0, None]
    assert answer_format_reward(completions) == [1.0, 0.0, 0.0, 0.0, 0.0]
    # Conversational completions, and the functions by spec through score_completions.
    messages = [[{"role": "assistant", "content": c}] for c in completions[:2]]
    assert exact_match_reward(messages, answers[:2]) == [1.0, 0.0]
    funcs = parse_reward_funcs(
        "jaxalign.rewards_examples:exact_match_reward,"
        "jaxalign.rewards_examples:answer_format_reward",
        "1.0,0.25",
    )
    rows = [{"prompt": "Capital of France?", "answer": "Paris"}] * 2
    total, _ = score_completions(funcs, rows, completions[:2], [[1], [2]])
    np.testing.assert_allclose(total, [1.25, 0.0])
