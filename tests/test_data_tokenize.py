"""Row -> tokens: SFT loss masks, chat-template assistant masking, preference splits/truncation."""

import numpy as np
import pytest

from jaxalign.data import (
    DataError,
    RowStats,
    render_prompt,
    split_preference,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)
from jaxalign.data.testing import CHAT_TEMPLATE, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def tokens(tokenizer, token_ids):
    return tokenizer.convert_ids_to_tokens([int(i) for i in token_ids])


# --- SFT --------------------------------------------------------------------------------------


def test_prompt_tokens_get_zero_loss_weight(tokenizer):
    example = tokenize_sft(
        {"prompt": "hello world", "completion": "i am fine"}, tokenizer, max_length=32, where="f:1"
    )
    assert tokens(tokenizer, example["input_ids"]) == [
        "<s>", "hello", "world", "i", "am", "fine", "</s>"
    ]  # fmt: skip
    np.testing.assert_array_equal(example["loss_mask"], [0, 0, 0, 1, 1, 1, 1])
    assert example["input_ids"].dtype == np.int32 and example["loss_mask"].dtype == np.int32


def test_chat_template_masks_only_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "ok"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "i am fine"},
        {"role": "user", "content": "tell me a joke"},
        {"role": "assistant", "content": "sure"},
    ]
    example = tokenize_sft({"messages": messages}, tokenizer, max_length=64, where="f:1")
    got = list(
        zip(tokens(tokenizer, example["input_ids"]), example["loss_mask"].tolist(), strict=True)
    )
    assert got == [
        ("<s>", 0),
        ("<|system|>", 0), ("ok", 0), ("<|end|>", 0),
        ("<|user|>", 0), ("hello", 0), ("<|end|>", 0),
        ("<|assistant|>", 0), ("i", 1), ("am", 1), ("fine", 1), ("</s>", 1),
        ("<|user|>", 0), ("tell", 0), ("me", 0), ("a", 0), ("joke", 0), ("<|end|>", 0),
        ("<|assistant|>", 0), ("sure", 1), ("</s>", 1),
    ]  # fmt: skip


def test_assistant_content_repeated_in_user_turn_is_not_masked(tokenizer):
    # String search for "sure" would find the user's copy first; prefix rendering cannot.
    messages = [
        {"role": "user", "content": "sure"},
        {"role": "assistant", "content": "sure"},
    ]
    example = tokenize_sft({"messages": messages}, tokenizer, max_length=64, where="f:1")
    assert tokens(tokenizer, example["input_ids"]) == [
        "<s>", "<|user|>", "sure", "<|end|>", "<|assistant|>", "sure", "</s>"
    ]  # fmt: skip
    np.testing.assert_array_equal(example["loss_mask"], [0, 0, 0, 0, 0, 1, 1])


def test_bos_not_doubled_when_template_adds_it(tmp_path):
    tokenizer = build_tiny_tokenizer(tmp_path, chat_template="{{ bos_token }}" + CHAT_TEMPLATE)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}]
    example = tokenize_sft({"messages": messages}, tokenizer, max_length=64, where="f:1")
    assert tokens(tokenizer, example["input_ids"])[:2] == ["<s>", "<|user|>"]


def test_no_bos_when_tokenizer_has_none(tmp_path):
    tokenizer = build_tiny_tokenizer(tmp_path, with_bos=False)
    example = tokenize_sft(
        {"prompt": "hello", "completion": "yes"}, tokenizer, max_length=8, where="f:1"
    )
    assert tokens(tokenizer, example["input_ids"]) == ["hello", "yes", "</s>"]
    np.testing.assert_array_equal(example["loss_mask"], [0, 1, 1])


