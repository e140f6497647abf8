"""End to end per algorithm: file -> builder -> stats -> iterator -> batch."""

import json
import logging

import numpy as np
import pytest

from jaxalign.data import (
    BatchIterator,
    DataError,
    build_preference_dataset,
    build_prompt_dataset,
    build_sft_dataset,
)
from jaxalign.data.testing import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


SFT_LINES = [
    json.dumps({"prompt": "hello", "completion": "yes"}),  # 1
    "{oops",  # 2: not JSON
    json.dumps({"prompt": "hello"}),  # 3: missing completion
    json.dumps({"prompt": "hello", "completion": ""}),  # 4: empty completion
    json.dumps({"prompt": "one two three four five six seven eight", "completion": "yes"}),  # 5
    json.dumps({"prompt": "hello", "completion": 7}),  # 6: wrong type
    json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}),  # 7
]  # fmt: skip


@pytest.mark.parametrize(
    "line, field, reason",
    [(1, None, "not_json"), (2, "completion", "missing_field"), (3, "completion", "empty_completion"),
     (4, "prompt", "prompt_too_long"), (5, "completion", "wrong_type")],
)  # fmt: skip
def test_sft_bad_row_errors_name_file_line_and_field(tmp_path, tokenizer, line, field, reason):
    path = write_jsonl(tmp_path / "sft.jsonl", [SFT_LINES[0], SFT_LINES[line]])
    with pytest.raises(DataError) as caught:
        build_sft_dataset(path, tokenizer, max_length=8)
    assert caught.value.where == f"{path}:2"
    assert (caught.value.field, caught.value.reason) == (field, reason)
    assert str(caught.value).startswith(f"{path}:2")


def test_sft_skip_mode_counts_bad_rows_and_logs(tmp_path, tokenizer, caplog):
    path = write_jsonl(tmp_path / "sft.jsonl", SFT_LINES)
    with caplog.at_level(logging.INFO, logger="jaxalign.data.errors"):
        dataset = build_sft_dataset(path, tokenizer, max_length=8, on_bad_row="skip")
    assert dataset.stats == {
        "rows_read": 7,
        "rows_kept": 2,
        "skipped": {
            "empty_completion": 1,
            "missing_field": 1,
            "not_json": 1,
            "prompt_too_long": 1,
            "wrong_type": 1,
        },
        "dropped": {},
        "truncated": {},
        "formats": {"conversational": 1, "prompt-completion": 4, "prompt-only": 1},
        "examples": 2,
    }
    assert "read 7 rows, kept 2" in caplog.text
    assert f"{path}:2" in caplog.text  # first skipped row of each reason is quoted


def test_sft_packed_batches(tmp_path, tokenizer):
    rows = [{"prompt": "hello", "completion": "yes " * n} for n in (1, 2, 3, 4, 5, 6)]
    path = write_jsonl(tmp_path / "sft.jsonl", [json.dumps(r) for r in rows])
    plain = build_sft_dataset(path, tokenizer, max_length=16)
    packed = build_sft_dataset(path, tokenizer, max_length=16, pack=True, buckets=(8,))
    assert packed.stats["rows_kept"] == 6 and packed.stats["examples"] < 6
    assert packed.buckets.lengths == (8, 16)
    n_tokens = sum(len(e["input_ids"]) for e in plain.examples)
    assert sum(len(e["input_ids"]) for e in packed.examples) == n_tokens
    batch = packed.collate(packed.examples)
    assert batch["input_ids"].shape == (len(packed.examples), 16)
    assert batch["attention_mask"].max() >= 2
    assert batch["loss_mask"].sum() == sum(e["loss_mask"].sum() for e in plain.examples)


def test_preference_builder_stats_and_batches(tmp_path, tokenizer):
    rows = [
        {"prompt": "hello", "chosen": "yes", "rejected": "no"},
        {"prompt": "hello", "chosen": "yes", "rejected": "yes"},  # identical
        {"prompt": "hello", "chosen": "", "rejected": "no"},  # empty
        {"chosen": "\n\nHuman: hello\n\nAssistant: yes", "rejected": "\n\nHuman: hello\n\nAssistant: no"},
        {"prompt": "one two three four five six", "chosen": "yes", "rejected": "no"},  # prompt cut
        {"prompt": "hi", "chosen": "no"},  # bad: missing rejected
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "pref.jsonl", [json.dumps(r) for r in rows])
    dataset = build_preference_dataset(
        path, tokenizer, max_length=8, max_prompt_length=6, on_bad_row="skip", buckets=(4,)
    )
    assert dataset.stats["rows_read"] == 6 and dataset.stats["rows_kept"] == 3
    assert dataset.stats["dropped"] == {"empty_response": 1, "identical_responses": 1}
    assert dataset.stats["skipped"] == {"missing_field": 1}
    assert dataset.stats["truncated"] == {"prompt": 1}
    batches = BatchIterator(dataset.examples, batch_size=2, collate=dataset.collate, seed=0)
    batch = next(batches)
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert batch["chosen_input_ids"].shape[1] in dataset.buckets.lengths
    assert "reference_chosen_logps" not in batch


def test_preference_reference_logps_must_be_all_or_none(tmp_path, tokenizer):
    rows = [
        {"prompt": "hello", "chosen": "yes", "rejected": "no", "reference_chosen_logps": -1.0,
         "reference_rejected_logps": -2.0},
        {"prompt": "hi", "chosen": "yes", "rejected": "no"},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "pref.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(ValueError, match="all or none"):
        build_preference_dataset(path, tokenizer, max_length=8, max_prompt_length=4)
    path = write_jsonl(tmp_path / "pref.jsonl", [json.dumps(rows[0])] * 2)
    dataset = build_preference_dataset(path, tokenizer, max_length=8, max_prompt_length=4)
    batch = dataset.collate(dataset.examples)
    np.testing.assert_array_equal(batch["reference_rejected_logps"], [-2.0, -2.0])


def test_prompt_builder_left_pads_and_keeps_texts(tmp_path, tokenizer):
    rows = [
        {"prompt": "hello world"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]},
        {"prompt": "one two three four five six seven"},
    ]
    path = write_jsonl(tmp_path / "prompts.jsonl", [json.dumps(r) for r in rows])
    dataset = build_prompt_dataset(path, tokenizer, max_prompt_length=6, buckets=(4,))
    assert dataset.texts[1] == "<|user|> hi <|end|> <|assistant|> "
    assert dataset.stats["truncated"] == {"prompt": 1}
    batches = BatchIterator(
        dataset.examples, batch_size=3, collate=dataset.collate, seed=0, shuffle=False
    )
    batch = next(batches)
    assert [dataset.texts[i] for i in batches.last_batch_indices] == dataset.texts
    assert batch["prompt_input_ids"].shape == (3, 6)
    np.testing.assert_array_equal(batch["prompt_attention_mask"][0], [0, 0, 0, 1, 1, 1])
    assert tokenizer.convert_ids_to_tokens(batch["prompt_input_ids"][2].tolist()) == [
        "<s>", "three", "four", "five", "six", "seven"
    ]  # fmt: skip
