"""Judges: Python reward functions of text, for PPO reward hooks and for evaluation.

A judge maps a batch of `(prompt, response)` texts to one float32 score each:

    judge(prompts: list[str], responses: list[str]) -> np.ndarray  # [N], float32

Judges run on the host, outside `jax.jit`; callers decode token ids to text first.

`VaderSentimentJudge` is the ground-truth judge of the controlled-sentiment experiment
(Rafailov et al. 2023, §6.1, where a sentiment classifier scores generated reviews): it
labels preference pairs for DPO, serves as the reward for PPO, and scores evaluations.
`get_judge(name)` builds judges by name so configs can name them as strings.
"""

from collections.abc import Callable, Sequence

import numpy as np

Judge = Callable[[list[str], list[str]], np.ndarray]


def _check_batch(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")


def join_prompt_response(prompt: str, response: str) -> str:
    """The text a reader sees: prompt then response, one space between them when neither
    side brings its own whitespace (`"It was" + "great"` -> `"It was great"`)."""
    if not prompt or not response or prompt[-1].isspace() or response[0].isspace():
        return prompt + response
    return f"{prompt} {response}"


class VaderSentimentJudge:
    """Score = VADER compound sentiment in [-1, 1] (Hutto & Gilbert 2014).

    By default the judge scores `prompt + response`, the whole review, as the DPO paper
    scores whole generated reviews: the response alone loses context that decides its
    sentiment, e.g. prompt "The plot was not" + response " bad at all." reads negative on
    its own ("bad at all.") and positive as a whole. With `include_prompt=False` it scores
    the response alone (a policy then cannot be credited for sentiment already in the
    prompt, but negation split across the cut is misread).
    """

    def __init__(self, *, include_prompt: bool = True):
        # Imported here so `jaxalign.judges` imports without vaderSentiment installed.
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ImportError(
                "the vader judge needs vaderSentiment, part of the demo extra: "
                'pip install -e ".[demo]"'
            ) from None

        self.include_prompt = include_prompt
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        _check_batch(prompts, responses)
        texts = (
            [join_prompt_response(p, r) for p, r in zip(prompts, responses, strict=True)]
            if self.include_prompt
            else list(responses)
        )
        return np.array(
            [self._analyzer.polarity_scores(text)["compound"] for text in texts], dtype=np.float32
        )

    def __repr__(self) -> str:
        return f"VaderSentimentJudge(include_prompt={self.include_prompt})"


class LengthJudge:
    """Score = number of whitespace-separated words in the response (tests, length probes)."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        _check_batch(prompts, responses)
        return np.array([len(response.split()) for response in responses], dtype=np.float32)

    def __repr__(self) -> str:
        return "LengthJudge()"


class TokenCountJudge:
    """Score = how often `word` occurs as a whole word in the response, case-insensitive,
    surrounding punctuation ignored. A reward a policy can learn fast, for tests."""

    _PUNCTUATION = ".,;:!?\"'()[]"

    def __init__(self, word: str):
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"token_count needs one non-empty word, got {word!r}")
        self.word = word.lower()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        _check_batch(prompts, responses)
        counts = [
            sum(token.strip(self._PUNCTUATION).lower() == self.word for token in response.split())
            for response in responses
        ]
        return np.array(counts, dtype=np.float32)

    def __repr__(self) -> str:
        return f"TokenCountJudge({self.word!r})"


# One table of names: `get_judge` reads it and its error lists it.
_JUDGES: dict[str, Callable[[], Judge]] = {
    "vader": lambda: VaderSentimentJudge(include_prompt=True),
    "vader_response": lambda: VaderSentimentJudge(include_prompt=False),
    "length": LengthJudge,
}
_PARAMETRIC_JUDGES: dict[str, Callable[[str], Judge]] = {
    "token_count": TokenCountJudge,
}
KNOWN_JUDGES = (*_JUDGES, *(f"{name}:<word>" for name in _PARAMETRIC_JUDGES))


def get_judge(name: str) -> Judge:
    """The judge called `name`: "vader", "vader_response", "length" or "token_count:<word>".

    Raises:
      ValueError: for an unknown name; the message lists the known ones.
    """
    if name in _JUDGES:
        return _JUDGES[name]()
    kind, sep, argument = name.partition(":")
    if sep and kind in _PARAMETRIC_JUDGES:
        return _PARAMETRIC_JUDGES[kind](argument)
    raise ValueError(f"unknown judge {name!r}; known judges: {', '.join(KNOWN_JUDGES)}")
