"""Autoregressive sampling with a KV cache, as one cached jitted function of fixed shapes.

    config = SamplingConfig(max_new_tokens=64, temperature=0.7, top_p=0.9,
                            eos_token_ids=(2,), pad_token_id=0)
    out = generate(model, params, prompt_ids, prompt_mask, rng=jax.random.key(0), config=config)
    old_logps = response_logprobs(model, params, prompt_ids, prompt_mask, out.tokens,
                                  out.response_mask, temperature=config.temperature)

Shapes: B batch, P prompt length (a bucket), N = `max_new_tokens`, V vocab.

Prompts are left-padded (`jaxalign.data` prompt batches), so every row's last prompt token sits in
column P-1 and generated tokens append on the right. The whole decode is one `jax.jit` of fixed
shapes: prefill the `[B, P]` prompt into a cache of P+N slots (sliding-window layers keep a ring
of min(W, P+N), `jaxalign.models.kv_cache`), then a `lax.while_loop` of one-token steps that stops
as soon as every row has emitted EOS. Each row samples with its own key
(`fold_in(rng, row)` then `fold_in(key, step)`), so a row's tokens do not depend on which other rows
share its batch or on how the batch is sharded. Sharding is left to propagation from the inputs:
shard the batch's leading dim over the data axes and the params as for training.

`num_generations=G` samples G completions per prompt (GRPO's groups) from one prefill per prompt:
the prompt's cache is repeated to its G rows (prompt-major, `jnp.repeat` order, as TRL orders
them), and the result equals generating on the repeated prompts with the same keys.

Compiled functions are cached per (model, max_new_tokens, whether top-k/top-p is on, G) and shapes;
temperature, top_k, top_p, greedy, EOS and pad ids are runtime values: changing them (e.g. greedy
evaluation between sampled PPO rollouts) does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models import KVCache, init_cache, sequence_token_logprobs
from jaxalign.models.kv_cache import window_layers, window_length
from jaxalign.models.transformer import softcap

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to pick tokens; frozen and hashable.

    Logits are divided by `temperature`, then filtered by `top_k` (0 = off) and `top_p`
    (1.0 = off); `greedy` takes the argmax instead of sampling. Rows stop at any of
    `eos_token_ids`; positions after a row's EOS hold `pad_token_id`.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    eos_token_ids: tuple[int, ...]
    pad_token_id: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@flax.struct.dataclass
class GenerationOutput:
    """Generated responses; everything after a row's first EOS is padding.

    tokens: `[B, N]` int32, `pad_token_id` after EOS.
    response_mask: `[B, N]` int32, 1 for generated tokens up to and including the first EOS.
    logprobs: `[B, N]` float32, log-prob of each token under the temperature-scaled, filtered
      distribution it was drawn from; 0 where `response_mask` is 0.
    finished: `[B]` bool, whether the row emitted EOS within N tokens.
    """

    tokens: Array
    response_mask: Array
    logprobs: Array
    finished: Array


def filter_logits(logits: Array, *, top_k: int | Array = 0, top_p: float | Array = 1.0) -> Array:
    """Sets logits outside the top-k and then the nucleus to -inf; `logits [..., V]`, scaled.

    top-k (0 = off) keeps the k largest logits. top-p (Holtzman et al. 2019; 1.0 = off) then keeps
    the smallest set of most probable tokens whose cumulative probability (renormalised over the
    top-k) is >= p; the most probable token is always kept. Ties at a cut-off are kept. `top_k`
    and `top_p` may be traced scalars: one descending sort serves both.
    """
    if isinstance(top_k, int) and isinstance(top_p, int | float) and top_k == 0 and top_p >= 1:
        return logits
    vocab = logits.shape[-1]
    rank = jnp.arange(vocab)
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_top_k = rank < k
    sorted_probs = jax.nn.softmax(jnp.where(in_top_k, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # exclusive: rank 0 has 0
    kept = in_top_k & ((mass_before < top_p) | (top_p >= 1.0))
    cutoff = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, jnp.asarray(-jnp.inf, logits.dtype), logits)


def sample_tokens(
    logits: Array,
    keys: Array,
    *,
    temperature: float | Array = 1.0,
    top_k: int | Array = 0,
    top_p: float | Array = 1.0,
    greedy: bool | Array = False,
) -> tuple[Array, Array]:
    """Picks one token per row from `logits [B, V]` with per-row `keys [B]`.

    Returns `(tokens [B] int32, logprobs [B] float32)`: log-probs under the distribution sampled,
    `softmax(filter(logits / temperature))`. Greedy takes its argmax (that of the raw logits).
    """
    scaled = logits.astype(jnp.float32) / temperature
    filtered = filter_logits(scaled, top_k=top_k, top_p=top_p)
    sampled = jax.vmap(jax.random.categorical)(keys, filtered)
    tokens = jnp.where(greedy, jnp.argmax(filtered, axis=-1), sampled).astype(jnp.int32)
    log_probs = jax.nn.log_softmax(filtered, axis=-1)
    return tokens, jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]


def row_keys_from_rng(rng: Array, batch_size: int) -> Array:
    """`[B]` keys `fold_in(rng, row)`: a row's randomness depends only on `rng` and its index."""
    return jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(batch_size))


