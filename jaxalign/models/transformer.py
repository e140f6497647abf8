"""The decoder: one Flax Linen module for policy, reference, reward and value models.

Pure-functional: `Transformer(config)` is a definition; weights live in a params pytree, so the
policy and its frozen reference are the same module applied to two params trees.

Shapes: B batch, T query length, S key length (cache), E hidden, H heads, K kv heads,
D head dim, F mlp width, V vocab, L layers.

Masks are *segment ids* `[B, T]` (int): 0 marks padding, and a token attends causally to earlier
tokens carrying the same non-zero id. A plain 0/1 attention mask is the one-segment case;
packed sequences use ids 1..k with positions restarting per segment.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxalign.models.config import ModelConfig, llama_scaled_inv_freq, yarn_scaled_inv_freq
from jaxalign.models.moe import MoeMLP, RouterStats

Array = jax.Array

_INIT_STD = 0.02


@flax.struct.dataclass
class KVCache:
    """Decode state: keys/values of every layer and the slots' segment ids and positions.

    Keys and values are heads-major, the layout attention reads: with `scan_layers` one stacked
    `[L, B, K, S, D]` array each (scanned over L), otherwise a tuple of L `[B, K, S, D]` arrays,
    which a decode loop updates in place without slicing or restacking.
    """

    keys: Array | tuple[Array, ...]
    values: Array | tuple[Array, ...]
    segment_ids: Array  # [B, S] int32, 0 = empty or padding
    positions: Array  # [B, S] int32
    index: Array  # [] int32, the next slot to write


def init_cache(config: ModelConfig, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
    """An empty cache with room for `max_length` tokens (prompt + generated)."""
    shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    if config.scan_layers:
        keys = values = jnp.zeros((config.num_layers, *shape), dtype)
    else:
        keys = values = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(
        keys=keys,
        values=values,
        segment_ids=jnp.zeros((batch_size, max_length), jnp.int32),
        positions=jnp.zeros((batch_size, max_length), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def default_positions(attention_mask: Array) -> Array:
    """Positions of an unpacked, left- or right-padded batch: cumsum(mask) - 1, clipped at 0."""
    return jnp.maximum(jnp.cumsum(attention_mask != 0, axis=-1) - 1, 0).astype(jnp.int32)


def last_token_index(attention_mask: Array) -> Array:
    """Index of the rightmost non-pad token of each row, `[B]`."""
    seq_len = attention_mask.shape[-1]
    return (seq_len - 1 - jnp.argmax(jnp.flip(attention_mask != 0, axis=-1), axis=-1)).astype(
        jnp.int32
    )


def gather_last_token(values: Array, attention_mask: Array) -> Array:
    """`values[b, last_token_index[b]]`: a reward model's score of each sequence, `[B]`."""
    index = last_token_index(attention_mask)
    return jnp.take_along_axis(values, index[:, None], axis=-1)[:, 0]


def _init(axes: tuple[str | None, ...], init: Any = None) -> Any:
    return nn.with_logical_partitioning(init or nn.initializers.normal(_INIT_STD), axes)


def _activation(name: str):
    return {
        "silu": jax.nn.silu,
        "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
        "gelu": functools.partial(jax.nn.gelu, approximate=False),
    }[name]


class Norm(nn.Module):
    """RMSNorm `x / rms(x) * (offset + w)` (Zhang & Sennrich 2019) or LayerNorm, in fp32."""

    config: ModelConfig
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        features = x.shape[-1]
        scale_init = nn.initializers.zeros if c.norm_scale_offset else nn.initializers.ones
        scale = self.param(
            "scale", _init((self.axis_name,), scale_init), (features,), jnp.dtype(c.param_dtype)
        )
        x32 = x.astype(jnp.float32)
        if c.norm_type == "layer":
            bias = self.param(
                "bias", _init((self.axis_name,), nn.initializers.zeros), (features,), c.param_dtype
            )
            centered = x32 - x32.mean(-1, keepdims=True)
            normed = centered * jax.lax.rsqrt((centered**2).mean(-1, keepdims=True) + c.norm_eps)
            out = normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        else:
            normed = x32 * jax.lax.rsqrt((x32**2).mean(-1, keepdims=True) + c.norm_eps)
            out = normed * (c.norm_scale_offset + scale.astype(jnp.float32))
        return out.astype(jnp.dtype(c.dtype))


