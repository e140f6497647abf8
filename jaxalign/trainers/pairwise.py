"""Pairwise preference batches: chosen and rejected through one concatenated forward (2B rows).

A batch holds one pair per row, or (packed, `pair_mask [B, K]` present) up to K pairs per row as
segments 1..K of the attention mask; per-pair values are then `[B, K]`, with `pair_weights`
1 on the real pairs and 0 on empty slots (see `jaxalign.data.batching`).
"""

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


def pair_weights(batch: Batch) -> jax.Array:
    """`[P]` 1.0 for each real pair, flattened like `flat_pairs` flattens per-pair values."""
    if "pair_mask" in batch:
        return batch["pair_mask"].reshape(-1)
    rows = batch["input_ids" if "branch_ids" in batch else "chosen_input_ids"].shape[0]
    return jnp.ones((rows,), jnp.float32)


def flat_pairs(*values: jax.Array) -> tuple[jax.Array, ...]:
    """Per-pair values `[B]` or `[B, K]` (packed) as `[P]`, the order of `pair_weights`."""
    return tuple(value.reshape(-1) for value in values)


def _segment_onehot(segments: jax.Array, num_slots: int) -> jax.Array:
    """`[B, T, K]` true where token t belongs to pair slot k (segment id k + 1)."""
    return segments[..., None] == jnp.arange(1, num_slots + 1, dtype=segments.dtype)


def response_logps(
    model: Transformer,
    params,
    batch: Batch,
    *,
    chunk_size: int | None,
    return_router_stats: bool = False,
    with_mean_logits: bool = False,
) -> tuple[jax.Array, ...]:
    """Summed response log-probs and response lengths: `(chosen, rejected, chosen_len, rejected_len)`,
    each `[B]`, or `[B, K]` for a packed batch (0 on empty slots).

    Takes either batch layout of `jaxalign.data.batching`: chosen and rejected rows (2B rows), or
    shared-prompt rows (`branch_ids` present; B rows, the prompt run once), packed or not.
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
        num_rows = batch["chosen_input_ids"].shape[0]
        masks = (loss_mask, loss_mask)
        branch_ids = None
    # Packed rows: a [B, T, K] one-hot of each token's pair slot turns token sums into pair sums.
    # (An elementwise product and sum, not an einsum: a TPU matmul would round fp32 to bf16.)
    onehot = (
        _segment_onehot(attention_mask, batch["pair_mask"].shape[1])
        if "pair_mask" in batch
        else None
    )
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

    def sum_pairs(x: jax.Array) -> jax.Array:  # [rows, T] -> [rows] or [rows, K]
        if onehot is None:
            return x.sum(-1)
        return jnp.where(onehot, x[..., None], 0.0).sum(1)

    def chosen_and_rejected(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if branch_ids is not None:  # one row per pair: the two masks pick the two responses
            return sum_pairs(x * masks[0]), sum_pairs(x * masks[1])
        summed = sum_pairs(x * masks[0])  # chosen rows, then rejected rows
        return summed[:num_rows], summed[num_rows:]

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
    num_slots: int | None = None,
) -> jax.Array | tuple[jax.Array, Any]:
    """Scalar-head score of each sequence `[B]`, read where Hugging Face reads it (`score_mask`);
    with `return_router_stats`, also the forward's `RouterStats` (None for a dense model).
    `num_slots=K`: rows packed with sequences as segments 1..K (`attention_mask`), scored per
    segment, `[B, K]` (slots without a sequence read token 0)."""
    values, stats = model.apply(
        {"params": params}, input_ids, attention_mask, positions, return_router_stats=True
    )
    mask = score_mask(input_ids, attention_mask, model.config.pad_token_id)
    if num_slots is None:
        scores = gather_last_token(values, mask)
    else:  # the last scorable token of each segment
        index = jnp.arange(values.shape[1])[:, None]
        onehot = _segment_onehot(attention_mask, num_slots) & mask[..., None]
        last = jnp.where(onehot, index, 0).max(axis=1)  # [B, K]
        scores = jnp.take_along_axis(values, last, axis=1)
    return (scores, stats) if return_router_stats else scores


def pair_rewards(
    model: Transformer, params, batch: Batch, *, return_router_stats: bool = False
) -> tuple[jax.Array, ...]:
    """Scalar-head scores of each sequence: `(chosen_rewards, rejected_rewards)`, `[B]` or `[B, K]`
    for a packed batch (and the `RouterStats` with `return_router_stats`)."""
    input_ids, attention_mask, positions, _ = concat_pairs(batch)
    rewards, stats = sequence_scores(
        model,
        params,
        input_ids,
        attention_mask,
        positions,
        return_router_stats=True,
        num_slots=batch["pair_mask"].shape[1] if "pair_mask" in batch else None,
    )
    num_rows = batch["chosen_input_ids"].shape[0]
    out = rewards[:num_rows], rewards[num_rows:]
    return (*out, stats) if return_router_stats else out
