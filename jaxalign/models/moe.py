"""Mixture-of-experts MLP (Qwen3-MoE, Mixtral): top-k routing, dropless grouped matmuls, aux loss.

Shapes: N tokens (the residual stream's `B·T` rows), E hidden, X experts, k experts per token,
F expert width.

Routing, as both families do it in `transformers`: p = softmax(x·W_r) over the X experts (fp32),
the k largest p_i are kept and, with `norm_topk_prob` (Mixtral always, Qwen3-MoE per config),
renormalised to sum to 1. Token n's output is Σ_{i in top-k(n)} w_ni · down_i(act(gate_i x) ⊙ up_i x).

**Dropless, via `jax.lax.ragged_dot`.** The N·k (token, expert) assignments are sorted by expert,
so each expert's tokens are one contiguous run of rows, and each projection is one grouped matmul
`ragged_dot(rows [N·k, E], kernels [X, E, F], group_sizes [X])`: no capacity factor, no dropped
tokens, no padding to a per-expert capacity, and (where the backend has a native grouped matmul)
the FLOPs of the k chosen experts only.
`ragged_dot` is JAX's own primitive: differentiable, available on every backend and partitioned
by XLA's SPMD partitioner (tests/test_models_moe.py checks 8 devices with the expert axis sharded
against one), so it needs no extra dependency. tokamax/megablox grouped-matmul kernels are faster
on TPU for large token counts but are backend-specific; `_grouped` is the one call site to swap.

**Expert parallelism.** Expert kernels carry the logical axis `expert` (`[X, E, F]`:
`("expert", "embed", "mlp")`). The default rule `("expert", None)` keeps experts whole and lets
`embed`/`mlp` shard them like dense MLPs (FSDP/tensor); a rule such as `("expert", "fsdp")` put
before it shards the X axis instead (then `embed` falls back to replicated, as a mesh axis is used
once per array). The dispatch is left to XLA's partitioner (correct, checked against one device;
whether it moves tokens or gathers expert weights is its choice): an explicit `shard_map`
all-to-all token dispatch is not implemented.

**Auxiliary loss** (Switch Transformer, Fedus et al. 2022, eq. 4-6, as `transformers`'
`load_balancing_loss_func`): over all MoE layers and non-padding tokens together,
f_i = (# assignments to expert i) / (L·N) and P_i = Σ p_i / (L·N), and
aux = X · Σ_i f_i · P_i (= k when routing is uniform). Each layer returns `RouterStats` sums;
`router_loss_terms` turns their total into the term every trainer adds to its loss:
`router_aux_loss_coef · aux · denominator` (so that after the engine divides by the denominator
the loss gains coef · aux). Neither family has a router z-loss, so none is added.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class RouterStats:
    """Sums over non-padding tokens (and, once `Transformer` adds them up, over layers).

    expert_counts: `[X]` number of (token, expert) assignments to each expert.
    router_probs: `[X]` Σ of each expert's router probability.
    tokens: `[]` number of tokens routed (Σ over layers: L·N).
    """

    expert_counts: Array
    router_probs: Array
    tokens: Array

    def __add__(self, other: RouterStats) -> RouterStats:
        return jax.tree.map(jnp.add, self, other)


def route(router_logits: Array, top_k: int, norm_topk_prob: bool) -> tuple[Array, Array, Array]:
    """`(probs [N, X], weights [N, k], experts [N, k])` from router logits, in fp32."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return probs, weights, experts


def router_stats(probs: Array, experts: Array, token_mask: Array) -> RouterStats:
    """This layer's `RouterStats`; `token_mask [N]` is 1 on real tokens, 0 on padding."""
    num_experts = probs.shape[-1]
    mask = token_mask.astype(jnp.float32)
    one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [N, k, X]
    return RouterStats(
        expert_counts=jnp.einsum("nkx,n->x", one_hot, mask),
        router_probs=jnp.einsum("nx,n->x", probs, mask),
        tokens=mask.sum(),
    )


def _grouped(rows: Array, kernels: Array, group_sizes: Array) -> Array:
    """`rows [M, in]` (sorted by group) times their group's `kernels [X, in, out]` -> `[M, out]`."""
    return jax.lax.ragged_dot(rows, kernels, group_sizes, preferred_element_type=rows.dtype)