class _Knobs(NamedTuple):
    """The sampling fields passed as runtime values, so changing them does not recompile."""

    temperature: Array  # [] float32
    top_k: Array  # [] int32
    top_p: Array  # [] float32
    greedy: Array  # [] bool
    is_eos: Array  # [V] bool
    pad_id: Array  # [] int32


def _knobs(config: SamplingConfig, vocab_size: int) -> _Knobs:
    bad = [i for i in config.eos_token_ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"eos_token_ids {bad} outside the vocabulary [0, {vocab_size})")
    is_eos = np.zeros(vocab_size, bool)
    is_eos[list(config.eos_token_ids)] = True
    return _Knobs(
        temperature=np.float32(config.temperature),
        top_k=np.int32(config.top_k),
        top_p=np.float32(config.top_p),
        greedy=np.bool_(config.greedy),
        is_eos=is_eos,
        pad_id=np.int32(config.pad_token_id),
    )


def _repeat_cache(
    cache: KVCache, num_generations: int, max_length: int, window_slots: int
) -> KVCache:
    """A prefilled cache of P rows as P·G rows (each row G times in a row, `jnp.repeat` order),
    its slot axes padded with empty slots: to `max_length`, and the sliding-window layers' rings
    to `window_slots` = min(W, max_length). A ring prefilled with P < W tokens holds token i at
    slot i = i mod W, so padding it keeps its layout; with P >= W it is already W slots long."""

    def grow(arrays: Any, length: int) -> Any:
        """Keys/values are [L, B, K, S, D] stacked (scan_layers) or tuples of [B, K, S, D], segment
        ids and positions [B, S]: batch axis -4 or 0, slot axis -2 or 1; None if no such layers."""

        def one(x: Array) -> Array:
            batch_axis, slot_axis = (-4, -2) if x.ndim >= 4 else (0, 1)
            pad = [(0, 0)] * x.ndim
            pad[slot_axis] = (0, length - x.shape[slot_axis])
            return jnp.repeat(jnp.pad(x, pad), num_generations, axis=batch_axis)

        return jax.tree.map(one, arrays)

    return KVCache(
        keys=grow(cache.keys, max_length),
        values=grow(cache.values, max_length),
        window_keys=grow(cache.window_keys, window_slots),
        window_values=grow(cache.window_values, window_slots),
        segment_ids=grow(cache.segment_ids, max_length),
        positions=grow(cache.positions, max_length),
        index=cache.index,
    )


