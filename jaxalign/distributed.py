"""Multi-process JAX start-up: one call before any JAX computation.

Call ``maybe_initialize(config.mesh)`` at the very top of a trainer, before building the
mesh or touching ``jax.devices()``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

logger = logging.getLogger(__name__)

_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def maybe_initialize(mesh_config: Any) -> bool:
    """Initializes ``jax.distributed`` when ``mesh_config.distributed`` is true.

    Coordinator address, process count and process id come from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` when set; anything unset is auto-detected by
    JAX (TPU VMs, SLURM, Open MPI, ...). Idempotent: a second call is a no-op.

    Args:
      mesh_config: ``config.mesh``; only ``distributed`` (bool) is read.

    Returns:
      True if JAX is running multi-process-initialized after the call, else False.
    """
    if not mesh_config.distributed:
        return False
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(
            coordinator_address=os.environ.get(_ENV_COORDINATOR) or None,
            num_processes=_env_int(_ENV_NUM_PROCESSES),
            process_id=_env_int(_ENV_PROCESS_ID),
        )
    logger.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def is_main_process() -> bool:
    """True on process 0, the one that writes logs and JSON side files."""
    return jax.process_index() == 0