def softcap(x: Array, cap: float | None) -> Array:
    """cap·tanh(x / cap) (Gemma 2's soft-capping of logits); `x` itself when cap is None."""
    if not cap:
        return x
    return cap * jnp.tanh(x / cap)


def rope_inv_freq(config: ModelConfig, *, local: bool = False) -> Array:
    """Inverse frequencies θ^(-2i/D) of RoPE (Su et al. 2021), with optional scaling.

    `local=True`: those of sliding-window layers, which in Gemma 3 use `local_rope_theta` unscaled.
    """
    dim = config.head_dim
    if local and config.local_rope_theta is not None:
        return 1.0 / (config.local_rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = config.rope_scaling_dict
    if scaling and scaling["rope_type"] == "llama3":
        inv_freq = llama_scaled_inv_freq(inv_freq, scaling, jnp)
    elif scaling and scaling["rope_type"] == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling and scaling["rope_type"] == "yarn":
        inv_freq = yarn_scaled_inv_freq(inv_freq, scaling, config.rope_theta, jnp)
    return inv_freq


def rope_tables(
    positions: Array, inv_freq: Array, attention_factor: float = 1.0
) -> tuple[Array, Array]:
    """`(cos, sin)`, each `[B, T, 1, D]`, for `apply_rope`; computed once per forward.

    With angles a = position·θ_i (i < D/2): cos = [cos a, cos a] and sin = [−sin a, sin a], so that
    rotating is `x·cos + swap_halves(x)·sin`. Both are multiplied by `attention_factor` (YaRN's
    mscale; q and k are both rotated, so attention logits scale by its square).
    """
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return (
        jnp.concatenate([cos, cos], axis=-1)[:, :, None, :],
        jnp.concatenate([-sin, sin], axis=-1)[:, :, None, :],
    )


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates `x [B, T, H, D]` (rotate-half convention of HF): `x·cos + swap_halves(x)·sin`.

    The halves are swapped with a reverse over a size-2 axis rather than split + concatenate,
    which XLA fuses into one elementwise loop.
    """
    *lead, dim = x.shape
    x32 = x.astype(jnp.float32)
    swapped = jnp.flip(x32.reshape(*lead, 2, dim // 2), axis=-2).reshape(x.shape)
    return (x32 * cos + swapped * sin).astype(x.dtype)


def attention_mask_4d(
    q_segments: Array,
    q_positions: Array,
    q_index: Array,
    kv_segments: Array,
    kv_positions: Array,
    sliding_window: int | None,
    branch_ids: Array | None = None,
) -> Array:
    """Boolean `[B, 1, T, S]`: causal by slot index, same segment, key not padding, in window.

    With `branch_ids [B, T]` (no cache, so S = T), a query sees keys of the shared trunk (branch 0)
    and of its own branch only: `prompt | chosen | rejected` in one row, rejected not seeing chosen.
    """
    kv_index = jnp.arange(kv_segments.shape[-1])
    causal = kv_index[None, :] <= q_index[:, None]  # [T, S]
    same_segment = q_segments[:, :, None] == kv_segments[:, None, :]
    mask = causal[None] & same_segment & (kv_segments[:, None, :] != 0)
    if branch_ids is not None:
        kv_branch = branch_ids[:, None, :]
        mask &= (kv_branch == 0) | (kv_branch == branch_ids[:, :, None])
    if sliding_window is not None:
        mask &= (q_positions[:, :, None] - kv_positions[:, None, :]) < sliding_window
    return mask[:, None]


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array,
    impl: str,
    *,
    scale: float | None = None,
    logit_softcap: float | None = None,
) -> Array:
    """softmax(softcap(q·kᵀ·scale) + mask)·v with grouped kv heads; logits and softmax in fp32.

    q: [B, T, H, D]; k, v: [B, K, S, D] (heads-major, as the KV cache stores them);
    mask: [B, 1, T, S] -> [B, T, H, D]. `scale` defaults to 1/√D; `logit_softcap` (Gemma 2) caps
    the logits at ±cap with cap·tanh(logits / cap).
    """
    if impl == "cudnn":
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    batch, q_len, heads, dim = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, dim)
    logits = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    if scale is None:
        logits = logits / jnp.sqrt(jnp.float32(dim))
    else:
        logits = logits * jnp.float32(scale)
    logits = softcap(logits, logit_softcap)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(batch, q_len, heads, dim)


class Attention(nn.Module):
    """Multi-head attention with grouped kv heads, RoPE, optional q/k norm and a KV cache."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array,
        rope: tuple[Array, Array] | None,
        layer_cache: tuple[Array, Array] | None,
        cache_index: Array | None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """`x` is `[B·T, E]` (the mask `[B, 1, T, S]` gives B and T); `layer_cache` is this
        layer's `([B, K, S, D], [B, K, S, D])` keys and values, written at slot `cache_index`."""
        c = self.config
        batch, q_len = mask.shape[0], mask.shape[2]
        dense = functools.partial(
            nn.DenseGeneral,
            axis=-1,
            dtype=jnp.dtype(c.dtype),
            param_dtype=jnp.dtype(c.param_dtype),
            use_bias=c.qkv_bias,
        )
        q = dense(
            (c.num_heads, c.head_dim),
            kernel_init=_init(("embed", "heads", "head_dim")),
            bias_init=_init(("heads", "head_dim"), nn.initializers.zeros),
            name="q",
        )(x)
        kv_kernel = _init(("embed", "kv_heads", "head_dim"))
        kv_bias = _init(("kv_heads", "head_dim"), nn.initializers.zeros)
        k = dense((c.num_kv_heads, c.head_dim), kernel_init=kv_kernel, bias_init=kv_bias, name="k")(
            x
        )
        v = dense((c.num_kv_heads, c.head_dim), kernel_init=kv_kernel, bias_init=kv_bias, name="v")(
            x
        )
        q, k, v = (y.reshape(batch, q_len, *y.shape[1:]) for y in (q, k, v))
        if c.qk_norm:
            q = Norm(c, axis_name="head_dim", name="q_norm")(q)
            k = Norm(c, axis_name="head_dim", name="k_norm")(k)
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B, K, T, D]
        new_cache = None
        if layer_cache is not None:
            new_cache = tuple(
                jax.lax.dynamic_update_slice_in_dim(
                    cached, new.astype(cached.dtype), cache_index, 2
                )
                for cached, new in zip(layer_cache, (k, v), strict=True)
            )
            k, v = (cached.astype(q.dtype) for cached in new_cache)
        scale = None if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar**-0.5
        out = dot_product_attention(
            q, k, v, mask, c.attention_impl, scale=scale, logit_softcap=c.attn_logit_softcap
        )
        out = out.reshape(batch * q_len, *out.shape[2:])
        out = nn.DenseGeneral(
            c.hidden_size,
            axis=(-2, -1),
            use_bias=c.o_bias,
            dtype=jnp.dtype(c.dtype),
            param_dtype=jnp.dtype(c.param_dtype),
            kernel_init=_init(("heads", "head_dim", "embed")),
            bias_init=_init(("embed",), nn.initializers.zeros),
            name="o",
        )(out)
        return out, new_cache


