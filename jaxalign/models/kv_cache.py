"""The KV cache of autoregressive decoding, with window-sized rings for sliding-window layers.

Shapes: B batch, T new tokens, S cache length (`max_length`), W' window slots, K kv heads,
D head dim, L layers (Lf full-length ones, Lw sliding ones).

A sliding-window layer (Mistral's `sliding_window`; Gemma 2/3's "sliding_attention" layers) only
ever attends to the last W positions, so it keeps W' = min(W, S) slots, a ring: the token of
absolute slot i is stored at slot i mod W'. The other layers keep all S slots. Segment ids and
positions are kept once, per absolute slot `[B, S]`; a ring slot's are gathered from the absolute
slot it holds, so every layer's mask is the usual one (same segment, causal, key not empty, within
the window).

The ring is exact when a query's keys within its window lie in its last W slots, i.e. when no
padding sits inside a row's sequence: left-padded prompts (as `jaxalign.sampling` makes them) and
packed segments are fine; a right-padded prompt continued by decoding is not (its padding slots
would push in-window keys out of the ring).

Writing T tokens at slot index c: one token (decoding) goes to slot c mod W' before attending, as
the slot it replaces (c − W') is just out of the window. A prefill (T > 1) attends to the fresh
keys next to the ring as it was (only the fresh keys when c = 0, the usual case, chosen with a
`lax.cond`), then the last min(T, W') tokens are written into the ring.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp

from jaxalign.models.config import ModelConfig

Array = jax.Array


@flax.struct.dataclass
class KVCache:
    """Decode state: keys/values of every layer and the slots' segment ids and positions.

    Layers are in two groups, each in layer order: full-length layers (`keys`, `values`, S slots)
    and sliding-window layers (`window_keys`, `window_values`, W' = min(W, S) slots, a ring; see the
    module docstring); a group the model lacks is None. Keys and values are heads-major, the layout
    attention reads: with `scan_layers` one stacked array per group, `[Lf, B, K, S, D]` and
    `[Lw, B, K, W', D]`, otherwise a tuple of `[B, K, S, D]` (or `[B, K, W', D]`) arrays, which a
    decode loop updates in place without slicing or restacking.

    Scanned layers do not scan over the stacks (a mixed model's two groups differ in shape, Gemma
    2/3): the stacks ride in the scan's carry beside the residual stream. Each layer writes its
    fresh keys and values into its slots of its group's stack, in place (a select between the fresh
    and the present values, so a layer of the other kind leaves the stack as it is), then reads its
    slice under a `lax.cond` on its kind (traced), which runs only that kind's attention.
    """

    keys: Array | tuple[Array, ...] | None
    values: Array | tuple[Array, ...] | None
    window_keys: Array | tuple[Array, ...] | None
    window_values: Array | tuple[Array, ...] | None
    segment_ids: Array  # [B, S] int32 per absolute slot, 0 = empty or padding
    positions: Array  # [B, S] int32
    index: Array  # [] int32, the next absolute slot to write


def window_layers(config: ModelConfig) -> tuple[bool, ...]:
    """Whether each layer is a sliding-window layer (and so keeps a ring)."""
    if config.layer_types is not None:
        return tuple(t == "sliding_attention" for t in config.layer_types)
    return (config.sliding_window is not None,) * config.num_layers


def window_length(config: ModelConfig, max_length: int) -> int:
    """W' = min(W, max_length): the slots of a sliding-window layer's ring."""
    return min(config.sliding_window or max_length, max_length)


def init_cache(config: ModelConfig, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
    """An empty cache with room for `max_length` tokens (prompt + generated)."""
    dtype = jnp.dtype(dtype or config.dtype)
    is_window = window_layers(config)

    def group(count: int, slots: int) -> Array | tuple[Array, ...] | None:
        shape = (batch_size, config.num_kv_heads, slots, config.head_dim)
        if not count:
            return None
        if config.scan_layers:
            return jnp.zeros((count, *shape), dtype)
        return tuple(jnp.zeros(shape, dtype) for _ in range(count))

    num_window = sum(is_window)
    num_full = config.num_layers - num_window
    slots = window_length(config, max_length)
    return KVCache(
        keys=group(num_full, max_length),
        values=group(num_full, max_length),
        window_keys=group(num_window, slots),
        window_values=group(num_window, slots),
        segment_ids=jnp.zeros((batch_size, max_length), jnp.int32),
        positions=jnp.zeros((batch_size, max_length), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def _group_index(is_window: tuple[bool, ...]) -> tuple[int, ...]:
    """Each layer's index within its group (full-length or window)."""
    seen = {False: 0, True: 0}
    index = []
    for window in is_window:
        index.append(seen[window])
        seen[window] += 1
    return tuple(index)


