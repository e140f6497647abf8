"""Fused attention: which kernel runs (`model.attention_impl`), and Pallas splash attention.

`attention_impl` values (`ATTENTION_IMPLS`):
  - "xla": the einsum of `transformer.dot_product_attention`; materialises `[B, H, T, S]` fp32
    logits; any backend, any mask.
  - "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention` with the dense mask;
    GPU, bf16/fp16, no logit soft-capping (refused by `ModelConfig`).
  - "splash": the Pallas TPU splash-attention kernel (below); on other backends it runs in
    Pallas interpret mode (`interpret=True`: a jitted loop over the kernel's grid whose body is
    the kernel's own code lowered to XLA ops), which is what the CPU tests check; slow, tests
    only. (`pltpu.InterpretParams()` would also simulate TPU memory, at twice the cost.)
  - "auto" (the default): `resolve_attention_impl`: TPU → splash; GPU → cudnn when the compute
    dtype is bf16/fp16, there is no logit soft-cap and the head dim is a multiple of 8 and at most
    128 (cuDNN's limit before Hopper), else xla; CPU → xla. It never picks an impl that
    `ModelConfig` would refuse.

KV-cache forwards (prefill and decode) always take the dense-mask path: splash is used for
cache-free forwards, i.e. training and scoring. With "auto" on a GPU, cuDNN runs the cache-free
forwards of even length and xla the rest (`dense_mask_impl`); an explicit "cudnn" runs everywhere.

**Splash** (`jax.experimental.pallas.ops.tpu.splash_attention`) ships inside the pinned jax, so
it adds no dependency (tokamax packages newer kernels but brings its own jax pin). The kernel
builds the mask blockwise and skips blocks that are masked out entirely:
  - a static `CausalMask`, or `LocalMask((window - 1, 0))` for a sliding window that binds
    (T > window; a shorter sequence never reaches the window, so it is skipped). The window is
    by slot index, which equals the position distance inside one contiguous segment whose
    positions advance by one per token (every batch in `jaxalign.data.batching`, and rollouts);
  - `SegmentIds(q, kv)` for padding and packing: a token sees earlier tokens of its own segment;
    padding (id 0) sees padding only and its outputs are garbage that no loss reads.
  - Shared-prompt rows (`branch_ids`, 0 trunk, 1 chosen, 2 rejected; a branch sees the trunk and
    itself) are not expressible as segment equality, so the kernel runs twice: run j ∈ {1, 2}
    keeps kv segment ids where branch ∈ {0, j} and puts a sentinel (-1, matching no query)
    elsewhere; chosen and trunk queries read run 1, rejected queries run 2. Every kept query sees
    at least itself; a discarded one may see no key (the kernel's finite mask value keeps it
    finite), and discarded outputs get zero cotangent. A binding sliding window with
    branch ids is not expressible (rejected positions skip the chosen tokens, so index distance
    is not position distance): `branch_window_unsupported` says so, and the caller falls back to
    the xla path for those layers (logged once).
  - No scale argument: q is pre-scaled (in fp32, then cast back). Soft-capping is the kernel's
    `attn_logits_soft_cap`. Grouped kv heads are native (`make_splash_mha` takes H query heads and
    K | H kv heads).
  - T is padded up to a multiple of 128 (the kernel's lane width; padding gets segment id 0) and
    the block is the largest of 512/256/128 that divides the padded length.
  - Sharding: under a mesh in context (`jax.set_mesh`) the kernel runs in `jax.shard_map` with
    the batch split over the mesh axes that the rules map "activation_batch" to and heads over
    those of "activation_heads" (the rules of the enclosing `shd.activation_context`, else
    `DEFAULT_LOGICAL_RULES`), as `shd.constrain` pins q; axes that do not divide the dimension
    are dropped. When K does not divide over the head axes but H does, k and v are repeated per
    group first. Without a mesh in context (the deprecated `with mesh:` sets none) it is called
    unsharded, and XLA partitions around it.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from jaxalign import sharding as shd
from jaxalign.models.config import ModelConfig

Array = jax.Array

logger = logging.getLogger(__name__)

_LANES = 128  # splash's block sizes must be multiples of the TPU lane width
_BLOCK_SIZES = (512, 256, 128)
_SENTINEL = -1  # a kv segment id that no query carries (queries carry 0 or 1..k)


@flax.struct.dataclass
class SegmentMask:
    """The mask as its ingredients, for kernels that build it blockwise (no cache, S = T).

    segment_ids: `[B, T]` int, 0 = padding, 1..k the segments of a (packed) row.
    branch_ids: `[B, T]` int or None: 0 trunk, 1 chosen, 2 rejected (shared-prompt rows).
    """

    segment_ids: Array
    branch_ids: Array | None = None


def _backend() -> str:
    return jax.default_backend()


def resolve_attention_impl(config: ModelConfig, backend: str | None = None) -> str:
    """The impl that runs for `config.attention_impl`; "auto" picks per backend (module doc)."""
    if config.attention_impl != "auto":
        return config.attention_impl
    backend = backend or _backend()
    if backend == "tpu":
        return "splash"
    if backend in ("gpu", "cuda"):
        half = config.dtype in ("bfloat16", "float16")
        head_dim_ok = config.head_dim % 8 == 0 and config.head_dim <= 128
        if half and not config.attn_logit_softcap and head_dim_ok:
            return "cudnn"
    return "xla"


def dense_mask_impl(config: ModelConfig, *, cached: bool, seq_len: int) -> str:
    """The kernel of a forward that hands attention the dense mask: "cudnn" or "xla".

    An explicit `attention_impl="cudnn"` is used everywhere. "auto" takes cuDNN only where its
    conditions hold without a GPU to check them on: cache-free forwards (training, scoring) with
    an even length (cuDNN refuses odd lengths with a mask in training); KV-cache prefill and
    decoding take xla.
    """
    if config.attention_impl == "cudnn":
        return "cudnn"
    if resolve_attention_impl(config) == "cudnn" and not cached and seq_len % 2 == 0:
        return "cudnn"
    return "xla"


def window_binds(sliding_window: int | None, seq_len: int) -> bool:
    """Whether a window of `sliding_window` keys excludes any key of a `seq_len` sequence."""
    return sliding_window is not None and seq_len > sliding_window


def branch_window_unsupported(segments: SegmentMask, sliding_window: int | None) -> bool:
    """Splash cannot express a binding sliding window together with branch ids (module doc)."""
    seq_len = segments.segment_ids.shape[-1]
    return segments.branch_ids is not None and window_binds(sliding_window, seq_len)


@functools.cache
def log_once(message: str) -> None:
    logger.warning(message)


def _block_size(seq_len: int) -> tuple[int, int]:
    """`(block, padded_len)`: `seq_len` rounded up to the lane width, and the largest block of
    `_BLOCK_SIZES` dividing it."""
    padded = -(-seq_len // _LANES) * _LANES
    return next(b for b in _BLOCK_SIZES if padded % b == 0), padded


def _make_kernel(
    heads: int, seq_len: int, block: int, window: int | None, cap: float | None
) -> Any:
    if window_binds(window, seq_len):
        head_mask = splash.LocalMask((seq_len, seq_len), window_size=(window - 1, 0), offset=0)
    else:
        head_mask = splash.CausalMask((seq_len, seq_len))
    interpret = jax.default_backend() != "tpu"
    if interpret:
        log_once(
            f"splash attention runs in Pallas interpret mode on {jax.default_backend()} (slow)"
        )
    # Separate dq and dkv backward kernels (MaxText's default; the fused one wins on some TPU
    # generations only).
    block_sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return splash.make_splash_mha(
        splash.MultiHeadMask([head_mask] * heads),
        block_sizes=block_sizes,
        head_shards=1,
        q_seq_shards=1,
        attn_logits_soft_cap=cap,
        interpret=interpret,
    )


def _rules() -> Any:
    """The logical-axis rules of the enclosing `shd.activation_context`, else the defaults."""
    rules = shd.activation_rules()
    if rules is not None:
        return rules
    from jaxalign.config import DEFAULT_LOGICAL_RULES  # noqa: PLC0415 (config imports models)

    return DEFAULT_LOGICAL_RULES


def _divisible_axes(mesh: Any, mesh_axes: Any, size: int) -> tuple[str, ...]:
    """The axes of `mesh_axes` (in order) whose running product divides `size`; manual axes
    (inside an enclosing shard_map) and axes not in the mesh are skipped."""
    chosen, product = [], 1
    for axis in (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ()):
        if axis not in mesh.shape or axis in mesh.manual_axes:
            continue
        if size % (product * mesh.shape[axis]) == 0:
            chosen.append(axis)
            product *= mesh.shape[axis]
    return tuple(chosen)


def splash_attention(
    q: Array,
    k: Array,
    v: Array,
    segments: SegmentMask,
    *,
    sliding_window: int | None = None,
    scale: float | None = None,
    logit_softcap: float | None = None,
) -> Array:
    """softmax(softcap(q·kᵀ·scale) + mask)·v by the splash kernel, the mask from `segments`.

    q: [B, T, H, D]; k, v: [B, K, T, D] (heads-major) -> [B, T, H, D]. The mask is the one
    `transformer.attention_mask_4d` builds from the same segment and branch ids (causal, same
    segment, key not padding, own branch or trunk, in window); outputs at padding differ.
    """
    if branch_window_unsupported(segments, sliding_window):
        raise ValueError("splash cannot combine branch_ids with a binding sliding window")
    batch, seq_len, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    q = (q.astype(jnp.float32) * scale).astype(q.dtype).swapaxes(1, 2)  # [B, H, T, D]
    block, padded = _block_size(seq_len)
    pad = ((0, 0), (0, 0), (0, padded - seq_len), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    ids = [jnp.pad(segments.segment_ids.astype(jnp.int32), ((0, 0), (0, padded - seq_len)))]
    if segments.branch_ids is not None:
        ids.append(jnp.pad(segments.branch_ids.astype(jnp.int32), ((0, 0), (0, padded - seq_len))))
    window = sliding_window if window_binds(sliding_window, seq_len) else None

    mesh = jax.sharding.get_abstract_mesh()
    batch_axes = head_axes = ()
    if not mesh.empty:
        batch_rule, heads_rule = shd.logical_to_mesh_axes(
            ("activation_batch", "activation_heads"), _rules()
        )
        batch_axes = _divisible_axes(mesh, batch_rule, batch)
        head_axes = _divisible_axes(mesh, heads_rule, heads)
    head_shards = math.prod(mesh.shape[a] for a in head_axes)
    if kv_heads % head_shards:  # shard whole groups: give every query head its own kv head
        k, v = (jnp.repeat(x, heads // kv_heads, axis=1) for x in (k, v))

    def attend(q: Array, k: Array, v: Array, *ids: Array) -> Array:
        kernel = _make_kernel(q.shape[1], padded, block, window, logit_softcap)
        run = jax.vmap(
            lambda q, k, v, qs, kvs: kernel(q, k, v, segment_ids=splash.SegmentIds(qs, kvs))
        )
        if len(ids) == 1:
            return run(q, k, v, ids[0], ids[0])
        segment_ids, branch_ids = ids
        outs = [
            run(
                q,
                k,
                v,
                segment_ids,
                jnp.where((branch_ids == 0) | (branch_ids == j), segment_ids, _SENTINEL),
            )
            for j in (1, 2)
        ]
        return jnp.where((branch_ids == 2)[:, None, :, None], outs[1], outs[0])

    if batch_axes or head_axes:
        qkv_spec = P(batch_axes or None, head_axes or None, None, None)
        ids_spec = P(batch_axes or None, None)
        attend = jax.shard_map(
            attend,
            mesh=mesh,
            in_specs=(qkv_spec, qkv_spec, qkv_spec, *(ids_spec for _ in ids)),
            out_specs=qkv_spec,
            check_vma=False,  # the kernel's pallas_call declares no varying-axes types
        )
    out = attend(q, k, v, *ids)
    return out[:, :, :seq_len].swapaxes(1, 2)
