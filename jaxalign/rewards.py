"""Reward functions for online RL (GRPO), in TRL's calling convention, scored on the host.

`grpo.reward_funcs` is a comma-separated list of specs, `grpo.reward_weights` their weights
(comma-separated floats; empty = all 1):

- `module:function` — an importable Python function (or callable; `module:Class.attr` works too)
  written for TRL's `GRPOTrainer`, called unchanged as

      fn(prompts=[...], completions=[...], completion_ids=[...], **columns) -> list[float | None]

  `prompts` are the dataset's `prompt` values; `completions` are texts, or, when the prompts are
  conversations (lists of `{"role", "content"}`), `[{"role": "assistant", "content": text}]`;
  `completion_ids` are token-id lists; every other column of the prompt dataset (e.g. `answer`)
  arrives as a list aligned with the rows. `None` means "not applicable to this row" (NaN).
  TRL's `trainer_state`, `log_extra` and `log_metric` keyword arguments are not passed.
- `judge:NAME` — a `jaxalign.judges` judge (`judge(prompts, responses)` on texts).
- anything else — a reward-model directory or hub id (kind `"model"`); the trainer runs it and
  passes its scores to `score_completions` as `model_scores[name]`.

Scores combine as in TRL (`GRPOTrainer._calculate_rewards` and its caller): `total_i =
Σ_f w_f·r_{i,f}` over the functions that scored row i (`nansum`), NaN when none did (an
unscorable row; `advantages.grpo_advantages` gives it advantage 0).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

REWARD_KINDS: tuple[str, ...] = ("python", "judge", "model")
_TRL_RESERVED = ("prompt", "completion", "completion_ids")  # columns TRL does not forward


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardFunction:
    """One parsed reward spec.

    name: the metric name, as TRL names it (`rewards/<name>/mean`): a Python function's
      `__name__`, `judge_<NAME>` for a judge, the directory's last component for a model.
    kind: one of `REWARD_KINDS`.
    weight: its weight in the total.
    fn: the Python reward function (`"python"`) or the judge (`"judge"`); None for a model.
    path: the reward model's directory or hub id (`"model"` only).
    spec: the spec it was parsed from.
    """

    name: str
    kind: str
    weight: float = 1.0
    fn: Callable[..., Any] | None = None
    path: str = ""
    spec: str = ""


def _callable_name(fn: Any) -> str:
    """TRL's `get_callable_name`: unwraps `functools.partial`, falls back to the class name."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def _import_callable(spec: str) -> Callable[..., Any]:
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"reward function {spec!r}: cannot import {module_name!r}: {error}"
        ) from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"reward function {spec!r}: {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"reward function {spec!r} is not callable")
    return target


_PYTHON_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def parse_reward_spec(spec: str, weight: float = 1.0) -> RewardFunction:
    """One `RewardFunction` from `module:function`, `judge:NAME` or a reward-model path."""
    spec = spec.strip()
    if not spec:
        raise ValueError("empty reward function spec")
    if spec.startswith("judge:"):
        from jaxalign.judges import get_judge  # judges import optional packages lazily

        judge_name = spec.removeprefix("judge:")
        return RewardFunction(
            name=f"judge_{judge_name}".replace(":", "_"),
            kind="judge",
            weight=weight,
            fn=get_judge(judge_name),
            spec=spec,
        )
    if _PYTHON_SPEC.fullmatch(spec):  # not `gs://bucket/rm` or `C:\\rm`: those are model paths
        fn = _import_callable(spec)
        return RewardFunction(
            name=_callable_name(fn), kind="python", weight=weight, fn=fn, spec=spec
        )
    name = spec.rstrip("/").split("/")[-1]
    return RewardFunction(name=name, kind="model", weight=weight, path=spec, spec=spec)


def parse_reward_weights(weights: str | Sequence[float] | None, count: int) -> list[float]:
    """Weights from `"1.0, 0.5"` (or a sequence); empty or None = all 1. Checks the count."""
    if weights is None or (isinstance(weights, str) and not weights.strip()):
        return [1.0] * count
    if isinstance(weights, str):
        try:
            parsed = [float(w) for w in weights.split(",") if w.strip()]
        except ValueError as error:
            raise ValueError(f"reward_weights {weights!r}: {error}") from error
    else:
        parsed = [float(w) for w in weights]
    if len(parsed) != count:
        raise ValueError(f"{len(parsed)} reward_weights for {count} reward functions")
    if not all(math.isfinite(w) for w in parsed):
        raise ValueError(f"reward_weights must be finite, got {parsed}")
    return parsed


