"""KV-cache sampling vs plain full forwards, batch independence, EOS masking, sharding."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tiny_hf import make_tiny_hf_model

from jaxalign.data.testing import build_tiny_tokenizer
from jaxalign.models import from_pretrained
from jaxalign.sampling import (
    SamplingConfig,
    _jitted_decode,
    filter_logits,
    generate,
    generate_text,
    response_logprobs,
    row_keys_from_rng,
    sample_tokens,
)

PROMPT_LEN, NEW_TOKENS = 8, 5
ALONE_LEN = 10  # a row alone is padded differently from the batch
GREEDY = SamplingConfig(max_new_tokens=NEW_TOKENS, greedy=True, eos_token_ids=(), pad_token_id=0)
SAMPLE = SamplingConfig(
    max_new_tokens=NEW_TOKENS, temperature=1.3, eos_token_ids=(), pad_token_id=0
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return from_pretrained(make_tiny_hf_model("llama", tmp_path_factory.mktemp("hf") / "llama"))


def _prompts(lengths=(8, 3, 1), seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded `[B, PROMPT_LEN]` prompts of the given lengths (pad id 0)."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    mask = (np.arange(PROMPT_LEN)[None] >= PROMPT_LEN - lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(3, 97, (len(lengths), PROMPT_LEN)), 0).astype(np.int32)
    return ids, mask


def _alone(ids, mask, row):
    """Row `row` as a batch of one, left-padded to ALONE_LEN instead of PROMPT_LEN."""
    pad = ((0, 0), (ALONE_LEN - PROMPT_LEN, 0))
    return np.pad(ids[row : row + 1], pad), np.pad(mask[row : row + 1], pad)


def test_greedy_equals_repeated_full_forward_argmax(llama):
    model, params = llama
    ids, mask = _prompts()
    out = generate(model, params, ids, mask, rng=jax.random.key(0), config=GREEDY)
    # The growing sequence sits in a fixed [B, P+N] buffer (one compile): causal attention makes
    # the logits at column t independent of the right padding after it.
    forward = jax.jit(lambda i, m: model.apply({"params": params}, i, m))
    seq = np.pad(ids, ((0, 0), (0, NEW_TOKENS)))
    seq_mask = np.pad(mask, ((0, 0), (0, NEW_TOKENS)))
    for t in range(PROMPT_LEN, PROMPT_LEN + NEW_TOKENS):
        seq[:, t] = np.argmax(forward(seq, seq_mask)[:, t - 1], axis=-1)
        seq_mask[:, t] = 1
    np.testing.assert_array_equal(out.tokens, seq[:, PROMPT_LEN:])
    np.testing.assert_array_equal(out.response_mask, 1)
    assert not np.asarray(out.finished).any()


def test_rows_do_not_depend_on_batch(llama):
    model, params = llama
    ids, mask = _prompts()
    batch_greedy = generate(model, params, ids, mask, rng=jax.random.key(0), config=GREEDY)
    row_keys = row_keys_from_rng(jax.random.key(7), 3)
    batch_sampled = generate(model, params, ids, mask, row_keys=row_keys, config=SAMPLE)
    for row in range(3):
        row_ids, row_mask = _alone(ids, mask, row)
        alone = generate(model, params, row_ids, row_mask, rng=jax.random.key(0), config=GREEDY)
        np.testing.assert_array_equal(alone.tokens[0], batch_greedy.tokens[row])
        alone = generate(
            model, params, row_ids, row_mask, row_keys=row_keys[row:][:1], config=SAMPLE
        )
        np.testing.assert_array_equal(alone.tokens[0], batch_sampled.tokens[row])
        np.testing.assert_allclose(alone.logprobs[0], batch_sampled.logprobs[row], atol=1e-5)


def test_same_seed_same_samples_other_seed_other_samples(llama):
    model, params = llama
    ids, mask = _prompts()

    def sample(seed: int) -> np.ndarray:
        out = generate(model, params, ids, mask, rng=jax.random.key(seed), config=SAMPLE)
        return np.asarray(out.tokens)

    np.testing.assert_array_equal(sample(0), sample(0))
    assert not np.array_equal(sample(0), sample(1))


def test_sharded_batch_samples_like_unsharded(llama):
    """Batch 8 sharded over 8 devices vs the same rows generated unsharded, 3 at a time."""
    model, params = llama
    ids, mask = _prompts(lengths=(8, 3, 1, 2, 5, 4, 7, 1), seed=2)
    row_keys = row_keys_from_rng(jax.random.key(0), 8)
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    data = NamedSharding(mesh, PartitionSpec("data"))
    sharded_params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    sharded_ids, sharded_mask = jax.device_put((ids, mask), data)
    assert sharded_ids.sharding.is_equivalent_to(data, 2)
    sharded = generate(
        model, sharded_params, sharded_ids, sharded_mask, rng=jax.random.key(0), config=SAMPLE
    )
    assert len(sharded.tokens.sharding.device_set) == 8

    for start in (0, 3, 6):  # batch-3 chunks reuse the compiled batch-3 decode
        rows = [min(row, 7) for row in range(start, start + 3)]
        chunk = generate(
            model, params, ids[rows], mask[rows], row_keys=row_keys[np.asarray(rows)], config=SAMPLE
        )
        np.testing.assert_array_equal(chunk.tokens, np.asarray(sharded.tokens)[rows])
        np.testing.assert_allclose(chunk.logprobs, np.asarray(sharded.logprobs)[rows], atol=1e-5)


def test_eos_masks_the_rest_and_sets_finished(llama):
    model, params = llama
    ids, mask = _prompts()
    greedy = np.asarray(
        generate(model, params, ids, mask, rng=jax.random.key(0), config=GREEDY).tokens
    )
    eos = int(greedy[0, 2])  # row 0 emits it at step 2 (maybe earlier); another row may too
    config = dataclasses.replace(GREEDY, eos_token_ids=(eos,), pad_token_id=0)
    out = generate(model, params, ids, mask, rng=jax.random.key(0), config=config)
    tokens, response_mask = np.asarray(out.tokens), np.asarray(out.response_mask)
    logprobs, finished = np.asarray(out.logprobs), np.asarray(out.finished)
    for row in range(3):
        hits = np.flatnonzero(greedy[row] == eos)
        length = hits[0] + 1 if hits.size else NEW_TOKENS
        assert finished[row] == bool(hits.size)
        np.testing.assert_array_equal(tokens[row, :length], greedy[row, :length])
        np.testing.assert_array_equal(tokens[row, length:], 0)
        np.testing.assert_array_equal(response_mask[row], np.arange(NEW_TOKENS) < length)
        np.testing.assert_array_equal(logprobs[row, length:], 0.0)
        assert np.all(logprobs[row, :length] < 0)
    assert finished[0] and response_mask[0].sum() <= 3


def test_all_rows_finished_stops_early_without_recompiling(llama):
    """EOS = every token: each row stops after one token, the rest is padding."""
    model, params = llama
    ids, mask = _prompts()
    config = dataclasses.replace(SAMPLE, eos_token_ids=tuple(range(97)), pad_token_id=5)
    generate(model, params, ids, mask, rng=jax.random.key(0), config=SAMPLE)
    compiled = _jitted_decode(model, NEW_TOKENS, False)
    compiled_shapes = compiled._cache_size()
    out = generate(model, params, ids, mask, rng=jax.random.key(0), config=config)
    assert compiled._cache_size() == compiled_shapes  # EOS, pad, temperature are runtime values
    assert np.asarray(out.finished).all()
    np.testing.assert_array_equal(out.response_mask, [[1, 0, 0, 0, 0]] * 3)
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, 1:], 5)


def test_top_k_one_and_tiny_top_p_are_greedy(llama):
    model, params = llama
    ids, mask = _prompts()
    greedy = generate(model, params, ids, mask, rng=jax.random.key(0), config=GREEDY)
    for filters in (dict(top_k=1), dict(top_p=1e-6)):
        config = dataclasses.replace(SAMPLE, **filters)
        out = generate(model, params, ids, mask, rng=jax.random.key(3), config=config)
        np.testing.assert_array_equal(out.tokens, greedy.tokens)
        np.testing.assert_allclose(out.logprobs, 0.0, atol=1e-6)  # one token left: prob 1


def test_filter_logits_top_k_and_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    # top_k/top_p traced, as inside the decode: one compile for all cases.
    filtered = jax.jit(lambda k, p: filter_logits(logits, top_k=k, top_p=p))
    kept = lambda top_k=0, top_p=1.0: np.isfinite(filtered(top_k, top_p))[0]  # noqa: E731
    np.testing.assert_array_equal(kept(), [1, 1, 1, 1])
    np.testing.assert_array_equal(kept(top_k=2), [1, 1, 0, 0])
    np.testing.assert_array_equal(kept(top_p=0.45), [1, 0, 0, 0])
    np.testing.assert_array_equal(kept(top_p=0.51), [1, 1, 0, 0])
    np.testing.assert_array_equal(kept(top_p=0.9), [1, 1, 1, 0])
    np.testing.assert_array_equal(kept(top_k=2, top_p=0.99), [1, 1, 0, 0])


def test_logprobs_match_training_forward(llama):
    model, params = llama
    ids, mask = _prompts()
    config = dataclasses.replace(SAMPLE, temperature=0.7, eos_token_ids=tuple(range(3, 20)))
    out = generate(model, params, ids, mask, rng=jax.random.key(4), config=config)
    recomputed = jax.jit(
        lambda *a: response_logprobs(model, params, *a, temperature=0.7, chunk_size=4)
    )(ids, mask, out.tokens, out.response_mask)
    np.testing.assert_allclose(recomputed, out.logprobs, atol=1e-4)
    response_mask = np.asarray(out.response_mask)
    assert 0 < response_mask.sum() < response_mask.size  # some row stopped at EOS
    assert np.all(np.asarray(out.logprobs)[response_mask == 1] < 0)


def test_generate_text_returns_one_string_per_prompt(llama, tmp_path):
    model, params = llama
    tokenizer = build_tiny_tokenizer(tmp_path / "tok")
    config = dataclasses.replace(SAMPLE, eos_token_ids=(tokenizer.eos_token_id,))
    prompts = ["hello world", "the quick brown fox", "one two three four five six seven"]
    texts = generate_text(
        model, params, tokenizer, prompts, rng=jax.random.key(0), config=config, prompt_bucket=8
    )
    assert len(texts) == 3 and all(isinstance(text, str) for text in texts)


def test_config_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(max_new_tokens=4, temperature=0.0, eos_token_ids=(2,), pad_token_id=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(max_new_tokens=4, top_p=0.0, eos_token_ids=(2,), pad_token_id=0)
    config = SamplingConfig(max_new_tokens=4, eos_token_ids=[2, 3], pad_token_id=0)
    assert config.eos_token_ids == (2, 3) and hash(config) == hash(dataclasses.replace(config))


def test_scanned_layers_decode_like_unrolled(llama):
    """`scan_layers` keeps a stacked `[L, ...]` cache, unrolled layers a tuple: same tokens."""
    model, params = llama
    scanned = type(model)(model.config.replace(scan_layers=True))
    layer_names = sorted(k for k in params if k.startswith("layers_"))
    scanned_params = {k: v for k, v in params.items() if k not in layer_names}
    scanned_params["layers"] = jax.tree.map(
        lambda *xs: jnp.stack(xs), *(params[k] for k in layer_names)
    )
    ids, mask = _prompts()
    out = generate(model, params, ids, mask, rng=jax.random.key(3), config=SAMPLE)
    out_scanned = generate(scanned, scanned_params, ids, mask, rng=jax.random.key(3), config=SAMPLE)
    np.testing.assert_array_equal(out.tokens, out_scanned.tokens)
    np.testing.assert_allclose(out.logprobs, out_scanned.logprobs, atol=1e-5)


# ----------------------------------------------------------------------------- distributions

# Tests of a sampler's distribution fail by chance with probability ALPHA (fixed keys make each
# run deterministic; the threshold says how unlikely the checked keys were to be unlucky).
ALPHA_Z = 3.719  # one-sided standard normal quantile of 1 - 1e-4


def chi_square_threshold(df: int) -> float:
    """The 1 − 1e-4 quantile of χ²(df), Wilson–Hilferty approximation (within 1 % for df ≥ 3)."""
    a = 2 / (9 * df)
    return df * (1 - a + ALPHA_Z * np.sqrt(a)) ** 3


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic of `counts` against `probs` over the support (probs > 0), and its df."""
    support = probs > 0
    expected = counts.sum() * probs[support]
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