def _decode(
    model: Any,
    max_new_tokens: int,
    filtering: bool,
    num_generations: int,
    params: Any,
    prompt_ids: Array,
    prompt_mask: Array,
    row_keys: Array,
    knobs: _Knobs,
) -> GenerationOutput:
    """Prefill + while_loop decode; traced once per (model, max_new_tokens, filtering,
    num_generations, shapes). With G = num_generations > 1 the `[P, T]` prompts are prefilled
    once and their cache and last logits repeated to the `B = P·G` decode rows."""
    num_prompts, prompt_len = prompt_ids.shape
    batch = num_prompts * num_generations
    variables = {"params": params}
    sample = functools.partial(
        sample_tokens,
        temperature=knobs.temperature,
        top_k=knobs.top_k if filtering else 0,
        top_p=knobs.top_p if filtering else 1.0,
        greedy=knobs.greedy,
    )
    step_keys = lambda step: jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)  # noqa: E731

    max_length = prompt_len + max_new_tokens
    # Shared prefill: a prompt's G rows would compute the same keys and values, so compute them
    # once into a prompt-length cache, then repeat (and pad) it for decoding.
    shared = num_generations > 1
    cache = init_cache(model.config, num_prompts, prompt_len if shared else max_length)
    segment_ids = (prompt_mask != 0).astype(jnp.int32)
    # Prefill: only the last position's logits are needed, so the LM head sees one row per prompt.
    hidden, cache = model.apply(
        variables, prompt_ids.astype(jnp.int32), segment_ids, cache=cache, return_hidden=True
    )
    output_embedding = model.apply(variables, method="output_embedding")
    last_logits = jnp.einsum(
        "be,ev->bv",
        hidden[:, -1],
        output_embedding.astype(hidden.dtype),
        preferred_element_type=jnp.float32,
    )
    last_logits = softcap(last_logits, model.config.final_logit_softcap)
    if shared:
        window_slots = window_length(model.config, max_length)
        cache = _repeat_cache(cache, num_generations, max_length, window_slots)
        last_logits = jnp.repeat(last_logits, num_generations, axis=0)
    token, logprob = sample(last_logits, step_keys(0))

    tokens = jnp.full((batch, max_new_tokens), knobs.pad_id, jnp.int32).at[:, 0].set(token)
    response_mask = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(1)
    logprobs = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(logprob)
    state = (jnp.int32(1), cache, token, knobs.is_eos[token], tokens, response_mask, logprobs)

    def cond(state):
        step, _, _, done, *_ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, prev_token, done, tokens, response_mask, logprobs = state
        # Finished rows keep decoding (shapes are fixed); their outputs are masked below.
        logits, cache = model.apply(
            variables, prev_token[:, None], jnp.ones((batch, 1), jnp.int32), cache=cache
        )
        token, logprob = sample(logits[:, -1], step_keys(step))
        alive = ~done
        tokens = tokens.at[:, step].set(jnp.where(alive, token, knobs.pad_id))
        response_mask = response_mask.at[:, step].set(alive.astype(jnp.int32))
        logprobs = logprobs.at[:, step].set(jnp.where(alive, logprob, 0.0))
        done = done | knobs.is_eos[token]
        return step + 1, cache, token, done, tokens, response_mask, logprobs

    _, _, _, done, tokens, response_mask, logprobs = jax.lax.while_loop(cond, body, state)
    return GenerationOutput(
        tokens=tokens, response_mask=response_mask, logprobs=logprobs, finished=done
    )


def _jitted_decode(model: Any, max_new_tokens: int, filtering: bool, num_generations: int = 1):
    """One jitted decode per (model definition, static fields); jit caches the shapes."""
    return _cached_decode(model, max_new_tokens, filtering, num_generations)


@functools.lru_cache(maxsize=64)
def _cached_decode(model: Any, max_new_tokens: int, filtering: bool, num_generations: int):
    return jax.jit(functools.partial(_decode, model, max_new_tokens, filtering, num_generations))


def _check_left_padded(model_config: Any, prompt_mask: Any, max_length: int) -> None:
    """Raises when a prompt row has padding after a real token and the model keeps ring caches
    shorter than `max_length` (sliding-window layers), which are exact for left padding only
    (`jaxalign.models.kv_cache`). Traced or not fully addressable masks are not checked."""
    if (
        not any(window_layers(model_config))
        or window_length(model_config, max_length) >= max_length
    ):
        return
    if isinstance(prompt_mask, jax.core.Tracer) or (
        isinstance(prompt_mask, jax.Array) and not prompt_mask.is_fully_addressable
    ):
        return
    real = np.asarray(prompt_mask) != 0
    gaps = np.flatnonzero((np.maximum.accumulate(real, axis=1) & ~real).any(axis=1))
    if gaps.size:
        raise ValueError(
            f"prompt_attention_mask rows {gaps[:8].tolist()}{' ...' if gaps.size > 8 else ''} "
            "have padding after a real token; generate needs left-padded prompts (padding first, "
            f"as batching.collate_prompts makes them): this model's sliding-window layers keep a "
            f"ring of {window_length(model_config, max_length)} slots, exact for left padding only"
        )


