"""The pieces every trainer shares: mesh, models on the mesh, train state, the jitted step, the loop.

A trainer supplies a *loss function* `(params, batch, frozen, rng) -> (loss_sum, aux)` where `aux`
is `{"denominator": n, "metrics": {name: sum}}` (plus optional `"counts"`, logged as they are):
sums are accumulated over microbatches and divided once, so accumulation and sharding never bias
a mean (Tunix `WeightedMetric` style).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from jaxalign import checkpoint as ckpt
from jaxalign import sharding as shd
from jaxalign.config import resolve_mesh_shape
from jaxalign.metrics import MetricWriter
from jaxalign.models import (
    ModelConfig,
    Transformer,
    from_hf_config,
    from_pretrained,
    load_tokenizer,
)
from jaxalign.models.hf import read_hf_config, resolve_checkpoint_dir
from jaxalign.optim import accumulate_gradients

logger = logging.getLogger(__name__)

Params = Any
Batch = dict[str, jax.Array]
LossFn = Callable[[Params, Batch, Any, jax.Array], tuple[jax.Array, dict[str, Any]]]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training and is checkpointed."""

    step: jax.Array
    params: Params
    opt_state: Any
    rng: jax.Array
    skipped_steps: jax.Array
    consecutive_nonfinite: jax.Array


# ----------------------------------------------------------------------------- mesh and models


def make_mesh(
    mesh_config: ml_collections.ConfigDict, *, devices: list[jax.Device] | None = None
) -> Mesh:
    """The `config.mesh` mesh over `devices` (default: all of `jax.devices()`)."""
    devices = jax.devices() if devices is None else list(devices)
    dcn = tuple(mesh_config.dcn_shape) or None
    # With dcn_shape, mesh.shape is the per-slice (ICI) shape.
    shape = resolve_mesh_shape(tuple(mesh_config.shape), len(devices) // math.prod(dcn or (1,)))
    return shd.make_mesh(
        shape=shape, axis_names=tuple(mesh_config.axis_names), devices=devices, dcn_shape=dcn
    )


def model_config_for(
    model_cfg: ml_collections.ConfigDict, *, name_or_path: str = "", head: str = "lm"
) -> ModelConfig:
    """The `ModelConfig` of a HF checkpoint (or of `model.init` for random init) with run settings."""
    run_settings = dict(
        dtype=model_cfg.dtype,
        param_dtype=model_cfg.param_dtype,
        remat_policy=model_cfg.remat_policy,
        scan_layers=model_cfg.scan_layers,
        attention_impl=model_cfg.attention_impl,
    )
    if name_or_path:
        config = from_hf_config(
            read_hf_config(resolve_checkpoint_dir(name_or_path)), **run_settings
        )
        return config.replace(head=head)
    return ModelConfig(**model_cfg.init.to_dict(), **run_settings, head=head)


def abstract_params(model: Transformer) -> Any:
    """Boxed (logically partitioned) parameter shapes, without allocating anything."""
    dummy = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy)["params"])


def load_model(
    model_cfg: ml_collections.ConfigDict,
    mesh: Mesh,
    rules: Any,
    *,
    name_or_path: str = "",
    head: str = "lm",
    seed: int = 0,
) -> tuple[Transformer, Params, Any]:
    """(model, params, param_shardings): HF weights streamed into their shardings, or random init."""
    model = Transformer(model_config_for(model_cfg, name_or_path=name_or_path, head=head))
    shardings = shd.param_shardings(abstract_params(model), mesh, rules)
    if name_or_path:
        settings = model.config
        _, params = from_pretrained(
            name_or_path,
            dtype=jnp.dtype(settings.dtype),
            param_dtype=jnp.dtype(settings.param_dtype),
            head=head,
            shardings=shardings,
            seed=seed,
            remat_policy=settings.remat_policy,
            scan_layers=settings.scan_layers,
            attention_impl=settings.attention_impl,
        )
    else:
        dummy = jnp.zeros((1, 1), jnp.int32)
        params, shardings = shd.init_sharded(
            lambda rng: model.init(rng, dummy)["params"], mesh, rules, jax.random.PRNGKey(seed)
        )
    return model, params, shardings


def load_run_tokenizer(config: ml_collections.ConfigDict, model: Transformer):
    path = config.tokenizer or config.model.name_or_path
    if not path:
        raise ValueError("config.tokenizer is required when config.model.name_or_path is empty")
    tokenizer = load_tokenizer(path)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer {path} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model.config.vocab_size} (config.model.init.vocab_size)"
        )
    return tokenizer


