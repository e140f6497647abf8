"""The one training loop every algorithm runs on, with the train state and the jitted step.

A trainer hands `run_training` one of two things:

- offline algorithms (SFT, reward model, DPO family): a *loss function*
  `(params, batch, frozen, rng) -> (loss_sum, aux)` turned into a jitted
  `(state, batch, frozen) -> (state, metrics)` by `make_train_step`; `train_offline` does all of it;
- online algorithms (PPO, GRPO): an *iteration* `(state, prompt_batch) -> (state, metrics)` that
  rolls out, scores, computes advantages and runs its updates (each one a `make_train_step` step),
  plus any host-side state to checkpoint with it (e.g. the adaptive KL controller).

Either way the loop owns resume, preemption saves, the non-finite stop, evaluation, logging and
export, so every algorithm gets all of them.

`aux` is `{"denominator": n, "metrics": {name: sum}}` (plus optional `"counts"`, logged as they
are, and `"weighted"`: `{name: (sum, weight)}`, logged as `sum / weight`): sums are accumulated over
microbatches and divided once, so accumulation and sharding never bias a mean (Tunix
`WeightedMetric` style).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxalign import checkpoint as ckpt
from jaxalign import hub
from jaxalign import sharding as shd
from jaxalign.metrics import MetricWriter
from jaxalign.models import Transformer
from jaxalign.optim import accumulate_gradients, make_optimizer
from jaxalign.run_summary import compile_seconds, startup_summary
from jaxalign.trainers import common
from jaxalign.trainers.setup import RunSetup, abstract_params

logger = logging.getLogger(__name__)

Params = Any
Batch = dict[str, jax.Array]
LossFn = Callable[[Params, Batch, Any, jax.Array], tuple[jax.Array, dict[str, Any]]]
Iteration = Callable[[Any, dict[str, np.ndarray]], tuple[Any, dict[str, Any]]]


class HostState(Protocol):
    """Host-side training state an online iteration keeps between steps (checkpointed as JSON)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training and is checkpointed."""

    step: jax.Array
    params: Params
    opt_state: Any
    rng: jax.Array
    skipped_steps: jax.Array
    consecutive_nonfinite: jax.Array


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
    # `model` may also be a pytree of boxed abstract params (several models in one state, e.g.
    # PPO's, or LoRA's trainable adapters).
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


def _weighted_means(aux: dict[str, Any]) -> dict[str, jax.Array]:
    return {
        name: total / jnp.maximum(weight, 1e-8)
        for name, (total, weight) in aux.get("weighted", {}).items()
    }


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    grad_accum_steps: int,
    schedule: optax.Schedule,
) -> Callable[[TrainState, Batch, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """`(state, batch, frozen) -> (state, metrics)`: one optimizer step, skipped if non-finite.

    The gradient is `∇ Σ loss / denominator`. A non-finite loss, gradient or *update* (e.g. a
    learning rate that overflows, or Adam with eps=0 dividing 0 by 0) leaves params and optimizer
    state unchanged and counts in `skipped_steps` / `consecutive_nonfinite`, so params never go
    non-finite and neither does any checkpoint of them.
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
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(updates)
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
            **_weighted_means(aux),
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


def _global_count(local: int) -> int:
    """A per-process count summed over all processes (each holds a different slice)."""
    if jax.process_count() == 1:
        return local
    return int(multihost_utils.process_allgather(np.int64(local)).sum())