def ring_metadata(
    segment_ids: Array, positions: Array, end: Array, slots: int
) -> tuple[Array, Array]:
    """Segment ids and positions `[B, W']` of a ring after absolute slots `< end` were written.

    Ring slot j holds absolute slot a_j = end − 1 − ((end − 1 − j) mod W'), empty when a_j < 0.
    """
    j = jnp.arange(slots)
    held = end - 1 - jnp.mod(end - 1 - j, slots)
    valid = held >= 0
    held = jnp.clip(held, 0, segment_ids.shape[1] - 1)
    return (
        jnp.where(valid, segment_ids[:, held], 0),
        jnp.where(valid, positions[:, held], 0),
    )


def write_slots(cache: Array, fresh: Array, index: Array, *, ring: bool) -> Array:
    """`cache [..., S', D]` with `fresh [..., T, D]` written at absolute slots index … index+T−1:
    at those slots, or, in a ring, at slot i mod S' (only the last S' tokens survive)."""
    fresh = fresh.astype(cache.dtype)
    slots, count = cache.shape[-2], fresh.shape[-2]
    slot_axis = cache.ndim - 2
    if not ring:
        return jax.lax.dynamic_update_slice_in_dim(cache, fresh, index, slot_axis)
    if count == 1:
        return jax.lax.dynamic_update_slice_in_dim(cache, fresh, index % slots, slot_axis)
    keep = min(count, slots)
    where = (index + count - keep + jnp.arange(keep)) % slots
    return cache.at[..., where, :].set(fresh[..., count - keep :, :])


@flax.struct.dataclass
class CacheView:
    """What the layers' attention needs of a cache for one forward of T new tokens.

    With `scan_layers` the layers share one view, broadcast, whose groups' stacks are replaced by
    the ones carried through the scan (`with_stacks`); each layer gets its traced index in the model
    beside it. Otherwise each layer gets its own view, `layer_view(i)`, holding its own
    `[B, K, S, D]` (or ring) arrays and its static index.

    Masks are `[B, 1, T, ·]`: `mask` over the S slots after writing (full-length layers);
    `window_mask` over the ring after writing (decoding, or a ring that cannot wrap, W' = S) or over
    `[ring before writing | the T fresh keys]` (a prefill into a ring that can wrap); then
    `fresh_mask` `[B, 1, T, T]` over the fresh keys alone, used when the cache was empty.
    """

    keys: Array | tuple[Array, ...] | None
    values: Array | tuple[Array, ...] | None
    window_keys: Array | tuple[Array, ...] | None
    window_values: Array | tuple[Array, ...] | None
    index: Array
    segment_ids: Array  # [B, S] after writing
    positions: Array  # [B, S] after writing
    mask: Array
    window_mask: Array | None
    fresh_mask: Array | None
    is_window: tuple[bool, ...] = flax.struct.field(pytree_node=False)
    wraps: bool = flax.struct.field(pytree_node=False)  # W' < S
    layer: int | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def stacks(self) -> tuple[Any, Any, Any, Any]:
        """`(keys, values, window_keys, window_values)`."""
        return self.keys, self.values, self.window_keys, self.window_values

    def with_stacks(self, stacks: tuple[Any, Any, Any, Any] | None) -> CacheView:
        keys, values, window_keys, window_values = stacks or (None,) * 4
        return self.replace(
            keys=keys, values=values, window_keys=window_keys, window_values=window_values
        )

    def layer_view(self, layer: int) -> CacheView:
        """The view of unrolled layer `layer`: its own arrays (of its group) and static index."""
        group = _group_index(self.is_window)[layer]
        pick = lambda arrays, mine: arrays[group] if mine else None  # noqa: E731
        window = self.is_window[layer]
        return self.replace(
            keys=pick(self.keys, not window),
            values=pick(self.values, not window),
            window_keys=pick(self.window_keys, window),
            window_values=pick(self.window_values, window),
            layer=layer,
        )


