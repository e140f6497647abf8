"""Device mesh and logical-axis sharding: rules are data, resolved by small pure functions.

A *rule table* is a sequence of ``(logical_name, mesh_axes)`` pairs taken verbatim from
``config.mesh.logical_rules``, e.g.::

    (("embed", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
     ("mlp", "tensor"), ("head_dim", None), ("layers", None), ("batch", ("data", "fsdp")))

``mesh_axes`` is a mesh axis name, a tuple of them, or ``None`` (replicate). A logical name
may appear more than once: the first entry whose mesh axes are not already used by an
earlier dim of the same array wins (so ``("heads", "tensor")`` + ``("heads", None)`` is
legal). A logical name that is not in the table is an error (typos fail loudly).

Divisibility policy: **raise**. If a rule would shard a dim whose size is not divisible by
the product of the mesh axis sizes, ``param_shardings`` raises ``ValueError`` naming the
parameter path, the dim, its size and the mesh axes with their sizes. Silently replicating
would hide a memory blow-up (e.g. a replicated 150k x 8k embedding); pad the dim (e.g.
vocab to a multiple of 128) or map that logical name to ``None`` instead.

Usage (big_vision style, params are born sharded)::

    mesh = make_mesh(shape=config.mesh.shape, axis_names=config.mesh.axis_names)
    params, shardings = init_sharded(
        lambda rng: model.init(rng, dummy_tokens)["params"], mesh, config.mesh.logical_rules, rng
    )
    batch = shard_batch(local_numpy_batch, mesh)

Activations are constrained the same way, by logical names (``activation_batch``,
``activation_embed``, ...; ``ACTIVATION_AXES``) that ``constrain`` resolves against the rules of
the enclosing ``activation_context(mesh, rules)``. The engine enters that context around every
step it runs, so the model's constraints apply wherever a step is traced; outside it (single-device
use, tests, tools) ``constrain`` is the identity.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax.core import meta
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

# Logical names of activation dims, used by the model's `constrain` calls; every rule table needs
# a rule for each (`config.validate` checks). Shapes: residual stream `[B·T, E]`, q/k/v and
# attention output `[B, T, H|K, D]`, MLP hidden `[B·T, F]`, logits `[B, T, V]`.
ACTIVATION_AXES: tuple[str, ...] = (
    "activation_batch",
    "activation_length",
    "activation_embed",
    "activation_heads",
    "activation_kv_heads",
    "activation_head_dim",
    "activation_mlp",
    "activation_vocab",
)

# `(mesh, rules)` of the innermost `activation_context`; None outside one.
_ACTIVATION_CONTEXT: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar(
    "jaxalign_activation_context", default=None
)


def _is_box(x: Any) -> bool:
    return isinstance(x, meta.AxisMetadata)


def unbox(tree: Any) -> Any:
    """Strips Flax ``AxisMetadata`` boxes (e.g. ``nn.LogicallyPartitioned``) from a pytree.

    Unlike ``flax.core.meta.unbox`` this never inserts sharding constraints.

    Args:
      tree: pytree possibly containing boxed leaves.

    Returns:
      The same pytree with every box replaced by its value.
    """

    def _value(x):
        return x.value if isinstance(x, meta.Partitioned) else x.unbox()

    return jax.tree.map(lambda x: _value(x) if _is_box(x) else x, tree, is_leaf=_is_box)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces a single ``-1`` in ``shape`` so the product equals ``num_devices``.

    Args:
      shape: mesh shape, at most one entry ``-1``.
      num_devices: number of devices the mesh must cover.

    Returns:
      The resolved shape.

    Raises:
      ValueError: naming ``mesh.shape`` if the shape cannot cover exactly ``num_devices``.
    """
    shape = tuple(int(s) for s in shape)
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh.shape={shape}: entries must be positive with at most one -1.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh.shape={shape}: cannot fill -1, {num_devices} devices are not "
                f"divisible by the product of the other axes ({known})."
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh.shape={shape} has {math.prod(shape)} devices but {num_devices} are "
            "available; set mesh.shape so its product matches, or use -1 for one axis."
        )
    return shape


