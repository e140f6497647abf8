"""DPO's TRL-named logit metrics against full logits computed independently by the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxalign.config import base_config, tiny_model_init
from jaxalign.models import ModelConfig, Transformer
from jaxalign.trainers.dpo import dpo_loss_fn


def _pair_batch(rng: np.random.Generator, pairs: int, length: int, vocab: int) -> dict:
    batch = {}
    for side in ("chosen", "rejected"):
        ids = rng.integers(3, vocab, size=(pairs, length)).astype(np.int32)
        mask = np.ones((pairs, length), np.int32)
        mask[0, -3:] = 0  # right padding on the first pair
        loss = np.zeros((pairs, length), np.float32)
        loss[:, 4:] = 1.0  # prompt of 4 tokens, the rest is the response
        loss *= mask
        batch[f"{side}_input_ids"] = ids
        batch[f"{side}_attention_mask"] = mask
        batch[f"{side}_positions"] = np.broadcast_to(np.arange(length), (pairs, length)).copy()
        batch[f"{side}_loss_mask"] = loss
    return batch


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_logits_metrics_are_the_mean_response_logit(chunk_size):
    model = Transformer(ModelConfig(**tiny_model_init().to_dict()))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    batch = _pair_batch(np.random.default_rng(0), pairs=2, length=10, vocab=512)
    dpo_cfg = ml_collections.ConfigDict(base_config().dpo.to_dict())
    loss_fn = dpo_loss_fn(model, dpo_cfg, chunk_size=chunk_size)
    _, aux = loss_fn(params, batch, params, jax.random.PRNGKey(0))

    for side in ("chosen", "rejected"):
        logits = model.apply(
            {"params": params},
            batch[f"{side}_input_ids"],
            batch[f"{side}_attention_mask"],
            batch[f"{side}_positions"],
        )
        # Token t's log-prob comes from the logits at t - 1.
        mean_logit = np.asarray(logits, np.float64)[:, :-1].mean(-1)
        mask = batch[f"{side}_loss_mask"][:, 1:]
        expected = (mean_logit * mask).sum() / mask.sum()
        total, count = aux["weighted"][f"logits/{side}"]
        assert float(count) == mask.sum()
        np.testing.assert_allclose(float(total) / float(count), expected, rtol=1e-5)
