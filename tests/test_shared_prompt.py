"""Shared-prompt preference rows (`prompt + chosen + rejected`, the prompt run once) compute exactly
what the two-row layout computes: the same response log-probs, DPO loss and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import sharding as shd
from jaxalign.data import collate_preference, collate_preference_shared
from jaxalign.data.batching import Buckets
from jaxalign.losses import dpo_loss
from jaxalign.models import ModelConfig, Transformer
from jaxalign.models.config import from_hf_config
from jaxalign.models.transformer import attention_mask_4d
from jaxalign.trainers.pairwise import response_logps

PAD = 0


def _examples(seed: int = 0, prompt_lengths=(1, 5, 9, 3), vocab: int = 97):
    rng = np.random.default_rng(seed)
    examples = []
    for n_prompt in prompt_lengths:
        n_chosen, n_rejected = rng.integers(1, 8, 2)
        examples.append(
            {
                f"{name}_ids": rng.integers(3, vocab, n).astype(np.int32)
                for name, n in (
                    ("prompt", n_prompt),
                    ("chosen", n_chosen),
                    ("rejected", n_rejected),
                )
            }
        )
    return examples


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_and_params(request):
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    if request.param == "llama":
        config = ModelConfig(model_type="llama", num_kv_heads=2, head_dim=8, **common)
    else:
        config = from_hf_config(
            {
                "model_type": "gpt2",
                "vocab_size": 97,
                "n_embd": 32,
                "n_layer": 2,
                "n_head": 4,
                "n_positions": 64,
            }
        )
    model = Transformer(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return model, shd.unbox(params)


def test_collate_shared_layout_by_hand():
    example = {
        "prompt_ids": np.int32([5, 6]),
        "chosen_ids": np.int32([7, 8, 9]),
        "rejected_ids": np.int32([10]),
    }
    batch = collate_preference_shared([example], buckets=Buckets((8,), max_length=16), pad_id=PAD)
    np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7, 8, 9, 10, 0, 0]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 4, 2, 0, 0]])
    np.testing.assert_array_equal(batch["branch_ids"], [[0, 0, 1, 1, 1, 2, 0, 0]])
    np.testing.assert_array_equal(batch["chosen_loss_mask"], [[0, 0, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["rejected_loss_mask"], [[0, 0, 0, 0, 0, 1, 0, 0]])


def test_rejected_tokens_do_not_see_chosen_tokens():
    branch = jnp.asarray([[0, 0, 1, 1, 2, 2]])
    segments = jnp.ones_like(branch)
    positions = jnp.asarray([[0, 1, 2, 3, 2, 3]])
    mask = attention_mask_4d(segments, positions, jnp.arange(6), segments, positions, None, branch)[
        0, 0
    ]
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],  # rejected: the prompt and itself, not chosen
            [1, 1, 0, 0, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(mask, expected)


def test_shared_prompt_logps_loss_and_grads_equal_two_rows(model_and_params):
    model, params = model_and_params
    examples = _examples()
    buckets = Buckets((16,), max_length=16)
    two_rows = collate_preference(examples, buckets=buckets, pad_id=PAD)
    shared = collate_preference_shared(examples, buckets=Buckets((16,), max_length=32), pad_id=PAD)
    assert shared["input_ids"].shape[0] == len(examples)

    def loss(p, batch):
        chosen, rejected, chosen_len, rejected_len = response_logps(
            model, p, batch, chunk_size=None
        )
        losses, _, _ = dpo_loss(chosen, rejected, chosen * 0.5, rejected * 0.3, beta=0.1)
        return losses.sum(), (chosen, rejected, chosen_len, rejected_len)

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (loss_two, logps_two), grads_two = grad_fn(params, two_rows)
    (loss_shared, logps_shared), grads_shared = grad_fn(params, shared)
    for a, b in zip(logps_two, logps_shared, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logps_two[2], [len(e["chosen_ids"]) for e in examples])
    np.testing.assert_allclose(loss_two, loss_shared, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        grads_two,
        grads_shared,
    )