def test_sft_completion_truncated_and_counted(tokenizer):
    stats = RowStats()
    example = tokenize_sft(
        {"prompt": "hello", "completion": "one two three four"},
        tokenizer,
        max_length=4,
        where="f:1",
        stats=stats,
    )
    assert tokens(tokenizer, example["input_ids"]) == ["<s>", "hello", "one", "two"]
    np.testing.assert_array_equal(example["loss_mask"], [0, 0, 1, 1])
    assert stats.truncated == {"completion": 1}


@pytest.mark.parametrize(
    "row, field, reason",
    [
        ({"completion": "yes"}, "prompt", "missing_field"),
        ({"prompt": "hello"}, "completion", "missing_field"),
        ({"prompt": "hello", "completion": None}, "completion", "missing_field"),
        ({"prompt": "hello", "completion": "  "}, "completion", "empty_completion"),
        ({"prompt": 3, "completion": "yes"}, "prompt", "wrong_type"),
        ({"prompt": "one two three four", "completion": "yes"}, "prompt", "prompt_too_long"),
        ({"messages": "hello"}, "messages", "wrong_type"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no_assistant_turn"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
            "messages",
            "empty_completion",
        ),
        (
            {"messages": [{"role": "user", "content": ["hi"]}]},
            "messages",
            "wrong_type",
        ),
    ],
)
def test_sft_bad_rows_name_location_and_field(tokenizer, row, field, reason):
    with pytest.raises(DataError) as caught:
        tokenize_sft(row, tokenizer, max_length=5, where="data.jsonl:7")
    assert caught.value.reason == reason
    assert caught.value.field == field
    assert str(caught.value).startswith(f"data.jsonl:7: field {field!r}")


# --- preferences ------------------------------------------------------------------------------


def test_preference_string_format(tokenizer):
    row = {"prompt": "hello world", "chosen": "yes", "rejected": "no"}
    example = tokenize_preference(row, tokenizer, max_length=16, max_prompt_length=8, where="f:1")
    assert tokens(tokenizer, example["prompt_ids"]) == ["<s>", "hello", "world"]
    assert tokens(tokenizer, example["chosen_ids"]) == ["yes", "</s>"]
    assert tokens(tokenizer, example["rejected_ids"]) == ["no", "</s>"]


def test_preference_messages_format_ultrafeedback(tokenizer):
    prompt = "what is the capital of france ?"
    row = {
        "prompt": prompt,
        "chosen": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": "paris"},
        ],
        "rejected": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": "i am fine"},
        ],
    }
    text = split_preference(row, tokenizer, where="f:1")
    assert text.prompt == f"<|user|> {prompt} <|end|> <|assistant|> "
    assert (text.chosen, text.rejected) == ("paris </s> ", "i am fine </s> ")
    example = tokenize_preference(row, tokenizer, max_length=32, max_prompt_length=16, where="f:1")
    assert tokens(tokenizer, example["prompt_ids"])[-3:] == ["?", "<|end|>", "<|assistant|>"]
    assert tokens(tokenizer, example["chosen_ids"]) == ["paris", "</s>"]  # template's EOS only
    assert tokens(tokenizer, example["rejected_ids"]) == ["i", "am", "fine", "</s>"]


