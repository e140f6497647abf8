"""Optimizer, learning-rate schedule and gradient accumulation.

``make_optimizer`` turns ``config.optimizer`` into one optax chain::

    clip_by_global_norm(max_grad_norm)          # skipped when max_grad_norm == 0
    -> scale_by_<name>(b1, b2, eps)
    -> add_decayed_weights(weight_decay, mask)  # decoupled (AdamW-style), no decay on
                                                # biases, norm scales and 1-D params
    -> scale_by_learning_rate(schedule)         # linear warmup, then constant/cosine/linear

``accumulate_gradients`` is a function transformer (after Levanter's ``grad_accum``): it turns
a loss-and-grad function on a full batch into one that scans over microbatches and returns
*sums*, so the trainer divides by the token count once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop", "adafactor")
SCHEDULES = ("constant", "cosine", "linear")
# Leaf names never weight-decayed; needed because under `nn.scan` a norm scale is 2-D.
NO_DECAY_NAMES = ("bias", "scale")


def make_schedule(
    *, learning_rate: float, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then decay to ``learning_rate * min_lr_ratio``.

    lr(t) = lr * t / warmup                                  for t < warmup
    cosine: lr * (r + (1 - r) * (1 + cos(pi * s)) / 2),  s = (t - warmup) / (total - warmup)
    linear: lr * (1 - (1 - r) * s);   constant: lr.      s is clipped to [0, 1].

    Args:
      learning_rate: peak learning rate.
      schedule: "constant" | "cosine" | "linear".
      warmup_steps: warmup length in optimizer steps (0 = none).
      total_steps: optimizer steps in the run, warmup included.
      min_lr_ratio: final lr as a fraction of the peak (cosine/linear only).

    Returns:
      ``step -> lr``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={schedule!r} not in {SCHEDULES}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"optimizer.warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}]."
        )
    end_lr = learning_rate * min_lr_ratio
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "constant":
        decay = optax.constant_schedule(learning_rate)
    elif schedule == "cosine":
        decay = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=min_lr_ratio)
    else:
        decay = optax.linear_schedule(learning_rate, end_lr, decay_steps)
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: rank >= 2 and not named ``bias``/``scale``."""

    def _decay(path, leaf):
        # Last dict key: skips the `.value` attribute of an `nn.LogicallyPartitioned` box.
        name = next((k.key for k in reversed(path) if hasattr(k, "key")), None)
        return jnp.ndim(leaf) >= 2 and name not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(_decay, params)


def _scale_by(opt_config: Any) -> optax.GradientTransformation:
    name = opt_config.name
    if name in ("adamw", "adam"):
        return optax.scale_by_adam(b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps)
    if name == "sgd":  # b1 is the momentum; 0 = plain SGD.
        return optax.trace(decay=opt_config.b1) if opt_config.b1 else optax.identity()
    if name == "rmsprop":
        return optax.scale_by_rms(decay=opt_config.b2, eps=opt_config.eps)
    if name == "adafactor":  # factored second moment; b2/eps keep Adafactor's own defaults.
        return optax.chain(
            optax.scale_by_factored_rms(),
            optax.trace(decay=opt_config.b1) if opt_config.b1 else optax.identity(),
        )
    raise ValueError(f"optimizer.name={name!r} not in {OPTIMIZERS}.")


def warmup_steps_for(opt_config: Any, total_steps: int) -> int:
    """Warmup updates of a run of `total_steps` updates: `warmup_steps`, or `warmup_ratio` of the
    run (rounded), clamped to the run so a short smoke run of a long recipe needs no override."""
    ratio = getattr(opt_config, "warmup_ratio", 0.0) or 0.0
    warmup = opt_config.warmup_steps or round(ratio * total_steps)
    return max(0, min(int(warmup), total_steps))