def run_training(
    *,
    config: ml_collections.ConfigDict,
    workdir: Path,
    mesh: Mesh,
    state: TrainState,
    state_shardings: TrainState,
    train_iterator: Any,
    train_step: Callable | None = None,
    frozen: Any = None,
    iteration: Iteration | None = None,
    host_state: HostState | None = None,
    eval_step: Callable | None = None,
    eval_batches: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None,
    tokens_per_batch: Callable[[dict[str, np.ndarray]], int] | None = None,
    export: Callable[[Params, Path], None] | None = None,
) -> RunResult:
    """The loop: restore → (batch → step or iteration → log → eval → checkpoint)* → export.

    Exactly one of `train_step` (jitted `(state, sharded_batch, frozen) -> (state, metrics)`) and
    `iteration` (`(state, local_batch) -> (state, metrics)`, online RL) drives each loop step.
    Resumes from the newest checkpoint in `workdir/checkpoints` (state, data position and
    `host_state`). A SIGTERM saves and exits; `train.max_consecutive_nonfinite` non-finite
    optimizer steps stop the run with a checkpoint of the last good state.
    """
    if (train_step is None) == (iteration is None):
        raise ValueError("run_training needs exactly one of train_step and iteration")
    if iteration is None:

        def iteration(state, local_batch):
            return train_step(state, shd.shard_batch(local_batch, mesh), frozen)

    # Steps (and an online iteration's rollout and scoring) are traced with the mesh and the
    # activation rules in context, so the model's activation sharding constraints apply.
    iteration = shd.in_activation_context(iteration, mesh, config.mesh.logical_rules)
    if eval_step is not None:
        eval_step = shd.in_activation_context(eval_step, mesh, config.mesh.logical_rules)

    train_cfg = config.train
    checkpointer = ckpt.Checkpointer(
        workdir / "checkpoints",
        save_every=train_cfg.checkpoint_every,
        keep=train_cfg.keep_checkpoints,
        async_save=train_cfg.async_checkpoint,
        # Refuses (RunMismatchError) a workdir holding another run's checkpoints, before
        # config.json or anything else there is overwritten.
        identity=ckpt.run_identity(config, state),
    )
    config_json = json.loads(config.to_json_best_effort())
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config_json, indent=2))
    step = 0
    if checkpointer.latest_step() is not None:
        abstract = ckpt.abstract_with_shardings(state, state_shardings)
        # The newest checkpoint that verifies (files, finite values); bad ones are set aside.
        restored = checkpointer.restore(abstract_state=abstract)
        state = restored.state
        train_iterator.load_state_dict(restored.data_state["iterator"])
        if host_state is not None:
            host_state.load_state_dict(restored.data_state["host"])
        step = restored.step
        num_tokens = int(restored.data_state.get("num_tokens", 0))
        logger.info("resumed from step %d in %s", step, workdir)
    else:
        num_tokens = 0  # cumulative tokens trained on (all processes), TRL's `num_tokens`

    if jax.process_index() == 0:
        summary = startup_summary(
            config=config,
            mesh=mesh,
            params=state.params,
            frozen=frozen,
            train_iterator=train_iterator,
            workdir=workdir,
            start_step=step,
        )
        logger.info("%s", summary)
    wandb = None
    if train_cfg.wandb_project:
        wandb = {
            "project": train_cfg.wandb_project,
            "mode": train_cfg.wandb_mode,
            "config": config_json,
        }
    writer = MetricWriter(workdir, total_steps=train_cfg.num_steps, wandb=wandb)
    preemption = ckpt.install_preemption_handler()
    last_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    stopped_early = None
    evaluated_at = None
    shapes_seen: set[tuple] = set()
    batches_per_epoch = getattr(train_iterator, "batches_per_epoch", None)

    def save(force: bool) -> None:
        data_state = {"iterator": train_iterator.state_dict()}
        if tokens_per_batch is not None:
            data_state["num_tokens"] = num_tokens
        if host_state is not None:
            data_state["host"] = host_state.state_dict()
        checkpointer.save(step, state=state, data_state=data_state, config=config_json, force=force)

    def run_eval() -> dict[str, float]:
        metrics = evaluate(eval_step, state.params, frozen, eval_batches(), mesh)
        writer.write(step, metrics)
        return metrics

    can_eval = eval_step is not None and eval_batches is not None
    try:
        while step < train_cfg.num_steps:
            local_batch = next(train_iterator)
            signature = tuple(sorted((k, v.shape) for k, v in local_batch.items()))
            new_shapes = signature not in shapes_seen
            if new_shapes:
                shapes_seen.add(signature)
                compiled_before, started = compile_seconds(), time.perf_counter()
            if tokens_per_batch is not None:
                num_tokens += _global_count(tokens_per_batch(local_batch))
            state, metrics = iteration(state, local_batch)
            if new_shapes:  # the call returns once compiled (the step itself runs async)
                logger.info(
                    "step %d: compiled for batch shapes %s in %.1f s (%.1f s wall)",
                    step + 1,
                    {k: tuple(shape) for k, shape in signature},
                    compile_seconds() - compiled_before,
                    time.perf_counter() - started,
                )
            step += 1
            if step % train_cfg.log_every == 0 or step == train_cfg.num_steps:
                last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if tokens_per_batch is not None:
                    last_metrics["num_tokens"] = float(num_tokens)
                if batches_per_epoch:
                    last_metrics["epoch"] = step / batches_per_epoch
                last_metrics = writer.write(step, last_metrics) or last_metrics
            # Checked every step, not only at log steps: a run of bad steps shorter than
            # log_every must still stop it (one scalar sync per step).
            if (
                int(jax.device_get(state.consecutive_nonfinite))
                >= train_cfg.max_consecutive_nonfinite
            ):
                stopped_early = (
                    f"{train_cfg.max_consecutive_nonfinite} consecutive non-finite steps"
                )
            if can_eval and train_cfg.eval_every and step % train_cfg.eval_every == 0:
                eval_metrics, evaluated_at = run_eval(), step
            if preemption.should_stop(step):
                stopped_early = "preemption signal"
            if stopped_early:
                save(force=True)
                logger.warning("stopping at step %d: %s", step, stopped_early)
                break
            save(force=step == train_cfg.num_steps)
        if can_eval and not stopped_early and evaluated_at != step:
            eval_metrics = run_eval()
    finally:
        checkpointer.wait_until_finished()
        checkpointer.close()
        preemption.uninstall()
        writer.close()

    export_dir = None
    if export is not None and train_cfg.export_hf and not stopped_early:
        export_dir = workdir / "hf"
        export(state.params, export_dir)
        if jax.process_index() == 0:
            hub.write_model_card(export_dir, config_json, {**last_metrics, **eval_metrics})
            if train_cfg.push_to_hub:
                hub.push_to_hub(export_dir, train_cfg.push_to_hub)
    return RunResult(
        state=state,
        last_metrics=last_metrics,
        eval_metrics=eval_metrics,
        checkpoint_dir=workdir / "checkpoints",
        export_dir=export_dir,
        stopped_early=stopped_early,
    )