@pytest.fixture(scope="module")
def draw():
    """`draw(logits [V], n, **knobs)`: n tokens from `sample_tokens` with n independent row keys,
    and their reported log-probs. Knobs are traced: one compile per n."""
    sample = jax.jit(
        lambda logits, keys, t, k, p: sample_tokens(logits, keys, temperature=t, top_k=k, top_p=p)
    )

    def run(logits, n, *, temperature=1.0, top_k=0, top_p=1.0, seed=0):
        keys = row_keys_from_rng(jax.random.key(seed), n)
        batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
        tokens, logprobs = sample(
            batch, keys, np.float32(temperature), np.int32(top_k), np.float32(top_p)
        )
        return np.asarray(tokens), np.asarray(logprobs)

    return run


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


LOGITS = np.array([2.0, 1.2, 0.5, 0.0, -0.7, -1.5])  # probabilities 0.47 ... 0.02


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_samples_follow_softmax_of_logits_over_temperature(draw, temperature):
    n = 20_000
    tokens, logprobs = draw(LOGITS, n, temperature=temperature)
    probs = softmax(LOGITS / temperature)
    counts = np.bincount(tokens, minlength=len(LOGITS))
    statistic, df = chi_square(counts, probs)
    assert statistic < chi_square_threshold(df), (statistic, counts, n * probs)
    # The test has the power to see a wrong temperature: the counts reject T ± 20 %.
    for wrong in (temperature * 0.8, temperature * 1.2):
        assert chi_square(counts, softmax(LOGITS / wrong))[0] > chi_square_threshold(df)
    np.testing.assert_allclose(logprobs, np.log(probs)[tokens], rtol=1e-5)