def parse_reward_funcs(
    specs: str | Sequence[str], weights: str | Sequence[float] | None = None
) -> list[RewardFunction]:
    """`grpo.reward_funcs` and `grpo.reward_weights` as `RewardFunction`s (names unique)."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    if not specs:
        raise ValueError("no reward functions given")
    funcs = [
        parse_reward_spec(spec, weight)
        for spec, weight in zip(specs, parse_reward_weights(weights, len(specs)), strict=True)
    ]
    names = [func.name for func in funcs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"reward functions share the metric names {duplicates}: {list(specs)}")
    return funcs


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def is_conversational(prompt: Any) -> bool:
    """Whether a prompt is a message list (`[{"role": ..., "content": ...}, ...]`), as in TRL."""
    return (
        isinstance(prompt, list | tuple)
        and bool(prompt)
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in prompt)
    )


def _prompt_text(prompt: Any) -> str:
    """A judge's view of a prompt: the text, or a conversation's contents one per line."""
    if is_conversational(prompt):
        return "\n".join(str(message["content"]) for message in prompt)
    return str(prompt)


def _completion_text(completion: Any) -> str:
    if is_conversational(completion):
        return "".join(str(message["content"]) for message in completion)
    return str(completion)


def _describe_row(prompts: Sequence[Any], completions: Sequence[Any], row: int) -> str:
    def clip(text: str) -> str:
        return text if len(text) <= 80 else text[:77] + "..."

    prompt, completion = _prompt_text(prompts[row]), _completion_text(completions[row])
    return f"row {row} (prompt {clip(prompt)!r}, completion {clip(completion)!r})"


def _as_score(value: Any) -> float | None:
    """A float (NaN for None), or None when `value` is not a number.

    Numbers are Python and NumPy scalars and anything with `__float__` that converts (0-d
    arrays and tensors); strings are not numbers here, even "1.0".
    """
    if value is None:
        return math.nan
    if isinstance(value, str | bytes) or not hasattr(value, "__float__"):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _call(
    func: RewardFunction,
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]],
    columns: dict[str, list[Any]],
) -> Any:
    if func.kind == "judge":
        return func.fn(
            [_prompt_text(p) for p in prompts], [_completion_text(c) for c in completions]
        )
    return func.fn(
        prompts=prompts, completions=completions, completion_ids=completion_ids, **columns
    )


def _run(
    func: RewardFunction,
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]],
    columns: dict[str, list[Any]],
) -> np.ndarray:
    """`[B]` float32 scores of one Python function or judge, NaN where it returned None.

    Errors name the function and, where one can be found, the row: when the batch call raises,
    the rows are retried one at a time to find the first that raises alone.
    """
    rows = len(prompts)
    where = f"reward function {func.name!r} ({func.spec})"
    try:
        output = _call(func, prompts, completions, completion_ids, columns)
    except Exception as error:
        for row in range(rows):
            try:
                _call(
                    func,
                    prompts[row : row + 1],
                    completions[row : row + 1],
                    completion_ids[row : row + 1],
                    {name: values[row : row + 1] for name, values in columns.items()},
                )
            except Exception as row_error:
                raise RuntimeError(
                    f"{where} raised {type(row_error).__name__}: {row_error} at "
                    f"{_describe_row(prompts, completions, row)}"
                ) from row_error
        raise RuntimeError(
            f"{where} raised {type(error).__name__}: {error} on a batch of {rows} rows "
            "(no single row raises alone)"
        ) from error
    if isinstance(output, np.ndarray):
        output = output.tolist() if output.ndim == 1 else output
    if not isinstance(output, list | tuple):
        raise TypeError(f"{where} returned {type(output).__name__}, expected a list of {rows}")
    if len(output) != rows:
        raise ValueError(f"{where} returned {len(output)} rewards for {rows} completions")
    scores = np.empty(rows, np.float32)
    for row, value in enumerate(output):
        score = _as_score(value)
        if score is None:
            raise TypeError(
                f"{where} returned {value!r} ({type(value).__name__}), not a number or None, "
                f"at {_describe_row(prompts, completions, row)}"
            )
        scores[row] = score
    return scores


def score_completions(
    funcs: Sequence[RewardFunction],
    rows: Sequence[Mapping[str, Any]],
    completions: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    *,
    model_scores: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores B completions with every reward function (host side) and combines them.

    Args:
      funcs: from `parse_reward_funcs`.
      rows: `[B]` prompt-dataset rows, one per completion (a prompt's row repeated for its G
        completions): `row["prompt"]` is the prompt (text or messages); every other column
        except TRL's reserved `completion` / `completion_ids` is passed by name as a list.
      completions: `[B]` completion texts (decoded without special tokens).
      completion_ids: `[B]` token-id lists of the completions.
      model_scores: `{name: [B] scores}` for the `"model"` functions, computed by the caller.

    Returns:
      `(total [B] float32, per_func [B, F] float32)`: `per_func` is NaN where a function returned
      None; `total = Σ_f w_f·per_func[:, f]` over non-NaN entries, NaN where all are NaN.
    """
    num_rows = len(rows)
    if len(completions) != num_rows or len(completion_ids) != num_rows:
        raise ValueError(
            f"{num_rows} rows, {len(completions)} completions, {len(completion_ids)} id lists"
        )
    prompts = [row["prompt"] for row in rows]
    keys = [key for key in (rows[0] if rows else {}) if key not in _TRL_RESERVED]
    columns = {key: [row.get(key) for row in rows] for key in keys}
    texts = [str(text) for text in completions]
    if prompts and is_conversational(prompts[0]):
        texts = [[{"role": "assistant", "content": text}] for text in texts]
    ids = [list(map(int, row_ids)) for row_ids in completion_ids]
    model_scores = model_scores or {}

    per_func = np.full((num_rows, len(funcs)), np.nan, np.float32)
    for f, func in enumerate(funcs):
        if func.kind == "model":
            if func.name not in model_scores:
                raise KeyError(f"no model_scores for reward model {func.name!r} ({func.path})")
            scores = np.asarray(model_scores[func.name], np.float32).reshape(-1)
            if scores.shape != (num_rows,):
                raise ValueError(
                    f"reward model {func.name!r}: {scores.shape[0]} scores for {num_rows} rows"
                )
            per_func[:, f] = scores
        else:
            per_func[:, f] = _run(func, prompts, texts, ids, columns)

    weights = np.asarray([func.weight for func in funcs], np.float32)
    total = np.nansum(per_func * weights, axis=1).astype(np.float32)
    unscorable = np.isnan(per_func).all(axis=1)
    total[unscorable] = np.nan
    if unscorable.any():
        logger.warning(
            "every reward function returned None for %d of %d completions, e.g. %s",
            int(unscorable.sum()),
            num_rows,
            _describe_row(prompts, texts, int(np.flatnonzero(unscorable)[0])),
        )
    return total, per_func


def _nanstd(x: np.ndarray) -> float:
    """Unbiased std of the non-NaN entries (TRL's `nanstd`); NaN with fewer than two."""
    x = x[~np.isnan(x)]
    return float(np.std(x, ddof=1)) if x.size > 1 else math.nan


def reward_metrics(
    funcs: Sequence[RewardFunction], total: np.ndarray, per_func: np.ndarray
) -> dict[str, float]:
    """TRL's reward metrics of one batch (pass all rows, e.g. gathered from every process).

    `reward` / `reward_std`: NaN-ignoring mean and unbiased std of `total` over the batch;
    `rewards/<name>/mean` / `rewards/<name>/std`: the same per function, over the rows it scored.
    A statistic with no data is NaN.
    """
    total, per_func = np.asarray(total, np.float64), np.asarray(per_func, np.float64)

    def mean(x: np.ndarray) -> float:
        x = x[~np.isnan(x)]
        return float(x.mean()) if x.size else math.nan

    metrics = {"reward": mean(total), "reward_std": _nanstd(total)}
    for f, func in enumerate(funcs):
        metrics[f"rewards/{func.name}/mean"] = mean(per_func[:, f])
        metrics[f"rewards/{func.name}/std"] = _nanstd(per_func[:, f])
    return metrics
