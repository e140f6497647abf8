"""Two CPU processes under `jax.distributed` train exactly like one process with all the devices.

Each process gets 4 fake CPU devices; together they form the 8-device `(-1, 1, 1)` mesh that the
single-process reference gets from conftest's 8 devices. Cross-process collectives on CPU go
through gloo over TCP (`jax_cpu_collectives_implementation`, the default in jax 0.10), with
`127.0.0.1:<free port>` as the coordinator.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxalign import checkpoint as ckpt
from jaxalign.train import run

REPO = Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
LOCAL_DEVICES = 4  # per process: 2 x 4 = conftest's 8 single-process devices
NUM_STEPS = 4
TIMEOUT_S = 480.0  # both processes, start to exit; a run takes ~100 s on 2 busy cores

# No eval (its batch split is another story); export on, so the gathered HF export is checked too.
RUN_SETTINGS = {
    "train.num_steps": NUM_STEPS,
    "optimizer.warmup_steps": 2,  # sft_tiny's 5 exceeds num_steps
    "train.log_every": 1,
    "train.checkpoint_every": 1000,  # only the final, forced save
    "data.eval": "",
    "train.export_hf": True,
}


def sft_tiny_config(data_dir: Path, settings: dict) -> ml_collections.ConfigDict:
    """configs/sft_tiny.py with `settings` ({"train.num_steps": 4, ...}) applied."""
    spec = importlib.util.spec_from_file_location("sft_tiny", REPO / "configs" / "sft_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(str(data_dir))
    for key, value in settings.items():
        section, name = key.rsplit(".", 1)
        config[section][name] = value
    return config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(process_id: int, coordinator: str) -> dict[str, str]:
    """The test session's environment with this process's share of the devices and its rank."""
    xla_flags = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    )
    return {
        **os.environ,
        "XLA_FLAGS": f"{xla_flags} --xla_force_host_platform_device_count={LOCAL_DEVICES}",
        "JAX_PLATFORMS": "cpu",
        # gloo is the default; named so that a changed default fails here, not as a hang.
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "JAX_COORDINATOR_ADDRESS": coordinator,
        "JAX_NUM_PROCESSES": str(NUM_PROCESSES),
        "JAX_PROCESS_ID": str(process_id),
    }


@contextlib.contextmanager
def training_processes(config_arg: str, workdir: Path, settings: dict, logs: Path):
    """Starts `python -m jaxalign.train` on `NUM_PROCESSES` processes; yields a `wait()` that
    returns their stdout texts (or fails the test); kills any still running on exit.

    Output goes to files, not pipes: orbax logs a lot, and a full pipe would stall a process
    while its peer waits for it in a collective.
    """
    flags = [f"--config.{key}={value}" for key, value in settings.items()]
    command = [
        sys.executable,
        "-m",
        "jaxalign.train",
        f"--config={config_arg}",
        f"--workdir={workdir}",
        *flags,
    ]
    coordinator = f"127.0.0.1:{free_port()}"
    logs.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen] = []
    deadline = time.monotonic() + TIMEOUT_S

    def wait() -> list[str]:
        while any(p.poll() is None for p in processes):
            # One process failing leaves its peer blocked in a collective: stop waiting.
            if any(p.poll() not in (None, 0) for p in processes) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        codes = [p.poll() for p in processes]
        if codes != [0] * NUM_PROCESSES:
            tails = "\n".join(
                f"--- process {i} (rc {code}) stderr:\n"
                + (logs / f"stderr_{i}.txt").read_text()[-3000:]
                for i, code in enumerate(codes)
            )
            pytest.fail(f"multi-process training failed or timed out: rc {codes}\n{tails}")
        return [(logs / f"stdout_{i}.txt").read_text() for i in range(NUM_PROCESSES)]

    try:
        for process_id in range(NUM_PROCESSES):
            with (
                open(logs / f"stdout_{process_id}.txt", "w") as stdout,
                open(logs / f"stderr_{process_id}.txt", "w") as stderr,
            ):
                processes.append(
                    subprocess.Popen(
                        command,
                        cwd=REPO,
                        env=process_env(process_id, coordinator),
                        stdout=stdout,
                        stderr=stderr,
                    )
                )
        yield wait
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=60)


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def host_tree(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.mark.slow
def test_two_processes_train_like_one(tiny_data_dir, tiny_sft_settings, tmp_path):
    settings = {**tiny_sft_settings, **RUN_SETTINGS}
    multi_dir, single_dir = tmp_path / "two_processes", tmp_path / "one_process"

    # The reference trains in this process meanwhile: the two processes often wait on each other.
    with training_processes(
        f"configs/sft_tiny.py:{tiny_data_dir}",
        multi_dir,
        {**settings, "mesh.distributed": True},
        logs=tmp_path / "logs",
    ) as wait:
        reference = run(sft_tiny_config(tiny_data_dir, settings), single_dir)
        stdouts = wait()
    assert jax.process_count() == 1 and jax.device_count() == 2 * LOCAL_DEVICES

    # Really two processes of 4 devices on one 8-device mesh (distributed.maybe_initialize's log).
    for process_id in range(NUM_PROCESSES):
        stderr = (tmp_path / "logs" / f"stderr_{process_id}.txt").read_text()
        assert f"process {process_id} of 2, 4 local / 8 global devices" in stderr

    # Only process 0 writes: one record per step (a second writer would duplicate them), one
    # TensorBoard file, and only process 0 reports.
    multi_records, single_records = read_metrics(multi_dir), read_metrics(single_dir)
    assert [r["step"] for r in multi_records] == list(range(1, NUM_STEPS + 1))
    assert len(list((multi_dir / "tensorboard").iterdir())) == 1
    assert stdouts[0].strip().splitlines()[-1].startswith("done.")
    assert "done." not in stdouts[1]

    # The same global batches (token counts) and the same losses and gradients, step by step.
    assert [r["tokens"] for r in multi_records] == [r["tokens"] for r in single_records]
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(
            [r[name] for r in multi_records],
            [r[name] for r in single_records],
            rtol=1e-5,
            err_msg=name,
        )

    # The cooperative checkpoint (each process wrote its shards) restores onto one process and
    # holds the reference's state: params, Adam moments, step, rng.
    state_shardings = jax.tree.map(lambda x: x.sharding, reference.state)
    abstract = ckpt.abstract_with_shardings(reference.state, state_shardings)
    with ckpt.Checkpointer(multi_dir / "checkpoints", save_every=1, keep=None) as checkpointer:
        assert checkpointer.all_steps() == [NUM_STEPS]
        restored = checkpointer.restore(NUM_STEPS, abstract_state=abstract)
    assert restored.data_state == {"iterator": {"epoch": 0, "position": NUM_STEPS, "seed": 0}}
    jax.tree.map(
        lambda actual, expected: np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6),
        host_tree(restored.state),
        host_tree(reference.state),
    )

    # The HF export gathers the sharded params onto process 0, which writes them.
    multi_weights = load_file(multi_dir / "hf" / "model.safetensors")
    single_weights = load_file(single_dir / "hf" / "model.safetensors")
    assert multi_weights.keys() == single_weights.keys()
    for name, weight in single_weights.items():
        np.testing.assert_allclose(multi_weights[name], weight, rtol=1e-5, atol=1e-6, err_msg=name)
    assert (multi_dir / "hf" / "config.json").read_text() == (
        single_dir / "hf" / "config.json"
    ).read_text()
