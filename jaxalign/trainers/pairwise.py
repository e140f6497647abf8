"""Pairwise preference batches: chosen and rejected through one concatenated forward (2B rows)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.models import Transformer, gather_last_token, sequence_token_logprobs

Batch = dict[str, jax.Array]


def concat_pairs(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`[2B, T]` input_ids, attention_mask, positions and loss_mask: chosen rows, then rejected."""
    return tuple(
        jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=0)
        for name in ("input_ids", "attention_mask", "positions", "loss_mask")
    )


def response_logps(
    model: Transformer, params, batch: Batch, *, chunk_size: int | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Summed response log-probs and response lengths: `(chosen, rejected, chosen_len, rejected_len)`."""
    input_ids, attention_mask, positions, loss_mask = concat_pairs(batch)
    logprobs, _ = sequence_token_logprobs(
        model, params, input_ids, attention_mask, positions, chunk_size=chunk_size
    )
    summed = (logprobs * loss_mask).sum(-1)
    lengths = loss_mask.sum(-1)
    num_pairs = batch["chosen_input_ids"].shape[0]
    return summed[:num_pairs], summed[num_pairs:], lengths[:num_pairs], lengths[num_pairs:]


def pair_rewards(model: Transformer, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Scalar-head scores at each sequence's last token: `(chosen_rewards [B], rejected_rewards [B])`."""
    input_ids, attention_mask, positions, _ = concat_pairs(batch)
    values = model.apply({"params": params}, input_ids, attention_mask, positions)
    rewards = gather_last_token(values, attention_mask)
    num_pairs = batch["chosen_input_ids"].shape[0]
    return rewards[:num_pairs], rewards[num_pairs:]
