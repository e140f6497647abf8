"""Demo corpus and tokenizer: determinism, sentiment balance, HF round trip."""

import json
import random

import numpy as np
import pytest
from transformers import AutoTokenizer
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from jaxalign.demo import corpus
from jaxalign.demo.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def reviews() -> list[str]:
    return corpus.generate_reviews(2000, seed=0)


def test_generate_reviews_is_seeded(reviews):
    assert corpus.generate_reviews(2000, seed=0) == reviews
    other = corpus.generate_reviews(2000, seed=1)
    assert other != reviews
    assert len(set(other) & set(reviews)) < 100


def test_reviews_have_negation_and_mixed_sentiment(reviews):
    negation_markers = ("not bad at all", "not exactly", "hardly worth", "not very", "never ")
    assert sum(any(m in r for m in negation_markers) for r in reviews) > 100
    assert sum((", but " in r or ", yet " in r or "Although" in r) for r in reviews) > 200


def test_review_lengths_and_vocabulary(reviews):
    lengths = np.array([len(r.split()) for r in reviews])
    assert lengths.min() >= 4 and lengths.max() <= 45
    assert 12 <= np.median(lengths) <= 30
    assert 200 <= len(corpus.word_vocabulary(reviews)) <= 600


def test_vader_sentiment_is_balanced(reviews):
    analyzer = SentimentIntensityAnalyzer()
    compounds = np.array([analyzer.polarity_scores(r)["compound"] for r in reviews])
    assert -0.3 <= compounds.mean() <= 0.3
    assert (compounds > 0.8).sum() > 100
    assert (compounds < -0.8).sum() > 100


def test_split_prompt_cuts_at_a_word_boundary():
    rng = random.Random(0)
    review = "I watched The Quiet Harbor last night and it was not bad at all."
    for _ in range(50):
        prompt, continuation = corpus.split_prompt(review, min_words=2, max_words=8, rng=rng)
        assert prompt + continuation == review
        assert 2 <= len(prompt.split()) <= 8
        assert continuation.startswith(" ") and continuation.strip()
    with pytest.raises(ValueError):
        corpus.split_prompt("Great film.", min_words=2, max_words=8, rng=rng)


def test_make_prompts_distinct_seeded_and_split():
    prompts = corpus.make_prompts(300, seed=0)
    assert len(set(prompts)) == 300
    assert all(2 <= len(p.split()) <= 8 for p in prompts)
    assert corpus.make_prompts(300, seed=0) == prompts
    assert corpus.make_prompts(300, seed=1) != prompts
    held_in = corpus.make_prompts(300, seed=0, split="train")
    held_out = corpus.make_prompts(300, seed=1, split="eval")
    assert not set(held_in) & set(held_out)


def test_write_sft_jsonl(tmp_path, reviews):
    path = tmp_path / "sft.jsonl"
    assert corpus.write_sft_jsonl(path, reviews[:100], seed=0) == 100
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["prompt"] + row["completion"] for row in rows] == reviews[:100]
    assert all(row["completion"].startswith(" ") for row in rows)


def test_tokenizer_trains_reloads_and_round_trips(tmp_path, reviews):
    out_dir = train_tokenizer(reviews, tmp_path / "tok", vocab_size=512)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert len(tokenizer) == 512
    special_ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert None not in special_ids and len(special_ids) == 3
    for text in reviews[:200]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer("Great film.")["input_ids"][0] == tokenizer.bos_token_id

    # Deterministic for a fixed corpus.
    again = train_tokenizer(reviews, tmp_path / "tok2", vocab_size=512)
    assert (tmp_path / "tok" / "tokenizer.json").read_text() == (
        tmp_path / "tok2" / "tokenizer.json"
    ).read_text(), again

    messages = [
        {"role": "user", "content": "Review a film."},
        {"role": "assistant", "content": "It was great."},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<bos><|user|>\nReview a film.<eos>\n<|assistant|>\nIt was great.<eos>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
