"""Training metrics: JSONL + TensorBoard (+ Weights & Biases) + a tqdm bar, and a recompilation
tracer.

``MetricWriter.write(step, scalars)`` is the only place device scalars are pulled to the
host: call it every ``log_every`` steps with the (still on-device) scalars and it does one
``jax.device_get`` for the whole dict.

One rate is added to every record after the first: ``tokens_per_sec`` if ``scalars`` has
``num_tokens`` (a *cumulative* token count, as TRL logs it; the writer differences it between
writes, so the trainer keeps a running sum only), else ``steps_per_sec``.
The bar shows the algorithm's key metrics (``PROGRESS_KEYS``, those present) and the rate.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

TOKENS_KEY = "num_tokens"
# What the progress bar shows, in this order, of the keys a record has (at most 4): SFT, DPO,
# reward model, PPO, GRPO, then evaluation.
PROGRESS_KEYS = (
    ("loss", "loss"),
    ("mean_token_accuracy", "acc"),
    ("rewards/accuracies", "acc"),
    ("rewards/margins", "margin"),
    ("accuracy", "acc"),
    ("objective/score", "score"),
    ("objective/kl", "kl"),
    ("reward", "reward"),
    ("kl", "kl"),
    ("eval/loss", "eval_loss"),
)


def _to_float(name: str, value: Any) -> float:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"Metric {name!r} is not a scalar (shape {array.shape}).")
    return float(array.reshape(()))


class MetricWriter:
    """Writes ``<workdir>/metrics.jsonl``, TensorBoard events and a progress bar (process 0)."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        total_steps: int,
        enabled: bool | None = None,
        progress_bar: bool = True,
        wandb: Mapping[str, Any] | None = None,
    ):
        """Opens the outputs (appending, so resumed runs continue the same files).

        Args:
          workdir: local directory for ``metrics.jsonl`` and ``tensorboard/``.
          total_steps: last step of the run, for the bar's ETA.
          enabled: write anything at all; default ``jax.process_index() == 0``.
          progress_bar: show a tqdm bar (stderr).
          wandb: ``{"project", "mode", "config"}`` to log to Weights & Biases as well (``mode``
            ``"offline"`` writes under ``<workdir>/wandb`` for a later ``wandb sync``); the run id
            is kept in ``<workdir>/wandb_run_id`` so a resumed run continues the same run.
        """
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.total_steps = total_steps
        self._last_step: tuple[int, float] | None = None  # (step, time) of the last write
        self._last_tokens: tuple[float, float] | None = None  # (num_tokens, time)
        self._jsonl = self._tb = self._bar = self._wandb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.jsonl_path = os.path.join(os.fspath(workdir), "metrics.jsonl")
        self._jsonl = open(self.jsonl_path, "a", buffering=1)  # closed in close()
        from tensorboardX import SummaryWriter  # heavy import: only on the writing process

        self._tb = SummaryWriter(os.path.join(os.fspath(workdir), "tensorboard"), flush_secs=30)
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
        if wandb:
            self._wandb = _start_wandb(os.fspath(workdir), wandb)

    def write(self, step: int, scalars: Mapping[str, Any]) -> dict[str, float]:
        """Logs one record; the single host sync of a log step.

        Args:
          step: current step.
          scalars: name -> scalar (jax array, numpy or Python number).

        Returns:
          The record as written (Python floats), ``{}`` when disabled.
        """
        if not self.enabled:
            return {}
        host = jax.device_get(dict(scalars))
        values = {name: _to_float(name, value) for name, value in host.items()}
        now = time.time()
        if TOKENS_KEY in values:
            if self._last_tokens is not None and now > self._last_tokens[1]:
                tokens, then = self._last_tokens
                values["tokens_per_sec"] = (values[TOKENS_KEY] - tokens) / (now - then)
            self._last_tokens = (values[TOKENS_KEY], now)
        elif self._last_step is not None and step > self._last_step[0] and now > self._last_step[1]:
            values["steps_per_sec"] = (step - self._last_step[0]) / (now - self._last_step[1])
        if self._last_step is None or step > self._last_step[0]:
            self._last_step = (step, now)

        self._jsonl.write(json.dumps({"step": int(step), "time": now, **values}) + "\n")
        for name, value in values.items():
            self._tb.add_scalar(name, value, global_step=step, walltime=now)
        if self._wandb is not None:
            self._wandb.log(values, step=int(step))
        if self._bar is not None:
            self._bar.update(max(step - self._bar.n, 0))
            self._bar.set_postfix(progress_postfix(values), refresh=True)
        return values

    def close(self) -> None:
        """Flushes and closes all outputs."""
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._jsonl = self._tb = self._bar = self._wandb = None
        self.enabled = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_postfix(values: Mapping[str, float]) -> dict[str, str]:
    """The progress bar's fields: up to 4 of ``PROGRESS_KEYS`` that ``values`` has, and the rate."""
    shown: dict[str, str] = {}
    for key, label in PROGRESS_KEYS:
        if key in values and label not in shown and len(shown) < 4:
            shown[label] = f"{values[key]:.4g}"
    if "tokens_per_sec" in values:
        shown["tok/s"] = f"{values['tokens_per_sec']:,.0f}"
    return shown


def _start_wandb(workdir: str, options: Mapping[str, Any]) -> Any:
    """A Weights & Biases run (``wandb`` is imported only here: it is an optional dependency)."""
    try:
        import wandb
    except ImportError:
        from jaxalign.config import ConfigError

        raise ConfigError(
            "config.train.wandb_project: logging to Weights & Biases needs `pip install wandb`"
        ) from None
    id_file = os.path.join(workdir, "wandb_run_id")
    if os.path.exists(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    else:
        run_id = wandb.util.generate_id()
        with open(id_file, "w") as f:
            f.write(run_id)
    return wandb.init(
        project=options["project"],
        mode=options.get("mode", "online"),
        config=dict(options.get("config") or {}),
        dir=workdir,
        id=run_id,
        name=os.path.basename(os.path.abspath(workdir)),
        resume="allow",
    )


def shape_signature(batch: Any) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """``((path, shape, dtype), ...)`` for every leaf of ``batch``: what jit specializes on."""
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    return tuple(
        (
            jax.tree_util.keystr(path),
            tuple(np.shape(leaf)),
            str(getattr(leaf, "dtype", type(leaf).__name__)),
        )
        for path, leaf in leaves
    )


class RecompileLogger:
    """Logs each new input shape signature a jitted step sees (each one is a compile)."""

    def __init__(self):
        self._seen: dict[str, set[tuple]] = {}

    def note_shapes(self, name: str, batch: Any) -> bool:
        """Records ``batch``'s signature under ``name``; logs and returns True if it is new."""
        signature = shape_signature(batch)
        seen = self._seen.setdefault(name, set())
        if signature in seen:
            return False
        seen.add(signature)
        described = ", ".join(f"{path}{list(shape)}:{dtype}" for path, shape, dtype in signature)
        logging.info("%s: new input shapes #%d (expect a compile): %s", name, len(seen), described)
        return True


_DEFAULT_RECOMPILE_LOGGER = RecompileLogger()


def note_shapes(name: str, batch: Any) -> bool:
    """``RecompileLogger.note_shapes`` on a process-wide logger; see there."""
    return _DEFAULT_RECOMPILE_LOGGER.note_shapes(name, batch)