def test_preference_conversational_prompt_list(tokenizer):
    row = {
        "prompt": [{"role": "user", "content": "hello"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    text = split_preference(row, tokenizer, where="f:1")
    assert text.prompt == "<|user|> hello <|end|> <|assistant|> "
    assert (text.chosen, text.rejected) == ("yes </s> ", "no </s> ")


def test_preference_anthropic_hh_format(tokenizer):
    shared = "\n\nHuman: hello\n\nAssistant: i am fine\n\nHuman: tell me a joke\n\nAssistant:"
    row = {"chosen": shared + " sure , here is one", "rejected": shared + " no"}
    text = split_preference(row, tokenizer, where="f:1")
    assert text.prompt == shared
    assert (text.chosen, text.rejected) == (" sure , here is one", " no")


def test_preference_hh_split_in_common_prefix_not_inside_response(tokenizer):
    # Responses share their first word, and the chosen one quotes the marker itself.
    prompt = "\n\nHuman: hello\n\nAssistant:"
    row = {"chosen": prompt + " yes\n\nAssistant: ok", "rejected": prompt + " yes no"}
    text = split_preference(row, tokenizer, where="f:1")
    assert text.prompt == prompt
    assert text.chosen == " yes\n\nAssistant: ok"


def test_preference_truncation_keeps_prompt_end(tokenizer):
    stats = RowStats()
    row = {"prompt": "one two three four five six", "chosen": "yes no maybe", "rejected": "no"}
    example = tokenize_preference(
        row, tokenizer, max_length=6, max_prompt_length=4, where="f:1", stats=stats
    )
    assert tokens(tokenizer, example["prompt_ids"]) == ["<s>", "four", "five", "six"]
    assert tokens(tokenizer, example["chosen_ids"]) == ["yes", "no"]
    assert tokens(tokenizer, example["rejected_ids"]) == ["no", "</s>"]
    assert stats.truncated == {"prompt": 1, "chosen": 1}


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "hello", "chosen": "yes", "rejected": "yes"}, "identical_responses"),
        ({"prompt": "hello", "chosen": " ", "rejected": "yes"}, "empty_response"),
        ({"prompt": "hello", "chosen": "yes", "rejected": ""}, "empty_response"),
        ({"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: no"}, "empty_response"),
        # Identical only after the response budget cuts them.
        ({"prompt": "hello", "chosen": "one two three", "rejected": "one two four"}, "identical_responses"),
    ],
)  # fmt: skip
def test_preference_drops_are_counted_not_errors(tokenizer, row, reason):
    stats = RowStats("error")
    got = tokenize_preference(
        row, tokenizer, max_length=4, max_prompt_length=2, where="f:1", stats=stats
    )
    assert got is None
    assert stats.dropped == {reason: 1}


@pytest.mark.parametrize(
    "row, field, reason",
    [
        ({"prompt": "hi", "chosen": "yes"}, "rejected", "missing_field"),
        ({"chosen": "yes", "rejected": "no"}, "prompt", "missing_field"),
        ({"prompt": "hi", "chosen": "yes", "rejected": 5}, "rejected", "wrong_type"),
        (
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "rejected": [
                    {"role": "user", "content": "c"},
                    {"role": "assistant", "content": "d"},
                ],
            },
            "rejected",
            "mismatched_conversations",
        ),
        (
            {"prompt": "hi", "chosen": "yes", "rejected": "no", "reference_chosen_logps": -1.0},
            "reference_rejected_logps",
            "missing_field",
        ),
    ],
)
def test_preference_bad_rows(tokenizer, row, field, reason):
    with pytest.raises(DataError) as caught:
        tokenize_preference(row, tokenizer, max_length=8, max_prompt_length=4, where="p.jsonl:3")
    assert (caught.value.field, caught.value.reason) == (field, reason)
    assert "p.jsonl:3" in str(caught.value)


def test_preference_reference_logps_carried(tokenizer):
    row = {
        "prompt": "hi",
        "chosen": "yes",
        "rejected": "no",
        "reference_chosen_logps": -1.5,
        "reference_rejected_logps": -2,
    }
    example = tokenize_preference(row, tokenizer, max_length=8, max_prompt_length=4, where="f:1")
    assert example["reference_chosen_logps"] == -1.5
    assert example["reference_rejected_logps"] == -2.0


# --- prompts ----------------------------------------------------------------------------------


def test_prompt_from_messages_uses_generation_prompt(tokenizer):
    row = {
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "yes"},
        ]
    }
    assert render_prompt(row, tokenizer, where="f:1") == "<|user|> hello <|end|> <|assistant|> "
    example = tokenize_prompt(row, tokenizer, max_prompt_length=3, where="f:1")
    assert tokens(tokenizer, example["prompt_ids"]) == ["<s>", "<|end|>", "<|assistant|>"]
