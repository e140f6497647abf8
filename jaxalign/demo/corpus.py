"""Seeded toy corpus of movie reviews for the offline controlled-sentiment demo.

The demo reproduces, at toy scale, the controlled-sentiment experiment of the DPO paper
(Rafailov et al. 2023, §6.1): an LM is SFT-trained on movie reviews, prompted with a review
prefix, and aligned so that its continuations are positive, as judged by a sentiment scorer
(here VADER, see `jaxalign.judges`).

Reviews come from a small compositional grammar: a neutral opener ("I watched The Quiet
Harbor last night and", "The pacing in this western was") followed by a verdict, then
optionally a sentence about an aspect (plot, acting, score, ...) and a closing line. A review's
sentiment is drawn first (positive, negative or mixed, about equally often) and every slot is
filled to agree with it; verdicts are sometimes negated ("not bad at all", "not exactly a
masterpiece", "hardly worth it") and mixed reviews contrast two aspects ("great acting, but
a boring plot"). Slot words that are not meant to carry sentiment (titles, names, genres,
aspects) were checked to be absent from VADER's lexicon, so the sentiment of a review comes
from its verdict words only. Mean VADER compound over reviews is near 0, which leaves an SFT
model on this corpus headroom for alignment to push its continuations positive.

The SFT model is trained on full reviews split at random prefix points (`write_sft_jsonl`):
the prefix is the prompt, the rest the completion. Evaluation prompts (`make_prompts`) are
prefixes of 2–8 words cut the same way.

All randomness flows from an explicit seed through `random.Random`, so a seed gives the same
texts on every platform and Python version.
"""

import json
import random
import re
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

# --- Neutral slot words (none is in VADER's lexicon). ---------------------------------------
_TITLE_ADJECTIVES = (
    "Silent Golden Northern Hidden Last Quiet Long Iron Distant Winter Midnight Paper Glass "
    "Hollow Scarlet Velvet Electric Crimson Empty Seventh"
).split()
_TITLE_NOUNS = (
    "Harbor Crown Summer River Garden Mountain City Road Letter House Storm Shadow Orchard "
    "Lighthouse Station Mirror Island Frontier Voyage Kingdom Signal Tide Valley Horizon"
).split()
_FIRST_NAMES = "Anna Tom Maria James Elena David Sofia Marcus Clara Victor Nina Oscar".split()
_LAST_NAMES = (
    "Reyes Hale Moreau Becker Novak Lindqvist Ortega Park Whitman Duval Ferreira Kane".split()
)
_GENRES = (
    "drama",
    "western",
    "documentary",
    "musical",
    "mystery",
    "biopic",
    "noir",
    "heist movie",
    "period piece",
    "space opera",
    "spy film",
    "courtroom drama",
    "road movie",
    "family film",
    "sci-fi film",
)
_ROLES = (
    "detective cowboy captain singer pilot doctor teacher scientist sheriff nurse rival dancer "
    "soldier widow lawyer journalist boxer chef"
).split()
_RELATIONS = "sister brother roommate dad mom partner wife husband kids".split()
_TIMES = ("last night", "last week", "on Sunday", "over the weekend", "on a long flight")
_VENUES = ("at the cinema", "at home", "at a festival", "on a small screen", "in an old theater")

# (noun, kind): kind picks the verb ("was"/"were") and the article ("a"/"an"/none).
_ASPECTS = (
    ("plot", "count"),
    ("acting", "mass"),
    ("score", "count"),
    ("cinematography", "mass"),
    ("dialogue", "mass"),
    ("pacing", "mass"),
    ("ending", "count"),
    ("soundtrack", "count"),
    ("script", "count"),
    ("cast", "count"),
    ("direction", "mass"),
    ("editing", "mass"),
    ("lead performance", "count"),
    ("camera work", "mass"),
    ("final act", "count"),
    ("opening scene", "count"),
    ("production design", "mass"),
    ("costumes", "plural"),
    ("characters", "plural"),
    ("visuals", "plural"),
    ("story", "count"),
    ("lighting", "mass"),
    ("sound design", "mass"),
    ("twist", "count"),
)

# --- Graded adjectives. Some are in VADER's lexicon, some not (VADER is an imperfect judge). --
_POSITIVE_STRONG = (
    "brilliant wonderful superb outstanding excellent amazing fantastic beautiful great "
    "lovely delightful charming perfect awesome heartfelt"
).split()
_POSITIVE_MILD = (
    "good nice fun enjoyable engaging clever elegant powerful fresh solid funny smart lively "
    "thoughtful gripping memorable polished stylish witty"
).split()
_NEGATIVE_MILD = (
    "weak dull messy boring confusing lazy annoying tired sluggish disjointed irritating "
    "frustrating lame flat predictable forgettable wooden mediocre"
).split()
_NEGATIVE_STRONG = (
    "terrible awful dreadful horrible painful bad disappointing ridiculous stupid poor "
    "pathetic lousy dismal insipid"
).split()
_INTENSIFIERS = "very really incredibly extremely remarkably quite absolutely utterly so".split()
_DOWNTONERS = ("somewhat", "slightly", "a bit", "kind of", "fairly", "rather")

