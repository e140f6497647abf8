"""The one training entry point, `run(config, workdir)`; its command line is `jaxalign train`.

    jaxalign train --config=configs/<file>.py[:<arg>] --workdir=DIR [--config.<key>=<value> ...]
    python -m jaxalign.train ...   (the same)

`config.algorithm` picks the trainer (sft | reward | dpo | ppo | grpo). The config is validated before
anything compiles; re-running with the same --workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import jax
import ml_collections

from jaxalign.config import validate
from jaxalign.distributed import maybe_initialize

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


if __name__ == "__main__":
    from jaxalign.cli import train_main

    sys.exit(train_main(sys.argv[1:], prog="python -m jaxalign.train"))
