"""Small local datasets for the tiny configs, tests and the demo: tokenizer, SFT, preferences, prompts.

    python -m jaxalign.demo.data --out=/tmp/jaxalign-tiny

Everything is generated offline from the seeded review corpus. Preference pairs here are labelled
by a rule (the judge's sentiment of prompt + response); the demo pipeline instead samples its pairs
from the SFT model, as the DPO paper does.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from jaxalign.demo.corpus import generate_reviews, make_prompts, split_prompt, write_sft_jsonl
from jaxalign.demo.keyword_task import keyword_prompt_rows
from jaxalign.demo.tokenizer import train_tokenizer
from jaxalign.judges import get_judge


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def rule_preference_pairs(num_pairs: int, *, seed: int, split: str) -> list[dict]:
    """Pairs of continuations for one prompt; `chosen` is the one the sentiment judge prefers."""
    rng = random.Random(seed)
    judge = get_judge("vader")
    reviews = generate_reviews(4 * num_pairs, seed=seed + 1)
    tails = [split_prompt(r, min_words=2, max_words=6, rng=rng)[1] for r in reviews]
    prompts = make_prompts(num_pairs, seed=seed, split=split)
    rows = []
    for prompt in prompts:
        first, second = rng.sample(tails, 2)
        scores = judge([prompt, prompt], [first, second])
        if abs(float(scores[0] - scores[1])) < 0.2:
            continue  # too close to call: skip, as preference datasets drop ties
        chosen, rejected = (first, second) if scores[0] > scores[1] else (second, first)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def write_tiny_data(out_dir: str | Path, *, seed: int = 0, num_reviews: int = 2000) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reviews = generate_reviews(num_reviews, seed=seed)
    train_tokenizer(reviews, out / "tokenizer", vocab_size=512)
    split = int(0.9 * len(reviews))
    write_sft_jsonl(out / "sft_train.jsonl", reviews[:split], seed=seed)
    write_sft_jsonl(out / "sft_eval.jsonl", reviews[split:], seed=seed + 1)
    _write_jsonl(out / "prefs_train.jsonl", rule_preference_pairs(600, seed=seed, split="train"))
    _write_jsonl(out / "prefs_eval.jsonl", rule_preference_pairs(200, seed=seed + 7, split="eval"))
    for name, split_name in (("prompts_train.jsonl", "train"), ("prompts_eval.jsonl", "eval")):
        prompts = make_prompts(256, seed=seed, split=split_name)
        _write_jsonl(out / name, [{"prompt": p} for p in prompts])
    _write_jsonl(out / "keyword_train.jsonl", keyword_prompt_rows(256, seed=seed, split="train"))
    _write_jsonl(out / "keyword_eval.jsonl", keyword_prompt_rows(64, seed=seed, split="eval"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {write_tiny_data(args.out, seed=args.seed)}")


if __name__ == "__main__":
    main()
