"""The `jaxalign` console script: help generated from the schema, one-line errors, quiet logs, the
README's commands, model card, `push_to_hub` and Weights & Biases logging (issue 14)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest

from jaxalign import cli, hub
from jaxalign.config import base_config, validate
from jaxalign.metrics import MetricWriter

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "jaxalign"  # installed by `pip install -e .`


def jaxalign(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "jaxalign.cli"]
    return subprocess.run(
        [*command, *args], cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=timeout
    )


def test_train_help_lists_every_config_key_with_default_and_description():
    done = jaxalign("train", "--help")
    assert done.returncode == 0, done.stderr
    lines = {line.split(" = ")[0].strip(): line for line in done.stdout.splitlines()}
    for key, default in cli.flat_config(base_config()).items():
        assert key in lines, key
        assert f" = {default!r}" in lines[key], lines[key]
        assert "  # " in lines[key], f"{key} has no description in jaxalign/config.py"


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["train", "--config.train.batchsize=8"],
            "error: --config.train.batchsize: unknown config key; did you mean "
            "--config.train.batch_size?",
        ),
        (["train", "--config.train.batch_size=abc"], "error: flag --config.train.batch_size=abc"),
        (["trian"], "error: unknown subcommand 'trian' (did you mean 'train'?)"),
    ],
)
def test_mistakes_are_one_line_and_a_nonzero_exit(args, message, capsys):
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(message), captured


def test_typo_from_the_console_script_is_one_line():
    done = jaxalign("train", "--config.optimizer.lerning_rate=1e-3", timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --config.optimizer.lerning_rate: unknown config key; did you mean "
        "--config.optimizer.learning_rate? (jaxalign train --help lists all)"
    ]


def test_every_subcommand_has_help(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.SUBCOMMANDS)


def test_run_without_a_config_file_starts_from_the_base_config(tmp_path):
    config, workdir = cli.parse_train_flags(
        ["--config.algorithm=dpo", "--config.data.train=prefs.jsonl", "--config.dpo.beta=0.2"]
    )
    assert (config.algorithm, config.data.train, config.dpo.beta) == ("dpo", "prefs.jsonl", 0.2)
    assert config.train.batch_size == base_config().train.batch_size
    assert re.fullmatch(r"runs/dpo-\d{8}-\d{6}", str(workdir))


def test_two_step_run_is_quiet_and_exports_a_model_card(tiny_data_dir, tiny_sft_settings, tmp_path):
    """The README's flow through the console script: no orbax/absl INFO lines on stderr, the
    start-up summary and one compile line, an export with its model card."""
    workdir = tmp_path / "run"
    settings = {**tiny_sft_settings, "train.num_steps": 2, "data.eval": ""}
    done = jaxalign(
        "train",
        f"--config=configs/sft_tiny.py:{tiny_data_dir}",
        f"--workdir={workdir}",
        *(f"--config.{key}={value}" for key, value in settings.items()),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stderr = done.stderr
    assert not re.search(r"^I\d{4} ", stderr, re.M), stderr  # absl-format INFO lines
    assert "orbax" not in stderr.lower() and "checkpoint_manager" not in stderr, stderr
    assert "jaxalign sft: 8 cpu devices" in stderr and "parameters: " in stderr
    assert "run: 2 steps" in stderr and "outputs: " in stderr
    assert len(re.findall(r"compiled for batch shapes .* in [\d.]+ s", stderr)) == 1, stderr
    card = (workdir / "hf" / "README.md").read_text()
    assert "supervised fine-tuning" in card and "| `loss` |" in card
    assert "sft_train.jsonl" in card


def test_readme_commands_use_the_console_script_and_parse(tiny_data_dir):
    """Every command in the README's bash blocks is `jaxalign <subcommand>` (or pip / pytest /
    a `python tests/...` helper);
    its train commands parse and validate (other tests run the same configs)."""
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    commands = []
    for block in blocks:
        text = block.replace("\\\n", " ")
        commands += [line.split("#")[0].strip() for line in text.splitlines()]
    commands = [c for c in commands if c]
    assert commands and not [c for c in commands if "python -m jaxalign" in c]
    train_commands = 0
    for command in commands:
        for part in command.split("&&"):
            words = shlex.split(part.strip().replace("/tmp/jaxalign-tiny", str(tiny_data_dir)))
            if words[0] in ("pip", "pytest") or (words[0] == "python" and words[1][:6] == "tests/"):
                continue  # installs, tests and test-support scripts (tests/real_weights.py)
            assert words[0] == "jaxalign" and words[1] in cli.SUBCOMMANDS, part
            if words[1] == "train":
                config, _ = cli.parse_train_flags(words[2:])
                validate(config, num_devices=8)
                train_commands += 1
    assert train_commands >= 6


def test_push_to_hub_uploads_the_export(tmp_path, monkeypatch):
    """`train.push_to_hub`: create the repo, upload the folder (the upload call replaced here)."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(repo_id)
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "upload_folder",
        lambda self, **kw: calls.append(kw) or types.SimpleNamespace(commit_url="https://x/c/1"),
    )
    config = base_config().to_dict()
    config.update(algorithm="dpo")
    config["model"]["name_or_path"] = "org/base-model"
    hub.write_model_card(tmp_path, config, {"loss": 0.5})
    assert hub.push_to_hub(tmp_path, "me/my-model") == "https://x/c/1"
    assert calls[0] == "me/my-model"
    assert calls[1]["folder_path"] == str(tmp_path) and calls[1]["repo_id"] == "me/my-model"
    card = (tmp_path / "README.md").read_text()
    assert "base_model: org/base-model" in card and "Direct Preference Optimization" in card
    assert json.loads((tmp_path / "jaxalign_config.json").read_text())["algorithm"] == "dpo"