def make_optimizer(
    opt_config: Any,
    *,
    total_steps: int,
    weight_decay_mask: Callable[[Any], Any] | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optax chain described in the module docstring from ``config.optimizer``.

    Args:
      opt_config: ``config.optimizer`` with ``name, learning_rate, schedule, warmup_steps,
        min_lr_ratio, weight_decay, b1, b2, eps, max_grad_norm`` (``grad_accum_steps`` is for
        ``accumulate_gradients``). ``b1`` is the momentum for sgd/adafactor.
      total_steps: optimizer steps in the run.
      weight_decay_mask: ``params -> pytree[bool]``; defaults to ``decay_mask``.

    Returns:
      ``(tx, schedule)``: the transformation and the ``step -> lr`` function for logging.

    Raises:
      ValueError: unknown name/schedule, or ``name="adam"`` with ``weight_decay > 0`` (ambiguous
        between L2 and decoupled decay; use "adamw").
    """
    if opt_config.name == "adam" and opt_config.weight_decay > 0:
        raise ValueError('optimizer.name="adam" takes no weight_decay; use "adamw".')
    schedule = make_schedule(
        learning_rate=opt_config.learning_rate,
        schedule=opt_config.schedule,
        warmup_steps=warmup_steps_for(opt_config, total_steps),
        total_steps=total_steps,
        min_lr_ratio=opt_config.min_lr_ratio,
    )
    parts = []
    if opt_config.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(opt_config.max_grad_norm))
    parts.append(_scale_by(opt_config))
    if opt_config.weight_decay > 0:
        parts.append(
            optax.add_decayed_weights(opt_config.weight_decay, mask=weight_decay_mask or decay_mask)
        )
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts), schedule


LossAndGradFn = Callable[..., tuple[tuple[jax.Array, dict[str, jax.Array]], Any]]


def _split_microbatches(batch: Any, num_microbatches: int) -> Any:
    """``[B, ...] -> [num_microbatches, B // num_microbatches, ...]``, strided.

    Row ``i`` of microbatch ``m`` is global row ``i * num_microbatches + m``, so a batch
    sharded in contiguous blocks over devices keeps every microbatch spread over all
    devices (no resharding, no idle devices).
    """

    def _split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(
                f"Batch dim {x.shape[0]} is not divisible by num_microbatches={num_microbatches}."
            )
        x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(_split, batch)


def _accum_dtype(dtype: Any) -> Any:
    # Floats sum in (at least) float32; integer counts stay exact integers.
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else dtype


def accumulate_gradients(
    loss_and_grad_fn: LossAndGradFn,
    num_microbatches: int,
    *,
    microbatch_sharding: Any = None,
) -> LossAndGradFn:
    """Microbatches a loss-and-grad function; everything returned is a sum.

    ``loss_and_grad_fn(params, batch, *args) -> ((loss_sum, aux), grads)``, typically
    ``jax.value_and_grad(loss_fn, has_aux=True)`` where ``loss_fn`` returns the *sum* of
    per-token losses and ``aux`` a dict of sums including a denominator such as
    ``aux["token_count"]``. The returned function has the same signature and returns
    ``sum_m loss_sum_m``, ``sum_m aux_m`` and ``sum_m grads_m`` (floats accumulated in float32
    and cast back), computed with ``jax.lax.scan`` so only one microbatch's activations are live.
    The trainer then takes the mean once::

        (loss_sum, aux), grads = accumulate_gradients(vg, n)(params, batch)
        grads = jax.tree.map(lambda g: g / aux["token_count"], grads)

    Args:
      loss_and_grad_fn: function on a full batch (pytree with leading dim ``B``).
      num_microbatches: ``B`` must be divisible by it; 1 returns ``loss_and_grad_fn``.
      microbatch_sharding: optional sharding (e.g. ``sharding.batch_sharding(mesh)``) each
        microbatch is constrained to.

    Returns:
      The accumulating function. Extra ``*args`` (e.g. an RNG key) are passed unchanged to
      every microbatch; fold in a microbatch index yourself if they must differ.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches} must be >= 1.")
    if num_microbatches == 1:
        return loss_and_grad_fn

    def accumulated(params, batch, *args):
        microbatches = _split_microbatches(batch, num_microbatches)
        first = jax.tree.map(lambda x: x[0], microbatches)
        out_shape = jax.eval_shape(loss_and_grad_fn, params, first, *args)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, _accum_dtype(s.dtype)), out_shape)

        def body(acc, microbatch):
            if microbatch_sharding is not None:
                microbatch = jax.lax.with_sharding_constraint(microbatch, microbatch_sharding)
            out = loss_and_grad_fn(params, microbatch, *args)
            return jax.tree.map(lambda a, o: a + o.astype(a.dtype), acc, out), None

        total, _ = jax.lax.scan(body, zeros, microbatches)
        return jax.tree.map(lambda t, s: t.astype(s.dtype), total, out_shape)

    return accumulated
