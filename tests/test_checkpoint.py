"""Checkpoint round trips, retention, cross-topology restore, atomicity and preemption."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalign import checkpoint, sharding

AXES = ("data", "fsdp", "tensor")
SPECS = {"embedding": P("tensor", "fsdp"), "kernel": P("fsdp", "tensor"), "step": P(), "rng": P()}


def _mesh(shape, num_devices=8):
    return sharding.make_mesh(shape=shape, axis_names=AXES, devices=jax.devices()[:num_devices])


def _shardings(mesh):
    return {name: NamedSharding(mesh, spec) for name, spec in SPECS.items()}


def _state(mesh, seed=0):
    rng = np.random.default_rng(seed)
    host = {
        "embedding": rng.normal(size=(16, 8)).astype(np.float32),
        "kernel": rng.normal(size=(8, 4)).astype(jnp.bfloat16),
        "step": np.int32(seed),
    }
    state = {k: jax.device_put(v, s) for k, v in host.items() for s in [_shardings(mesh)[k]]}
    state["rng"] = jax.device_put(jax.random.key(seed), _shardings(mesh)["rng"])
    return state


def _assert_state_equal(actual, expected):
    for name in ("embedding", "kernel", "step"):
        assert actual[name].dtype == expected[name].dtype
        np.testing.assert_array_equal(np.asarray(actual[name]), np.asarray(expected[name]))
    np.testing.assert_array_equal(
        jax.random.key_data(actual["rng"]), jax.random.key_data(expected["rng"])
    )


def _abstract(state, mesh):
    return checkpoint.abstract_with_shardings(state, _shardings(mesh))


def test_round_trip_bit_exact_with_json_items(tmp_path):
    mesh = _mesh((2, 2, 2))
    state = _state(mesh, seed=3)
    config = ml_collections.ConfigDict(
        {"optimizer": {"name": "adamw", "learning_rate": 1e-4}, "mesh": {"shape": (-1, 1, 1)}}
    )
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        assert ckpt.save(3, state=state, data_state={"epoch": 1, "index": 17}, config=config)
        ckpt.wait_until_finished()
        restored = ckpt.restore(abstract_state=_abstract(state, mesh))
    assert restored.step == 3
    _assert_state_equal(restored.state, state)
    assert restored.state["embedding"].sharding == state["embedding"].sharding
    assert restored.data_state == {"epoch": 1, "index": 17}
    assert restored.config == {
        "optimizer": {"name": "adamw", "learning_rate": 1e-4},
        "mesh": {"shape": [-1, 1, 1]},
    }


def test_save_every_and_keep_last_k(tmp_path):
    mesh = _mesh((8, 1, 1))
    with checkpoint.Checkpointer(tmp_path, save_every=2, keep=2, async_save=False) as ckpt:
        saved = [step for step in range(1, 9) if ckpt.save(step, state=_state(mesh, step))]
        assert saved == [2, 4, 6, 8]
        assert ckpt.save(9, state=_state(mesh, 9), force=True)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [8, 9]
        assert ckpt.latest_step() == 9
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["8", "9"]


@pytest.mark.parametrize("save_devices, restore_devices", [(8, 1), (1, 8)])
def test_restore_across_topologies(tmp_path, save_devices, restore_devices):
    save_mesh = _mesh((1, 1, 1) if save_devices == 1 else (2, 2, 2), save_devices)
    restore_mesh = _mesh((1, 1, 1) if restore_devices == 1 else (2, 2, 2), restore_devices)
    state = _state(save_mesh, seed=5)
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(5, state=state)
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        restored = ckpt.restore(5, abstract_state=_abstract(state, restore_mesh)).state
    _assert_state_equal(restored, state)
    for name, value in restored.items():
        assert value.sharding == _shardings(restore_mesh)[name]
        assert len(value.sharding.device_set) == restore_devices


def test_half_written_tmp_dir_is_ignored(tmp_path):
    mesh = _mesh((8, 1, 1))
    state = _state(mesh, seed=1)
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        ckpt.save(1, state=state)
    # What a save killed midway leaves behind: a tmp step dir with partial contents.
    partial = tmp_path / "2.orbax-checkpoint-tmp-1712345678901234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 100)
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        assert ckpt.latest_step() == 1
        _assert_state_equal(ckpt.restore(abstract_state=_abstract(state, mesh)).state, state)
        # The next save of that step still works.
        assert ckpt.save(2, state=_state(mesh, seed=2))
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1, 2]
    assert not partial.exists()


_KILLED_SAVER = textwrap.dedent(
    """
    import asyncio, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from orbax.checkpoint._src.path import atomicity
    from jaxalign import checkpoint

    directory = sys.argv[1]
    ckpt = checkpoint.Checkpointer(directory, save_every=1, keep=3)
    ckpt.save(1, state={"w": jax.numpy.full((64, 64), 1.0)})
    ckpt.wait_until_finished()

    async def hang(self, *args, **kwargs):  # data written, rename never happens
        print("FINALIZING", flush=True)
        await asyncio.sleep(600)

    atomicity.AtomicRenameTemporaryPath.finalize = hang
    ckpt.save(2, state={"w": jax.numpy.full((64, 64), 2.0)})
    ckpt.wait_until_finished()
    """
)


def test_killed_save_leaves_previous_checkpoint_restorable(tmp_path):
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo_root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVER, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "FINALIZING", f"saver exited early (rc={proc.poll()})"
        proc.kill()  # SIGKILL: no cleanup, no atexit
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert any(".orbax-checkpoint-tmp" in p.name for p in tmp_path.iterdir())
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        assert ckpt.latest_step() == 1
        mesh = _mesh((1, 1, 1), 1)
        abstract = {
            "w": jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=sharding.replicated(mesh))
        }
        np.testing.assert_array_equal(
            ckpt.restore(abstract_state=abstract).state["w"], np.ones((64, 64), np.float32)
        )


def test_restore_without_checkpoint_raises(tmp_path):
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        with pytest.raises(FileNotFoundError):
            ckpt.restore(abstract_state={})


def test_sigterm_sets_flag_without_exiting():
    previous = signal.getsignal(signal.SIGTERM)
    handler = checkpoint.install_preemption_handler()
    try:
        assert not handler.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not handler.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert handler.requested
        assert handler.should_stop(1)
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGTERM) == previous
