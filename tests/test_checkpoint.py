"""Checkpoint round trips, retention, cross-topology restore, atomicity, integrity and preemption."""

import json
import os
import re
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


# ----------------------------------------------------------------------------- integrity


def _largest_data_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_bytes(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "missing_METADATA": (
        lambda d: (d / "state" / "_METADATA").unlink(),
        "state/_METADATA is missing",
    ),
    "truncated_data": (
        lambda d: _largest_data_file(d).write_bytes(_largest_data_file(d).read_bytes()[:100]),
        "bytes, the manifest says",
    ),
    "deleted_data": (lambda d: _largest_data_file(d).unlink(), "is missing"),
    "flipped_bytes": (lambda d: _flip_bytes(_largest_data_file(d)), "is corrupt (CRC-32"),
    "missing_manifest": (
        lambda d: (d / checkpoint.MANIFEST_NAME).unlink(),
        "jaxalign_manifest.json is missing",
    ),
}


def _two_checkpoints(directory, mesh):
    with checkpoint.Checkpointer(directory, save_every=1, keep=3) as ckpt:
        for step in (1, 2):
            assert ckpt.save(step, state=_state(mesh, seed=step), data_state={"at": step})
    return {step: _state(mesh, seed=step) for step in (1, 2)}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_is_reported_set_aside_and_older_one_restored(
    tmp_path, corruption, caplog
):
    mesh = _mesh((8, 1, 1))
    states = _two_checkpoints(tmp_path, mesh)
    corrupt, expected_reason = CORRUPTIONS[corruption]
    corrupt(tmp_path / "2")
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=3, read_only=True) as ckpt:
        with pytest.raises(
            checkpoint.CheckpointCorruptError, match=re.escape(expected_reason)
        ) as error:
            ckpt.restore(2, abstract_state=_abstract(states[2], mesh))
        assert str(error.value).startswith(f"checkpoint step 2 in {tmp_path} is bad: ")
        assert "\n" not in str(error.value)
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        with caplog.at_level("ERROR"):
            restored = ckpt.restore(abstract_state=_abstract(states[1], mesh))
        assert restored.step == 1 and restored.data_state == {"at": 1}
        _assert_state_equal(restored.state, states[1])
        assert any(
            "checkpoint step 2" in r.getMessage() and expected_reason in r.getMessage()
            for r in caplog.records
        )
        # Set aside, not deleted, so step 2 can be saved again.
        assert ckpt.all_steps() == [1]
        assert ckpt.save(2, state=states[2])
    assert [p.name.split("-")[0] for p in tmp_path.iterdir() if ".bad-" in p.name] == ["2.bad"]


def test_all_checkpoints_bad_raises_one_line_listing_each(tmp_path):
    mesh = _mesh((8, 1, 1))
    states = _two_checkpoints(tmp_path, mesh)
    _flip_bytes(_largest_data_file(tmp_path / "2"))
    (tmp_path / "1" / "state" / "_METADATA").unlink()
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=3, read_only=True) as ckpt:
        with pytest.raises(checkpoint.NoIntactCheckpointError) as error:
            ckpt.restore(abstract_state=_abstract(states[1], mesh))
    message = str(error.value)
    assert "step 2: " in message and "step 1: state/_METADATA is missing" in message
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # read-only: nothing moved


def test_nonfinite_state_is_not_saved_and_nonfinite_checkpoint_is_skipped(tmp_path, monkeypatch):
    mesh = _mesh((8, 1, 1))
    good = _state(mesh, seed=1)
    nan_state = dict(good, embedding=good["embedding"] * jnp.nan)
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as ckpt:
        assert ckpt.save(1, state=good)
        assert not ckpt.save(2, state=nan_state)  # refused: would rotate step 1 away
        assert ckpt.all_steps() == [1]
        # A checkpoint whose files verify but whose values are not finite (saved by a guard-less
        # writer) is skipped on restore as well.
        monkeypatch.setattr(checkpoint, "nonfinite_leaves", lambda tree: [])
        assert ckpt.save(3, state=nan_state)
        monkeypatch.undo()
        assert ckpt.all_steps() == [3]  # keep=1
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=None) as ckpt:
        with pytest.raises(
            checkpoint.NoIntactCheckpointError, match="non-finite values in embedding"
        ):
            ckpt.restore(abstract_state=_abstract(good, mesh))