def test_top_k_and_top_p_samples_follow_the_renormalised_kept_set(draw):
    n = 20_000
    temperature = 1.3
    probs = softmax(LOGITS / temperature)  # cumulative 0.44, 0.68, 0.82, 0.91, 0.97, 1
    for knobs, kept in (
        (dict(top_p=0.7), 3),
        (dict(top_p=0.56), 2),
        (dict(top_k=3), 3),
        # Over the top 5 the cumulative mass is 0.46, 0.70, 0.85, 0.94: top-p renormalises over
        # the top-k first, so 4 are kept (over all 6 tokens it would be 5).
        (dict(top_k=5, top_p=0.93), 4),
    ):
        tokens, logprobs = draw(LOGITS, n, temperature=temperature, **knobs)
        target = np.where(np.arange(len(LOGITS)) < kept, probs, 0.0)
        target /= target.sum()
        counts = np.bincount(tokens, minlength=len(LOGITS))
        assert counts[kept:].sum() == 0, (knobs, counts)
        statistic, df = chi_square(counts, target)
        assert statistic < chi_square_threshold(df), (knobs, statistic, counts, n * target)
        np.testing.assert_allclose(logprobs, np.log(target[tokens]), rtol=1e-5, err_msg=knobs)


def nucleus_reference(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Kept tokens [V] bool: the top k (all if 0), then the smallest prefix of them, most probable
    first, whose renormalised mass reaches top_p (Holtzman et al. 2019), with ties at the
    cut-off kept."""
    order = np.argsort(-logits, kind="stable")
    k = top_k or len(logits)
    probs = softmax(logits[order[:k]].astype(np.float64))
    size = int(np.searchsorted(np.cumsum(probs), top_p - 1e-9)) + 1 if top_p < 1 else k
    cutoff = logits[order[min(size, k) - 1]]
    return logits >= cutoff


def test_filter_logits_keeps_exactly_the_nucleus():
    """Random logits with repeated values (ties), random top-k and top-p: the kept set is the
    reference's, and what is kept keeps its logit."""
    rng = np.random.default_rng(0)
    rows, vocab = 400, 12
    logits = np.round(rng.normal(0, 1.5, (rows, vocab)), 1).astype(np.float32)  # some ties
    top_k = rng.integers(0, vocab + 1, rows).astype(np.int32)
    top_p = rng.uniform(0.05, 1.0, rows).astype(np.float32)
    top_p[:20] = 1.0
    filtered = jax.jit(jax.vmap(lambda row, k, p: filter_logits(row[None], top_k=k, top_p=p)[0]))(
        logits, top_k, top_p
    )
    filtered = np.asarray(filtered)
    for row in range(rows):
        expected = nucleus_reference(logits[row], int(top_k[row]), float(top_p[row]))
        kept = np.isfinite(filtered[row])
        np.testing.assert_array_equal(kept, expected, err_msg=f"row {row}")
        np.testing.assert_array_equal(filtered[row][kept], logits[row][kept])