def jitted_update_step(
    config: ml_collections.ConfigDict,
    setup: RunSetup,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    state_shardings: TrainState,
    *,
    frozen: Any = None,
    frozen_shardings: Any = None,
    key: str = "",
) -> tuple[Callable, Any, LossFn]:
    """`(jitted step, what it takes as `frozen`, the loss it runs)` for every trainer.

    With LoRA the loss sees trainable ∪ frozen base params (under `params[key]` when the state
    holds several models) and the base travels beside `frozen` (`RunSetup.bind_frozen`).
    """
    loss_fn, frozen, frozen_shardings = setup.bind_frozen(
        loss_fn, frozen, frozen_shardings, key=key
    )
    step = make_train_step(
        loss_fn, tx, grad_accum_steps=config.optimizer.grad_accum_steps, schedule=schedule
    )
    return jit_train_step(step, state_shardings, setup.mesh, frozen_shardings), frozen, loss_fn


def train_offline(
    config: ml_collections.ConfigDict,
    workdir: Path,
    setup: RunSetup,
    *,
    loss_fn: LossFn,
    train_data: Any,
    eval_data: Any = None,
    frozen: Any = None,
    frozen_shardings: Any = None,
    tokens_per_batch: Callable[[dict[str, np.ndarray]], int] | None = None,
) -> RunResult:
    """An offline algorithm end to end: optimizer, state, jitted step, then `run_training`."""
    common.resolve_num_steps(config, len(train_data.examples))
    tx, schedule = make_optimizer(config.optimizer, total_steps=config.train.num_steps)
    state, state_shardings = create_train_state(
        setup.params,
        setup.param_shardings,
        setup.boxed_params,
        tx,
        setup.mesh,
        setup.rules,
        seed=config.seed,
    )
    train_step, frozen, loss_fn = jitted_update_step(
        config,
        setup,
        loss_fn,
        tx,
        schedule,
        state_shardings,
        frozen=frozen,
        frozen_shardings=frozen_shardings,
    )
    return run_training(
        config=config,
        workdir=workdir,
        mesh=setup.mesh,
        state=state,
        state_shardings=state_shardings,
        train_step=train_step,
        frozen=frozen,
        train_iterator=common.train_iterator(train_data, config),
        eval_step=jax.jit(make_eval_step(loss_fn)),
        eval_batches=common.eval_batches_fn(eval_data, config),
        tokens_per_batch=tokens_per_batch,
        export=setup.exporter(config),
    )