def with_special_tokens(model: Transformer, tokenizer: Any) -> Transformer:
    """Records the tokenizer's bos/eos/pad ids in the model config (they go into config.json)."""
    return Transformer(
        model.config.replace(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


# ----------------------------------------------------------------------------- state and step


def create_train_state(
    params: Params,
    param_shardings: Any,
    model: Transformer,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Any,
    *,
    seed: int,
) -> tuple[TrainState, TrainState]:
    """Sharded `TrainState` and its matching pytree of shardings."""
    # `model` may also be a pytree of boxed abstract params (several models in one state, e.g. PPO).
    boxed = abstract_params(model) if isinstance(model, Transformer) else model
    opt_shardings = shd.param_shardings(jax.eval_shape(tx.init, boxed), mesh, rules)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    replicated = shd.replicated(mesh)
    state_shardings = TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=opt_shardings,
        rng=replicated,
        skipped_steps=replicated,
        consecutive_nonfinite=replicated,
    )
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=opt_state,
        rng=jax.random.PRNGKey(seed),
        skipped_steps=jnp.zeros((), jnp.int32),
        consecutive_nonfinite=jnp.zeros((), jnp.int32),
    )
    return jax.device_put(state, state_shardings), state_shardings


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    grad_accum_steps: int,
    schedule: optax.Schedule,
) -> Callable[[TrainState, Batch, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """`(state, batch, frozen) -> (state, metrics)`: one optimizer step, skipped if non-finite.

    The gradient is `∇ Σ loss / denominator`. A non-finite loss or gradient leaves params and
    optimizer state unchanged and counts in `skipped_steps` / `consecutive_nonfinite`.
    """

    def train_step(state: TrainState, batch: Batch, frozen: Any):
        rng, step_rng = jax.random.split(state.rng)

        def summed_loss(params, microbatch):
            return loss_fn(params, microbatch, frozen, step_rng)

        value_and_grad = jax.value_and_grad(summed_loss, has_aux=True)
        (loss_sum, aux), grads = accumulate_gradients(value_and_grad, grad_accum_steps)(
            state.params, batch
        )
        denominator = jnp.maximum(aux["denominator"], 1e-8)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        loss = loss_sum / denominator
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1,
            params=keep_new(new_params, state.params),
            opt_state=keep_new(new_opt_state, state.opt_state),
            rng=rng,
            skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
            consecutive_nonfinite=jnp.where(finite, 0, state.consecutive_nonfinite + 1),
        )
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            # Skipped steps do not advance the optimizer's count, so neither does its schedule.
            "learning_rate": schedule(state.step - state.skipped_steps),
            "skipped_steps": new_state.skipped_steps,
            **{name: value / denominator for name, value in aux["metrics"].items()},
            **aux.get("counts", {}),
        }
        return new_state, metrics

    return train_step


def make_eval_step(loss_fn: LossFn) -> Callable[[Params, Batch, Any], dict[str, jax.Array]]:
    """Sums of the loss and metrics over one batch (the caller divides by the summed denominator)."""

    def eval_step(params: Params, batch: Batch, frozen: Any):
        loss_sum, aux = loss_fn(params, batch, frozen, jax.random.PRNGKey(0))
        return {"loss": loss_sum, "denominator": aux["denominator"], **aux["metrics"]}

    return eval_step


def jit_train_step(train_step, state_shardings, mesh: Mesh, frozen_shardings: Any):
    batch_sharding = shd.batch_sharding(mesh)
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding, frozen_shardings),
        out_shardings=(state_shardings, shd.replicated(mesh)),
        donate_argnums=(0,),
    )


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class RunResult:
    state: TrainState
    last_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    checkpoint_dir: Path
    export_dir: Path | None
    stopped_early: str | None = None


def evaluate(
    eval_step, params: Params, frozen: Any, batches: Iterator[dict[str, np.ndarray]], mesh: Mesh
) -> dict[str, float]:
    totals: dict[str, float] = {}
    for local_batch in batches:
        sums = jax.device_get(eval_step(params, shd.shard_batch(local_batch, mesh), frozen))
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    denominator = max(totals.pop("denominator", 0.0), 1e-8)
    return {f"eval/{name}": value / denominator for name, value in totals.items()}


