"""The one training entry point.

    python -m jaxalign.train --config=configs/<file>.py[:<arg>] --workdir=DIR [--config.<key>=<value> ...]

`config.algorithm` picks the trainer (sft | reward | dpo | ppo | grpo). The config is validated before
anything compiles; re-running with the same --workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from jaxalign.checkpoint import CheckpointError, CheckpointSaveError
from jaxalign.config import ConfigError, validate
from jaxalign.data import DataError
from jaxalign.distributed import maybe_initialize
from jaxalign.models.config import UnsupportedConfigError
from jaxalign.models.hf import CheckpointError as ModelCheckpointError

TRAINERS = {
    "sft": "jaxalign.trainers.sft",
    "reward": "jaxalign.trainers.reward",
    "dpo": "jaxalign.trainers.dpo",
    "ppo": "jaxalign.trainers.ppo",
    "grpo": "jaxalign.trainers.grpo",
}


def run(config: ml_collections.ConfigDict, workdir: str | Path):
    """Validates `config` and runs its trainer in `workdir`; returns the trainer's result."""
    maybe_initialize(config.mesh)
    validate(config, num_devices=jax.device_count())
    trainer = importlib.import_module(TRAINERS[config.algorithm])
    return trainer.train(config, Path(workdir))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if flags.FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    logging.getLogger().setLevel(logging.INFO)
    try:
        result = run(flags.FLAGS.config, flags.FLAGS.workdir)
    except (
        CheckpointError,
        ConfigError,
        DataError,
        ModelCheckpointError,
        UnsupportedConfigError,
    ) as error:
        # Known, user-fixable problems: one line naming the file, key, step or directory.
        print(f"error: {error}", file=sys.stderr, flush=True)
        if isinstance(error, CheckpointSaveError):
            # A failed background save can leave orbax threads that never finish: do not
            # wait for them at interpreter exit.
            sys.stdout.flush()
            os._exit(1)
        sys.exit(1)
    if jax.process_index() == 0:
        where = f"checkpoints: {result.checkpoint_dir}"
        if result.export_dir is not None:
            where += f"; Hugging Face model: {result.export_dir}"
        if result.stopped_early:
            where += f"; stopped early: {result.stopped_early}"
        print(f"done. {where}", flush=True)


def define_flags() -> None:
    """Command-line flags, defined only when this module is the program (no import side effects)."""
    config_flags.DEFINE_config_file(
        "config", None, "Path to a configs/*.py file.", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
    flags.mark_flag_as_required("config")


if __name__ == "__main__":
    define_flags()
    app.run(main)
