"""Padding of preference batches, one pair per row vs packed (`data.pack`), on a generated length
mix like UltraFeedback-binarized's (prompts ~150 ± 100 tokens, responses ~250 ± 150, normal,
clipped to >= 1, truncated as `tokenize_preference` truncates). Counts tokens only: no model.

    python bench/padding.py                       # a table: both layouts, two max_lengths
    python bench/padding.py --pairs 60000 --batch-size 64

`padding` is the share of the batches' token slots that are padding (`padding_fraction`); `slots
per pair` is the token slots a pair costs, the compute a step spends on it (attention aside: a
longer row costs more per token there).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from jaxalign.data.batching import (
    DEFAULT_BUCKETS,
    Buckets,
    pack_preference_pairs,
    padding_fraction,
    row_token_counts,
)


def generated_pairs(num_pairs: int, *, max_length: int, max_prompt_length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prompts = np.clip(rng.normal(150, 100, num_pairs), 1, None).astype(int)
    responses = np.clip(rng.normal(250, 150, (num_pairs, 2)), 1, None).astype(int)
    prompts = np.minimum(prompts, max_prompt_length)  # the prompt keeps its end
    responses = np.minimum(responses, max_length - prompts[:, None])  # responses are cut
    return [
        {
            "prompt_ids": np.zeros(p, np.int32),
            "chosen_ids": np.zeros(c, np.int32),
            "rejected_ids": np.zeros(r, np.int32),
        }
        for p, (c, r) in zip(prompts, responses, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-pairs", type=int, default=16, help="data.max_pairs_per_row")
    args = parser.parse_args()
    print(
        f"{'max_length':>10} {'layout':>8} {'rows':>14} {'padding':>17} {'slots per pair':>16} "
        f"{'pack s':>6}"
    )
    for max_length in (1024, 2048):
        pairs = generated_pairs(
            args.pairs, max_length=max_length, max_prompt_length=max_length // 2
        )
        for shared in (True, False):
            # The builder's buckets: shared rows reach 2 * max_length, with 1.5x steps between.
            row_length = 2 * max_length if shared else max_length
            steps = (1, 1.5) if shared else (1,)
            buckets = Buckets(
                {int(n * s) for n in DEFAULT_BUCKETS for s in steps}, max_length=row_length
            )
            start = time.perf_counter()
            rows = pack_preference_pairs(
                pairs, length=row_length, max_pairs=args.max_pairs, shared=shared
            )
            pack_s = time.perf_counter() - start
            real = sum(sum(row_token_counts(p, shared=shared)) for p in pairs)
            figures = []
            for examples in (pairs, rows):
                padding = padding_fraction(
                    examples, buckets=buckets, batch_size=args.batch_size, shared=shared
                )
                figures.append((padding, real / (1 - padding) / len(pairs)))
            (before, slots_before), (after, slots_after) = figures
            print(
                f"{max_length:>10} {'shared' if shared else 'two rows':>8} "
                f"{len(pairs):>6} -> {len(rows):>5} {before:>7.1%} -> {after:>6.1%} "
                f"{slots_before:>7.0f} -> {slots_after:>5.0f} {pack_s:>6.2f}"
            )


if __name__ == "__main__":
    main()
