"""Buckets, packing and the three batch contracts (keys, dtypes, padding side)."""

import numpy as np
import pytest

from jaxalign.data import Buckets, collate_preference, collate_prompts, collate_sft, pack_examples

PAD = 0


def sft_example(token_ids, loss_mask):
    return {
        "input_ids": np.asarray(token_ids, np.int32),
        "loss_mask": np.asarray(loss_mask, np.int32),
    }


def test_buckets_capped_at_max_length_and_pick_smallest_fit():
    buckets = Buckets((64, 128, 256, 512), max_length=200)
    assert buckets.lengths == (64, 128, 200)
    assert [buckets.fit(n) for n in (1, 64, 65, 128, 129, 200)] == [64, 64, 128, 128, 200, 200]
    with pytest.raises(ValueError, match="exceeds max_length"):
        buckets.fit(201)


def test_bucket_first_use_logged_once(caplog):
    buckets = Buckets((4, 8), max_length=16, name="sft")
    with caplog.at_level("INFO", logger="jaxalign.data.batching"):
        for n in (3, 2, 7, 4):
            buckets.fit(n)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "sft: first batch padded to length 4",
        "sft: first batch padded to length 8",
    ]


def test_collate_sft_right_pads_to_bucket():
    batch = collate_sft(
        [sft_example([2, 5, 6], [0, 0, 1]), sft_example([2, 5, 6, 7, 3], [0, 0, 1, 1, 1])],
        buckets=Buckets((4, 8), max_length=16),
        pad_id=PAD,
    )
    assert sorted(batch) == ["attention_mask", "input_ids", "loss_mask", "positions"]
    assert {k: v.dtype for k, v in batch.items()} == {
        "input_ids": np.int32,
        "attention_mask": np.int32,
        "positions": np.int32,
        "loss_mask": np.float32,
    }
    np.testing.assert_array_equal(
        batch["input_ids"], [[2, 5, 6, 0, 0, 0, 0, 0], [2, 5, 6, 7, 3, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        batch["attention_mask"], [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        batch["positions"], [[0, 1, 2, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        batch["loss_mask"], [[0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0]]
    )


def test_packing_segments_positions_and_tokens():
    examples = [
        sft_example([10, 11, 12, 13, 14, 15], [0, 0, 1, 1, 1, 1]),  # 6
        sft_example([20, 21], [1, 1]),  # 2, loss on its first token (no BOS/prompt)
        sft_example([30, 31, 32, 33, 34], [0, 1, 1, 1, 1]),  # 5
        sft_example([40, 41, 42], [0, 1, 1]),  # 3
    ]
    rows = pack_examples(examples, length=8)
    # Best-fit decreasing: 6 -> row0, 5 -> row1, 3 -> row1 (room 3), 2 -> row0 (room 2).
    assert len(rows) == 2
    np.testing.assert_array_equal(rows[0]["input_ids"], [10, 11, 12, 13, 14, 15, 20, 21])
    np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 3, 4, 5, 0, 1])
    # The first token of a segment is never predicted from the previous example.
    np.testing.assert_array_equal(rows[0]["loss_mask"], [0, 0, 1, 1, 1, 1, 0, 1])
    np.testing.assert_array_equal(rows[1]["input_ids"], [30, 31, 32, 33, 34, 40, 41, 42])
    np.testing.assert_array_equal(rows[1]["segment_ids"], [1, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(rows[1]["positions"], [0, 1, 2, 3, 4, 0, 1, 2])

    batch = collate_sft(rows, buckets=Buckets((4, 8), max_length=8), pad_id=PAD)
    np.testing.assert_array_equal(batch["attention_mask"][0], rows[0]["segment_ids"])


def test_packed_rows_hold_exactly_the_original_tokens():
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(50):
        n = int(rng.integers(1, 17))
        examples.append(sft_example(rng.integers(4, 100, n), rng.integers(0, 2, n)))
    rows = pack_examples(examples, length=16)
    assert all(len(row["input_ids"]) <= 16 for row in rows)
    unpacked = []
    for row in rows:
        for segment in np.unique(row["segment_ids"]):
            in_segment = row["segment_ids"] == segment
            np.testing.assert_array_equal(row["positions"][in_segment], np.arange(in_segment.sum()))
            unpacked.append(tuple(row["input_ids"][in_segment]))
    assert sorted(unpacked) == sorted(tuple(e["input_ids"]) for e in examples)
    assert len(rows) <= int(np.ceil(sum(len(e["input_ids"]) for e in examples) / 16)) + 2


def test_collate_preference_shares_one_length():
    examples = [
        {
            "prompt_ids": np.array([2, 5], np.int32),
            "chosen_ids": np.array([7, 3], np.int32),
            "rejected_ids": np.array([8, 9, 10, 3], np.int32),
        },
        {
            "prompt_ids": np.array([2, 5, 6], np.int32),
            "chosen_ids": np.array([7, 3], np.int32),
            "rejected_ids": np.array([3], np.int32),
        },
    ]
    batch = collate_preference(examples, buckets=Buckets((4, 8), max_length=8), pad_id=PAD)
    expected_keys = {
        f"{side}_{key}"
        for side in ("chosen", "rejected")
        for key in ("input_ids", "attention_mask", "positions", "loss_mask")
    }
    assert set(batch) == expected_keys
    assert all(v.shape == (2, 8) for v in batch.values())
    np.testing.assert_array_equal(batch["chosen_input_ids"][0], [2, 5, 7, 3, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["chosen_loss_mask"][0], [0, 0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["rejected_input_ids"][0], [2, 5, 8, 9, 10, 3, 0, 0])
    np.testing.assert_array_equal(batch["rejected_loss_mask"][1], [0, 0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["rejected_attention_mask"][1], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["rejected_positions"][0], [0, 1, 2, 3, 4, 5, 0, 0])
    assert batch["chosen_loss_mask"].dtype == np.float32
    assert batch["chosen_input_ids"].dtype == np.int32


def test_collate_preference_reference_logps():
    example = {
        "prompt_ids": np.array([2], np.int32),
        "chosen_ids": np.array([7], np.int32),
        "rejected_ids": np.array([8], np.int32),
    }
    with_ref = [
        {**example, "reference_chosen_logps": -1.0, "reference_rejected_logps": -2.0},
        {**example, "reference_chosen_logps": -3.0, "reference_rejected_logps": -4.0},
    ]
    buckets = Buckets((4,), max_length=8)
    batch = collate_preference(with_ref, buckets=buckets, pad_id=PAD)
    np.testing.assert_array_equal(batch["reference_chosen_logps"], [-1.0, -3.0])
    assert batch["reference_rejected_logps"].dtype == np.float32
    with pytest.raises(ValueError, match="reference log-probs"):
        collate_preference([with_ref[0], example], buckets=buckets, pad_id=PAD)


def test_collate_prompts_left_pads():
    examples = [
        {"prompt_ids": np.array([2, 5, 6], np.int32)},
        {"prompt_ids": np.array([2, 7], np.int32)},
    ]
    batch = collate_prompts(examples, buckets=Buckets((4, 8), max_length=8), pad_id=PAD)
    assert sorted(batch) == ["prompt_attention_mask", "prompt_input_ids", "prompt_positions"]
    np.testing.assert_array_equal(batch["prompt_input_ids"], [[0, 2, 5, 6], [0, 0, 2, 7]])
    np.testing.assert_array_equal(batch["prompt_attention_mask"], [[0, 1, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(batch["prompt_positions"], [[0, 0, 1, 2], [0, 0, 0, 1]])
    assert all(v.dtype == np.int32 for v in batch.values())
