"""The half of online RL that PPO and GRPO share: sample a rollout, read it back, score it.

    rollout = sample_rollout(policy, params, prompts, rng=key, sampling=cfg, num_generations=G)
    texts, ids = local_responses(tokenizer, rollout, mesh)        # this process's rows, on host
    scores = shd.global_from_local(host_scores, mesh)            # back to a global [R] array

A rollout holds `R = prompts × num_generations` rows `[prompt (left-padded) | response
(right-padded, pad after EOS)]`. Rows are prompt-major (`jnp.repeat` order: a prompt's G samples
are adjacent), so a data-parallel shard of prompts owns exactly the rows sampled from them and
host-side scoring never crosses processes.

Forwards over a rollout (old/reference log-probs, values, reward-model scores) run through
`microbatched`, in the training microbatch size: a run whose train step fits in memory also fits
its scoring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxalign import sharding as shd
from jaxalign.sampling import SamplingConfig, generate

Array = jax.Array


@flax.struct.dataclass
class Rollout:
    """Sampled sequences; `[R, P+N]` sequence arrays, `[R, N]` response arrays, `[R]` flags."""

    input_ids: Array  # [R, P+N] prompt (left-padded) + response (pad after EOS)
    attention_mask: Array  # [R, P+N] int32
    response_mask: Array  # [R, N] float32, 1 up to and including EOS
    finished: Array  # [R] bool: the row emitted EOS within N tokens
    prompt_len: int = flax.struct.field(pytree_node=False)

    @property
    def tokens(self) -> Array:
        return self.input_ids[:, self.prompt_len :]


def sampling_config(section: Any, tokenizer: Any) -> SamplingConfig:
    """`SamplingConfig` from a `ppo`/`grpo` config section (max_new_tokens, temperature, top_k,
    top_p, stop_token); EOS always stops, `stop_token` (one token) stops as well."""
    eos_ids = [tokenizer.eos_token_id]
    if section.stop_token:
        stop_id = tokenizer.convert_tokens_to_ids(section.stop_token)
        if stop_id is None or stop_id == tokenizer.unk_token_id:
            raise ValueError(f"config stop_token={section.stop_token!r} is not a single token")
        eos_ids.append(stop_id)
    pad_id = tokenizer.pad_token_id
    return SamplingConfig(
        max_new_tokens=section.max_new_tokens,
        temperature=section.temperature,
        top_k=section.top_k,
        top_p=section.top_p,
        eos_token_ids=tuple(eos_ids),
        pad_token_id=pad_id if pad_id is not None else tokenizer.eos_token_id,
    )


def sample_rollout(
    model: Any,
    params: Any,
    prompt_batch: dict[str, Array],
    *,
    rng: Array,
    sampling: SamplingConfig,
    num_generations: int = 1,
) -> Rollout:
    """Samples `num_generations` responses per prompt (each prompt prefilled once).

    Args:
      prompt_batch: global `prompt_input_ids` / `prompt_attention_mask`, `[B, P]`, left-padded.
    Returns:
      `Rollout` with `B * num_generations` rows in `jnp.repeat` order.
    """
    prompt_ids = prompt_batch["prompt_input_ids"]
    prompt_mask = prompt_batch["prompt_attention_mask"]
    shared_prefill = {"num_generations": num_generations} if num_generations > 1 else {}
    gen = generate(
        model, params, prompt_ids, prompt_mask, rng=rng, config=sampling, **shared_prefill
    )
    if num_generations > 1:
        prompt_ids = jnp.repeat(prompt_ids, num_generations, axis=0)
        prompt_mask = jnp.repeat(prompt_mask, num_generations, axis=0)
    input_ids = jnp.concatenate([prompt_ids, gen.tokens], axis=1)
    attention_mask = jnp.concatenate(
        [(prompt_mask != 0).astype(jnp.int32), gen.response_mask.astype(jnp.int32)], axis=1
    )
    return Rollout(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=gen.response_mask.astype(jnp.float32),
        finished=gen.finished,
        prompt_len=prompt_ids.shape[1],
    )


def response_slice(x: Array, prompt_len: int, offset: int = 0) -> Array:
    """Columns of a `[R, P+N]` array that belong to the response (shifted by `offset`)."""
    return x[:, prompt_len + offset : x.shape[1] + offset]


def local_responses(
    tokenizer: Any, rollout: Rollout, mesh: Mesh
) -> tuple[list[str], list[list[int]]]:
    """This process's responses as text and as token ids (up to and including EOS)."""
    tokens, mask = shd.local_rows((rollout.tokens, rollout.response_mask), mesh)
    ids = [row[: int(m.sum())].tolist() for row, m in zip(tokens, mask, strict=True)]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return texts, ids


def microbatched(fn: Callable[..., Any], num_microbatches: int) -> Callable[..., Any]:
    """`fn(*args, batch)` run on `num_microbatches` strided slices of `batch` one at a time.

    Row `i` of microbatch `m` is row `i * num_microbatches + m` (as in gradient accumulation), so
    every microbatch stays spread over the data-parallel devices; outputs (pytrees of `[rows, …]`)
    come back in the original row order. Only one microbatch's activations are live at a time.
    """
    if num_microbatches == 1:
        return fn

    def split(x: Array) -> Array:
        return jnp.swapaxes(
            x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:]), 0, 1
        )

    def merge(x: Array) -> Array:
        x = jnp.swapaxes(x, 0, 1)
        return x.reshape(x.shape[0] * num_microbatches, *x.shape[2:])

    def mapped(*args: Any) -> Any:
        *shared, batch = args
        out = jax.lax.map(lambda mb: fn(*shared, mb), jax.tree.map(split, batch))
        return jax.tree.map(merge, out)

    return mapped