def test_failed_background_save_raises_once_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    mesh = _mesh((8, 1, 1))
    ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=1)
    assert ckpt.save(1, state=_state(mesh, seed=1))
    ckpt.wait_until_finished()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.integrity, "write_manifest", disk_full)  # runs in the background
    assert ckpt.save(2, state=_state(mesh, seed=2))
    with pytest.raises(checkpoint.CheckpointSaveError) as error:
        ckpt.wait_until_finished()
    assert str(error.value) == (
        f"saving checkpoint step 2 to {tmp_path} failed: OSError: [Errno 28] No space left on device"
    )
    with pytest.raises(checkpoint.CheckpointSaveError):
        ckpt.save(3, state=_state(mesh, seed=3))  # no silent carrying on
    ckpt.close()  # does not raise again or hang
    monkeypatch.undo()
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=1) as reopened:
        assert reopened.all_steps() == [1]  # the uncommitted step 2 did not displace step 1
        restored = reopened.restore(abstract_state=_abstract(_state(mesh, seed=1), mesh))
        _assert_state_equal(restored.state, _state(mesh, seed=1))


def test_unwritable_directory_fails_the_save_at_once(tmp_path, monkeypatch):
    import os as os_module

    mesh = _mesh((8, 1, 1))
    real_mkdir = os_module.mkdir

    def read_only_mkdir(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=1)
    monkeypatch.setattr(os_module, "mkdir", read_only_mkdir)
    with pytest.raises(
        checkpoint.CheckpointSaveError, match=re.escape(f"to {tmp_path} failed: Permission")
    ):
        ckpt.save(1, state=_state(mesh, seed=1))
    ckpt.close()


def test_identity_mismatch_lists_keys_and_resumable_keys_may_change(tmp_path):
    mesh = _mesh((8, 1, 1))
    state = _state(mesh)
    config = {
        "algorithm": "sft",
        "data": {"train": "a.jsonl", "eval": "e.jsonl"},
        "train": {"num_steps": 10, "log_every": 1},
        "mesh": {"shape": [8, 1, 1]},
    }
    identity = checkpoint.run_identity(config, {"embedding": state["embedding"]})
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, identity=identity) as ckpt:
        ckpt.save(1, state=state)
    resumed = json.loads(json.dumps(config))
    resumed["train"] = {"num_steps": 20, "log_every": 5}
    resumed["data"]["eval"] = "other.jsonl"
    resumed["mesh"]["shape"] = [2, 2, 2]
    same_run = checkpoint.run_identity(resumed, {"embedding": state["embedding"]})
    checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, identity=same_run).close()

    other = json.loads(json.dumps(resumed))
    other["algorithm"] = "dpo"
    other["data"]["train"] = "b.jsonl"
    other_params = {"embedding": jnp.zeros((16, 4), jnp.float32)}
    with pytest.raises(checkpoint.RunMismatchError) as error:
        checkpoint.Checkpointer(
            tmp_path, save_every=1, keep=1, identity=checkpoint.run_identity(other, other_params)
        )
    message = str(error.value)
    assert 'algorithm ("sft" -> "dpo")' in message
    assert 'data.train ("a.jsonl" -> "b.jsonl")' in message
    assert "embedding: float32[16, 8] -> float32[16, 4]" in message
    assert "num_steps" not in message and "mesh" not in message and "data.eval" not in message
    assert "new --workdir" in message and "\n" not in message
