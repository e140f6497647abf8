"""Fault injection through the CLI: each fault ends in a one-line message and a non-zero exit (or
a logged fallback), and nothing is lost: the last verified checkpoint still restores, exports are
untouched, params are finite.

Every run here is `python -m jaxalign.train` / `python -m jaxalign.export` in a subprocess, on
configs/sft_tiny.py shrunk by `TINY_SFT_SETTINGS` (the session's compilation cache is shared).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxalign import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240

# A checkpoint at steps 3 and 6 (keep 2), an HF export at the end, no eval.
RUN = {
    "train.num_steps": 6,
    "train.checkpoint_every": 3,
    "train.keep_checkpoints": 2,
    "data.eval": "",
    "train.export_hf": True,
}

# `python -m jaxalign.train ...` with os.mkdir refusing paths under argv[1], as a directory
# without write permission does for a non-root user (tests may run as root, which ignores modes).
UNWRITABLE_TRAIN = """
import os, runpy, sys
root = os.path.abspath(sys.argv.pop(1))
real_mkdir = os.mkdir
def mkdir(path, *args, **kwargs):
    if os.path.abspath(os.fspath(path)).startswith(root + os.sep):
        raise PermissionError(13, "Permission denied", os.fspath(path))
    return real_mkdir(path, *args, **kwargs)
os.mkdir = mkdir
runpy.run_module("jaxalign.train", run_name="__main__", alter_sys=True)
"""


def run_cli(args: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_args(config: str, workdir: Path, settings: dict) -> list[str]:
    flags = [f"--config.{key}={value}" for key, value in settings.items()]
    return ["-m", "jaxalign.train", f"--config={config}", f"--workdir={workdir}", *flags]


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def newest_data_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def settings(tiny_sft_settings: dict) -> dict:
    return {**tiny_sft_settings, **RUN}


@pytest.fixture(scope="module")
def config_arg(tiny_data_dir: Path) -> str:
    return f"configs/sft_tiny.py:{tiny_data_dir}"


@pytest.fixture(scope="module")
def finished_run(config_arg, settings, tmp_path_factory) -> Path:
    """A finished 6-step SFT run: checkpoints 3 and 6 (with manifests) and `hf/`."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli(train_args(config_arg, workdir, settings))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]
    assert (workdir / "checkpoints" / "6" / ckpt.MANIFEST_NAME).is_file()
    return workdir


@pytest.fixture
def workdir(finished_run, tmp_path) -> Path:
    """A private copy of `finished_run` to damage."""
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


# ----------------------------------------------------------------------------- 1. integrity


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(workdir, config_arg, settings):
    """Flipped bytes in step 6: the rerun logs which step is bad and why, resumes from step 3,
    redoes steps 4..6 and commits a new, verified step 6; the bad one is kept aside."""
    data_file = newest_data_file(workdir / "checkpoints" / "6")
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data_file.write_bytes(bytes(data))
    hf_before = tree_bytes(workdir / "hf")

    result = run_cli(train_args(config_arg, workdir, settings))
    assert result.returncode == 0, result.stderr[-3000:]
    bad_lines = [line for line in result.stderr.splitlines() if "checkpoint step 6" in line]
    assert bad_lines and "is bad: state/" in bad_lines[0] and "CRC-32" in bad_lines[0]
    assert "Restored checkpoint step 3 instead of the newer bad step(s) 6" in result.stderr
    names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert names[:2] == ["3", "6"] and names[2].startswith("6.bad-") and len(names) == 3
    with ckpt.Checkpointer(workdir / "checkpoints", save_every=1, keep=None, read_only=True) as c:
        c.verify(6)  # the redone step 6 is intact
    # The rerun's export replaced hf/ with weights trained again from step 3 (same data order).
    assert tree_bytes(workdir / "hf").keys() == hf_before.keys()


# ----------------------------------------------------------------------------- 2. failed saves


