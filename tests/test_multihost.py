"""Two CPU processes under `jax.distributed` train exactly like one process with all the devices.

Each process gets 4 fake CPU devices; together they form the 8-device mesh that the
single-process reference gets from conftest's 8 devices. Cross-process collectives on CPU go
through gloo over TCP (`jax_cpu_collectives_implementation`, the default in jax 0.10), with
`127.0.0.1:<free port>` as the coordinator.

Two jobs: DPO with `dpo.precompute_reference=True` on `(2, 2, 2)` (every process must get every
example's reference log-probs), and, with `-m slow`, SFT on the `(-1, 1, 1)` mesh. Each single-process
reference uses the settings of a run in test_train_sft.py / test_train_preference.py, so the
session's compilation cache compiles its programs once for both files.
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
TIMEOUT_S = 480.0  # both processes, start to exit; a job takes ~30 s on 2 busy cores

# The straight run of test_train_sft.py (conftest's TINY_SFT_SETTINGS, no eval), exported, so the
# gathered HF export is checked too.
SFT_SETTINGS = {
    "train.log_every": 1,
    "data.eval": "",
    "train.export_hf": True,
    "train.checkpoint_every": 1000,  # only the final, forced save
}
# test_train_preference.py's DPO runs (one padded length, constant schedule: the compiled step
# does not depend on num_steps), with the reference's log-probs precomputed.
DPO_SETTINGS = {
    "data.buckets": (96,),
    "optimizer.schedule": "constant",
    "optimizer.warmup_steps": 0,
    "optimizer.learning_rate": 3e-3,
    "train.log_every": 1,
    "train.checkpoint_every": 1000,
    "train.async_checkpoint": False,
    "train.export_hf": True,
    "mesh.shape": (2, 2, 2),
    "train.num_steps": 4,
    "data.eval": "",
    "dpo.precompute_reference": True,
}


def tiny_config(config_file: str, data_dir: Path, settings: dict) -> ml_collections.ConfigDict:
    """configs/<config_file> with `settings` ({"train.num_steps": 4, ...}) applied."""
    spec = importlib.util.spec_from_file_location("tiny", REPO / "configs" / config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(str(data_dir))
    for key, value in settings.items():
        section, name = key.rsplit(".", 1)
        config[section][name] = value
    return config


def flag_value(value) -> str:
    """`--config.<key>=` text that ml_collections parses back to `value`."""
    return f"({','.join(map(str, value))},)" if isinstance(value, tuple) else str(value)


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
    flags = [f"--config.{key}={flag_value(value)}" for key, value in settings.items()]
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


def restore(workdir: Path, step: int, abstract_state):
    """The run's only checkpoint, `step`, restored onto `abstract_state`'s shardings."""
    with ckpt.Checkpointer(workdir / "checkpoints", save_every=1, keep=None) as checkpointer:
        assert checkpointer.all_steps() == [step]
        return checkpointer.restore(step, abstract_state=abstract_state)


# The DPO job runs by default: it covers what the SFT job does (the loop, the cooperative
# checkpoint, the gathered export) plus a mesh whose FSDP and tensor axes cross the process
# boundary and the precomputed reference; SFT's pure data parallel adds ~35 s for less.
@pytest.mark.parametrize(
    "job", [pytest.param("sft", marks=pytest.mark.slow), "dpo_precomputed_reference"]
)
def test_two_processes_train_like_one(job, tiny_data_dir, tiny_sft_settings, tmp_path):
    if job == "sft":
        config_file, settings = "sft_tiny.py", {**tiny_sft_settings, **SFT_SETTINGS}
    else:
        config_file, settings = "dpo_tiny.py", DPO_SETTINGS
    num_steps = settings["train.num_steps"]
    # Per-step losses agree to 1e-5 in both jobs. DPO's Adam at lr 3e-3 turns the all-reduce's
    # other summation order into parameter differences of a few 1e-6 (up to ~lr where a gradient
    # is ~0 and its sign flips), as in test_train_preference.py's `assert_runs_match`.
    state_tolerance = dict(rtol=1e-5, atol=1e-6) if job == "sft" else dict(atol=5e-4)
    multi_dir, single_dir = tmp_path / "two_processes", tmp_path / "one_process"

    # The reference trains in this process meanwhile: the two processes often wait on each other.
    with training_processes(
        f"configs/{config_file}:{tiny_data_dir}",
        multi_dir,
        {**settings, "mesh.distributed": True},
        logs=tmp_path / "logs",
    ) as wait:
        reference = run(tiny_config(config_file, tiny_data_dir, settings), single_dir)
        stdouts = wait()
    assert jax.process_count() == 1 and jax.device_count() == 2 * LOCAL_DEVICES

    # Really two processes of 4 devices on one 8-device mesh (distributed.maybe_initialize's log).
    for process_id in range(NUM_PROCESSES):
        stderr = (tmp_path / "logs" / f"stderr_{process_id}.txt").read_text()
        assert f"process {process_id} of 2, 4 local / 8 global devices" in stderr

    # Only process 0 writes: one record per step (a second writer would duplicate them), one
    # TensorBoard file, and only process 0 reports.
    multi_records, single_records = read_metrics(multi_dir), read_metrics(single_dir)
    assert [r["step"] for r in multi_records] == list(range(1, num_steps + 1))
    assert len(list((multi_dir / "tensorboard").iterdir())) == 1
    assert stdouts[0].strip().splitlines()[-1].startswith("done.")
    assert "done." not in stdouts[1]

    # The same global batches and the same losses, gradients (and DPO rewards), step by step.
    names = ["loss", "grad_norm"] + (["rewards/chosen", "rewards/margins"] if job != "sft" else [])
    tokens = "num_tokens"  # cumulative tokens trained on, over all processes
    assert [r[tokens] for r in multi_records] == [r[tokens] for r in single_records]
    for name in names:
        np.testing.assert_allclose(
            [r[name] for r in multi_records],
            [r[name] for r in single_records],
            rtol=1e-5,
            atol=1e-7,
            err_msg=name,
        )

    # The cooperative checkpoint (each process wrote its shards) restores onto one process and
    # holds the reference's state: params, Adam moments, step, rng; and its data position.
    state_shardings = jax.tree.map(lambda x: x.sharding, reference.state)
    abstract = ckpt.abstract_with_shardings(reference.state, state_shardings)
    restored = restore(multi_dir, num_steps, abstract)
    assert restored.data_state == restore(single_dir, num_steps, abstract).data_state
    assert restored.data_state["iterator"]["position"] == num_steps
    assert int(restored.state.step) == num_steps
    np.testing.assert_array_equal(host_tree(restored.state.rng), host_tree(reference.state.rng))
    jax.tree.map(
        lambda actual, expected: np.testing.assert_allclose(actual, expected, **state_tolerance),
        host_tree(restored.state),
        host_tree(reference.state),
    )

    # The HF export gathers the sharded params onto process 0, which writes them.
    multi_weights = load_file(multi_dir / "hf" / "model.safetensors")
    single_weights = load_file(single_dir / "hf" / "model.safetensors")
    assert multi_weights.keys() == single_weights.keys()
    for name, weight in single_weights.items():
        np.testing.assert_allclose(multi_weights[name], weight, err_msg=name, **state_tolerance)
    assert (multi_dir / "hf" / "config.json").read_text() == (
        single_dir / "hf" / "config.json"
    ).read_text()
