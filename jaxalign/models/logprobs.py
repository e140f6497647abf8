"""Per-token log-probs without materialising full-vocabulary fp32 logits for the whole batch.

The sequence is cut into chunks; each chunk's logits `[B, C, V]` are built, reduced to the target
log-prob (and optionally the entropy) and dropped. `jax.checkpoint` makes the backward pass rebuild
each chunk's logits instead of storing them, so peak memory is O(B·C·V), not O(B·T·V).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxalign.models.transformer import softcap

Array = jax.Array


def _chunk_stats(
    hidden: Array,
    output_embedding: Array,
    targets: Array,
    temperature: float,
    with_entropy: bool,
    logit_softcap: float | None = None,
    with_mean_logit: bool = False,
) -> tuple[Array, ...]:
    batch, chunk, embed = hidden.shape
    logits = jnp.dot(  # as a 2-D matmul, which XLA:CPU runs faster than the [B, C, E] einsum
        hidden.reshape(batch * chunk, embed),
        output_embedding.astype(hidden.dtype),
        preferred_element_type=jnp.float32,
    ).reshape(batch, chunk, -1)
    logits = softcap(logits, logit_softcap) / temperature
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    entropy = None
    if with_entropy:
        probs = jnp.exp(logits - log_norm[..., None])
        entropy = log_norm - jnp.sum(probs * logits, axis=-1)
    if with_mean_logit:  # TRL's `logits/chosen`: the mean over the vocabulary, per token
        return target_logits - log_norm, entropy, jnp.mean(logits, axis=-1)
    return target_logits - log_norm, entropy


def token_logprobs_from_hidden(
    hidden: Array,
    output_embedding: Array,
    targets: Array,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = True,
    logit_softcap: float | None = None,
    with_mean_logit: bool = False,
) -> tuple[Array, ...]:
    """log π(targets | hidden) and the entropy of π at each position.

    Args:
      hidden: final hidden states `[B, T, E]` that predict `targets [B, T]`.
      output_embedding: `[E, V]`.
      chunk_size: tokens per chunk along T (None: one chunk).
      logit_softcap: the model's `final_logit_softcap` (Gemma 2), applied before the temperature.
      with_mean_logit: also return each position's mean logit over the vocabulary `[B, T]`.
    Returns:
      `(logprobs [B, T], entropy [B, T])`, both float32, plus `mean_logit [B, T]` when asked;
      logits are divided by `temperature`. `entropy` is None when `with_entropy=False` (it costs
      a full-vocabulary pass).
    """
    batch, seq_len, _ = hidden.shape
    settings = (temperature, with_entropy, logit_softcap, with_mean_logit)
    if chunk_size is None or chunk_size >= seq_len:
        return _chunk_stats(hidden, output_embedding, targets, *settings)
    stats = jax.checkpoint(_chunk_stats, static_argnums=(3, 4, 5, 6))
    num_chunks = -(-seq_len // chunk_size)
    pad = num_chunks * chunk_size - seq_len
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hidden_chunks = hidden.reshape(batch, num_chunks, chunk_size, -1).swapaxes(0, 1)
    target_chunks = targets.reshape(batch, num_chunks, chunk_size).swapaxes(0, 1)
    outputs = jax.lax.map(
        lambda xs: stats(xs[0], output_embedding, xs[1], *settings),
        (hidden_chunks, target_chunks),
    )
    unchunk = lambda x: None if x is None else x.swapaxes(0, 1).reshape(batch, -1)[:, :seq_len]  # noqa: E731
    return tuple(unchunk(x) for x in outputs)


def sequence_token_logprobs(
    model: Any,
    params: Any,
    input_ids: Array,
    attention_mask: Array,
    positions: Array | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = True,
    branch_ids: Array | None = None,
    return_router_stats: bool = False,
    with_mean_logit: bool = False,
) -> tuple[Any, ...]:
    """Log-prob of each input token given the tokens before it, aligned with `input_ids`.

    Returns `(logprobs [B, T], entropy [B, T])` where `logprobs[:, t] = log π(x_t | x_<t)` and
    column 0 is 0 (nothing predicts the first token). Multiply by a response mask and sum to get
    sequence log-probs. `entropy` is None when `with_entropy=False`.

    With `branch_ids` (a trunk of 0s, then branches 1, 2, ...; see `Transformer`; a packed row
    repeats this once per segment), x_<t means the tokens x_t attends to: the first token of a
    branch that follows another branch is predicted from the last trunk token before it.

    `with_mean_logit=True` appends each token's mean logit over the vocabulary `[B, T]` (TRL's
    `logits/chosen` metric). `return_router_stats=True` then appends the forward's
    mixture-of-experts `RouterStats` (None for a dense model), from which
    `jaxalign.models.moe.router_loss_terms` makes the auxiliary loss.
    """
    variables = {"params": params}
    kwargs = {} if branch_ids is None else {"branch_ids": branch_ids}
    if return_router_stats:
        kwargs["return_router_stats"] = True
    hidden = model.apply(
        variables, input_ids, attention_mask, positions, return_hidden=True, **kwargs
    )
    hidden, stats = hidden if return_router_stats else (hidden, None)
    output_embedding = model.apply(variables, method="output_embedding")
    predicting = hidden[:, :-1]  # token t is predicted from the hidden state at t - 1 ...
    if branch_ids is not None:
        # ... except a branch's first token after another branch: from the last trunk token.
        index = jnp.arange(input_ids.shape[1])
        follows_trunk = (
            (branch_ids[:, 1:] != 0)
            & (branch_ids[:, :-1] != 0)
            & (branch_ids[:, 1:] != branch_ids[:, :-1])
        )  # [B, T - 1], for tokens 1..T-1
        is_trunk = (branch_ids == 0) & (attention_mask != 0)
        last_trunk = jax.lax.cummax(jnp.where(is_trunk, index, 0), axis=1)[:, :-1]
        source = jnp.where(follows_trunk, last_trunk, index[:-1])
        predicting = jnp.take_along_axis(hidden, source[..., None], axis=1)
    pad = ((0, 0), (1, 0))
    per_token = tuple(
        None if x is None else jnp.pad(x, pad)
        for x in token_logprobs_from_hidden(
            predicting,
            output_embedding,
            input_ids[:, 1:],
            chunk_size=chunk_size,
            temperature=temperature,
            with_entropy=with_entropy,
            logit_softcap=model.config.final_logit_softcap,
            with_mean_logit=with_mean_logit,
        )
    )  # logprobs, entropy (or None)[, mean_logit]
    return (*per_token, stats) if return_router_stats else tuple(per_token)
