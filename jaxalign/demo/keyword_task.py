"""A verifiable-reward task for GRPO on the tiny review model: mention the requested aspect.

Each prompt row is `{"prompt": "(acting) The film was", "keyword": "acting"}`: a review opening
tagged with one of the corpus's aspect nouns. `mentions_keyword` rewards a completion with 1.0 when
the keyword appears in it as a word, else 0.0: a program checks the text, no learned judge. An SFT'd
review model mentions a given aspect now and then by chance, so groups of samples differ in reward
and GRPO has a signal; copying the tag (or naming more aspects) raises the reward.

The reward function has TRL's signature (`prompts`, `completions`, dataset columns as keyword
arguments, `**kwargs`), so the same function runs in TRL's `GRPOTrainer`.
"""

from __future__ import annotations

import random
import re
from typing import Any

from jaxalign.demo.corpus import make_prompts

# Aspects the review corpus often names, so the SFT model mentions each now and then by chance.
KEYWORDS = ("acting", "plot", "ending", "cinematography")


def keyword_prompt_rows(n: int, *, seed: int, split: str = "train") -> list[dict[str, str]]:
    """`n` rows `{"prompt", "keyword"}`: held-in (`train`) or held-out (`eval`) review openings."""
    rng = random.Random(seed)
    rows = []
    for opening in make_prompts(n, seed=seed, split=split):
        keyword = rng.choice(KEYWORDS)
        rows.append({"prompt": f"({keyword}) {opening}", "keyword": keyword})
    return rows


def _text(completion: Any) -> str:
    # Conversational datasets pass `[{"role": "assistant", "content": ...}]`.
    return completion if isinstance(completion, str) else completion[-1]["content"]


def mentions_keyword(
    prompts: list[Any], completions: list[Any], keyword: list[str], **kwargs: Any
) -> list[float]:
    """1.0 where the completion contains its row's `keyword` as a whole word, else 0.0."""
    del prompts, kwargs
    return [
        1.0 if re.search(rf"\b{re.escape(word)}\b", _text(completion).lower()) else 0.0
        for completion, word in zip(completions, keyword, strict=True)
    ]