class MLP(nn.Module):
    """Gated `down(act(gate x) * up x)` (Shazeer 2020) or plain `proj(act(fc x))` (GPT-2)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        dense = functools.partial(
            nn.Dense,
            use_bias=c.mlp_bias,
            dtype=jnp.dtype(c.dtype),
            param_dtype=jnp.dtype(c.param_dtype),
        )
        up_init = dict(
            kernel_init=_init(("embed", "mlp")), bias_init=_init(("mlp",), nn.initializers.zeros)
        )
        down_init = dict(
            kernel_init=_init(("mlp", "embed")), bias_init=_init(("embed",), nn.initializers.zeros)
        )
        act = _activation(c.activation)
        if c.mlp_type == "gated":
            hidden = act(dense(c.intermediate_size, name="gate", **up_init)(x))
            hidden = hidden * dense(c.intermediate_size, name="up", **up_init)(x)
            return dense(c.hidden_size, name="down", **down_init)(hidden)
        hidden = act(dense(c.intermediate_size, name="fc", **up_init)(x))
        return dense(c.hidden_size, name="proj", **down_init)(hidden)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    With `post_norms` (Gemma 2/3) each branch's output is normed too before the residual add:
    x + norm(attn(norm(x))), then x + norm(mlp(norm(x))). With `num_experts` the MLP is a
    mixture of experts, whose `RouterStats` the layer returns beside its new cache.

    Layers of a `mixed_attention` model get `mask` and `rope` as `(global, sliding)` pairs and pick
    theirs with `is_sliding` (a bool, traced when the layers are scanned).
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | tuple[Array, Array],
        rope: Any,
        layer_cache: tuple[Array, Array] | None,
        cache_index: Array | None,
        token_mask: Array,
        is_sliding: Array | bool = False,
    ) -> tuple[Array, tuple[tuple[Array, Array] | None, RouterStats | None]]:
        c = self.config
        if c.mixed_attention:
            pick = lambda pair: jax.tree.map(  # noqa: E731
                lambda full, sliding: jnp.where(is_sliding, sliding, full), *pair
            )
            mask, rope = pick(mask), pick(rope)
        attn_out, new_cache = Attention(c, name="attn")(
            Norm(c, name="input_norm")(x), mask, rope, layer_cache, cache_index
        )
        if c.post_norms:
            attn_out = Norm(c, name="post_attn_norm")(attn_out)
            x = x + attn_out
            mlp_in = Norm(c, name="pre_mlp_norm")(x)
        else:
            x = x + attn_out
            mlp_in = Norm(c, name="post_attn_norm")(x)
        stats = None
        if c.num_experts:
            mlp_out, stats = MoeMLP(c, _activation(c.activation), name="moe")(mlp_in, token_mask)
        else:
            mlp_out = MLP(c, name="mlp")(mlp_in)
        if c.post_norms:
            mlp_out = Norm(c, name="post_mlp_norm")(mlp_out)
        return x + mlp_out, (new_cache, stats)


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _layer_class(config: ModelConfig) -> type[nn.Module]:
    if config.remat_policy == "none":
        return DecoderLayer
    return nn.remat(
        DecoderLayer,
        policy=_REMAT_POLICIES[config.remat_policy],
        prevent_cse=not config.scan_layers,
    )


class Transformer(nn.Module):
    """Decoder-only transformer with an LM head (`[B, T, V]` logits) or a scalar head (`[B, T]`).

    `__call__(input_ids, attention_mask=None, positions=None, cache=None, return_hidden=False,
    branch_ids=None)`:
      - `attention_mask` `[B, T]` segment ids (0 = pad); default all ones.
      - `branch_ids` `[B, T]`: 0 for a shared trunk, k > 0 for branch k, which attends to the trunk
        and to itself only (a prompt shared by its chosen and rejected responses; no cache).
      - `positions` `[B, T]`; default `cumsum(mask) - 1` (continuing after the cache's tokens).
      - with `cache`, the tokens are written at `cache.index` and `(output, new_cache)` is returned.
      - `return_hidden=True` returns the final-norm hidden states `[B, T, E]` instead of the head's
        output, for chunked log-prob computation with `output_embedding()` (then apply
        `softcap(logits, config.final_logit_softcap)`, as `jaxalign.models.logprobs` does).
      - `return_router_stats=True` (no cache) returns `(output, RouterStats summed over layers)`;
        the stats are None for a dense model. See `jaxalign.models.moe`.
    """

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        self.embed = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=jnp.dtype(c.dtype),
            param_dtype=jnp.dtype(c.param_dtype),
            embedding_init=_init(("vocab", "embed")),
        )
        if c.position_embedding == "learned":
            self.pos_embed = nn.Embed(
                c.max_position_embeddings,
                c.hidden_size,
                dtype=jnp.dtype(c.dtype),
                param_dtype=jnp.dtype(c.param_dtype),
                embedding_init=_init((None, "embed")),
            )
        layer = _layer_class(c)
        if c.scan_layers:
            self.layers = nn.scan(
                layer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast, 0),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, name="layers")
        else:
            self.layers = [layer(c, name=f"layers_{i}") for i in range(c.num_layers)]
        self.final_norm = Norm(c)
        if c.head == "scalar":
            self.score = nn.Dense(
                1,
                use_bias=False,
                dtype=jnp.float32,
                param_dtype=jnp.dtype(c.param_dtype),
                kernel_init=_init(("embed", None)),
            )
        elif not c.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head", _init(("embed", "vocab")), (c.hidden_size, c.vocab_size), c.param_dtype
            )

    def output_embedding(self) -> Array:
        """The `[E, V]` matrix that maps final hidden states to logits."""
        if self.config.tie_word_embeddings:
            return self.embed.embedding.T
        return self.lm_head

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        positions: Array | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        branch_ids: Array | None = None,
        return_router_stats: bool = False,
    ) -> Array | tuple[Array, KVCache] | tuple[Array, RouterStats | None]:
        c = self.config
        if branch_ids is not None and cache is not None:
            raise ValueError("branch_ids (shared-prefix rows) cannot be combined with a KV cache")
        if return_router_stats and cache is not None:
            raise ValueError("return_router_stats is for training forwards, without a KV cache")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        if positions is None:
            positions = default_positions(attention_mask)
            if cache is not None:
                positions = positions + (cache.segment_ids != 0).sum(-1, keepdims=True)
        positions = positions.astype(jnp.int32)

        x = self.embed(input_ids)
        if c.scale_embeddings:
            x = x * jnp.asarray(c.hidden_size**0.5, x.dtype)
        if c.position_embedding == "learned":
            x = x + self.pos_embed(positions)
        # The residual stream is [B·T, E]: XLA:CPU runs 2-D matmuls markedly faster than the same
        # products on [B, T, E] operands, and on accelerators the reshape is free.
        batch, seq_len = input_ids.shape
        x = x.reshape(batch * seq_len, c.hidden_size)

        query_index = jnp.arange(input_ids.shape[1])
        if cache is None:
            kv_segments, kv_positions, cache_index = attention_mask, positions, None
        else:
            cache_index = cache.index
            query_index = query_index + cache_index
            kv_segments = jax.lax.dynamic_update_slice_in_dim(
                cache.segment_ids, attention_mask, cache_index, 1
            )
            kv_positions = jax.lax.dynamic_update_slice_in_dim(
                cache.positions, positions, cache_index, 1
            )
        mask_of = functools.partial(
            attention_mask_4d,
            attention_mask,
            positions,
            query_index,
            kv_segments,
            kv_positions,
            branch_ids=branch_ids,
        )
        rope = None
        if c.position_embedding == "rope":
            rope = rope_tables(positions, rope_inv_freq(c), c.rope_attention_factor)
        if c.mixed_attention:
            # Full caches for every layer: sliding layers see their window through the mask.
            mask = (mask_of(None), mask_of(c.sliding_window))
            local_rope = rope
            if c.local_rope_theta is not None:
                local_rope = rope_tables(positions, rope_inv_freq(c, local=True))
            rope = (rope, local_rope)
            is_sliding = [t == "sliding_attention" for t in c.layer_types]
        else:
            mask = mask_of(c.sliding_window)
            is_sliding = [False] * c.num_layers
        token_mask = (attention_mask != 0).reshape(-1)

        if c.scan_layers:
            layer_caches = None if cache is None else (cache.keys, cache.values)
            x, (new_layer_caches, stats) = self.layers(
                x, mask, rope, layer_caches, cache_index, token_mask, jnp.asarray(is_sliding)
            )
            if stats is not None:
                stats = jax.tree.map(lambda s: s.sum(0), stats)
        else:
            new_keys, new_values, layer_stats = [], [], []
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
                x, (new_layer_cache, stats) = layer(
                    x, mask, rope, layer_cache, cache_index, token_mask, is_sliding[i]
                )
                if new_layer_cache is not None:
                    new_keys.append(new_layer_cache[0])
                    new_values.append(new_layer_cache[1])
                if stats is not None:
                    layer_stats.append(stats)
            new_layer_caches = (tuple(new_keys), tuple(new_values))
            stats = functools.reduce(RouterStats.__add__, layer_stats) if layer_stats else None
        hidden = self.final_norm(x)

        if return_hidden:
            out = hidden.reshape(batch, seq_len, -1)
        elif c.head == "scalar":
            out = self.score(hidden.astype(jnp.float32)).reshape(batch, seq_len)
        else:
            out = jnp.dot(
                hidden,
                self.output_embedding().astype(hidden.dtype),
                preferred_element_type=jnp.float32,
            ).reshape(batch, seq_len, -1)
            out = softcap(out, c.final_logit_softcap)
        if return_router_stats:
            return out, stats
        if cache is None:
            return out
        new_cache = KVCache(
            keys=new_layer_caches[0],
            values=new_layer_caches[1],
            segment_ids=kv_segments,
            positions=kv_positions,
            index=cache.index + input_ids.shape[1],
        )
        return out, new_cache
