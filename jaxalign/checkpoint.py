"""Orbax checkpoints of the train state plus JSON side items, and preemption handling.

A checkpoint step directory holds three items::

    <directory>/<step>/state/       # any pytree of jax.Arrays (params, opt_state, step, rng)
    <directory>/<step>/data_state/  # JSON: data iterator position
    <directory>/<step>/config/      # JSON: the run's config

Saves are atomic: orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it (local
disks) or writes a commit marker (``gs://``), so a save killed midway leaves earlier steps
restorable and is ignored (and, here, cleaned up) when the directory is reopened.

Restores are topology-free: ``restore(..., abstract_state=...)`` takes
``jax.ShapeDtypeStruct(shape, dtype, sharding=target)`` leaves, so a checkpoint written on
an 8-device mesh restores onto 1 device and vice versa.

Loop sketch::

    ckpt = Checkpointer(workdir / "ckpt", save_every=1000, keep=3)
    preemption = install_preemption_handler()
    for step in range(start, total_steps):
        state = train_step(state, batch)
        stop = preemption.should_stop(step)
        ckpt.save(step, state=state, data_state=data.state(), config=config, force=stop)
        if stop:
            break
    ckpt.close()
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
from collections.abc import Iterable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

_ITEMS = ("state", "data_state", "config")


@dataclasses.dataclass(frozen=True)
class Restored:
    """What ``Checkpointer.restore`` returns."""

    step: int
    state: Any
    data_state: dict[str, Any]
    config: dict[str, Any]


def _to_json(obj: Any) -> Any:
    """A JSON-ready copy of a dict, ``ConfigDict`` or JSON string (unknown types -> str)."""
    if obj is None:
        return {}
    if isinstance(obj, str):
        return json.loads(obj)
    if hasattr(obj, "to_json_best_effort"):  # ml_collections.ConfigDict
        return json.loads(obj.to_json_best_effort())
    return json.loads(json.dumps(obj, default=str))


def _as_path(directory: str | os.PathLike) -> epath.Path:
    directory = os.fspath(directory)
    return epath.Path(directory if "://" in directory else os.path.abspath(directory))


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` per leaf of ``tree`` carrying the target sharding.

    Args:
      tree: pytree of arrays or ``ShapeDtypeStruct``s (e.g. from ``jax.eval_shape``).
      shardings: matching pytree of ``jax.sharding.Sharding`` (or one sharding for all).

    Returns:
      Pytree of ``ShapeDtypeStruct`` for ``Checkpointer.restore(abstract_state=...)``.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


class Checkpointer:
    """Keeps the last ``keep`` checkpoints, one every ``save_every`` steps, under ``directory``."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep: int | None,
        async_save: bool = True,
    ):
        """Opens (creating if needed) a checkpoint directory.

        Args:
          directory: local path or ``gs://`` URL.
          save_every: ``save`` writes only at steps divisible by this (unless forced).
          keep: how many most recent checkpoints to keep; ``None`` keeps all.
          async_save: write in a background thread after the device-to-host copy.
        """
        if save_every < 1:
            raise ValueError(f"save_every={save_every} must be >= 1.")
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # Steps divisible by save_every, plus JAX's multi-host preemption sync step; unlike
            # orbax's default, not also "the first step seen".
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(save_every), policies.PreemptionCheckpointingPolicy()]
            ),
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # remove leftovers of saves killed midway
            create=True,
        )
        self.directory = _as_path(directory)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def save(
        self,
        step: int,
        *,
        state: Any,
        data_state: dict[str, Any] | None = None,
        config: Any = None,
        force: bool = False,
    ) -> bool:
        """Saves if ``step`` is due (or ``force``); returns whether a save started.

        Args:
          step: training step the state belongs to.
          state: pytree of ``jax.Array`` (params, opt_state, step, rng keys, ...).
          data_state: JSON-able dict, e.g. the data iterator position.
          config: dict, ``ConfigDict`` or JSON string of the run's config.
          force: save even if ``step`` is not a multiple of ``save_every`` (e.g. preemption,
            end of training).

        Returns:
          True if a checkpoint for ``step`` is being written.
        """
        if not force and not self._manager.should_save(step):
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_state=ocp.args.JsonSave(_to_json(data_state)),
            config=ocp.args.JsonSave(_to_json(config)),
        )
        saved = self._manager.save(step, args=args, force=force)
        if saved:
            logging.info("Checkpoint save started: step %d -> %s", step, self.directory)
        return saved

    def latest_step(self) -> int | None:
        """Newest fully written step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All fully written steps, ascending."""
        return sorted(self._manager.all_steps())

    def restore(self, step: int | None = None, *, abstract_state: Any) -> Restored:
        """Restores ``step`` (default: latest) onto the shardings in ``abstract_state``.

        Args:
          step: step to restore; None for ``latest_step()``.
          abstract_state: pytree of ``jax.ShapeDtypeStruct(..., sharding=...)`` matching the
            saved state's structure (see ``abstract_with_shardings``).

        Returns:
          ``Restored(step, state, data_state, config)``.

        Raises:
          FileNotFoundError: if there is no checkpoint to restore.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_state=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        restored = self._manager.restore(step, args=args)
        logging.info("Restored checkpoint step %d from %s", step, self.directory)
        return Restored(
            step=step,
            state=restored.state,
            data_state=restored.data_state or {},
            config=restored.config or {},
        )

    def wait_until_finished(self) -> None:
        """Blocks until any background save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PreemptionHandler:
    """Records a preemption notice; the training loop saves and exits on its own.

    Single process (or multi-process without JAX's preemption service): a Python signal
    handler sets ``requested``; it never exits or raises. Multi-process with the service
    (``jax.distributed`` initialized, ``jax_enable_preemption_service``, the default): JAX's
    runtime already catches SIGTERM and agrees on a step for all hosts, so no Python handler
    is installed and ``should_stop(step)`` asks
    ``multihost_utils.reached_preemption_sync_point`` (all hosts must call it every step).
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,)):
        self.requested = False
        self._previous: dict[int, Any] = {}
        self._multihost = jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)
        if not self._multihost:
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        del frame
        logging.warning("Received signal %d: will checkpoint and stop at the next step.", signum)
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """True once a preemption was requested (and, multi-process, all hosts reached ``step``)."""
        if self._multihost and multihost_utils.reached_preemption_sync_point(step):
            self.requested = True
        return self.requested

    def uninstall(self) -> None:
        """Puts back the signal handlers that were there before."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def install_preemption_handler(*, signals: Iterable[int] = (signal.SIGTERM,)) -> PreemptionHandler:
    """Installs a ``PreemptionHandler`` (main thread only) and returns it.

    Args:
      signals: signals treated as a preemption notice.

    Returns:
      The handler; poll ``handler.should_stop(step)`` (or ``handler.requested``) each step.
    """
    return PreemptionHandler(signals)