Polarity = Literal["pos", "neg"]
_OPPOSITE: dict[str, Polarity] = {"pos": "neg", "neg": "pos"}


def _adjective(rng: random.Random, polarity: Polarity) -> str:
    strong, mild = (
        (_POSITIVE_STRONG, _POSITIVE_MILD)
        if polarity == "pos"
        else (_NEGATIVE_STRONG, _NEGATIVE_MILD)
    )
    return rng.choice(strong if rng.random() < 0.5 else mild)


def _adjective_phrase(rng: random.Random, polarity: Polarity) -> str:
    """A predicate after a copula ("was ..."), sometimes intensified, toned down or negated."""
    draw = rng.random()
    if draw < 0.2:  # Negated: the words say one thing, the net sentiment is `polarity`.
        if polarity == "pos":
            mild_negative = rng.choice(_NEGATIVE_MILD)
            return rng.choice(
                (
                    "not bad at all",
                    f"not {mild_negative} at all",
                    f"never {mild_negative} for a second",
                    f"not {rng.choice(_NEGATIVE_STRONG)} in the slightest",
                )
            )
        return rng.choice(
            (
                "not exactly a masterpiece",
                f"not exactly {rng.choice(_POSITIVE_MILD)}",
                f"not very {rng.choice(_POSITIVE_MILD)}",
                "hardly worth it",
                "hardly worth the ticket",
                "nothing special",
                f"not as {rng.choice(_POSITIVE_MILD)} as I had hoped",
            )
        )
    adjective = _adjective(rng, polarity)
    if draw < 0.55:
        return f"{rng.choice(_INTENSIFIERS)} {adjective}"
    if draw < 0.65:
        return f"{rng.choice(_DOWNTONERS)} {adjective}"
    return adjective


def _title(rng: random.Random) -> str:
    return f"The {rng.choice(_TITLE_ADJECTIVES)} {rng.choice(_TITLE_NOUNS)}"


