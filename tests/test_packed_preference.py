"""Packed preference batches (several pairs per row, `data.pack` for DPO and reward models) give
exactly what one pair per row gives: the same per-pair log-probs, scores, losses, metrics and
gradients, each pair weighted once."""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxalign import sharding as shd
from jaxalign.config import ConfigError, base_config, validate
from jaxalign.data import collate_preference, collate_preference_shared
from jaxalign.data.batching import (
    Buckets,
    pack_preference_pairs,
    padding_fraction,
    pair_size,
    row_pairs,
)
from jaxalign.models import ModelConfig, Transformer
from jaxalign.trainers.dpo import dpo_loss_fn, precompute_reference_logps
from jaxalign.trainers.reward import reward_loss_fn

PAD = 0
EOS = 2
VOCAB = 97
LAYOUTS = {"shared": collate_preference_shared, "two_rows": collate_preference}
REF = "reference_chosen_logps"


def _pairs(num_pairs: int, *, seed: int = 0, reference: bool = False, eos: bool = False):
    """Random pairs: prompts of 0-8 tokens (one empty), responses of 1-8 (ending in EOS with
    `eos`), optionally with reference log-probs."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(num_pairs):
        lengths = {"prompt": 0 if i == 1 else rng.integers(1, 9), "chosen": 0, "rejected": 0}
        example = {}
        for part, n in lengths.items():
            n = n or int(rng.integers(1, 9))
            ids = rng.integers(3, VOCAB, n).astype(np.int32)
            if eos and part != "prompt":
                ids[-1] = EOS
            example[f"{part}_ids"] = ids
        if reference:
            example["reference_chosen_logps"] = np.float32(-rng.uniform(5, 30))
            example["reference_rejected_logps"] = np.float32(-rng.uniform(5, 30))
        examples.append(example)
    return examples


def _batches(examples, layout: str, *, max_pairs: int = 4):
    """`(one pair per row, packed)` batches of all `examples`."""
    shared = layout == "shared"
    length = 32 if shared else 16
    buckets = Buckets((length,), max_length=length)
    collate = functools.partial(LAYOUTS[layout], buckets=buckets, pad_id=PAD)
    rows = pack_preference_pairs(examples, length=length, max_pairs=max_pairs, shared=shared)
    assert len(rows) < len(examples)
    return collate(examples), collate(rows, max_pairs=max_pairs)


def _model(head: str = "lm", **overrides):
    config = ModelConfig(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        head=head,
        **overrides,
    )
    model = Transformer(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return model, shd.unbox(params)


@pytest.fixture(scope="module")
def lm():
    return _model()


def _mean_loss_and_grads(loss_fn, params, batch, frozen):
    """Loss, gradients and metrics as the engine reports them: sums over the denominator."""

    def loss(p):
        return loss_fn(p, batch, frozen, jax.random.PRNGKey(0))

    (loss_sum, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    denominator = aux["denominator"]
    metrics = {name: value / denominator for name, value in aux["metrics"].items()}
    metrics.update({name: total / n for name, (total, n) in aux.get("weighted", {}).items()})
    return (
        float(loss_sum / denominator),
        jax.tree.map(lambda g: g / denominator, grads),
        metrics,
        float(denominator),
    )


def _assert_same(one_per_row, packed, num_pairs):
    loss_a, grads_a, metrics_a, pairs_a = one_per_row
    loss_b, grads_b, metrics_b, pairs_b = packed
    assert pairs_a == pairs_b == num_pairs  # every pair once, empty slots not counted
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    assert metrics_a.keys() == metrics_b.keys()
    for name in metrics_a:
        np.testing.assert_allclose(metrics_b[name], metrics_a[name], rtol=1e-5, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5), grads_a, grads_b
    )
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads_b))


# ----------------------------------------------------------------------------- packing, collation


def test_pack_preference_pairs_keeps_every_pair_within_the_limits():
    examples = _pairs(40, reference=True)
    rows = pack_preference_pairs(examples, length=24, max_pairs=3, shared=True)
    unpacked = []
    for row in rows:
        pairs = row_pairs(row)
        assert 1 <= len(pairs) <= 3
        assert sum(pair_size(*map(len, pair), shared=True) for pair in pairs) <= 24
        np.testing.assert_array_equal(row["pair_lengths"], [list(map(len, p)) for p in pairs])
        assert row["reference_chosen_logps"].shape == (len(pairs),)
        unpacked += [
            (*(tuple(ids) for ids in pair), float(chosen_ref))
            for pair, chosen_ref in zip(pairs, row["reference_chosen_logps"], strict=True)
        ]
    original = [
        (*(tuple(e[f"{k}_ids"]) for k in ("prompt", "chosen", "rejected")), float(e[REF]))
        for e in examples
    ]
    assert sorted(unpacked) == sorted(original)
    # Two-row layout: a pair takes its longer sequence's room.
    rows = pack_preference_pairs(examples, length=16, max_pairs=8, shared=False)
    assert all(
        sum(pair_size(*map(len, pair), shared=False) for pair in row_pairs(row)) <= 16
        for row in rows
    )


def _two_pair_row():
    pairs = [
        {"prompt_ids": np.int32([5, 6]), "chosen_ids": np.int32([7, 8]), "rejected_ids": [9]},
        {"prompt_ids": np.int32([11]), "chosen_ids": np.int32([12]), "rejected_ids": [13, 14]},
    ]
    for pair in pairs:
        pair["rejected_ids"] = np.int32(pair["rejected_ids"])
    return pairs


def test_collate_packed_shared_row_by_hand():
    rows = pack_preference_pairs(_two_pair_row(), length=16, max_pairs=3, shared=True)
    assert len(rows) == 1
    batch = collate_preference_shared(
        rows, buckets=Buckets((12,), max_length=16), pad_id=PAD, max_pairs=3
    )
    np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7, 8, 9, 11, 12, 13, 14, 0, 0, 0]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 2, 0, 1, 1, 2, 0, 0, 0]])
    np.testing.assert_array_equal(batch["branch_ids"], [[0, 0, 1, 1, 2, 0, 1, 2, 2, 0, 0, 0]])
    np.testing.assert_array_equal(batch["chosen_loss_mask"], [[0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(
        batch["rejected_loss_mask"], [[0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0]]
    )
    np.testing.assert_array_equal(batch["pair_mask"], [[1, 1, 0]])
    assert batch["pair_mask"].dtype == np.float32


def test_collate_packed_two_row_layout_by_hand():
    pairs = _two_pair_row()
    for pair, (chosen, rejected) in zip(pairs, [(-1, -2), (-3, -4)], strict=True):
        pair["reference_chosen_logps"], pair["reference_rejected_logps"] = chosen, rejected
    rows = pack_preference_pairs(pairs, length=8, max_pairs=2, shared=False)
    assert len(rows) == 1
    batch = collate_preference(rows, buckets=Buckets((8,), max_length=8), pad_id=PAD, max_pairs=2)
    np.testing.assert_array_equal(batch["chosen_input_ids"], [[5, 6, 7, 8, 11, 12, 0, 0]])
    np.testing.assert_array_equal(batch["chosen_attention_mask"], [[1, 1, 1, 1, 2, 2, 0, 0]])
    np.testing.assert_array_equal(batch["chosen_positions"], [[0, 1, 2, 3, 0, 1, 0, 0]])
    np.testing.assert_array_equal(batch["chosen_loss_mask"], [[0, 0, 1, 1, 0, 1, 0, 0]])
    np.testing.assert_array_equal(batch["rejected_input_ids"], [[5, 6, 9, 11, 13, 14, 0, 0]])
    np.testing.assert_array_equal(batch["rejected_attention_mask"], [[1, 1, 1, 2, 2, 2, 0, 0]])
    np.testing.assert_array_equal(batch["rejected_positions"], [[0, 1, 2, 0, 1, 2, 0, 0]])
    np.testing.assert_array_equal(batch["rejected_loss_mask"], [[0, 0, 1, 0, 1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["pair_mask"], [[1, 1]])
    np.testing.assert_array_equal(batch["reference_chosen_logps"], [[-1, -3]])
    np.testing.assert_array_equal(batch["reference_rejected_logps"], [[-2, -4]])
    with pytest.raises(ValueError, match="max_pairs >= 2"):
        collate_preference(rows, buckets=Buckets((8,), max_length=8), pad_id=PAD)


def test_one_pair_per_row_with_pair_slots_is_the_plain_batch():
    """A plain pair is a row of one: `max_pairs` only adds the slot arrays."""
    examples = _pairs(5, reference=True)
    for collate in LAYOUTS.values():
        buckets = Buckets((32,), max_length=32)
        plain = collate(examples, buckets=buckets, pad_id=PAD)
        slotted = collate(examples, buckets=buckets, pad_id=PAD, max_pairs=2)
        np.testing.assert_array_equal(slotted.pop("pair_mask"), [[1, 0]] * 5)
        for key in ("reference_chosen_logps", "reference_rejected_logps"):
            np.testing.assert_array_equal(slotted.pop(key)[:, 0], plain.pop(key))
        assert slotted.keys() == plain.keys()
        for key in plain:
            np.testing.assert_array_equal(slotted[key], plain[key])


# ----------------------------------------------------------------------------- losses, gradients


@pytest.mark.parametrize(
    "layout, loss_type, reference",
    [
        ("shared", "sigmoid", "model"),  # the reference run in the step
        ("shared", "orpo", None),  # length-normalised; log(1 - p) would be -inf on empty slots
        ("two_rows", "simpo", None),
        ("two_rows", "sigmoid", "batch"),  # precomputed reference log-probs in the batch
    ],
)
def test_packed_dpo_matches_one_pair_per_row(lm, layout, loss_type, reference):
    model, params = lm
    examples = _pairs(12, reference=reference == "batch")
    one_per_row, packed = _batches(examples, layout)
    assert packed["pair_mask"].min() == 0  # some rows have empty slots
    dpo_cfg = ml_collections.ConfigDict(base_config().dpo.to_dict())
    dpo_cfg.loss_type = loss_type
    dpo_cfg.rpo_alpha = 0.5 if loss_type == "sigmoid" else 0.0  # per-token NLL: lengths matter
    ref_params = jax.tree.map(lambda p: p * 1.1, params) if reference == "model" else None
    loss_fn = dpo_loss_fn(model, dpo_cfg, chunk_size=None)
    _assert_same(
        _mean_loss_and_grads(loss_fn, params, one_per_row, ref_params),
        _mean_loss_and_grads(loss_fn, params, packed, ref_params),
        num_pairs=len(examples),
    )


def test_packed_reward_model_matches_one_pair_per_row():
    """Each pair's score is read at its sequence's last token that is not the pad id (EOS here,
    as a tokenizer padding with EOS has it), segment by segment."""
    model, params = _model(head="scalar", pad_token_id=EOS)
    examples = _pairs(12, eos=True)
    one_per_row, packed = _batches(examples, "two_rows")
    loss_fn = reward_loss_fn(model, margin=0.1, center_coef=0.01)
    _assert_same(
        _mean_loss_and_grads(loss_fn, params, one_per_row, None),
        _mean_loss_and_grads(loss_fn, params, packed, None),
        num_pairs=len(examples),
    )


def test_precomputed_reference_of_packed_rows_is_per_pair(lm):
    model, params = lm
    examples = _pairs(12)
    mesh = shd.make_mesh(
        shape=(1, 1, 1), axis_names=("data", "fsdp", "tensor"), devices=jax.devices()[:1]
    )
    buckets = Buckets((32,), max_length=32)
    collate = functools.partial(collate_preference_shared, buckets=buckets, pad_id=PAD)
    plain = types.SimpleNamespace(examples=[dict(e) for e in examples], collate=collate)
    rows = pack_preference_pairs(examples, length=32, max_pairs=4, shared=True)
    packed = types.SimpleNamespace(examples=rows, collate=functools.partial(collate, max_pairs=4))
    for data in (plain, packed):
        precompute_reference_logps(model, params, data, mesh, batch_size=4, chunk_size=None)
    expected = {
        tuple(np.concatenate([e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]])): (
            e["reference_chosen_logps"],
            e["reference_rejected_logps"],
        )
        for e in plain.examples
    }
    seen = 0
    for row in packed.examples:
        for k, pair in enumerate(row_pairs(row)):
            chosen, rejected = expected[tuple(np.concatenate(pair))]
            np.testing.assert_allclose(row["reference_chosen_logps"][k], chosen, rtol=1e-5)
            np.testing.assert_allclose(row["reference_rejected_logps"][k], rejected, rtol=1e-5)
            seen += 1
    assert seen == len(examples)


# ----------------------------------------------------------------------------- padding, config


def test_padding_fraction_counts_real_tokens_against_bucketed_slots():
    sft = [{"input_ids": np.zeros(n, np.int32)} for n in (3, 5, 8, 2)]
    buckets = Buckets((4, 8), max_length=8)
    assert padding_fraction(sft, buckets=buckets, batch_size=4) == pytest.approx(1 - 18 / 32)
    # Two-row pairs: both rows padded to the longer one's bucket.
    pairs = _two_pair_row()  # rows of 4 and 3 tokens, then 2 and 3
    assert padding_fraction(pairs, buckets=buckets, batch_size=2) == pytest.approx(1 - 12 / 16)
    assert padding_fraction(pairs, buckets=buckets, batch_size=2, shared=True) == pytest.approx(
        1 - 9 / 16
    )
    # Shared rows of 5 and 4 tokens, one per batch (buckets 10 and 4), then packed into one of 9.
    buckets = Buckets((4, 10), max_length=16)
    assert padding_fraction(pairs, buckets=buckets, batch_size=1, shared=True) == pytest.approx(
        1 - 9 / 14
    )
    rows = pack_preference_pairs(pairs, length=16, max_pairs=2, shared=True)
    assert padding_fraction(rows, buckets=buckets, batch_size=1, shared=True) == pytest.approx(
        1 - 9 / 10
    )


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(algorithm="grpo", data__pack=True), r"data\.pack: packs sft, dpo and reward"),
        (dict(algorithm="dpo", data__max_pairs_per_row=0), r"data\.max_pairs_per_row"),
    ],
)
def test_validate_packing_keys(changes, message):
    config = base_config()
    config.data.train = "train.jsonl"
    config.grpo.reward_funcs = "length"
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            config[section][name] = value
        else:
            config[section] = value
    with pytest.raises(ConfigError, match=message):
        validate(config)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dpo", "reward"])
def test_packed_training_runs_and_reports_its_padding(algorithm, tiny_data_dir, tmp_path, caplog):
    """`data.pack=True` through the trainer: rows of several pairs, the reference precomputed
    per pair (DPO), a finite loss that starts where one pair per row starts (log 2)."""
    from test_train_preference import summarize, tiny_config

    from jaxalign.train import run

    overrides = {"data.pack": True, "train.num_steps": 3, "train.batch_size": 8}
    if algorithm == "dpo":
        overrides["dpo.precompute_reference"] = True
    config = tiny_config(algorithm, tiny_data_dir, overrides)
    with caplog.at_level("INFO", logger="jaxalign.trainers.common"):
        result = run(config, tmp_path)
    report = [r.getMessage() for r in caplog.records if "preference packing" in r.getMessage()]
    assert len(report) == 1 and " pairs -> " in report[0], report
    losses = summarize(tmp_path, result.state.params)["losses"]
    assert len(losses) == 3 and np.isfinite(losses).all()
    if algorithm == "dpo":  # policy = reference at step 0: every pair's loss is log 2
        np.testing.assert_allclose(losses[0], np.log(2), rtol=1e-4)
