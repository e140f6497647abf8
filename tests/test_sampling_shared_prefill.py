"""Shared-prefill sampling (`generate(..., num_generations=G)`) equals G independent prefills:
generating on `jnp.repeat(prompts, G, axis=0)` with the same row keys, token for token."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_hf import make_tiny_hf_model

from jaxalign.models import from_pretrained
from jaxalign.sampling import SamplingConfig, generate, row_keys_from_rng

PROMPT_LEN, NEW_TOKENS, GROUP = 8, 6, 3
SAMPLE = SamplingConfig(
    max_new_tokens=NEW_TOKENS, temperature=1.3, eos_token_ids=(), pad_token_id=0
)


def _scanned(model, params):
    """The same weights as a `scan_layers` model (stacked `[L, ...]` params and cache)."""
    layer_names = sorted(k for k in params if k.startswith("layers_"))
    scanned_params = {k: v for k, v in params.items() if k not in layer_names}
    scanned_params["layers"] = jax.tree.map(
        lambda *xs: jnp.stack(xs), *(params[k] for k in layer_names)
    )
    return type(model)(model.config.replace(scan_layers=True)), scanned_params


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    """`load(arch, layout) -> (model, params)`, each tiny checkpoint built once."""
    loaded = {}

    def load(arch: str, layout: str):
        if arch not in loaded:
            path = make_tiny_hf_model(arch, tmp_path_factory.mktemp("hf") / arch)
            loaded[arch] = from_pretrained(path)
        model, params = loaded[arch]
        return (model, params) if layout == "unrolled" else _scanned(model, params)

    return load


def _prompts(lengths=(8, 3, 1), seed=1):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    mask = (np.arange(PROMPT_LEN)[None] >= PROMPT_LEN - lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(3, 97, (len(lengths), PROMPT_LEN)), 0)
    return ids.astype(np.int32), mask


def _assert_same(shared, independent):
    np.testing.assert_array_equal(shared.tokens, independent.tokens)
    np.testing.assert_array_equal(shared.response_mask, independent.response_mask)
    np.testing.assert_array_equal(shared.finished, independent.finished)
    np.testing.assert_allclose(shared.logprobs, independent.logprobs, atol=1e-5)


# The stacked (scan_layers) cache layout does not depend on the architecture: llama covers it.
@pytest.mark.parametrize(
    "arch,layout", [("llama", "unrolled"), ("llama", "scan_layers"), ("gpt2", "unrolled")]
)
def test_shared_prefill_equals_independent_prefills(load, arch, layout):
    model, params = load(arch, layout)
    ids, mask = _prompts()
    repeated_ids, repeated_mask = np.repeat(ids, GROUP, axis=0), np.repeat(mask, GROUP, axis=0)
    row_keys = row_keys_from_rng(jax.random.key(7), len(ids) * GROUP)

    shared = generate(
        model, params, ids, mask, row_keys=row_keys, config=SAMPLE, num_generations=GROUP
    )
    independent = generate(
        model, params, repeated_ids, repeated_mask, row_keys=row_keys, config=SAMPLE
    )
    assert shared.tokens.shape == (len(ids) * GROUP, NEW_TOKENS)
    _assert_same(shared, independent)
    # Rows of one prompt differ (own keys): the group is G samples, not one sample G times.
    tokens = np.asarray(shared.tokens)
    assert len({tuple(row) for row in tokens[:GROUP]}) > 1

    # The default per-row keys (fold_in(rng, row)) agree too, and so does early stopping at EOS.
    eos = int(tokens[1, 2])
    config = dataclasses.replace(SAMPLE, eos_token_ids=(eos,))
    shared = generate(
        model, params, ids, mask, rng=jax.random.key(7), config=config, num_generations=GROUP
    )
    independent = generate(
        model, params, repeated_ids, repeated_mask, rng=jax.random.key(7), config=config
    )
    _assert_same(shared, independent)
    assert np.asarray(shared.finished)[1]


def test_rejects_wrong_number_of_row_keys(load):
    model, params = load("llama", "unrolled")
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="row_keys"):
        generate(
            model,
            params,
            ids,
            mask,
            row_keys=row_keys_from_rng(jax.random.key(0), len(ids)),
            config=SAMPLE,
            num_generations=GROUP,
        )