def expert_mlp(
    x: Array,
    weights: Array,
    experts: Array,
    gate: Array,
    up: Array,
    down: Array,
    activation: Any,
) -> Array:
    """Σ_j weights[n, j] · down_e(act(gate_e x_n) ⊙ up_e x_n) with e = experts[n, j]; dropless.

    x: `[N, E]`; weights, experts: `[N, k]`; gate, up: `[X, E, F]`; down: `[X, F, E]` -> `[N, E]`.
    """
    num_tokens, top_k = experts.shape
    num_experts = gate.shape[0]
    flat_experts = experts.reshape(-1)  # [N·k], assignment a = n·k + j
    order = jnp.argsort(flat_experts, stable=True)  # assignments grouped by expert
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    rows = jnp.take(x, order // top_k, axis=0)  # [N·k, E]
    hidden = activation(_grouped(rows, gate, group_sizes)) * _grouped(rows, up, group_sizes)
    out = _grouped(hidden.astype(x.dtype), down, group_sizes)  # [N·k, E], sorted
    unsorted = jnp.take(out, jnp.argsort(order), axis=0).reshape(num_tokens, top_k, -1)
    return jnp.einsum("nke,nk->ne", unsorted, weights.astype(unsorted.dtype))


def dense_reference_mlp(
    x: Array, weights: Array, experts: Array, gate: Array, up: Array, down: Array, activation: Any
) -> Array:
    """`expert_mlp` computed the slow way, every token through every one of its experts' full
    kernels gathered per token (for tests)."""
    g = jnp.einsum("ne,nkef->nkf", x, gate[experts])
    u = jnp.einsum("ne,nkef->nkf", x, up[experts])
    out = jnp.einsum("nkf,nkfe->nke", activation(g) * u, down[experts])
    return jnp.einsum("nke,nk->ne", out, weights)


class MoeMLP(nn.Module):
    """Router + X gated experts; returns `(out [N, E], RouterStats)`.

    Params: `router/kernel [E, X]` (a Dense, so LoRA and sharding treat it like any projection),
    `gate`, `up` `[X, E, F]` and `down` `[X, F, E]`.
    """

    config: Any
    activation: Any

    @nn.compact
    def __call__(self, x: Array, token_mask: Array) -> tuple[Array, RouterStats]:
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        init = nn.initializers.normal(0.02)

        def kernel(name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> Array:
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, param_dtype)

        logits = nn.Dense(
            c.num_experts,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nn.with_logical_partitioning(init, ("embed", "expert")),
            name="router",
        )(x)
        probs, weights, experts = route(logits, c.num_experts_per_tok, c.norm_topk_prob)
        x_dims, f_dims = (c.num_experts, c.hidden_size), c.moe_intermediate_size
        gate = kernel("gate", (*x_dims, f_dims), ("expert", "embed", "mlp"))
        up = kernel("up", (*x_dims, f_dims), ("expert", "embed", "mlp"))
        down = kernel("down", (c.num_experts, f_dims, c.hidden_size), ("expert", "mlp", "embed"))
        out = expert_mlp(
            x.astype(dtype),
            weights,
            experts,
            gate.astype(dtype),
            up.astype(dtype),
            down.astype(dtype),
            self.activation,
        )
        return out, router_stats(probs, experts, token_mask)


def aux_loss(stats: RouterStats) -> Array:
    """X · Σ_i f_i · P_i over the `stats` of all layers (see the module docstring)."""
    num_experts = stats.expert_counts.shape[-1]
    total = jnp.maximum(stats.tokens, 1.0)
    return num_experts * jnp.sum((stats.expert_counts / total) * (stats.router_probs / total))


def expert_load(stats: RouterStats) -> Array:
    """`[X]` share of (token, expert) assignments each expert received (sums to 1)."""
    return stats.expert_counts / jnp.maximum(stats.expert_counts.sum(), 1.0)


def router_loss_terms(
    config: Any, stats: RouterStats | None, denominator: Array
) -> tuple[Array, dict[str, Array]]:
    """`(loss term, metric sums)` a trainer adds to its loss sum and metrics.

    The term is `router_aux_loss_coef · aux · denominator` and the metrics are multiplied by the
    denominator too, because the engine divides loss and metrics by it. Metrics: `router/aux_loss`,
    `router/max_load` and `router/min_load` (the busiest and idlest expert's share × X: 1 when
    balanced) and `router/dropped_tokens` (0: the computation is dropless). Per-expert loads are
    `expert_load(stats)`. A dense model (`stats` None) gets `(0, {})`.
    """
    if stats is None:
        return jnp.zeros((), jnp.float32), {}
    aux = aux_loss(stats)
    load = expert_load(stats) * stats.expert_counts.shape[-1]
    denominator = jnp.asarray(denominator, jnp.float32)
    metrics = {
        "router/aux_loss": aux * denominator,
        "router/max_load": load.max() * denominator,
        "router/min_load": load.min() * denominator,
        "router/dropped_tokens": jnp.zeros((), jnp.float32),
    }
    return config.router_aux_loss_coef * aux * denominator, metrics
