"""Orbax checkpoints of the train state plus JSON side items, and preemption handling.

A checkpoint step directory holds three items and a manifest::

    <directory>/<step>/state/       # any pytree of jax.Arrays (params, opt_state, step, rng)
    <directory>/<step>/data_state/  # JSON: data iterator position
    <directory>/<step>/config/      # JSON: the run's config
    <directory>/<step>/jaxalign_manifest.json  # sizes + CRC-32 of the files, the run identity

Saves are atomic: orbax writes ``<step>.orbax-checkpoint-tmp*`` and renames it (local disks)
or writes a commit marker (``gs://``); the manifest is written just before that commit, so a
committed step always has one (see ``jaxalign.integrity``). A save killed midway leaves earlier
steps restorable and is ignored (and, here, cleaned up) when the directory is reopened.

Restores verify: ``restore()`` checks the newest step against its manifest and that the restored
values are finite; a bad step is logged (which step, which file, why), set aside as
``<step>.bad-<time>`` and the next older one is tried. Old steps are deleted only once ``keep``
newer ones have been committed with their manifests, so the last good checkpoint survives any
number of failed or corrupt newer ones. A failed background save raises
``CheckpointSaveError`` (naming the directory) from the next ``save``/``wait_until_finished``.

Restores are topology-free: ``restore(..., abstract_state=...)`` takes
``jax.ShapeDtypeStruct(shape, dtype, sharding=target)`` leaves, so a checkpoint written on
an 8-device mesh restores onto 1 device and vice versa.

Loop sketch::

    ckpt = Checkpointer(workdir / "ckpt", save_every=1000, keep=3,
                        identity=run_identity(config, state))  # refuses another run's directory
    if ckpt.latest_step() is not None:
        state = ckpt.restore(abstract_state=abstract_with_shardings(state, shardings)).state
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
import time
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jaxalign import integrity
from jaxalign.integrity import MANIFEST_NAME, IntegrityError

_ITEMS = ("state", "data_state", "config")
_FRESH_START = "use a new --workdir for this run, or delete {directory} to start over"


class CheckpointError(RuntimeError):
    """A checkpoint problem the user must act on; the message is one line naming what and where."""


class CheckpointCorruptError(CheckpointError):
    """One checkpoint step failed verification (manifest, files, or non-finite values)."""

    def __init__(self, step: int, directory: Any, reason: str):
        self.step, self.reason = step, reason
        super().__init__(f"checkpoint step {step} in {directory} is bad: {reason}")


class NoIntactCheckpointError(CheckpointError):
    """Checkpoints exist but none verifies."""


class CheckpointSaveError(CheckpointError):
    """A save failed (in the background, for async saves); training cannot go on safely."""


class RunMismatchError(CheckpointError):
    """The directory holds checkpoints of a run with another identity (algorithm, model, data...)."""


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


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def run_identity(config: Any, state: Any) -> dict[str, Any]:
    """The identity a resumed run must match (see ``jaxalign.integrity.run_identity``).

    Args:
      config: the run's ``ConfigDict`` (or dict / JSON string).
      state: the train state (its ``.params`` are used; a bare params pytree works too).
    """
    return integrity.run_identity(_to_json(config), getattr(state, "params", state))


@jax.jit
def _all_finite_per_leaf(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths (``params/embed/embedding``) of the floating-point leaves holding a NaN or inf."""
    named = [
        (integrity.path_name(path), x)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
    ]
    if not named:
        return []
    if all(isinstance(x, np.ndarray) for _, x in named):
        finite = [bool(np.isfinite(x).all()) for _, x in named]
    else:
        finite = np.asarray(jax.device_get(_all_finite_per_leaf([x for _, x in named])))
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


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
    """Keeps the last ``keep`` verified checkpoints, one every ``save_every`` steps."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep: int | None,
        async_save: bool = True,
        identity: dict[str, Any] | None = None,
        read_only: bool = False,
    ):
        """Opens (creating if needed) a checkpoint directory.

        Args:
          directory: local path or ``gs://`` URL.
          save_every: ``save`` writes only at steps divisible by this (unless forced).
          keep: how many most recent verified checkpoints to keep; ``None`` keeps all.
          async_save: write in a background thread after the device-to-host copy.
          identity: this run's ``run_identity``; stored with every save, and checked here
            against the newest checkpoint already in ``directory``.
          read_only: never create, delete or set aside anything (e.g. for exports).

        Raises:
          RunMismatchError: ``directory`` holds checkpoints of a run with another identity.
          CheckpointSaveError: ``directory`` cannot be created.
        """
        if save_every < 1:
            raise ValueError(f"save_every={save_every} must be >= 1.")
        if keep is not None and keep < 1:
            raise ValueError(f"keep={keep} must be >= 1 or None.")
        self.directory = _as_path(directory)
        self._keep = keep
        self._async_save = async_save
        self._identity = identity
        self._read_only = read_only
        self._pending_step: int | None = None  # the save in flight, until it is known committed
        self._save_error: CheckpointSaveError | None = None
        self._verified: set[int] = set()
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # Steps divisible by save_every, plus JAX's multi-host preemption sync step; unlike
            # orbax's default, not also "the first step seen".
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(save_every), policies.PreemptionCheckpointingPolicy()]
            ),
            # Pruned here (`_prune`), only once newer checkpoints are committed with manifests;
            # orbax's max_to_keep deletes as soon as a save starts.
            max_to_keep=None,
            # Always orbax's async path, so the manifest is written by its pre-commit callback;
            # synchronous saves wait for it at once.
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(
                # Directories are created in the calling thread: an unwritable directory then
                # fails `save` at once, instead of leaving threads that wait forever for a
                # "directory created" signal (the process could not exit).
                create_directories_asynchronously=False,
                post_finalization_callback=self._write_manifest,
            ),
            cleanup_tmp_directories=not read_only,  # remove leftovers of saves killed midway
            create=not read_only,
            read_only=read_only,
        )
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=_ITEMS
            )
        except OSError as error:
            raise CheckpointSaveError(
                f"cannot use checkpoint directory {self.directory}: {_one_line(error)}"
            ) from error
        if identity is not None:
            self.check_resumable()

    # ------------------------------------------------------------------------- saving

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

        A state with non-finite values is not saved (logged): it would displace good
        checkpoints with one that cannot be resumed.

        Args:
          step: training step the state belongs to.
          state: pytree of ``jax.Array`` (params, opt_state, step, rng keys, ...).
          data_state: JSON-able dict, e.g. the data iterator position.
          config: dict, ``ConfigDict`` or JSON string of the run's config.
          force: save even if ``step`` is not a multiple of ``save_every`` (e.g. preemption,
            end of training).

        Returns:
          True if a checkpoint for ``step`` is being written.

        Raises:
          CheckpointSaveError: this save, or the previous background one, failed.
        """
        self._raise_if_failed()
        if not force and not self._manager.should_save(step):
            return False
        bad = nonfinite_leaves(state)
        if bad:
            logging.error(
                "Not saving checkpoint step %d to %s: non-finite values in %s; the earlier "
                "checkpoints are kept.",
                step,
                self.directory,
                ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""),
            )
            return False
        self._finish_pending_save()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_state=ocp.args.JsonSave(_to_json(data_state)),
            config=ocp.args.JsonSave(_to_json(config)),
        )
        self._pending_step = step
        try:
            saved = self._manager.save(step, args=args, force=force)
        except Exception as error:  # noqa: BLE001 - any failure: one clear error
            raise self._failed(step, error) from error
        if not saved:
            self._pending_step = None
            return False
        logging.info("Checkpoint save started: step %d -> %s", step, self.directory)
        if not self._async_save:
            self._finish_pending_save()
        return True

    def _write_manifest(self) -> None:
        """orbax's post-finalization callback: primary host, all items written, not yet committed."""
        step = self._pending_step
        if step is None:
            return
        tmp_dirs = list(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
        # A commit-marker filesystem (gs://) writes the final directory in place.
        step_dir = max(tmp_dirs, key=lambda p: p.stat().mtime) if tmp_dirs else self._step_dir(step)
        integrity.write_manifest(step_dir, step=step, identity=self._identity)

    def _finish_pending_save(self) -> None:
        """Waits for the save in flight; raises if it failed, else prunes old checkpoints."""
        step = self._pending_step
        if step is None:
            return
        try:
            self._manager.wait_until_finished()  # the manifest callback reads _pending_step
            if not (self._step_dir(step) / MANIFEST_NAME).exists():
                raise FileNotFoundError(f"step {step} was not committed with its manifest")
        except Exception as error:  # noqa: BLE001 - any failure: one clear error
            raise self._failed(step, error) from error
        finally:
            self._pending_step = None
        self._verified.add(step)
        self._prune()

    def _failed(self, step: int, error: BaseException) -> CheckpointSaveError:
        self._save_error = CheckpointSaveError(
            f"saving checkpoint step {step} to {self.directory} failed: {_one_line(error)}"
        )
        return self._save_error

    def _raise_if_failed(self) -> None:
        if self._save_error is not None:
            raise self._save_error

    def _prune(self) -> None:
        """Deletes the steps older than the ``keep`` newest that have a manifest."""
        if self._keep is None or self._read_only:
            return
        steps = self.all_steps()
        with_manifest = [s for s in steps if (self._step_dir(s) / MANIFEST_NAME).exists()]
        if len(with_manifest) <= self._keep:
            return
        oldest_kept = with_manifest[-self._keep]
        for step in steps:
            if step < oldest_kept:
                self._manager.delete(step)
                self._verified.discard(step)

    def wait_until_finished(self) -> None:
        """Blocks until any background save has been committed (and prunes old checkpoints).

        Raises:
          CheckpointSaveError: the background save failed (raised once; later calls return).
        """
        if self._save_error is None:
            self._finish_pending_save()

    def close(self) -> None:
        """Waits for pending saves and releases resources (errors as ``wait_until_finished``)."""
        try:
            self.wait_until_finished()
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 - the save error was already raised
                if self._save_error is None:
                    raise
                logging.warning(
                    "Ignoring an error while closing %s after a failed save.", self.directory
                )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------- reading

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        """Newest committed step (not necessarily intact: ``restore`` checks), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All committed steps, ascending."""
        return sorted(self._manager.all_steps())

    def verify(self, step: int) -> dict[str, Any]:
        """Checks ``step``'s files against its manifest (on process 0; the verdict is shared).

        Returns:
          The manifest (``{"identity": ..., "files": ...}``; ``{}`` on non-primary processes).

        Raises:
          CheckpointCorruptError: naming the step and the first file that does not match.
        """
        manifest, reason = {}, None
        if step in self._verified:
            return integrity.read_manifest(self._step_dir(step))
        if jax.process_index() == 0:
            try:
                manifest = integrity.verify_step_dir(self._step_dir(step))
            except (IntegrityError, OSError) as error:
                reason = str(error) if isinstance(error, IntegrityError) else _one_line(error)
        if jax.process_count() > 1:
            ok = multihost_utils.broadcast_one_to_all(np.int32(reason is None))
            if not ok and reason is None:
                reason = "failed its integrity check on process 0"
        if reason is not None:
            raise CheckpointCorruptError(step, self.directory, reason)
        self._verified.add(step)
        return manifest

    def check_resumable(self) -> None:
        """Compares this run's identity with the newest checkpoint that has a readable manifest.

        Raises:
          RunMismatchError: listing the differing keys and how to start fresh.
        """
        if self._identity is None:
            return
        for step in reversed(self.all_steps()):
            try:
                manifest = integrity.read_manifest(self._step_dir(step))
            except IntegrityError:
                continue  # restore() reports it
            stored = manifest.get("identity")
            differences = integrity.identity_differences(stored or {}, self._identity)
            if differences:
                shown = "; ".join(differences[:6])
                more = f"; and {len(differences) - 6} more" if len(differences) > 6 else ""
                raise RunMismatchError(
                    f"{self.directory} holds checkpoints of a different run (newest step {step}); "
                    f"differing: {shown}{more}; " + _FRESH_START.format(directory=self.directory)
                )
            return

    def read_config(self, step: int) -> dict[str, Any]:
        """The run config stored with ``step`` (unverified; call ``verify`` first)."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored.config or {}

    def restore(
        self,
        step: int | None = None,
        *,
        abstract_state: Any,
        partial: bool = False,
    ) -> Restored:
        """Restores ``step``, or the newest intact step, onto the shardings in ``abstract_state``.

        With ``step=None`` each step, newest first, is verified (manifest, files, finite
        values); a bad one is logged and, unless read-only, set aside as ``<step>.bad-<time>``
        (so training can save that step again), and the next older one is tried.

        Args:
          step: step to restore (verified, no fallback); None for the newest intact one.
          abstract_state: pytree of ``jax.ShapeDtypeStruct(..., sharding=...)`` matching the
            saved state's structure (see ``abstract_with_shardings``); leaves without a
            sharding restore as numpy arrays.
          partial: ``abstract_state`` names a subset of the saved state (e.g.
            ``{"params": ...}``); only that is read.

        Returns:
          ``Restored(step, state, data_state, config)``.

        Raises:
          FileNotFoundError: if there is no checkpoint at all.
          CheckpointCorruptError: ``step`` was given and is bad.
          NoIntactCheckpointError: no step is intact.
          CheckpointError: an intact step does not fit ``abstract_state`` (another run's state).
        """
        if step is not None:
            return self._restore_verified(step, abstract_state, partial)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        bad: list[CheckpointCorruptError] = []
        for candidate in reversed(steps):
            try:
                restored = self._restore_verified(candidate, abstract_state, partial)
            except CheckpointCorruptError as error:
                logging.error("%s; trying the previous checkpoint.", error)
                bad.append(error)
                continue
            self._set_aside([error.step for error in bad])
            if bad:
                logging.warning(
                    "Restored checkpoint step %d instead of the newer bad step(s) %s.",
                    candidate,
                    ", ".join(str(error.step) for error in bad),
                )
            return restored
        reasons = "; ".join(f"step {error.step}: {error.reason}" for error in bad)
        raise NoIntactCheckpointError(
            f"no intact checkpoint in {self.directory} ({reasons}); "
            + _FRESH_START.format(directory=self.directory)
        )

    def _restore_verified(self, step: int, abstract_state: Any, partial: bool) -> Restored:
        if step not in self.all_steps():
            raise FileNotFoundError(f"No checkpoint step {step} in {self.directory}.")
        self.verify(step)
        if partial:
            state_args = ocp.args.PyTreeRestore(
                item=abstract_state,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
                partial_restore=True,
            )
        else:
            state_args = ocp.args.StandardRestore(abstract_state)
        args = ocp.args.Composite(
            state=state_args, data_state=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()
        )
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as error:  # noqa: BLE001 - files are intact: the state does not fit
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} is intact but does not restore into "
                f"this run's state ({_one_line(error)}); "
                + _FRESH_START.format(directory=self.directory)
            ) from error
        bad = nonfinite_leaves(restored.state)
        if bad:
            raise CheckpointCorruptError(
                step, self.directory, f"non-finite values in {', '.join(bad[:3])}"
            )
        logging.info("Restored checkpoint step %d from %s", step, self.directory)
        return Restored(
            step=step,
            state=restored.state,
            data_state=restored.data_state or {},
            config=restored.config or {},
        )

    def _set_aside(self, steps: list[int]) -> None:
        """Renames bad steps out of orbax's view (``<step>.bad-<unix time>``); never deletes."""
        if not steps or self._read_only:
            return
        if jax.process_index() == 0:
            for step in steps:
                target = self.directory / f"{step}.bad-{int(time.time())}"
                self._step_dir(step).rename(target)
                logging.warning(
                    "Moved bad checkpoint step %d to %s (delete it when no longer needed).",
                    step,
                    target,
                )
                self._verified.discard(step)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxalign_checkpoint_set_aside")
        self._manager.reload()


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
