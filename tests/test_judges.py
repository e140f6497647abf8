"""Judges: VADER sentiment ordering and negation, trivial judges, the name registry."""

import numpy as np
import pytest

from jaxalign.judges import VaderSentimentJudge, get_judge, join_prompt_response


def test_vader_orders_positive_over_negative():
    judge = get_judge("vader")
    scores = judge(
        ["", ""], ["This movie was wonderful, I loved it.", "This movie was terrible and boring."]
    )
    assert scores.dtype == np.float32 and scores.shape == (2,)
    assert scores[0] > 0 > scores[1]


def test_vader_handles_negation():
    judge = VaderSentimentJudge()
    not_bad, bad = judge(["The plot was", "The plot was"], [" not bad at all.", " bad."])
    assert not_bad > 0 > bad


def test_vader_scores_prompt_with_response_by_default():
    prompts, responses = ["The plot was not"], [" bad at all."]
    assert get_judge("vader")(prompts, responses)[0] > 0
    assert get_judge("vader_response")(prompts, responses)[0] < 0


def test_join_prompt_response():
    assert join_prompt_response("It was", "great") == "It was great"
    assert join_prompt_response("It was", " great") == "It was great"
    assert join_prompt_response("", "great") == "great"


def test_trivial_judges():
    responses = ["great, Great film!", "", "a b c"]
    np.testing.assert_array_equal(get_judge("length")([""] * 3, responses), [3, 0, 3])
    np.testing.assert_array_equal(get_judge("token_count:great")([""] * 3, responses), [2, 0, 0])


def test_batch_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        get_judge("length")(["a", "b"], ["c"])


def test_unknown_judge_lists_known_names():
    with pytest.raises(ValueError, match="unknown judge 'sentiment'") as error:
        get_judge("sentiment")
    for name in ("vader", "length", "token_count:<word>"):
        assert name in str(error.value)
    with pytest.raises(ValueError):
        get_judge("token_count:")
