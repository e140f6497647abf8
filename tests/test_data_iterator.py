"""BatchIterator: seeded epoch order, exact resume, process-local slices."""

import functools
import itertools

import numpy as np
import pytest

from jaxalign.data import BatchIterator


def collate(examples):
    return {"ids": np.asarray(examples, np.int32)}


def take(iterator, n):
    return [batch["ids"].tolist() for batch in itertools.islice(iterator, n)]


def test_same_seed_same_batches_and_epochs_differ():
    def make(seed):
        return BatchIterator(list(range(10)), batch_size=4, collate=collate, seed=seed)

    first = take(make(0), 6)
    assert first == take(make(0), 6)
    assert first != take(make(1), 6)
    assert len(first) == 6 and all(len(b) == 4 for b in first)  # 2 per epoch, last 2 dropped
    epoch0, epoch1 = first[:2], first[2:4]
    assert len(set(sum(epoch0, []))) == 8 and epoch0 != epoch1


def test_resume_from_state_dict_gives_identical_batches():
    reference = BatchIterator(list(range(11)), batch_size=3, collate=collate, seed=7)
    expected = take(reference, 10)

    run = BatchIterator(list(range(11)), batch_size=3, collate=collate, seed=7)
    take(run, 4)  # mid second epoch
    state = run.state_dict()
    assert state == {"epoch": 1, "position": 1, "seed": 7}

    resumed = BatchIterator(list(range(11)), batch_size=3, collate=collate, seed=123)
    resumed.load_state_dict(state)
    assert take(resumed, 6) == expected[4:]


def test_process_local_slices_tile_the_global_batch():
    global_batches = take(BatchIterator(list(range(16)), batch_size=8, collate=collate, seed=3), 4)
    local = [
        take(
            BatchIterator(
                list(range(16)),
                batch_size=8,
                collate=collate,
                seed=3,
                process_index=i,
                process_count=4,
            ),
            4,
        )
        for i in range(4)
    ]
    for step, global_batch in enumerate(global_batches):
        assert sum((local[i][step] for i in range(4)), []) == global_batch
        assert local[1][step] == global_batch[2:4]


def test_batch_size_must_divide_over_processes():
    with pytest.raises(ValueError, match="not divisible by process_count"):
        BatchIterator(list(range(16)), batch_size=6, collate=collate, seed=0, process_count=4)


def test_no_shuffle_no_drop_last_single_epoch():
    iterator = BatchIterator(
        list(range(7)),
        batch_size=3,
        collate=collate,
        seed=0,
        shuffle=False,
        drop_last=False,
        num_epochs=1,
    )
    assert [b["ids"].tolist() for b in iterator] == [[0, 1, 2], [3, 4, 5], [6]]
    np.testing.assert_array_equal(iterator.last_batch_indices, [6])


def test_processes_pad_to_the_same_bucket_as_the_global_batch():
    """Rows of one global batch straddling a bucket boundary: every process pads alike."""
    from jaxalign.data.batching import Buckets, collate_sft

    short = {"input_ids": np.arange(4, dtype=np.int32), "loss_mask": np.ones(4, np.float32)}
    long = {"input_ids": np.arange(40, dtype=np.int32), "loss_mask": np.ones(40, np.float32)}
    collate = functools.partial(collate_sft, buckets=Buckets((32, 64), max_length=64), pad_id=0)
    shapes = set()
    for process_index in range(2):
        iterator = BatchIterator(
            [short, long],
            batch_size=2,
            collate=collate,
            seed=0,
            shuffle=False,
            process_index=process_index,
            process_count=2,
        )
        shapes.add(next(iterator)["input_ids"].shape)
    assert shapes == {(1, 64)}