def cache_view(
    config: ModelConfig,
    cache: KVCache,
    segment_ids: Array,
    positions: Array,
    mask_fn: Callable[..., Array],
) -> CacheView:
    """The view of `cache` for new tokens with `segment_ids`, `positions` `[B, T]`.

    `mask_fn(q_segments, q_positions, q_index, kv_segments, kv_positions, window)` is the model's
    mask rule (`attention_mask_4d`), causal by slot index. Ring slots are given indices that make
    every written one precede the queries (they all do), and fresh keys follow them in order.
    """
    num_new, length = segment_ids.shape[1], cache.segment_ids.shape[1]
    index = cache.index
    kv_segments = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids, index, 1)
    kv_positions = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, index, 1)
    mask_of = functools.partial(mask_fn, segment_ids, positions)
    q_index = jnp.arange(num_new) + index
    mask = mask_of(q_index, kv_segments, kv_positions, None)
    is_window = window_layers(config)
    window_mask = fresh_mask = None
    wraps = False
    if any(is_window):
        window, slots = config.sliding_window, _slots(cache.window_keys)
        wraps = slots < length
        if not wraps:  # the ring is the full cache, windowed by its mask
            window_mask = mask_of(q_index, kv_segments, kv_positions, window)
        elif num_new == 1:  # after writing; all ring slots precede the query
            ring = ring_metadata(kv_segments, kv_positions, index + 1, slots)
            window_mask = mask_of(jnp.full((1,), slots - 1), *ring, window)
        else:  # [ring before writing | fresh keys]
            ring = ring_metadata(cache.segment_ids, cache.positions, index, slots)
            fresh = (segment_ids, positions)
            joined = (jnp.concatenate(pair, axis=1) for pair in zip(ring, fresh, strict=True))
            window_mask = mask_of(slots + jnp.arange(num_new), *joined, window)
            fresh_mask = mask_of(jnp.arange(num_new), *fresh, window)
    return CacheView(
        keys=cache.keys,
        values=cache.values,
        window_keys=cache.window_keys,
        window_values=cache.window_values,
        index=index,
        segment_ids=kv_segments,
        positions=kv_positions,
        mask=mask,
        window_mask=window_mask,
        fresh_mask=fresh_mask,
        is_window=is_window,
        wraps=wraps,
    )


def _slots(group: Array | tuple[Array, ...]) -> int:
    return (group[0] if isinstance(group, tuple) else group).shape[-2]


def _prefill_attention(q, k, v, view: CacheView, ring_k, ring_v, attend):
    """A prefill into a ring that can wrap: writing first could overwrite keys its earlier queries
    need, so attend to the fresh keys (as stored) beside the ring as it was before writing, or to
    the fresh keys alone when the cache was empty (the usual prefill, chosen by `lax.cond`)."""
    k, v = (f.astype(ring_k.dtype).astype(q.dtype) for f in (k, v))

    def into_empty():
        return attend(q, k, v, view.fresh_mask)

    def into_filled():
        ring = ((ring_k, k), (ring_v, v))
        joined = (jnp.concatenate([c.astype(q.dtype), f], axis=2) for c, f in ring)
        return attend(q, *joined, view.window_mask)

    return jax.lax.cond(view.index == 0, into_empty, into_filled)


def _layer_attention(q, k, v, view: CacheView, attend):
    """An unrolled layer: writes into its own arrays, returns `(out, (keys, values))`."""
    window = view.is_window[view.layer]
    cache_k, cache_v = (
        (view.window_keys, view.window_values) if window else (view.keys, view.values)
    )
    ring = window and view.wraps
    new = tuple(write_slots(c, f, view.index, ring=ring) for c, f in ((cache_k, k), (cache_v, v)))
    if window and view.fresh_mask is not None:
        return _prefill_attention(q, k, v, view, cache_k, cache_v, attend), new
    mask = view.window_mask if window else view.mask
    return attend(q, *(c.astype(q.dtype) for c in new), mask), new