def test_wandb_logging_is_optional_and_works_offline(tmp_path, monkeypatch):
    """A stand-in `wandb` module records what the writer sends (wandb is not a dependency)."""
    runs = []

    class Run:
        def __init__(self, **kwargs):
            self.kwargs, self.logged, self.finished = kwargs, [], False
            runs.append(self)

        def log(self, values, step):
            self.logged.append((step, dict(values)))

        def finish(self):
            self.finished = True

    fake = types.SimpleNamespace(init=Run, util=types.SimpleNamespace(generate_id=lambda: "abc"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    options = {"project": "p", "mode": "offline", "config": {"algorithm": "sft"}}
    with MetricWriter(tmp_path, total_steps=2, progress_bar=False, wandb=options) as writer:
        writer.write(1, {"loss": 2.0, "num_tokens": 100})
        writer.write(2, {"loss": 1.5, "num_tokens": 200})
    (run,) = runs
    assert run.kwargs["mode"] == "offline" and run.kwargs["project"] == "p"
    assert run.kwargs["id"] == "abc" and (tmp_path / "wandb_run_id").read_text() == "abc"
    assert [step for step, _ in run.logged] == [1, 2] and run.finished
    assert "tokens_per_sec" in run.logged[1][1] and "steps_per_sec" not in run.logged[1][1]

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: one clear error
    from jaxalign.config import ConfigError

    with pytest.raises(ConfigError, match=r"pip install wandb"):
        MetricWriter(tmp_path / "b", total_steps=1, progress_bar=False, wandb=options)


def test_training_run_pushes_its_export_at_the_end(
    tiny_data_dir, tiny_sft_settings, tmp_path, monkeypatch
):
    """The engine's end of run: `train.push_to_hub` uploads `hf/` with its final model card."""
    import huggingface_hub
    from test_multihost import tiny_config

    from jaxalign.train import run

    uploads = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "upload_folder",
        lambda self, **kw: uploads.append(kw) or types.SimpleNamespace(commit_url="https://x/c/2"),
    )
    settings = {
        **tiny_sft_settings,
        "train.num_steps": 2,
        "data.eval": "",
        "train.push_to_hub": "me/tiny-sft",
    }
    result = run(tiny_config("sft_tiny.py", tiny_data_dir, settings), tmp_path / "run")
    assert [u["repo_id"] for u in uploads] == ["me/tiny-sft"]
    assert uploads[0]["folder_path"] == str(result.export_dir)
    assert "| `loss` |" in (result.export_dir / "README.md").read_text()