@pytest.mark.parametrize("async_checkpoint", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_unwritable_checkpoint_dir_stops_promptly_with_one_line(
    config_arg, settings, tmp_path, async_checkpoint
):
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    checkpoints.mkdir(parents=True)
    run_settings = {
        **settings,
        "train.checkpoint_every": 1,
        "train.async_checkpoint": async_checkpoint,
    }
    flags = train_args(config_arg, workdir, run_settings)[1:]  # without "-m"
    if os.geteuid() != 0:
        checkpoints.chmod(0o555)
        command = ["-m", *flags]
    else:
        command = ["-c", UNWRITABLE_TRAIN, str(checkpoints), *flags[1:]]
    try:
        result = run_cli(command, timeout=120)  # a hang fails here
    finally:
        checkpoints.chmod(0o755)
    assert result.returncode == 1, result.stderr[-3000:]
    message = last_line(result.stderr)
    assert message.startswith(f"error: saving checkpoint step 1 to {checkpoints} failed: ")
    assert "Permission denied" in message
    assert not (workdir / "hf").exists()


# ----------------------------------------------------------------------------- 3. run identity


def test_other_run_in_the_workdir_is_refused_before_anything_is_overwritten(workdir, tiny_data_dir):
    """`dpo_tiny` into a finished SFT run's workdir: exit 1 naming the differing keys;
    config.json, hf/ and the checkpoints are untouched."""
    before = tree_bytes(workdir)
    dpo_settings = {"train.num_steps": 6, "optimizer.warmup_steps": 0}
    result = run_cli(train_args(f"configs/dpo_tiny.py:{tiny_data_dir}", workdir, dpo_settings))
    assert result.returncode == 1, result.stderr[-3000:]
    message = last_line(result.stderr)
    assert message.startswith(f"error: {workdir / 'checkpoints'} holds checkpoints of a different")
    assert 'algorithm ("sft" -> "dpo")' in message and "data.train (" in message
    assert "new --workdir" in message
    assert tree_bytes(workdir) == before


@pytest.mark.slow  # the message itself: test_checkpoint.py::test_identity_mismatch_lists_keys...
def test_resume_with_changed_model_shape_names_the_shapes(workdir, config_arg, settings):
    before = tree_bytes(workdir)
    changed = {**settings, "model.init.hidden_size": 32, "train.num_steps": 9}
    result = run_cli(train_args(config_arg, workdir, changed))
    assert result.returncode == 1
    message = last_line(result.stderr)
    assert "model.init.hidden_size (64 -> 32)" in message
    assert "embed/embedding: float32[512, 64] -> float32[512, 32]" in message
    assert "Event loop is closed" not in result.stderr
    assert tree_bytes(workdir) == before


# ----------------------------------------------------------------------------- 11. export


def test_export_equals_the_end_of_run_export(finished_run, tmp_path):
    out = tmp_path / "exported"
    result = run_cli(["-m", "jaxalign.export", f"--workdir={finished_run}", f"--out={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_line(result.stdout) == f"done. exported step 6 of {finished_run} to {out}"
    expected, actual = (
        load_file(finished_run / "hf" / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert np.all(np.isfinite(actual[name]))
        np.testing.assert_array_equal(actual[name], tensor, err_msg=name)
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (finished_run / "hf" / "config.json").read_text()
    )
    assert (out / "tokenizer.json").read_bytes() == (
        finished_run / "hf" / "tokenizer.json"
    ).read_bytes()


def test_export_of_a_bad_step_fails_and_default_falls_back(workdir, tmp_path):
    (workdir / "checkpoints" / "6" / "state" / "_METADATA").unlink()
    checkpoints_before = tree_bytes(workdir / "checkpoints")
    out = tmp_path / "step6"
    result = run_cli(["-m", "jaxalign.export", f"--workdir={workdir}", "--step=6", f"--out={out}"])
    assert result.returncode == 1
    assert last_line(result.stderr) == (
        f"error: checkpoint step 6 in {workdir / 'checkpoints'} is bad: state/_METADATA is missing"
    )
    assert not out.exists()

    out = tmp_path / "newest"
    result = run_cli(["-m", "jaxalign.export", f"--workdir={workdir}", f"--out={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint step 6" in result.stderr  # reported
    assert json.loads((out / "jaxalign_export.json").read_text())["step"] == 3
    assert tree_bytes(workdir / "checkpoints") == checkpoints_before  # export never modifies
    # Step 3's weights differ from the end-of-run export (step 6).
    final, step3 = (
        load_file(workdir / "hf" / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    assert any(not np.array_equal(final[k], step3[k]) for k in final)


@pytest.mark.parametrize(
    "algorithm, expected",
    [
        ("sft", {"policy": ("lm", ())}),
        ("grpo", {"policy": ("lm", ())}),
        ("reward", {"policy": ("scalar", ())}),  # saved as *ForSequenceClassification
        ("ppo", {"policy": ("lm", ("policy",)), "critic": ("scalar", ("critic",))}),
    ],
)
def test_export_picks_the_model_and_params_of_each_algorithm(algorithm, expected):
    from jaxalign.config import base_config
    from jaxalign.export import _models

    config = base_config()
    config.algorithm = algorithm
    config.ppo.critic_init = "policy"
    models = _models(config)
    assert {name: (m.config.head, path) for name, (m, path) in models.items()} == expected


# ----------------------------------------------------------------------------- 4. non-finite updates


@pytest.mark.parametrize(
    "fault",
    [
        {"optimizer.learning_rate": 1e39},  # overflows to inf in fp32: finite grads, inf update
        {"optimizer.eps": 0.0},  # Adam's 0/0 in embedding rows no token touched: NaN update
    ],
    ids=["lr_overflow", "adam_eps_0"],
)
def test_nonfinite_updates_are_skipped_and_never_checkpointed(
    fault, config_arg, settings, tmp_path
):
    workdir = tmp_path / "run"
    faulty = {**settings, **fault, "train.max_consecutive_nonfinite": 2, "train.log_every": 1}
    result = run_cli(train_args(config_arg, workdir, faulty))
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_line(result.stdout).endswith("stopped early: 2 consecutive non-finite steps")
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_steps"] for m in metrics if "skipped_steps" in m] == [1, 2]
    out = tmp_path / "exported"
    exported = run_cli(["-m", "jaxalign.export", f"--workdir={workdir}", f"--out={out}"])
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert json.loads((out / "jaxalign_export.json").read_text())["step"] == 2
    for name, tensor in load_file(out / "model.safetensors").items():
        assert np.all(np.isfinite(tensor)), name


# ----------------------------------------------------------------------------- 10. eval microbatches


def test_evaluation_runs_in_training_microbatches(tiny_data_dir, tiny_sft_settings):
    """With grad_accum_steps = 4, eval never runs more rows in one forward than a train
    microbatch, and still covers the rows of `train.eval_batches` full batches."""
    from transformers import AutoTokenizer

    from jaxalign.config import base_config
    from jaxalign.data import build_sft_dataset
    from jaxalign.trainers import common

    config = base_config()
    config.train.batch_size, config.optimizer.grad_accum_steps, config.train.eval_batches = 64, 4, 2
    tokenizer = AutoTokenizer.from_pretrained(tiny_data_dir / "tokenizer")
    dataset = build_sft_dataset(
        str(tiny_data_dir / "sft_eval.jsonl"), tokenizer, max_length=64, on_bad_row="skip"
    )
    batches = list(common.eval_batches_fn(dataset, config)())
    assert len(dataset.examples) >= 128
    assert [len(b["input_ids"]) for b in batches] == [16] * 8  # 8 fake devices: 2 rows each