def _write_layer(
    stack: Array | None, group: Array, fresh: Array, index: Array, *, ring: bool, apply: Any
) -> Array | None:
    """`stack [Lg, B, K, S', D]` with `fresh [B, K, T, D]` written into layer `group` as
    `write_slots` does, where `apply` (a traced bool) holds, else unchanged. Decoding (and any write
    that does not wrap) reads and rewrites only the T slots, so the carried stack updates in place."""
    if stack is None:
        return None
    fresh = fresh.astype(stack.dtype)[None]
    slots, count = stack.shape[-2], fresh.shape[-2]
    if not ring or count == 1:
        start = (group, 0, 0, index % slots if ring else index, 0)
        present = jax.lax.dynamic_slice(stack, start, fresh.shape)
        return jax.lax.dynamic_update_slice(stack, jnp.where(apply, fresh, present), start)
    # A prefill into a ring that can wrap (once per generation): rewrite the layer's slice.
    layer = jax.lax.dynamic_index_in_dim(stack, group, keepdims=False)
    written = write_slots(layer, fresh[0], index, ring=True)
    return jax.lax.dynamic_update_index_in_dim(stack, jnp.where(apply, written, layer), group, 0)


def cached_attention(
    q: Array,
    k: Array,
    v: Array,
    view: CacheView,
    layer: Array | None,
    attend: Callable[[Array, Array, Array, Array], Array],
) -> tuple[Array, tuple[Any, ...]]:
    """Attention of `q [B, T, H, D]` over the cache plus the fresh `k`, `v` `[B, K, T, D]`.

    `attend(q, keys, values, mask)` is the model's attention. Returns `(out [B, T, H, D], new)`:
    for an unrolled layer (`view.layer` set) `new` is its updated `(keys, values)` arrays; for a
    scanned one (`layer` its traced index) the updated stacks, `view.stacks` after writing.
    """
    if view.layer is not None:
        return _layer_attention(q, k, v, view, attend)

    group = jnp.asarray(_group_index(view.is_window))[layer]
    if all(view.is_window) or not any(view.is_window):
        window = all(view.is_window)  # static: one group
    else:
        window = jnp.asarray(view.is_window)[layer]
    take = lambda stack: jax.lax.dynamic_index_in_dim(stack, group, keepdims=False)  # noqa: E731
    prefill = view.fresh_mask is not None
    if prefill:  # attends to the ring as it was before writing
        ring_before = take(view.window_keys), take(view.window_values)
    write = functools.partial(_write_layer, group=group, index=view.index)
    keys = write(view.keys, fresh=k, ring=False, apply=~jnp.asarray(window))
    values = write(view.values, fresh=v, ring=False, apply=~jnp.asarray(window))
    window_keys = write(view.window_keys, fresh=k, ring=view.wraps, apply=window)
    window_values = write(view.window_values, fresh=v, ring=view.wraps, apply=window)

    def full():
        return attend(q, take(keys).astype(q.dtype), take(values).astype(q.dtype), view.mask)

    def ring():
        if prefill:
            return _prefill_attention(q, k, v, view, *ring_before, attend)
        read = (take(window_keys).astype(q.dtype), take(window_values).astype(q.dtype))
        return attend(q, *read, view.window_mask)

    if isinstance(window, bool):
        out = ring() if window else full()
    else:  # mixed (Gemma 2/3): the layer's kind is traced; run only its branch
        out = jax.lax.cond(window, ring, full)
    return out, (keys, values, window_keys, window_values)


def next_cache(view: CacheView, new_layers: Any, num_new: int) -> KVCache:
    """The cache after a forward of `num_new` tokens. `new_layers` is what the layers'
    `cached_attention` returned: per layer its updated `(keys, values)` (unrolled, a list), or the
    updated stacks `(keys, values, window_keys, window_values)` carried out of the scan."""
    if isinstance(new_layers, list):  # unrolled: regroup the layers' arrays
        groups = []
        for window in (False, True):
            mine = [new for new, w in zip(new_layers, view.is_window, strict=True) if w == window]
            groups += [tuple(k for k, _ in mine), tuple(v for _, v in mine)] if mine else [None] * 2
        new_layers = tuple(groups)
    keys, values, window_keys, window_values = new_layers
    return KVCache(
        keys=keys,
        values=values,
        window_keys=window_keys,
        window_values=window_values,
        segment_ids=view.segment_ids,
        positions=view.positions,
        index=view.index + num_new,
    )
