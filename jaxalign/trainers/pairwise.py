"""Pairwise preference batches: chosen and rejected through one concatenated forward (2B rows)."""

from __future__ import annotations

from typing import Any

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
    model: Transformer,
    params,
    batch: Batch,
    *,
    chunk_size: int | None,
    return_router_stats: bool = False,
    with_mean_logits: bool = False,
) -> tuple[jax.Array, ...]:
    """Summed response log-probs and response lengths: `(chosen, rejected, chosen_len, rejected_len)`.

    Takes either batch layout of `jaxalign.data.batching`: chosen and rejected rows (2B rows), or
    shared-prompt rows (`branch_ids` present; B rows, the prompt run once).
    `with_mean_logits=True` appends `(chosen_logits, rejected_logits)`: per pair, the sum over
    response tokens of each token's mean logit over the vocabulary (TRL's `logits/*` metrics
    divide them by the token counts). `return_router_stats=True` then appends the forward's
    `RouterStats` (None for a dense model).
    """
    if "branch_ids" in batch:
        input_ids, attention_mask, positions = (
            batch["input_ids"],
            batch["attention_mask"],
            batch["positions"],
        )
        masks = (batch["chosen_loss_mask"], batch["rejected_loss_mask"])
        branch_ids = batch["branch_ids"]
    else:
        input_ids, attention_mask, positions, loss_mask = concat_pairs(batch)
        num_pairs = batch["chosen_input_ids"].shape[0]
        masks = (loss_mask, loss_mask)
        branch_ids = None
    logprobs, _, *extra = sequence_token_logprobs(
        model,
        params,
        input_ids,
        attention_mask,
        positions,
        chunk_size=chunk_size,
        with_entropy=False,
        branch_ids=branch_ids,
        return_router_stats=True,
        with_mean_logit=with_mean_logits,
    )
    stats = extra[-1]
    per_token = [logprobs] + ([extra[0]] if with_mean_logits else [])

    def chosen_and_rejected(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if branch_ids is not None:  # one row per pair: the two masks pick the two responses
            return (x * masks[0]).sum(-1), (x * masks[1]).sum(-1)
        summed = (x * masks[0]).sum(-1)  # chosen rows, then rejected rows
        return summed[:num_pairs], summed[num_pairs:]

    lengths = chosen_and_rejected(jnp.ones_like(logprobs))
    out = (*chosen_and_rejected(per_token[0]), *lengths)
    if with_mean_logits:
        out = (*out, *chosen_and_rejected(per_token[1]))
    return (*out, stats) if return_router_stats else out


def score_mask(
    input_ids: jax.Array, attention_mask: jax.Array, pad_token_id: int | None
) -> jax.Array:
    """`[B, T]` tokens a sequence's score may be read at: real tokens that are not the pad id.

    Hugging Face's `*ForSequenceClassification` scores the last token whose id is not
    `pad_token_id`; when a tokenizer pads with EOS that is the token *before* the final EOS, so
    reading the score there too keeps an exported reward model scoring as it was trained.
    """
    mask = attention_mask != 0
    if pad_token_id is not None:
        mask &= input_ids != pad_token_id
    return mask


def sequence_scores(
    model: Transformer,
    params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    positions=None,
    *,
    return_router_stats: bool = False,
) -> jax.Array | tuple[jax.Array, Any]:
    """Scalar-head score of each sequence `[B]`, read where Hugging Face reads it (`score_mask`);
    with `return_router_stats`, also the forward's `RouterStats` (None for a dense model)."""
    values, stats = model.apply(
        {"params": params}, input_ids, attention_mask, positions, return_router_stats=True
    )
    scores = gather_last_token(
        values, score_mask(input_ids, attention_mask, model.config.pad_token_id)
    )
    return (scores, stats) if return_router_stats else scores


def pair_rewards(
    model: Transformer, params, batch: Batch, *, return_router_stats: bool = False
) -> tuple[jax.Array, ...]:
    """Scalar-head scores of each sequence: `(chosen_rewards [B], rejected_rewards [B])` (and the
    `RouterStats` with `return_router_stats`)."""
    input_ids, attention_mask, positions, _ = concat_pairs(batch)
    rewards, stats = sequence_scores(
        model, params, input_ids, attention_mask, positions, return_router_stats=True
    )
    num_pairs = batch["chosen_input_ids"].shape[0]
    out = rewards[:num_pairs], rewards[num_pairs:]
    return (*out, stats) if return_router_stats else out