def run_training(
    *,
    config: ml_collections.ConfigDict,
    workdir: Path,
    mesh: Mesh,
    state: TrainState,
    state_shardings: TrainState,
    train_step: Callable,
    frozen: Any,
    train_iterator: Any,
    eval_step: Callable | None = None,
    eval_batches: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None,
    tokens_per_batch: Callable[[dict[str, np.ndarray]], int] | None = None,
    export: Callable[[Params, Path], None] | None = None,
) -> RunResult:
    """Plain loop: restore → (batch → step → log → eval → checkpoint)* → export.

    Resumes from the newest checkpoint in `workdir/checkpoints` (state and data position). A
    SIGTERM saves and exits; `train.max_consecutive_nonfinite` non-finite steps stop the run with
    a checkpoint of the last good state.
    """
    train_cfg = config.train
    checkpointer = ckpt.Checkpointer(
        workdir / "checkpoints",
        save_every=train_cfg.checkpoint_every,
        keep=train_cfg.keep_checkpoints,
        async_save=train_cfg.async_checkpoint,
    )
    config_json = json.loads(config.to_json_best_effort())
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config_json, indent=2))
    latest = checkpointer.latest_step()
    if latest is not None:
        abstract = ckpt.abstract_with_shardings(state, state_shardings)
        restored = checkpointer.restore(latest, abstract_state=abstract)
        state = restored.state
        train_iterator.load_state_dict(restored.data_state["iterator"])
        logger.info("resumed from step %d in %s", latest, workdir)

    writer = MetricWriter(workdir, total_steps=train_cfg.num_steps)
    preemption = ckpt.install_preemption_handler()
    step = int(jax.device_get(state.step))
    last_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    stopped_early = None
    evaluated_at = None
    window_tokens, window_start = 0, time.perf_counter()
    shapes_seen: set[tuple] = set()

    def save(force: bool) -> None:
        checkpointer.save(
            step,
            state=state,
            data_state={"iterator": train_iterator.state_dict()},
            config=config_json,
            force=force,
        )

    try:
        while step < train_cfg.num_steps:
            local_batch = next(train_iterator)
            signature = tuple(sorted((k, v.shape) for k, v in local_batch.items()))
            if signature not in shapes_seen:
                shapes_seen.add(signature)
                logger.info("compiling the train step for batch shapes %s", dict(signature))
            window_tokens += tokens_per_batch(local_batch) if tokens_per_batch else 0
            state, metrics = train_step(state, shd.shard_batch(local_batch, mesh), frozen)
            step += 1
            if step % train_cfg.log_every == 0 or step == train_cfg.num_steps:
                last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - window_start
                last_metrics["tokens_per_s"] = (
                    window_tokens * jax.process_count() / max(elapsed, 1e-9)
                )
                writer.write(step, last_metrics)
                window_tokens, window_start = 0, time.perf_counter()
            # Checked every step, not only at log steps: a run of bad steps shorter than
            # log_every must still stop it (one scalar sync per step).
            if (
                int(jax.device_get(state.consecutive_nonfinite))
                >= train_cfg.max_consecutive_nonfinite
            ):
                stopped_early = (
                    f"{train_cfg.max_consecutive_nonfinite} consecutive non-finite steps"
                )
            if eval_step is not None and eval_batches is not None and train_cfg.eval_every:
                if step % train_cfg.eval_every == 0:
                    eval_metrics = evaluate(eval_step, state.params, frozen, eval_batches(), mesh)
                    writer.write(step, eval_metrics)
                    evaluated_at = step
            if preemption.should_stop(step):
                stopped_early = "preemption signal"
            if stopped_early:
                save(force=True)
                logger.warning("stopping at step %d: %s", step, stopped_early)
                break
            save(force=step == train_cfg.num_steps)
        final_eval = not stopped_early and evaluated_at != step
        if final_eval and eval_step is not None and eval_batches is not None:
            eval_metrics = evaluate(eval_step, state.params, frozen, eval_batches(), mesh)
            writer.write(step, eval_metrics)
    finally:
        checkpointer.wait_until_finished()
        checkpointer.close()
        preemption.uninstall()
        writer.close()

    export_dir = None
    if export is not None and train_cfg.export_hf and not stopped_early:
        export_dir = workdir / "hf"
        export(state.params, export_dir)
    return RunResult(
        state=state,
        last_metrics=last_metrics,
        eval_metrics=eval_metrics,
        checkpoint_dir=workdir / "checkpoints",
        export_dir=export_dir,
        stopped_early=stopped_early,
    )