def generate(
    model: Any,
    params: Any,
    prompt_input_ids: Array,
    prompt_attention_mask: Array,
    *,
    rng: Array | None = None,
    config: SamplingConfig,
    row_keys: Array | None = None,
    num_generations: int = 1,
) -> GenerationOutput:
    """Samples `config.max_new_tokens` tokens after each left-padded prompt, G times per prompt.

    With `num_generations = G > 1` (GRPO's group of completions per prompt) each prompt is
    prefilled once and its KV cache repeated to its G rows, which are prompt-major as in TRL and
    `jnp.repeat(prompts, G, axis=0)`: rows `p·G … p·G + G − 1` continue prompt p. The output
    equals `generate` on `jnp.repeat(prompt_input_ids, G, axis=0)` with the same row keys, token
    for token: only the prefill is shared, the decode rows are independent.

    Args:
      model: an LM-head `Transformer`; params its weights (sharded or not).
      prompt_input_ids: `[P, T]` int, left-padded.
      prompt_attention_mask: `[P, T]`, 0 on padding.
      rng: a PRNG key; output row b samples with `fold_in(rng, b)`, then `fold_in(·, step)`.
      row_keys: `[P·G]` explicit per-row keys instead of `rng` (e.g. to reproduce one row alone).
      num_generations: G, completions per prompt.
    Returns:
      `GenerationOutput` with `[P·G, N]` tokens, response_mask, logprobs and `[P·G]` finished.
    """
    if model.config.head != "lm":
        raise ValueError(f"generate needs an LM head, got head={model.config.head!r}")
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    batch = prompt_input_ids.shape[0] * num_generations
    if row_keys is None:
        if rng is None:
            raise ValueError("generate needs rng or row_keys")
        row_keys = row_keys_from_rng(rng, batch)
    if row_keys.shape[0] != batch:
        raise ValueError(f"row_keys has {row_keys.shape[0]} keys for {batch} rows")
    _check_left_padded(
        model.config, prompt_attention_mask, prompt_input_ids.shape[1] + config.max_new_tokens
    )
    filtering = config.top_k > 0 or config.top_p < 1.0
    decode = _jitted_decode(model, config.max_new_tokens, filtering, num_generations)
    knobs = _knobs(config, model.config.vocab_size)
    return decode(params, prompt_input_ids, prompt_attention_mask, row_keys, knobs)


def response_logprobs(
    model: Any,
    params: Any,
    prompt_ids: Array,
    prompt_mask: Array,
    tokens: Array,
    response_mask: Array,
    *,
    temperature: float,
    chunk_size: int | None = None,
) -> Array:
    """Log-probs `[B, N]` of generated `tokens` recomputed with the training forward.

    Runs `sequence_token_logprobs` over `concat(prompt, response)` with mask
    `concat(prompt_mask != 0, response_mask)`, i.e. exactly what the PPO loss computes, and keeps the
    last N columns: `out[b, t] = log softmax(logits / temperature)[tokens[b, t]]`, 0 where masked.
    Equals `GenerationOutput.logprobs` when sampling used no top-k / top-p filtering.
    """
    input_ids = jnp.concatenate([prompt_ids, tokens], axis=1).astype(jnp.int32)
    mask = jnp.concatenate(
        [(prompt_mask != 0).astype(jnp.int32), response_mask.astype(jnp.int32)], axis=1
    )
    logprobs, _ = sequence_token_logprobs(
        model,
        params,
        input_ids,
        mask,
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=False,
    )
    return jnp.where(response_mask != 0, logprobs[:, -tokens.shape[1] :], 0.0)


def _bucket_length(length: int, minimum: int = 8) -> int:
    """Next power of two >= `length` (at least `minimum`), so prompt shapes recompile rarely."""
    return max(minimum, 1 << max(0, length - 1).bit_length())


def left_pad(sequences: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to `[B, length]`; returns `(ids int32, mask int32)`."""
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, sequence in enumerate(sequences):
        if len(sequence) > length:
            raise ValueError(f"prompt of {len(sequence)} tokens exceeds the bucket of {length}")
        if sequence:
            ids[row, -len(sequence) :] = sequence
            mask[row, -len(sequence) :] = 1
    return ids, mask


def generate_text(
    model: Any,
    params: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    rng: Array,
    config: SamplingConfig,
    prompt_bucket: int | None = None,
) -> list[str]:
    """Tokenizes `prompts` (with BOS if the tokenizer has one), generates, decodes the responses.

    Prompts are left-padded to `prompt_bucket` (default: the next power of two of the longest).
    Responses are decoded up to and including EOS, without special tokens.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    sequences = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    length = prompt_bucket or _bucket_length(max(len(s) for s in sequences))
    ids, mask = left_pad(sequences, length, config.pad_token_id)
    out = generate(model, params, jnp.asarray(ids), jnp.asarray(mask), rng=rng, config=config)
    tokens, response_mask = np.asarray(out.tokens), np.asarray(out.response_mask)
    return [
        tokenizer.decode(row[keep != 0].tolist(), skip_special_tokens=True)
        for row, keep in zip(tokens, response_mask, strict=True)
    ]
