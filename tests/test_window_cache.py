"""Sliding-window layers keep a window-sized ring as their KV cache (`jaxalign.models.kv_cache`).

Tiny random models with a window of 4: Mistral-style (every layer sliding) and Gemma-2-style
(sliding, full, sliding: two layers in the ring stack, one in the full stack). Sequences run well
past the window, so the ring wraps several times; decoding must equal full forwards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models import Transformer, init_cache
from jaxalign.models.config import ModelConfig
from jaxalign.sampling import SamplingConfig, _check_left_padded, generate

WINDOW = 4
TOL = 1e-5
_COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    sliding_window=WINDOW,
)
CONFIGS = {
    "mistral": ModelConfig(model_type="mistral", num_layers=2, **_COMMON),
    "gemma2": ModelConfig(
        model_type="gemma2",
        num_layers=3,
        layer_types=("sliding_attention", "full_attention", "sliding_attention"),
        norm_scale_offset=1.0,
        activation="gelu_tanh",
        scale_embeddings=True,
        tie_word_embeddings=True,
        post_norms=True,
        query_pre_attn_scalar=8.0,
        attn_logit_softcap=20.0,
        final_logit_softcap=30.0,
        **_COMMON,
    ),
}


def _unstack(params: dict) -> dict:
    """Scanned params (`layers`, stacked `[L, ...]`) as unrolled ones (`layers_0`, ...)."""
    stacked = params["layers"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


@pytest.fixture(scope="module")
def models():
    """`models(arch, scan) -> (model, params)`: one set of weights per arch for both layouts,
    scaled up from the init so that attention is far from uniform and the window matters."""
    built = {}

    def load(arch: str, scan: bool):
        if arch not in built:
            model = Transformer(CONFIGS[arch].replace(scan_layers=True))
            params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
            params = jax.tree.map(lambda x: x * 8.0 if x.ndim > 1 else x, params)
            built[arch] = params
        config = CONFIGS[arch].replace(scan_layers=scan)
        params = built[arch] if scan else _unstack(built[arch])
        return Transformer(config), params

    return load


def _left_padded(lengths, prompt_len, seed=1):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    mask = (np.arange(prompt_len)[None] >= prompt_len - lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(3, 64, (len(lengths), prompt_len)), 0)
    return ids.astype(np.int32), mask


def _slots(group) -> list[int]:
    arrays = group if isinstance(group, tuple) else [group]
    return [a.shape[-2] for a in arrays]


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sliding_layers_keep_window_sized_caches(arch, scan):
    config = CONFIGS[arch].replace(scan_layers=scan)
    cache = init_cache(config, 3, 20)
    num_window = 2  # Mistral: both layers; Gemma 2: layers 0 and 2
    num_full = config.num_layers - num_window
    ring, full = (3, 2, WINDOW, 8), (3, 2, 20, 8)
    for group, count, shape in (
        (cache.window_keys, num_window, ring),
        (cache.window_values, num_window, ring),
        (cache.keys, num_full, full),
        (cache.values, num_full, full),
    ):
        if count == 0:
            assert group is None
        elif scan:
            assert group.shape == (count, *shape)
        else:
            assert len(group) == count and all(a.shape == shape for a in group)
    assert cache.segment_ids.shape == cache.positions.shape == (3, 20)
    # A cache shorter than the window: the ring is the whole cache.
    assert set(_slots(init_cache(config, 3, 3).window_keys)) == {3}


@pytest.mark.parametrize(
    "arch,scan",
    [
        ("gemma2", False),
        ("gemma2", True),
        # test_models.py decodes the unrolled Mistral past its window too (one-chunk prefill).
        pytest.param("mistral", False, marks=pytest.mark.slow),
        ("mistral", True),
    ],
)
def test_decoding_past_the_window_equals_full_forward(models, arch, scan):
    """Left-padded prompts of 10 tokens (> window), prefilled in two chunks of 5 (the second
    attends over the ring beside its fresh keys), then 7 one-token steps: the ring wraps."""
    model, params = models(arch, scan)
    prompt_len, new_tokens = 10, 7
    ids, mask = _left_padded([10, 5, 1], prompt_len)
    rng = np.random.default_rng(2)
    full_ids = np.concatenate([ids, rng.integers(3, 64, (3, new_tokens))], axis=1).astype(np.int32)
    full_mask = np.concatenate([mask, np.ones((3, new_tokens), np.int32)], axis=1)
    forward = jax.jit(lambda i, m: model.apply({"params": params}, i, m))
    full_logits = np.asarray(forward(full_ids, full_mask))
    if arch == "gemma2":  # the window matters here: without it the same weights differ
        unwindowed = Transformer(model.config.replace(sliding_window=None, layer_types=None))
        other = jax.jit(unwindowed.apply)({"params": params}, full_ids, full_mask)
        assert np.abs(np.asarray(other) - full_logits)[:, prompt_len:].max() > 1e-2

    cache = init_cache(model.config, 3, prompt_len + new_tokens)
    step = jax.jit(lambda i, m, c: model.apply({"params": params}, i, m, cache=c))
    outputs = []
    for start, stop in [(0, 5), (5, 10), *((t, t + 1) for t in range(10, 10 + new_tokens))]:
        logits, cache = step(full_ids[:, start:stop], full_mask[:, start:stop], cache)
        outputs.append(np.asarray(logits))
    assert set(_slots(cache.window_keys)) == {WINDOW}
    decoded = np.concatenate(outputs, axis=1)
    real = full_mask.astype(bool)
    np.testing.assert_allclose(decoded[real], full_logits[real], atol=TOL, rtol=0)


def _greedy_reference(model, params, ids, mask, new_tokens):
    """Greedy tokens by a full forward per step, in a fixed `[B, P+N]` buffer."""
    forward = jax.jit(lambda i, m: model.apply({"params": params}, i, m))
    prompt_len = ids.shape[1]
    seq = np.pad(ids, ((0, 0), (0, new_tokens)))
    seq_mask = np.pad(mask, ((0, 0), (0, new_tokens)))
    for t in range(prompt_len, prompt_len + new_tokens):
        seq[:, t] = np.argmax(np.asarray(forward(seq, seq_mask))[:, t - 1], axis=-1)
        seq_mask[:, t] = 1
    return seq[:, prompt_len:]


@pytest.mark.parametrize(
    "arch,scan,prompt_len",
    [
        # A prompt shorter than the window: the shared prefill's ring is padded to the window.
        ("gemma2", False, 3),
        # Longer: the prefill wraps the ring.
        pytest.param("mistral", True, 6, marks=pytest.mark.slow),
    ],
)
def test_greedy_generate_equals_full_forwards(models, arch, scan, prompt_len):
    model, params = models(arch, scan)
    new_tokens, group = 7, 2
    ids, mask = _left_padded([prompt_len, 2, 1], prompt_len, seed=3)
    expected = _greedy_reference(model, params, ids, mask, new_tokens)
    config = SamplingConfig(
        max_new_tokens=new_tokens, greedy=True, eos_token_ids=(), pad_token_id=0
    )
    out = generate(model, params, ids, mask, rng=jax.random.key(0), config=config)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    shared = generate(
        model, params, ids, mask, rng=jax.random.key(0), config=config, num_generations=group
    )
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.repeat(expected, group, axis=0))


def test_generate_refuses_right_padded_prompts_when_the_ring_is_shorter_than_the_run(models):
    model, params = models("mistral", False)
    ids, mask = _left_padded([3, 6], prompt_len=6)
    right = np.ascontiguousarray(mask[:, ::-1])  # row 0: 3 real tokens, then padding
    config = SamplingConfig(max_new_tokens=4, greedy=True, eos_token_ids=(), pad_token_id=0)
    with pytest.raises(ValueError, match=r"rows \[0\] have padding after a real token"):
        generate(model, params, ids, right, rng=jax.random.key(0), config=config)
    # A window of 16 holds all 6 + 4 slots (the ring is the whole cache): nothing to refuse.
    _check_left_padded(model.config.replace(sliding_window=16), right, 10)
    _check_left_padded(model.config, mask, 10)  # left-padded: fine