def _actor(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"


def _aspect(rng: random.Random, *, exclude: str = "") -> tuple[str, str]:
    noun, kind = rng.choice(_ASPECTS)
    while noun == exclude:
        noun, kind = rng.choice(_ASPECTS)
    return noun, kind


def _copula(kind: str) -> str:
    return "were" if kind == "plural" else "was"


def _noun_phrase(adjective: str, noun: str, kind: str) -> str:
    """'a boring plot', 'an awful ending', 'great acting', 'wooden characters'."""
    if kind != "count":
        return f"{adjective} {noun}"
    article = "an" if adjective[0] in "aeiou" else "a"
    return f"{article} {adjective} {noun}"


def _capitalize(text: str) -> str:
    return text[0].upper() + text[1:]


def _end(rng: random.Random) -> str:
    return "!" if rng.random() < 0.15 else "."


# --- Sentences. ---------------------------------------------------------------------------
def _clause_after_and(rng: random.Random, polarity: Polarity) -> str:
    """What follows 'I watched X last night and'."""
    phrase = _adjective_phrase(rng, polarity)
    shared = (f"it was {phrase}", f"I found it {phrase}", f"I thought it was {phrase}")
    if polarity == "pos":
        own = ("loved every minute of it", "I loved it", "I enjoyed it more than I expected")
    else:
        own = ("hated every minute of it", "I hated it", "I was bored the whole time")
    return rng.choice(shared + own)


def _opening_sentence(rng: random.Random, polarity: Polarity) -> str:
    """A neutral opener, then a verdict of `polarity`: the prompt prefixes live here."""
    noun, kind = _aspect(rng)
    cop = _copula(kind)
    genre = rng.choice(_GENRES)
    title = _title(rng)
    copula_openers = (
        f"The {noun} in this {genre} {cop}",
        f"The {noun} of {title} {cop}",
        f"{title} was",
        f"This {genre} with {_actor(rng)} was",
        f"Honestly, this {genre} was",
        f"I thought the {noun} {cop}",
        f"As a fan of {_actor(rng)}, I found this {genre}",
        f"My {rng.choice(_RELATIONS)} and I agreed that {title} was",
        f"Seen {rng.choice(_VENUES)}, this {genre} was",
    )
    and_openers = (
        f"I watched {title} {rng.choice(_TIMES)} and",
        f"I went to see {title} with my {rng.choice(_RELATIONS)} and",
        f"I finally saw this {genre} {rng.choice(_TIMES)} and",
        f"We rented {title} {rng.choice(_TIMES)} and",
    )
    if rng.random() < 0.6:
        sentence = f"{rng.choice(copula_openers)} {_adjective_phrase(rng, polarity)}"
    else:
        sentence = f"{rng.choice(and_openers)} {_clause_after_and(rng, polarity)}"
    return sentence + _end(rng)


def _aspect_sentence(rng: random.Random, polarity: Polarity) -> str:
    noun, kind = _aspect(rng)
    other_noun, other_kind = _aspect(rng, exclude=noun)
    templates = (
        lambda: f"The {noun} {_copula(kind)} {_adjective_phrase(rng, polarity)}",
        lambda: f"Even the {noun} {_copula(kind)} {_adjective(rng, polarity)}",
        lambda: (
            f"{_actor(rng)} gives "
            f"{_noun_phrase(_adjective(rng, polarity), 'performance', 'count')} "
            f"as the {rng.choice(_ROLES)}"
        ),
        lambda: _capitalize(
            f"{_noun_phrase(_adjective(rng, polarity), noun, kind)} and "
            f"{_noun_phrase(_adjective(rng, polarity), other_noun, other_kind)}"
        ),
    )
    return rng.choice(templates)() + _end(rng)


def _contrast_sentence(rng: random.Random, first: Polarity) -> str:
    """A mixed sentence: `first` about one aspect, the opposite about another."""
    second = _OPPOSITE[first]
    noun, kind = _aspect(rng)
    other_noun, other_kind = _aspect(rng, exclude=noun)
    templates = (
        lambda: (
            f"The {noun} {_copula(kind)} {_adjective_phrase(rng, first)}, but the {other_noun} "
            f"{_copula(other_kind)} {_adjective_phrase(rng, second)}"
        ),
        lambda: _capitalize(
            f"{_noun_phrase(_adjective(rng, first), noun, kind)}, but "
            f"{_noun_phrase(_adjective(rng, second), other_noun, other_kind)}"
        ),
        lambda: (
            f"Although the {noun} {_copula(kind)} {_adjective(rng, first)}, the {other_noun} "
            f"{_copula(other_kind)} {_adjective_phrase(rng, second)}"
        ),
        lambda: (
            f"The {noun} {_copula(kind)} {_adjective(rng, first)}, yet the {other_noun} "
            f"{_copula(other_kind)} {_adjective(rng, second)}"
        ),
    )
    return rng.choice(templates)() + "."


def _closing_sentence(rng: random.Random, polarity: Polarity | None) -> str:
    if polarity == "pos":
        return rng.choice(
            (
                "Highly recommended.",
                "Definitely worth a watch.",
                "A real gem.",
                "I would watch it again.",
                f"{rng.choice(('Eight', 'Nine', 'Ten'))} out of ten.",
            )
        )
    if polarity == "neg":
        return rng.choice(
            (
                "Skip this one.",
                "A total waste of time.",
                "I would not recommend it.",
                "What a mess.",
                f"{rng.choice(('One', 'Two', 'Three'))} out of ten.",
            )
        )
    return f"{rng.choice(('Five', 'Six'))} out of ten."


# Negative verdicts score weaker under VADER than positive ones (several negative adjectives
# are missing from its lexicon, "hardly worth it" reads as positive), so negative reviews are
# drawn a little more often; this puts the mean compound near 0 (tests/test_demo_corpus.py).
_LABEL_WEIGHTS = (0.30, 0.40, 0.30)


def _review(rng: random.Random) -> str:
    label = rng.choices(("pos", "neg", "mixed"), weights=_LABEL_WEIGHTS)[0]
    if label == "mixed":
        # The verdict after "but" is the one a reader (and VADER) weighs more.
        first: Polarity = rng.choice(("pos", "neg"))
        sentences = [_opening_sentence(rng, first), _contrast_sentence(rng, first)]
        if rng.random() < 0.4:
            sentences.append(_closing_sentence(rng, None))
        return " ".join(sentences)
    polarity: Polarity = "pos" if label == "pos" else "neg"
    sentences = [_opening_sentence(rng, polarity)]
    if rng.random() < 0.7:
        if rng.random() < 0.2:  # A concession ending on the review's own polarity.
            sentences.append(_contrast_sentence(rng, _OPPOSITE[polarity]))
        else:
            sentences.append(_aspect_sentence(rng, polarity))
    if rng.random() < 0.5:
        sentences.append(_closing_sentence(rng, polarity))
    return " ".join(sentences)


# --- Public API. --------------------------------------------------------------------------
def generate_reviews(n: int, *, seed: int) -> list[str]:
    """`n` movie reviews (1–3 sentences, ~5–40 words), identical for identical `seed`.

    About a third each are positive, negative and mixed; about a fifth of verdicts are
    negated ("not bad at all", "hardly worth it").
    """
    rng = random.Random(seed)
    return [_review(rng) for _ in range(n)]


_WORD = re.compile(r"\S+")


def split_prompt(
    review: str, *, min_words: int = 2, max_words: int = 8, rng: random.Random
) -> tuple[str, str]:
    """Cuts `review` after a random number of words in [min_words, max_words].

    Returns:
      `(prompt, continuation)` with `prompt + continuation == review`: the prompt holds the
      first words (no trailing space), the continuation the rest, starting with its space.
      At least one word is always left for the continuation.

    Raises:
      ValueError: if the review has fewer than `min_words + 1` words.
    """
    word_ends = [match.end() for match in _WORD.finditer(review)]
    if min_words < 1 or len(word_ends) <= min_words:
        raise ValueError(
            f"cannot cut {len(word_ends)} words after {min_words} and keep a continuation: "
            f"{review!r}"
        )
    num_prompt_words = rng.randint(min_words, min(max_words, len(word_ends) - 1))
    cut = word_ends[num_prompt_words - 1]
    return review[:cut], review[cut:]


def prompt_split(prompt: str, *, eval_fraction: float = 0.2) -> Literal["train", "eval"]:
    """The fixed split a prompt belongs to, from a hash of its text (not of any seed).

    Prompts are short prefixes, so two seeds draw many of the same ones; a text hash keeps
    held-in and held-out prompts disjoint whatever seeds draw them.
    """
    bucket = zlib.crc32(prompt.encode("utf-8")) % 10_000
    return "eval" if bucket < eval_fraction * 10_000 else "train"


def make_prompts(
    n: int,
    *,
    seed: int,
    min_words: int = 2,
    max_words: int = 8,
    split: Literal["all", "train", "eval"] = "all",
    eval_fraction: float = 0.2,
) -> list[str]:
    """`n` distinct review prefixes of `min_words`–`max_words` words, in draw order.

    Args:
      n: how many prompts.
      seed: drives which reviews are drawn and where they are cut.
      min_words, max_words: prefix length range, in words.
      split: "train" (held-in) or "eval" (held-out) keeps only prompts of that side of
        `prompt_split`; the two are disjoint for any seeds. "all" keeps both.
      eval_fraction: share of the prompt space that is held out.

    Raises:
      ValueError: if the grammar cannot yield `n` distinct prompts for these settings.
    """
    if split not in ("all", "train", "eval"):
        raise ValueError(f"split must be 'all', 'train' or 'eval', got {split!r}")
    rng = random.Random(seed)
    prompts: list[str] = []
    seen: set[str] = set()
    max_draws = 200 * n + 10_000
    for _ in range(max_draws):
        if len(prompts) == n:
            break
        prompt, _ = split_prompt(_review(rng), min_words=min_words, max_words=max_words, rng=rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        if split == "all" or prompt_split(prompt, eval_fraction=eval_fraction) == split:
            prompts.append(prompt)
    if len(prompts) < n:
        raise ValueError(f"found only {len(prompts)} distinct {split} prompts, asked for {n}")
    return prompts


def write_sft_jsonl(
    path: str | Path,
    reviews: Iterable[str],
    *,
    seed: int,
    min_words: int = 2,
    max_words: int = 8,
    splits_per_review: int = 1,
) -> int:
    """Writes SFT rows `{"prompt": prefix, "completion": rest}`, one JSON object per line.

    The SFT model is trained on full reviews split at random prefix points: each review is
    cut `splits_per_review` times by `split_prompt`, so `prompt + completion == review` and
    the completion starts with a space. Whether the loss covers the prompt and where BOS/EOS
    go is the SFT data loader's business, not this file's.

    Returns:
      The number of rows written.
    """
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    num_rows = 0
    with path.open("w", encoding="utf-8") as f:
        for review in reviews:
            for _ in range(splits_per_review):
                prompt, completion = split_prompt(
                    review, min_words=min_words, max_words=max_words, rng=rng
                )
                f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
                num_rows += 1
    return num_rows


def word_vocabulary(texts: Sequence[str]) -> set[str]:
    """Distinct lower-cased words of `texts`, punctuation stripped."""
    return {word for text in texts for word in re.findall(r"[a-z'-]+", text.lower())}
