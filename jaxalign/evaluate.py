"""Reward and KL of a trained policy against its reference, on held-out prompts.

    python -m jaxalign.evaluate --policy=RUN/hf --reference=SFT/hf --prompts=prompts.jsonl \
        --judge=vader --samples_per_prompt=4 --out=eval.json
    python -m jaxalign.evaluate --policy=RUN/hf --reference=SFT/hf --prompts=prompts.jsonl \
        --reward_model=RM/hf

For each prompt, responses y ~ π(·|x) are sampled (temperature 1); the score is the judge's (or the
reward model's) and the sequence-level KL(π ‖ π_ref) is estimated by the sample mean of
log π(y|x) − log π_ref(y|x) (Rafailov et al. 2023 §6.1 plot reward against this KL). Means come with
standard errors over responses.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.data import DataError, RowStats, load_rows, tokenize_prompt
from jaxalign.data.sources import DATA_SUFFIXES
from jaxalign.judges import Judge, get_judge
from jaxalign.models import (
    CheckpointError,
    Transformer,
    UnsupportedConfigError,
    from_pretrained,
    load_tokenizer,
)
from jaxalign.sampling import SamplingConfig, generate, left_pad, response_logprobs
from jaxalign.trainers.pairwise import sequence_scores

logger = logging.getLogger(__name__)


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.mean()) if len(values) else float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def read_prompts(path: str | Path) -> list[str]:
    """The `prompt` strings of a JSONL (or JSON / parquet) file, in file order.

    A row that is not UTF-8, not JSON, or whose `prompt` is missing, not a string or blank raises
    a `DataError` naming `file:line` and the field; a file without prompts raises one naming it.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such prompts file: {path}")
    if not str(path).endswith(DATA_SUFFIXES):
        detail = f"expected a {'/'.join(DATA_SUFFIXES)} file of rows with a 'prompt'"
        raise DataError(str(path), None, "bad_file", detail)
    prompts = []
    for row, where in load_rows(path):
        prompt = row.get("prompt")
        if prompt is None:
            raise DataError(where, "prompt", "missing_field", "required field is missing")
        if not isinstance(prompt, str):
            detail = f"expected a string, got {type(prompt).__name__}"
            raise DataError(where, "prompt", "wrong_type", detail)
        if not prompt.strip():
            raise DataError(where, "prompt", "empty_prompt", "prompt is empty")
        prompts.append(prompt)
    if not prompts:
        raise DataError(str(path), None, "no_rows", "no prompts: expected a 'prompt' per line")
    return prompts


def sample_and_score(
    policy: Transformer,
    policy_params: Any,
    ref_params: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    rng: jax.Array,
    sampling: SamplingConfig,
    judge: Judge | None = None,
    reward_model: tuple[Transformer, Any] | None = None,
    batch_size: int = 64,
    prompt_bucket: int = 32,
) -> dict[str, list]:
    """Per-response texts, scores and log π − log π_ref summed over the response.

    Each prompt is encoded with BOS and, when longer than `prompt_bucket` tokens, cut from the
    left keeping BOS (as the training data pipeline does). Besides the texts, the samples hold the
    token ids that were scored (`prompt_ids`, `response_ids`).
    """
    if not prompts:
        raise ValueError("no prompts to evaluate")
    out: dict[str, list] = {
        "prompts": [],
        "responses": [],
        "scores": [],
        "kl": [],
        "length": [],
        "prompt_ids": [],
        "response_ids": [],
    }
    stats = RowStats()  # counts the prompts cut to `prompt_bucket`
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        sequences = []
        for index, prompt in enumerate(chunk, start=start):
            row, where = {"prompt": prompt}, f"prompt {index}"
            encoded = tokenize_prompt(
                row, tokenizer, max_prompt_length=prompt_bucket, where=where, stats=stats
            )
            sequences.append(encoded["prompt_ids"].tolist())
        ids, mask = left_pad(sequences, prompt_bucket, sampling.pad_token_id)
        ids, mask = jnp.asarray(ids), jnp.asarray(mask)
        gen = generate(
            policy, policy_params, ids, mask, rng=jax.random.fold_in(rng, start), config=sampling
        )
        logps = response_logprobs(
            policy, policy_params, ids, mask, gen.tokens, gen.response_mask, temperature=1.0
        )
        ref_logps = response_logprobs(
            policy, ref_params, ids, mask, gen.tokens, gen.response_mask, temperature=1.0
        )
        response_mask = np.asarray(gen.response_mask)
        kl = np.asarray(((logps - ref_logps) * gen.response_mask).sum(-1))
        tokens = np.asarray(gen.tokens)
        responses = [
            tokenizer.decode(row[keep != 0].tolist(), skip_special_tokens=True)
            for row, keep in zip(tokens, response_mask, strict=True)
        ]
        if judge is not None:
            scores = np.asarray(judge(chunk, responses))
        else:
            rm, rm_params = reward_model
            full_ids = jnp.concatenate([ids, gen.tokens], axis=1)
            full_mask = jnp.concatenate([(mask != 0).astype(jnp.int32), gen.response_mask], axis=1)
            scores = np.asarray(sequence_scores(rm, rm_params, full_ids, full_mask))
        out["prompts"] += chunk
        out["responses"] += responses
        out["scores"] += [float(s) for s in scores]
        out["kl"] += [float(k) for k in kl]
        out["length"] += [int(n) for n in response_mask.sum(-1)]
        out["prompt_ids"] += sequences
        out["response_ids"] += [
            row[keep != 0].tolist() for row, keep in zip(tokens, response_mask, strict=True)
        ]
    if stats.truncated:
        logger.warning(
            "%d of %d prompts were longer than %d tokens; their start was cut (BOS kept)",
            stats.truncated["prompt"],
            len(prompts),
            prompt_bucket,
        )
    return out


