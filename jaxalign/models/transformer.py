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

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxalign import sharding as shd
from jaxalign.models.attention import (
    SegmentMask,
    branch_window_unsupported,
    dense_mask_impl,
    log_once,
    resolve_attention_impl,
    splash_attention,
    window_binds,
)
from jaxalign.models.config import ModelConfig, llama_scaled_inv_freq, yarn_scaled_inv_freq
from jaxalign.models.kv_cache import CacheView, KVCache, cache_view, cached_attention, next_cache
from jaxalign.models.moe import MoeMLP, RouterStats

Array = jax.Array

_INIT_STD = 0.02

# Logical names under which `shd.constrain` pins activations inside `shd.activation_context` (and
# does nothing outside one). The residual stream `[B·T, E]` is named as tokens sharded like the
# batch (B is the major dim of B·T); see `jaxalign.sharding.ACTIVATION_AXES`.
_STREAM = ("activation_batch", "activation_embed")
_Q_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
_KV_HEADS = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
_MLP_HIDDEN = ("activation_batch", "activation_mlp")
_LOGITS = ("activation_batch", "activation_length", "activation_vocab")


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


def splash_layer_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None,
    segments: SegmentMask,
    config: ModelConfig,
    is_sliding: Array | bool,
    scale: float | None,
) -> Array:
    """One layer's cache-free attention by splash (`jaxalign.models.attention`), `[B, T, H, D]`.

    The layer's window is static, except for the scanned (or rematerialised) layers of a
    mixed-attention model whose traced `is_sliding` picks one of two kernels by `lax.cond`. Where
    splash cannot express the mask (branch ids with a binding window) the layer falls back to the
    xla path with the dense `mask`, which `Transformer` then builds.
    """

    def attend(window: int | None) -> Array:
        if branch_window_unsupported(segments, window):
            log_once(
                "attention_impl=splash: sliding-window layers of shared-prompt rows (branch_ids) "
                f"longer than the window ({window}) use the xla path"
            )
            return dot_product_attention(
                q, k, v, mask, "xla", scale=scale, logit_softcap=config.attn_logit_softcap
            )
        return splash_attention(
            q,
            k,
            v,
            segments,
            sliding_window=window,
            scale=scale,
            logit_softcap=config.attn_logit_softcap,
        )

    window = config.sliding_window
    if not window_binds(window, q.shape[1]):
        return attend(None)
    if not config.mixed_attention:
        return attend(window)
    if isinstance(is_sliding, bool):
        return attend(window if is_sliding else None)
    return jax.lax.cond(is_sliding, lambda: attend(window), lambda: attend(None))


