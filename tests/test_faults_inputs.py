"""Bad inputs (issue 11, items 5, 7, 8): each fails with one line naming the file and line (or
field), from the command line where a user meets it, or is skipped and counted when asked.

Conflicting RoPE fields in `config.json` (item 6) are covered in test_rope_scaling.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_hf import make_tiny_hf_model

from jaxalign.data import DataError, RowStats, build_sft_dataset, load_rows
from jaxalign.models import CheckpointError, from_pretrained, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _cli(module: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(
        command, cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=timeout
    )


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def _with_invalid_utf8(src: Path, dst: Path, line_number: int) -> Path:
    """`src` with a byte that is not UTF-8 (0xff) put into line `line_number` (1-based)."""
    lines = src.read_bytes().split(b"\n")
    lines[line_number - 1] = lines[line_number - 1].replace(b'": "', b'": "\xff', 1)
    dst.write_bytes(b"\n".join(lines))
    return dst


# ----------------------------------------------------------------------------- invalid UTF-8


def test_train_cli_names_the_line_that_is_not_utf8(tmp_path, tiny_data_dir, tiny_sft_settings):
    data = _with_invalid_utf8(tiny_data_dir / "sft_train.jsonl", tmp_path / "sft.jsonl", 3)
    settings = {**tiny_sft_settings, "data.on_bad_row": "error", "data.train": str(data)}
    done = _cli(
        "jaxalign.train",
        f"--config=configs/sft_tiny.py:{tiny_data_dir}",
        f"--workdir={tmp_path / 'run'}",
        *(f"--config.{key}={value}" for key, value in settings.items()),
    )
    assert done.returncode != 0
    message = _last_line(done.stderr)
    assert f"{data}:3: line is not valid UTF-8 (byte b'\\xff' at column" in message, message
    assert message.endswith("[not_utf8]")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_invalid_utf8_row_is_skipped_and_counted(tmp_path, tiny_data_dir):
    """What the trainers call with `data.on_bad_row=skip`: the bad line goes, the rest stays."""
    src = tiny_data_dir / "sft_train.jsonl"
    data = _with_invalid_utf8(src, tmp_path / "sft.jsonl", 3)
    without_line = tmp_path / "without_line_3.jsonl"
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    without_line.write_text("".join(lines[:2] + lines[3:]), encoding="utf-8")
    tokenizer = load_tokenizer(tiny_data_dir / "tokenizer")

    skipped = build_sft_dataset(data, tokenizer, max_length=256, on_bad_row="skip")
    reference = build_sft_dataset(without_line, tokenizer, max_length=256)
    assert skipped.stats["skipped"] == {"not_utf8": 1}
    assert skipped.stats["rows_read"] == reference.stats["rows_read"] + 1
    assert len(skipped.examples) == len(reference.examples) > 0
    for ours, theirs in zip(skipped.examples, reference.examples, strict=True):
        assert ours.keys() == theirs.keys()
        assert all((ours[k] == theirs[k]).all() for k in ours)

    with pytest.raises(DataError, match=rf"^{data}:3: line is not valid UTF-8"):
        build_sft_dataset(data, tokenizer, max_length=256)


def test_invalid_utf8_in_a_json_array_names_row_and_line(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    path = tmp_path / "rows.json"
    text = json.dumps(rows, indent=1).encode()  # one field per line: row 1's prompt on line 7
    path.write_bytes(text.replace(b'"c"', b'"c\xfe"'))
    assert text.split(b"\n")[6].strip() == b'"prompt": "c",'
    with pytest.raises(DataError, match=rf"^{path}:row 1: row is not valid UTF-8 .*line 7\)"):
        list(load_rows(path))
    stats = RowStats("skip")
    assert [row for row, _ in load_rows(path, stats=stats)] == rows[:1]
    assert stats.skipped == {"not_utf8": 1}


def test_byte_order_mark_is_not_a_bad_row(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n{"prompt": "b"}\n')
    assert [row["prompt"] for row, _ in load_rows(path)] == ["a", "b"]


# ----------------------------------------------------------------------------- safetensors


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_hf_model("llama", tmp_path_factory.mktemp("ckpt") / "llama")


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def _damage(weights: Path, how: str) -> None:
    raw = weights.read_bytes()
    damaged = {
        "empty": b"",
        "truncated": raw[: len(raw) // 2],
        "corrupt_header": raw[:8] + b"{garbage" + raw[16:],
        "header_length_only": raw[:8],
    }[how]
    weights.write_bytes(damaged)


@pytest.mark.parametrize("how", ["empty", "truncated", "corrupt_header", "header_length_only"])
def test_damaged_safetensors_names_the_file(tmp_path, tiny_checkpoint, how):
    directory = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    _damage(directory / "model.safetensors", how)
    with pytest.raises(CheckpointError, match=rf"^{directory}/model\.safetensors: not a readable"):
        from_pretrained(directory)


def test_damaged_shard_listed_in_the_index_names_the_file(tmp_path, tiny_checkpoint):
    directory = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    (directory / "model.safetensors").rename(directory / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(directory / "model-00001-of-00001.safetensors", framework="np") as f:
        names = list(f.keys())
    index = {"weight_map": dict.fromkeys(names, "model-00001-of-00001.safetensors")}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    _damage(directory / "model-00001-of-00001.safetensors", "truncated")
    shard = directory / "model-00001-of-00001.safetensors"
    with pytest.raises(CheckpointError, match=rf"^{shard}: not a readable safetensors file"):
        from_pretrained(directory)
    (directory / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not a"):
        from_pretrained(directory)


# ----------------------------------------------------------------------------- evaluate CLI


def _evaluate(tmp_path: Path, prompts: Path):
    policy = tmp_path / "not-loaded"  # prompts are read before any checkpoint
    return _cli(
        "jaxalign.evaluate",
        f"--policy={policy}",
        f"--reference={policy}",
        f"--prompts={prompts}",
        "--judge=vader",
    )


def test_evaluate_cli_refuses_an_empty_prompts_file(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n  \n")
    done = _evaluate(tmp_path, prompts)
    assert done.returncode == 1 and done.stdout == ""  # no summary, no NaN
    assert _last_line(done.stderr) == (
        f"jaxalign.evaluate: error: {prompts}: no prompts: expected a 'prompt' per line [no_rows]"
    )
    assert "Traceback" not in done.stderr


def test_evaluate_cli_names_the_line_of_a_prompt_that_is_not_a_string(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": ["not", "a", "string"]}\n')
    done = _evaluate(tmp_path, prompts)
    assert done.returncode == 1
    assert _last_line(done.stderr) == (
        f"jaxalign.evaluate: error: {prompts}:2: field 'prompt': expected a string, got list "
        "[wrong_type]"
    )
    assert "Traceback" not in done.stderr


def test_evaluate_names_a_damaged_checkpoint_file(tmp_path, tiny_checkpoint, capsys):
    """In process (the subprocess path is shown above): `main` exits with one line, no traceback."""
    from jaxalign.evaluate import main

    directory = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    _damage(directory / "model.safetensors", "truncated")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n')
    argv = [f"--policy={directory}", f"--reference={directory}", f"--prompts={prompts}"]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--judge=vader"])
    assert str(exited.value.code).startswith(
        f"jaxalign.evaluate: error: {directory}/model.safetensors: not a readable safetensors file"
    ), exited.value.code
    assert capsys.readouterr().out == ""