def make_mesh(
    *,
    shape: Sequence[int],
    axis_names: Sequence[str],
    devices: Sequence[jax.Device] | None = None,
    dcn_shape: Sequence[int] | None = None,
) -> Mesh:
    """Builds a device mesh with topology-aware device order.

    Args:
      shape: per-slice (ICI) mesh shape; one entry may be ``-1`` (fill with what is left).
      axis_names: one name per mesh axis, e.g. ``("data", "fsdp", "tensor")``.
      devices: devices to use; defaults to ``jax.devices()``.
      dcn_shape: multi-slice (DCN) shape, same rank as ``shape`` (None/() = one slice); the final mesh is
        ``shape * dcn_shape`` elementwise (``mesh_utils.create_hybrid_device_mesh``).

    Returns:
      A ``jax.sharding.Mesh`` over all ``devices``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(shape) != len(axis_names):
        raise ValueError(
            f"mesh.shape={tuple(shape)} and mesh.axis_names={tuple(axis_names)} differ in rank."
        )
    if not dcn_shape:  # None or () = single slice
        ici_shape = resolve_mesh_shape(shape, len(devices))
        device_array = mesh_utils.create_device_mesh(ici_shape, devices)
    else:
        dcn_shape = tuple(int(s) for s in dcn_shape)
        if len(dcn_shape) != len(shape) or len(devices) % math.prod(dcn_shape):
            raise ValueError(
                f"mesh.dcn_shape={dcn_shape} does not fit mesh.shape={tuple(shape)} and {len(devices)} devices."
            )
        ici_shape = resolve_mesh_shape(shape, len(devices) // math.prod(dcn_shape))
        device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
    return Mesh(device_array, tuple(axis_names))


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_mesh_axes(logical_axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Maps one array's logical axis names to a ``PartitionSpec`` using the rule table.

    Args:
      logical_axes: one logical name (or ``None``) per array dim.
      rules: ``(logical_name, mesh_axes)`` pairs; see module docstring.

    Returns:
      ``PartitionSpec`` with one entry per dim (mesh axis, tuple of axes, or ``None``).

    Raises:
      ValueError: if a logical name has no rule.
    """
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        candidates = [axes for logical, axes in rules if logical == name]
        if not candidates:
            known = sorted({logical for logical, _ in rules})
            raise ValueError(
                f"Logical axis {name!r} has no rule in mesh.logical_rules (known: {known})."
            )
        chosen: MeshAxes = None
        for axes in candidates:
            if not used.intersection(_as_tuple(axes)):
                chosen = axes
                break
        used.update(_as_tuple(chosen))
        spec.append(chosen)
    return PartitionSpec(*spec)


def logical_sharding(mesh: Mesh, rules: Rules, logical_axes: Sequence[str | None]) -> NamedSharding:
    """``NamedSharding`` for an activation named by logical axes, e.g. ``("batch", None, "embed")``."""
    return NamedSharding(mesh, logical_to_mesh_axes(logical_axes, rules))


def check_divisible(path: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> None:
    """Raises if ``spec`` shards a dim of ``shape`` unevenly on ``mesh``.

    Args:
      path: parameter path, only for the error message.
      shape: the array's global shape.
      spec: its ``PartitionSpec``.
      mesh: the mesh the spec refers to.

    Raises:
      ValueError: naming the path, dim, dim size and mesh axis sizes.
    """
    for dim, (size, axes) in enumerate(zip(shape, spec, strict=False)):
        axes = _as_tuple(axes)
        missing = [a for a in axes if a not in mesh.shape]
        if missing:
            raise ValueError(
                f"{path}: mesh axes {missing} are not in the mesh axis_names {tuple(mesh.axis_names)}."
            )
        shards = math.prod(mesh.shape[a] for a in axes)
        if size % shards:
            sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in axes)
            raise ValueError(
                f"Cannot shard parameter {path!r} dim {dim} (size {size}) over mesh axes "
                f"({sizes}; {shards} shards): {size} is not divisible by {shards}. Pad the dim "
                "or map its logical name to None in mesh.logical_rules."
            )


def logical_partition_specs(abstract_params: Any, rules: Rules) -> Any:
    """``PartitionSpec`` for every leaf of a (boxed) pytree, in unboxed structure.

    Leaves not wrapped in ``nn.LogicallyPartitioned`` (e.g. an optimizer step count) are
    replicated, as are the leaves of a box whose value is itself a pytree (e.g. Adafactor's
    factored statistics, which do not share the param's rank).

    Args:
      abstract_params: pytree from ``jax.eval_shape(model.init, ...)`` (or real arrays).
      rules: logical rule table.

    Returns:
      Pytree of ``PartitionSpec`` matching ``unbox(abstract_params)``.
    """

    def _spec(box):
        if not _is_box(box):
            return PartitionSpec()
        if not hasattr(box.value, "shape"):
            return jax.tree.map(lambda _: PartitionSpec(), box.value)
        names = getattr(box, "names", None) or (None,) * len(box.value.shape)
        if len(names) != len(box.value.shape):
            raise ValueError(f"Logical names {names} do not match value shape {box.value.shape}.")
        return logical_to_mesh_axes(names, rules)

    return jax.tree.map(_spec, abstract_params, is_leaf=_is_box)


