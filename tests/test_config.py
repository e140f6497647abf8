"""Config files, `validate`'s messages, and the `python -m jaxalign.train` command end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from jaxalign.config import ConfigError, base_config, validate

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))


def load_config(argv: list[str]) -> ml_collections.ConfigDict:
    """Parses `--config=<file>[:arg] [--config.key=value ...]` the way `jaxalign.train` does."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flag_values(argv)
    return flag_values.config


def trainer_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """The config itself if it is a trainer config, else its trainer-config sections (the demo's
    pipeline config holds one per stage)."""
    if "algorithm" in config:
        return {"": config}
    return {
        name: section
        for name, section in config.items()
        if isinstance(section, ml_collections.ConfigDict) and "algorithm" in section
    }


def test_config_files_found():
    assert {"sft_tiny.py", "rm_tiny.py", "dpo_tiny.py"} <= {path.name for path in CONFIG_FILES}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: path.name)
def test_every_config_file_loads_and_validates(path: Path):
    config = load_config(["train", f"--config={path}"])  # get_config's default argument
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The hardware a recipe was sized for, else our 8 fake CPU devices.
    num_devices = getattr(module, "NUM_DEVICES", jax.device_count())
    stages = trainer_configs(config)
    assert stages, f"{path.name} has no trainer config (no `algorithm` key)"
    for name, stage in stages.items():
        stage = ml_collections.ConfigDict(stage.to_dict())
        if name:  # a pipeline stage: the pipeline fills in its data and reward model at run time
            stage.data.train = stage.data.train or "placeholder.jsonl"
            stage.ppo.reward_model = stage.ppo.reward_model or "judge:placeholder"
        validate(stage, num_devices=num_devices)


def test_config_file_typo_is_named_with_suggestion():
    config = base_config()
    config.data.train = "train.jsonl"
    config.train.batchsize = 8  # a config file may add keys; validate rejects them
    with pytest.raises(ConfigError, match=r"'train\.batchsize'.*did you mean 'train\.batch_size'"):
        validate(config, num_devices=8)


def test_model_init_typo_is_named_with_suggestion():
    config = base_config()
    config.data.train = "train.jsonl"
    config.model.init.num_layer = 3
    with pytest.raises(ConfigError, match=r"model\.init\.num_layer.*did you mean.*num_layers"):
        validate(config, num_devices=8)


def test_command_line_typo_is_named_with_suggestion():
    with pytest.raises(AttributeError, match=r"batchsize.*Did you mean \"batch_size\""):
        load_config(["train", "--config=configs/sft_tiny.py", "--config.train.batchsize=8"])


def test_command_line_wrong_type_names_the_key():
    with pytest.raises(flags.IllegalFlagValueError, match=r"config\.train\.batch_size=abc"):
        load_config(["train", "--config=configs/sft_tiny.py", "--config.train.batch_size=abc"])


def test_command_line_overrides_apply():
    config = load_config(
        ["train", "--config=configs/sft_tiny.py:/data", "--config.train.batch_size=32"]
    )
    assert config.train.batch_size == 32
    assert config.data.train == "/data/sft_train.jsonl"


def _config(**changes) -> ml_collections.ConfigDict:
    """A valid SFT config (or PPO, with `algorithm="ppo"`) with `section__key=value` changes."""
    config = base_config()
    config.data.train = "train.jsonl"
    config.ppo.reward_model = "judge:vader"
    for key, value in changes.items():
        if "__" in key:
            section, name = key.split("__")
            config[section][name] = value
        else:
            config[key] = value
    return config