def _examples(samples: dict[str, list], num_examples: int) -> list[dict[str, Any]]:
    """The first response to each of the first `num_examples` distinct prompts."""
    examples, seen = [], set()
    for prompt, response, score in zip(
        samples["prompts"], samples["responses"], samples["scores"], strict=True
    ):
        if prompt not in seen and len(examples) < num_examples:
            seen.add(prompt)
            examples.append({"prompt": prompt, "response": response, "score": score})
    return examples


def summarize(samples: dict[str, list], *, num_examples: int = 3) -> dict[str, Any]:
    reward, reward_se = mean_and_stderr(samples["scores"])
    kl, kl_se = mean_and_stderr(samples["kl"])
    return {
        "reward": reward,
        "reward_se": reward_se,
        "kl": kl,
        "kl_se": kl_se,
        "response_length": float(np.mean(samples["length"])),
        "num_samples": len(samples["scores"]),
        "examples": _examples(samples, num_examples),
    }


def evaluate_checkpoint(
    policy_dir: str,
    reference_dir: str,
    prompts: Sequence[str],
    *,
    judge_name: str = "",
    reward_model_dir: str = "",
    samples_per_prompt: int = 1,
    max_new_tokens: int = 32,
    max_prompt_length: int = 32,
    seed: int = 0,
    batch_size: int = 64,
    samples_out: str | Path = "",
) -> dict[str, Any]:
    """Loads the checkpoints (and tokenizer from `policy_dir`) and returns `summarize(...)`.

    `samples_out`, when given, receives one JSON line per response: its prompt, response, score,
    KL and the token ids that were scored.
    """
    if bool(judge_name) == bool(reward_model_dir):
        raise ValueError("give exactly one of --judge or --reward_model")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    policy, policy_params = from_pretrained(policy_dir)
    _, ref_params = from_pretrained(reference_dir)
    tokenizer = load_tokenizer(policy_dir)
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
    )
    reward_model = from_pretrained(reward_model_dir, head="scalar") if reward_model_dir else None
    samples = sample_and_score(
        policy,
        policy_params,
        ref_params,
        tokenizer,
        [p for p in prompts for _ in range(samples_per_prompt)],
        rng=jax.random.PRNGKey(seed),
        sampling=sampling,
        judge=get_judge(judge_name) if judge_name else None,
        reward_model=reward_model,
        batch_size=batch_size,
        prompt_bucket=max_prompt_length,
    )
    if samples_out:
        keys = ("prompts", "responses", "scores", "kl", "prompt_ids", "response_ids")
        names = ("prompt", "response", "score", "kl", "prompt_ids", "response_ids")
        lines = (
            json.dumps(dict(zip(names, values, strict=True)))
            for values in zip(*(samples[k] for k in keys), strict=True)
        )
        Path(samples_out).write_text("".join(line + "\n" for line in lines))
    return summarize(samples)


# Input faults the command line reports as one line (no traceback): bad prompt rows, unreadable
# or unsupported checkpoints, missing files.
_INPUT_ERRORS = (DataError, CheckpointError, UnsupportedConfigError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="HF directory of the trained policy")
    parser.add_argument("--reference", required=True, help="HF directory of the reference (SFT)")
    parser.add_argument("--prompts", required=True, help="JSONL file with a 'prompt' per line")
    parser.add_argument("--judge", default="", help="Python judge name, e.g. vader")
    parser.add_argument("--reward_model", default="", help="HF directory of a reward model")
    parser.add_argument("--samples_per_prompt", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument(
        "--max_prompt_length",
        type=int,
        default=32,
        help="longer prompts lose their start (BOS kept)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="write the summary JSON here")
    parser.add_argument("--samples_out", default="", help="write every response as JSONL here")
    args = parser.parse_args(argv)
    if bool(args.judge) == bool(args.reward_model):
        parser.error("give exactly one of --judge or --reward_model")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = evaluate_checkpoint(
            args.policy,
            args.reference,
            read_prompts(args.prompts),
            judge_name=args.judge,
            reward_model_dir=args.reward_model,
            samples_per_prompt=args.samples_per_prompt,
            max_new_tokens=args.max_new_tokens,
            max_prompt_length=args.max_prompt_length,
            seed=args.seed,
            samples_out=args.samples_out,
        )
    except _INPUT_ERRORS as e:
        sys.exit(f"jaxalign.evaluate: error: {e}")
    text = json.dumps(summary, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