def path_str(path: Sequence[Any]) -> str:
    """``"params/Block_0/kernel"`` for a ``jax.tree_util`` key path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def param_shardings(abstract_params: Any, mesh: Mesh, rules: Rules) -> Any:
    """``NamedSharding`` for every leaf of a (boxed) pytree, checked for divisibility.

    Args:
      abstract_params: boxed pytree of ``jax.ShapeDtypeStruct`` (or arrays).
      mesh: target mesh.
      rules: logical rule table.

    Returns:
      Pytree of ``NamedSharding`` with the structure of ``unbox(abstract_params)``.

    Raises:
      ValueError: if a dim cannot be sharded evenly (see module docstring).
    """
    specs = logical_partition_specs(abstract_params, rules)
    shapes = unbox(abstract_params)

    def _sharding(path, spec, leaf):
        check_divisible(path_str(path), np.shape(leaf), spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(
        _sharding, specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def batch_sharding(mesh: Mesh, *, axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """Sharding that splits the leading (batch) dim over ``axes`` present in ``mesh``.

    Args:
      mesh: device mesh.
      axes: mesh axes the batch dim is split over, default ``("data", "fsdp")``.

    Returns:
      ``NamedSharding(mesh, P(("data", "fsdp")))``; trailing dims replicated.
    """
    present = tuple(a for a in axes if a in mesh.shape)
    return NamedSharding(mesh, PartitionSpec(present or None))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this process's batch slice into global arrays sharded by ``batch_sharding``.

    Works single- and multi-process: each process passes its own rows ``[local_batch, ...]``
    and the global batch is ``[local_batch * process_count, ...]``.

    Args:
      local_batch: dict of host arrays with the same leading dim.
      mesh: device mesh.

    Returns:
      Dict of global ``jax.Array``s with leading dim over ``data x fsdp``.
    """
    sharding = batch_sharding(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in local_batch.items()
    }


def local_rows(tree: Any, mesh: Mesh) -> Any:
    """This process's rows of batch-sharded global arrays, as host NumPy (`shard_batch`'s inverse).

    `jax.device_get` of a global array fails on multi-host (not every shard is addressable); this
    returns exactly the rows this process passed to `shard_batch`, in order.
    """
    spec = batch_sharding(mesh).spec
    return jax.tree.map(
        lambda x: np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec)),
        tree,
    )


def global_from_local(tree: Any, mesh: Mesh) -> Any:
    """Global batch-sharded arrays from this process's host rows (e.g. host-computed scores)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )


def init_sharded(
    init_fn: Callable[..., Any], mesh: Mesh, rules: Rules, *args: Any
) -> tuple[Any, Any]:
    """Runs ``init_fn`` under ``jax.jit`` so its outputs are created already sharded.

    ``init_fn(*args)`` returns a pytree whose leaves are (optionally) boxed with
    ``nn.with_logical_partitioning``, e.g. ``lambda rng: model.init(rng, x)["params"]``, or a
    dict holding params and ``tx.init(params)`` (optax keeps the boxes on moments).

    Args:
      init_fn: pure init function.
      mesh: target mesh.
      rules: logical rule table.
      *args: arguments to ``init_fn`` (e.g. an RNG key); they are replicated.

    Returns:
      ``(values, shardings)``: unboxed arrays and the matching pytree of ``NamedSharding``.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = param_shardings(abstract, mesh, rules)
    values = jax.jit(lambda *a: unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return values, shardings


# ----------------------------------------------------------------------------- activations


@contextlib.contextmanager
def activation_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Makes ``mesh`` the ambient mesh and ``rules`` the activation rules while a step is traced.

    Inside it, ``constrain`` pins activations to ``NamedSharding(mesh, rules(names))`` and
    ``jax.sharding.get_abstract_mesh()`` returns ``mesh`` (what ``jax.shard_map`` kernels read).
    Enter it outside ``jax.jit``, around the call that traces (``jax.set_mesh`` refuses to be
    entered inside a trace). The mesh is part of jit's cache key, so a function traced outside
    the context is traced again inside it rather than reusing the unconstrained program.

    Args:
      mesh: the device mesh the step runs on.
      rules: logical rule table (``config.mesh.logical_rules``), with rules for ``ACTIVATION_AXES``.
    """
    token = _ACTIVATION_CONTEXT.set((mesh, tuple(rules)))
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _ACTIVATION_CONTEXT.reset(token)


def activation_rules() -> Rules | None:
    """The rules of the enclosing ``activation_context``; None outside one."""
    context = _ACTIVATION_CONTEXT.get()
    return None if context is None else context[1]


def in_activation_context(fn: Callable[..., Any], mesh: Mesh, rules: Rules) -> Callable[..., Any]:
    """``fn`` whose every call runs inside ``activation_context(mesh, rules)``.

    Wrap the host-side callable that invokes (and so traces) jitted steps, e.g. the engine's
    per-batch iteration, rather than the jitted function itself.
    """

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with activation_context(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """``x`` pinned to the sharding its logical axes name, or ``x`` itself outside a context.

    A dim whose size does not divide by its mesh axes (one kv head over ``tensor=2``, a decode
    batch of 1) is left to XLA's propagation instead of being padded.

    Args:
      x: an activation, e.g. the residual stream ``[B·T, E]``.
      logical_axes: one logical name (``ACTIVATION_AXES`` for activations; a weight's own names
        for a weight) or ``None`` (replicated) per dim of ``x``.

    Returns:
      ``x`` under ``jax.lax.with_sharding_constraint`` (an identity on values).
    """
    context = _ACTIVATION_CONTEXT.get()
    if context is None:
        return x
    mesh, rules = context
    spec = logical_to_mesh_axes(logical_axes, rules)
    spec = PartitionSpec(
        *(
            axes
            if size % math.prod(mesh.shape[a] for a in _as_tuple(axes)) == 0
            else PartitionSpec.UNCONSTRAINED
            for size, axes in zip(x.shape, spec, strict=True)
        )
    )
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