@pytest.mark.parametrize(
    "changes, num_devices, message",
    [
        (
            dict(train__batch_size=12, mesh__shape=(8, 1, 1)),
            8,
            r"train\.batch_size: 12 .*data\*fsdp=8",
        ),
        (dict(train__batch_size=8, mesh__shape=(2, 2, 2)), 8, None),  # data*fsdp=4 divides 8
        (
            dict(train__batch_size=6, mesh__shape=(2, 2, 2)),
            8,
            r"train\.batch_size: 6 .*data\*fsdp=4",
        ),
        (
            dict(train__batch_size=16, optimizer__grad_accum_steps=4),
            8,
            r"train\.batch_size: 16 rows \(/4",
        ),
        (dict(mesh__shape=(3, 1, 1)), 8, r"mesh\.shape: \(3, 1, 1\) needs 3 devices but 8"),
        (dict(mesh__shape=(-1, 3, 1)), 8, r"mesh\.shape: .*cannot fill 8 devices"),
        (dict(mesh__shape=(-1, 1)), 8, r"mesh\.shape: .*does not match mesh\.axis_names"),
        # Multi-slice: mesh.shape is per slice, dcn_shape multiplies it.
        (dict(mesh__shape=(-1, 1, 1), mesh__dcn_shape=(2, 1, 1)), 8, None),
        (dict(mesh__shape=(4, 1, 1), mesh__dcn_shape=(2, 1, 1)), 8, None),
        (dict(train__batch_size=4, mesh__dcn_shape=(2, 1, 1)), 8, r"data\*fsdp=8"),
        (dict(mesh__dcn_shape=(3, 1, 1)), 8, r"mesh\.dcn_shape"),
        (dict(train__max_consecutive_nonfinite=0), 8, r"train\.max_consecutive_nonfinite"),
        (dict(train__checkpoint_every=0), 8, r"train\.checkpoint_every"),
        (dict(data__train=""), 8, r"data\.train: is required"),
        # Warmup longer than the run is clamped to it (a short run of a long recipe just works).
        (dict(optimizer__warmup_steps=5, train__num_steps=4), 8, None),
        (
            dict(optimizer__warmup_steps=5, optimizer__warmup_ratio=0.1),
            8,
            r"optimizer\.warmup_ratio: set warmup_ratio or warmup_steps",
        ),
        (dict(data__on_long_row="cut"), 8, r"data\.on_long_row: 'cut' is not one of truncate"),
        (dict(train__num_epochs=-1.0), 8, r"train\.num_epochs: must be >= 0"),
        # PPO warms up over optimizer updates: num_steps * num_epochs * num_minibatches.
        (dict(algorithm="ppo", optimizer__warmup_steps=10, train__num_steps=4), 8, None),
    ],
)
def test_validate_names_the_key(changes, num_devices, message):
    config = _config(**changes)
    if message is None:
        validate(config, num_devices=num_devices)
    else:
        with pytest.raises(ConfigError, match=message):
            validate(config, num_devices=num_devices)


def test_unknown_algorithm_is_named():
    config = _config()
    config.algorithm = "ppx"
    with pytest.raises(ConfigError, match=r"config\.algorithm: 'ppx' is not one of sft, reward"):
        validate(config, num_devices=8)


def test_train_command_end_to_end(tiny_data_dir: Path, tiny_sft_settings: dict, tmp_path: Path):
    """`python -m jaxalign.train` trains, evaluates, checkpoints and exports a loadable HF model."""
    workdir = tmp_path / "run"
    settings = {
        **tiny_sft_settings,
        "train.log_every": 5,
        "train.eval_every": 10,
        "train.eval_batches": 1,
    }
    command = [
        sys.executable,
        "-m",
        "jaxalign.train",
        f"--config=configs/sft_tiny.py:{tiny_data_dir}",
        f"--workdir={workdir}",
        *(f"--config.{key}={value}" for key, value in settings.items()),
    ]
    done = subprocess.run(
        command, cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last_line = done.stdout.strip().splitlines()[-1]
    assert last_line == (
        f"done. checkpoints: {workdir / 'checkpoints'}; Hugging Face model: {workdir / 'hf'}"
    )

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [5, 10]
    assert all(np.isfinite(r["loss"]) and r["skipped_steps"] == 0 for r in train_records)
    assert [r["step"] for r in records if "eval/loss" in r] == [10]  # not again after the loop
    saved_config = json.loads((workdir / "config.json").read_text())
    assert saved_config["train"]["log_every"] == 5
    assert saved_config["data"]["train"] == f"{tiny_data_dir}/sft_train.jsonl"
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10"]

    # The export loads in both libraries, and they agree on its logits.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxalign.models import from_pretrained

    tokenizer = AutoTokenizer.from_pretrained(workdir / "hf")
    ids = tokenizer("I watched The Golden Frontier and", return_tensors="np")["input_ids"]
    hf_model = AutoModelForCausalLM.from_pretrained(workdir / "hf").eval()
    with torch.no_grad():
        hf_logits = hf_model(torch.from_numpy(ids)).logits.numpy()
    model, params = from_pretrained(str(workdir / "hf"))
    logits = np.asarray(model.apply({"params": params}, ids))
    assert logits.shape == (1, ids.shape[1], 512)
    np.testing.assert_allclose(logits, hf_logits, atol=2e-4, rtol=2e-4)