class Attention(nn.Module):
    """Multi-head attention with grouped kv heads, RoPE, optional q/k norm and a KV cache."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array,
        rope: tuple[Array, Array] | None,
        cache_layer: Array | None,
        cache: CacheView | None,
        segments: SegmentMask | None = None,
        is_sliding: Array | bool = False,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """`x` is `[B·T, E]` (the mask `[B, 1, T, S]`, or `segments`, gives B and T);
        `cache` is the KV cache as this layer sees it, with `cache_layer` the layer's traced index
        when the layers are scanned; its masks replace `mask`, and the updated cache arrays are
        returned beside the output (`kv_cache.cached_attention`). `segments` (splash, no cache) replaces the dense mask, which is
        then None unless this layer falls back to the xla path (`splash_layer_attention`)."""
        c = self.config
        if mask is not None:
            batch, q_len = mask.shape[0], mask.shape[2]
        else:
            batch, q_len = segments.segment_ids.shape
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
        q = shd.constrain(q, _Q_HEADS)
        k, v = shd.constrain(k, _KV_HEADS), shd.constrain(v, _KV_HEADS)
        if c.qk_norm:
            q = Norm(c, axis_name="head_dim", name="q_norm")(q)
            k = Norm(c, axis_name="head_dim", name="k_norm")(k)
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B, K, T, D]
        new_cache = None
        scale = None if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar**-0.5
        if segments is not None and cache is None:
            out = splash_layer_attention(q, k, v, mask, segments, c, is_sliding, scale)
        else:  # the KV-cache path of splash is xla's
            impl = dense_mask_impl(c, cached=cache is not None, seq_len=q_len)
            attend = functools.partial(
                dot_product_attention, impl=impl, scale=scale, logit_softcap=c.attn_logit_softcap
            )
            if cache is None:
                out = attend(q, k, v, mask)
            else:
                out, new_cache = cached_attention(q, k, v, cache, cache_layer, attend)
        out = shd.constrain(out, _Q_HEADS)
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
            hidden = shd.constrain(hidden, _MLP_HIDDEN)
            return dense(c.hidden_size, name="down", **down_init)(hidden)
        hidden = shd.constrain(
            act(dense(c.intermediate_size, name="fc", **up_init)(x)), _MLP_HIDDEN
        )
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
        cache_layer: Array | None,
        cache: CacheView | None,
        token_mask: Array,
        is_sliding: Array | bool = False,
        segments: SegmentMask | None = None,
    ) -> tuple[Array, tuple[tuple[Array, Array] | None, RouterStats | None]]:
        c = self.config
        if c.mixed_attention:
            pick = lambda pair: jax.tree.map(  # noqa: E731
                lambda full, sliding: jnp.where(is_sliding, sliding, full), *pair
            )
            mask, rope = pick(mask), pick(rope)
        attn_out, new_cache = Attention(c, name="attn")(
            Norm(c, name="input_norm")(x),
            mask,
            rope,
            cache_layer,
            cache,
            segments,
            is_sliding,
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
        return shd.constrain(x + mlp_out, _STREAM), (new_cache, stats)


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class _ScannedDecoderLayer(DecoderLayer):
    """`DecoderLayer` as `nn.scan` runs it: the carry is `(x, stacks)`, the residual stream and the
    KV cache's stacks (None without a cache), which each layer updates in place at its own slots
    (`kv_cache.KVCache`); stacks of different shapes (a mixed model's) cannot be scanned over."""

    @nn.compact
    def __call__(self, carry, mask, rope, cache_layer, cache, *rest):
        x, stacks = carry
        if cache is not None:
            cache = cache.with_stacks(stacks)
        x, (stacks, stats) = super().__call__(x, mask, rope, cache_layer, cache, *rest)
        return (x, stacks), (None, stats)


def _layer_class(config: ModelConfig) -> type[nn.Module]:
    layer = _ScannedDecoderLayer if config.scan_layers else DecoderLayer
    if config.remat_policy == "none":
        return layer
    return nn.remat(
        layer,
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
                in_axes=(
                    nn.broadcast,
                    nn.broadcast,
                    0,
                    nn.broadcast,
                    nn.broadcast,
                    0,
                    nn.broadcast,
                ),
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

        # The table whole along embed (an FSDP gather of a weight) before the lookup: sharded on
        # embed, XLA would look up every token of the global batch on every device instead.
        table = shd.constrain(self.embed.embedding, ("vocab", None))
        x = jnp.take(table.astype(jnp.dtype(c.dtype)), input_ids, axis=0)
        if c.scale_embeddings:
            x = x * jnp.asarray(c.hidden_size**0.5, x.dtype)
        if c.position_embedding == "learned":
            x = x + self.pos_embed(positions)
        # The residual stream is [B·T, E]: XLA:CPU runs 2-D matmuls markedly faster than the same
        # products on [B, T, E] operands, and on accelerators the reshape is free.
        batch, seq_len = input_ids.shape
        x = shd.constrain(x.reshape(batch * seq_len, c.hidden_size), _STREAM)

        query_index = jnp.arange(input_ids.shape[1])
        if cache is None:
            kv_segments, kv_positions, view = attention_mask, positions, None
        else:
            # Attention takes its masks from the view, sliding-window layers over their rings
            # (`jaxalign.models.kv_cache`); the layers' `mask` below then only gives B and T.
            view = cache_view(c, cache, attention_mask, positions, attention_mask_4d)
            query_index = query_index + cache.index
            kv_segments, kv_positions = view.segment_ids, view.positions
        mask_of = functools.partial(
            attention_mask_4d,
            attention_mask,
            positions,
            query_index,
            kv_segments,
            kv_positions,
            branch_ids=branch_ids,
        )
        segments = None
        if cache is None and resolve_attention_impl(c) == "splash":
            segments = SegmentMask(attention_mask, branch_ids)
            if not branch_window_unsupported(segments, c.sliding_window):
                mask_of = lambda window: None  # noqa: E731 (splash builds the mask blockwise)
        rope = None
        if c.position_embedding == "rope":
            rope = rope_tables(positions, rope_inv_freq(c), c.rope_attention_factor)
        if c.mixed_attention:
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
            # The cache's stacks ride in the carry (`_ScannedDecoderLayer`), the view without them
            # is broadcast, and each layer gets its index.
            cache_layers, carried = None, None
            if cache is not None:
                cache_layers, carried = jnp.arange(c.num_layers), view.stacks
                view = view.with_stacks(None)
            (x, new_layer_caches), (_, stats) = self.layers(
                (x, carried),
                mask,
                rope,
                cache_layers,
                view,
                token_mask,
                jnp.asarray(is_sliding),
                segments,
            )
            if stats is not None:
                stats = jax.tree.map(lambda s: s.sum(0), stats)
        else:
            new_layer_caches, layer_stats = [], []
            for i, layer in enumerate(self.layers):
                layer_view = None if cache is None else view.layer_view(i)
                x, (new_layer_cache, stats) = layer(
                    x, mask, rope, None, layer_view, token_mask, is_sliding[i], segments
                )
                new_layer_caches.append(new_layer_cache)
                if stats is not None:
                    layer_stats.append(stats)
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
            out = softcap(shd.constrain(out, _LOGITS), c.final_logit_softcap)
        if return_router_stats:
            return out, stats
        if cache is None:
            return out
        return out, next_cache(view, new_layer_caches, seq_len)
