"""Every TRL dataset type and file kind (issue 14): each tokenises as its explicit equivalent, and
SFT and DPO train two steps on it through `jaxalign train`'s flag parsing.

The training runs share one config shape (tiny random model, batch 8, one padded length), so after
the first run of each algorithm every run reuses the compiled step.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from jaxalign import cli
from jaxalign.data import (
    DataError,
    build_preference_dataset,
    build_prompt_dataset,
    build_sft_dataset,
)
from jaxalign.data.testing import build_tiny_tokenizer

USER = {"role": "user", "content": "what is the capital of france ?"}
SYSTEM = {"role": "system", "content": "tell me"}


def chat(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# (name, rows, the same rows in the explicit format), 8 rows each: one training batch.
PROMPTS = ["hello world", "how are you today ?", "tell me a joke", "what is the capital"]
ANSWERS = ["paris is the capital of france .", "i am fine , thank you .", "sure here is one"]


def _pairs(n: int = 8) -> list[tuple[str, str, str]]:
    return [(PROMPTS[i % 4], ANSWERS[i % 3], ANSWERS[(i + 1) % 3] + " no") for i in range(n)]


SFT_CASES = {
    "language_modeling": (
        [{"text": f"{p} {a}"} for p, a, _ in _pairs()],
        [{"prompt": "", "completion": f"{p} {a}"} for p, a, _ in _pairs()],
    ),
    "prompt_completion": (
        [{"prompt": p, "completion": " " + a} for p, a, _ in _pairs()],
        [{"prompt": p, "completion": " " + a} for p, a, _ in _pairs()],
    ),
    "conversational_prompt_completion": (
        [{"prompt": chat(p, "")[:1], "completion": reply(a)} for p, a, _ in _pairs()],
        [{"messages": chat(p, a)} for p, a, _ in _pairs()],
    ),
    "messages": (
        [{"messages": [SYSTEM, *chat(p, a)]} for p, a, _ in _pairs()],
        [{"messages": [SYSTEM, *chat(p, a)]} for p, a, _ in _pairs()],
    ),
}
DPO_CASES = {
    "explicit_prompt": (
        [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in _pairs()],
        [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in _pairs()],
    ),
    "implicit_prompt": (
        [{"chosen": f"{p} {c}", "rejected": f"{p} {r}"} for p, c, r in _pairs()],
        [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in _pairs()],
    ),
    "conversational_explicit_prompt": (
        [
            {"prompt": chat(p, "")[:1], "chosen": reply(c), "rejected": reply(r)}
            for p, c, r in _pairs()
        ],
        [
            {"prompt": chat(p, "")[:1], "chosen": reply(c), "rejected": reply(r)}
            for p, c, r in _pairs()
        ],
    ),
    "conversational_implicit_prompt": (
        [{"chosen": chat(p, c), "rejected": chat(p, r)} for p, c, r in _pairs()],
        [
            {"prompt": chat(p, "")[:1], "chosen": reply(c), "rejected": reply(r)}
            for p, c, r in _pairs()
        ],
    ),
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_as(kind: str, directory: Path, rows: list[dict]) -> str:
    """`rows` as a file (or folder) of `kind`; returns what `data.train` names."""
    directory.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if kind == "jsonl":
        return str(write_jsonl(directory / "train.jsonl", rows))
    if kind == "json":
        (directory / "train.json").write_text(json.dumps(rows))
        return str(directory / "train.json")
    if kind == "jsonl.gz":
        with gzip.open(directory / "train.jsonl.gz", "wt") as f:
            f.write(text)
        return str(directory / "train.jsonl.gz")
    if kind == "jsonl.bz2":
        with bz2.open(directory / "train.jsonl.bz2", "wt") as f:
            f.write(text)
        return str(directory / "train.jsonl.bz2")
    if kind in ("csv", "tsv"):
        path = directory / f"train.{kind}"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(
                f, fieldnames=list(rows[0]), delimiter="\t" if kind == "tsv" else ","
            )
            writer.writeheader()
            writer.writerows(rows)
        return str(path)
    import datasets

    dataset = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        dataset.to_parquet(str(directory / "train.parquet"))
        return str(directory / "train.parquet")
    if kind == "save_to_disk":
        datasets.DatasetDict({"train": dataset}).save_to_disk(str(directory / "saved"))
        return str(directory / "saved")
    raise ValueError(kind)


FILE_KINDS = ("jsonl", "json", "parquet", "csv", "tsv", "jsonl.gz", "jsonl.bz2", "save_to_disk")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from jaxalign.models import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def assert_same_examples(ours, theirs):
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def sft(source, tokenizer, **kwargs):
    return build_sft_dataset(source, tokenizer, max_length=32, **kwargs)


def prefs(source, tokenizer, **kwargs):
    return build_preference_dataset(
        source, tokenizer, max_length=32, max_prompt_length=16, **kwargs
    )


# ----------------------------------------------------------------------------- tokenisation


@pytest.mark.parametrize("case", SFT_CASES)
def test_sft_format_tokenises_as_its_explicit_form(case, tokenizer, tmp_path):
    rows, explicit = SFT_CASES[case]
    ours = sft(write_jsonl(tmp_path / "a.jsonl", rows), tokenizer)
    theirs = sft(write_jsonl(tmp_path / "b.jsonl", explicit), tokenizer)
    assert_same_examples(ours.examples, theirs.examples)
    assert sum(ours.examples[0]["loss_mask"]) > 0


@pytest.mark.parametrize("case", DPO_CASES)
def test_preference_format_tokenises_as_its_explicit_form(case, tokenizer, tmp_path):
    rows, explicit = DPO_CASES[case]
    ours = prefs(write_jsonl(tmp_path / "a.jsonl", rows), tokenizer)
    theirs = prefs(write_jsonl(tmp_path / "b.jsonl", explicit), tokenizer)
    assert_same_examples(ours.examples, theirs.examples)


def test_implicit_prompt_is_cut_at_a_word_boundary(tokenizer, tmp_path):
    """TRL's extract_prompt: the shared start up to its last whitespace (here inside "blue"/
    "black", so the responses start with the whole word)."""
    from jaxalign.data import split_preference

    text = split_preference(
        {"chosen": "the sky is blue", "rejected": "the sky is black"}, tokenizer, where="x"
    )
    assert (text.prompt, text.chosen, text.rejected) == ("the sky is", " blue", " black")


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_file_kind_gives_the_rows_of_jsonl(kind, tokenizer, tmp_path):
    rows, _ = SFT_CASES["prompt_completion"]
    reference = sft(write_as("jsonl", tmp_path / "ref", rows), tokenizer)
    dataset = sft(write_as(kind, tmp_path / kind, rows), tokenizer)
    assert_same_examples(dataset.examples, reference.examples)


def test_hub_dataset_options_reach_load_dataset(tokenizer, tmp_path, monkeypatch):
    """`data.subset/data_files/revision` go to `datasets.load_dataset` (no network here)."""
    import datasets

    from jaxalign import config as config_lib
    from jaxalign.trainers import common

    rows, _ = SFT_CASES["prompt_completion"]
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data_cfg = config_lib.base_config().data
    data_cfg.subset, data_cfg.data_files, data_cfg.revision = "en", "a/*.parquet,b.json", "v1.0"
    dataset = sft(common.data_source("org/reviews", data_cfg), tokenizer, split="train_sft")
    assert calls == [
        (
            "org/reviews",
            "en",
            {"split": "train_sft", "data_files": ["a/*.parquet", "b.json"], "revision": "v1.0"},
        )
    ]
    assert len(dataset.examples) == len(rows)


def test_unpaired_preference_is_named_as_unsupported(tokenizer, tmp_path):
    rows = [{"prompt": "hello", "completion": " world", "label": True}] * 8
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(DataError, match=r"unpaired preference rows .* not supported by dpo"):
        prefs(path, tokenizer, on_bad_row="skip")
    with pytest.raises(DataError, match=r"unpaired preference rows .* not supported by sft"):
        sft(path, tokenizer)


def test_prompt_only_rows_keep_their_extra_columns(tokenizer, tmp_path):
    answers = ["paris", "fine", "joke", "x"]
    rows = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, answers, strict=True)]
    path = write_as("csv", tmp_path, rows)
    dataset = build_prompt_dataset(path, tokenizer, max_prompt_length=16, algorithm="grpo")
    assert dataset.rows == rows
    assert dataset.stats["formats"] == {"prompt-only": 4}


@pytest.mark.parametrize("policy", ["truncate", "skip", "error"])
def test_long_rows_follow_on_long_row(policy, tokenizer, tmp_path):
    long = {"prompt": "hello", "completion": " " + " ".join(["one two three"] * 20)}
    path = write_jsonl(tmp_path / "long.jsonl", [long, {"prompt": "hi", "completion": " yes"}])
    if policy == "error":
        with pytest.raises(DataError, match=r":1: field 'completion': .*tokens > data.max_length"):
            sft(path, tokenizer, on_long_row=policy)
        return
    dataset = sft(path, tokenizer, on_long_row=policy)
    if policy == "truncate":
        assert dataset.stats["truncated"] == {"completion": 1}
        assert [len(e["input_ids"]) for e in dataset.examples][0] == 32
    else:
        assert dataset.stats["dropped"] == {"too_long": 1} and len(dataset.examples) == 1


# ----------------------------------------------------------------------------- training runs

# One run per algorithm trains on every format at once, each in another file kind: data.train
# names them all (comma-separated), the formats mix freely, and the start-up summary counts the
# rows of each. SFT is configs/sft_tiny.py with conftest's TINY_SFT_SETTINGS, the train step
# other test files compile (a cache hit in the full suite); DPO runs two steps on one shape.
SFT_FILES = {
    "language_modeling": "jsonl.gz",
    "prompt_completion": "csv",
    "conversational_prompt_completion": "parquet",
    "messages": "save_to_disk",
}
DPO_FILES = {
    "explicit_prompt": "jsonl.bz2",
    "implicit_prompt": "tsv",
    "conversational_explicit_prompt": "json",
    "conversational_implicit_prompt": "jsonl",
}
SUMMARY_NAMES = {
    "language_modeling": "language modeling",
    "prompt_completion": "prompt-completion",
    "conversational_prompt_completion": "prompt-completion (conversational)",
    "messages": "conversational",
    "explicit_prompt": "preference",
    "implicit_prompt": "preference",
    "conversational_explicit_prompt": "preference (conversational)",
    "conversational_implicit_prompt": "preference (conversational)",
}
REPO = Path(__file__).resolve().parents[1]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def train_run(args: list[str], workdir: Path) -> tuple[list[dict], str]:
    """`jaxalign train ARGS`, parsed and run as the console script does, in this process:
    (metric records, start-up summary)."""
    config, parsed_workdir = cli.parse_train_flags([*args, f"--workdir={workdir}"])
    assert parsed_workdir == workdir
    logger, handler = logging.getLogger("jaxalign"), _Records()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        assert cli._train(config, workdir) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    summary = next(m for m in handler.messages if m.startswith("jaxalign "))
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return records, summary


def write_all(cases: dict, files: dict, directory: Path) -> str:
    return ",".join(
        write_as(kind, directory / case, cases[case][0]) for case, kind in files.items()
    )


@pytest.fixture(scope="module")
def sft_run(tiny_data_dir, tiny_sft_settings, tokenizer_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sft_formats")
    settings = {
        **tiny_sft_settings,
        "tokenizer": str(tokenizer_dir),
        "data.train": write_all(SFT_CASES, SFT_FILES, directory),
        "data.eval": "",
        "train.export_hf": False,
        "train.log_every": 1,
    }
    args = [f"--config={REPO / 'configs' / 'sft_tiny.py'}:{tiny_data_dir}"]
    args += [f"--config.{key}={value}" for key, value in settings.items()]
    return train_run(args, directory / "run")


@pytest.fixture(scope="module")
def dpo_run(tokenizer_dir, tmp_path_factory):
    """No config file: `--config.algorithm=dpo --config.data.train=...` on the base config."""
    directory = tmp_path_factory.mktemp("dpo_formats")
    settings = {
        "algorithm": "dpo",
        "tokenizer": str(tokenizer_dir),
        "data.train": write_all(DPO_CASES, DPO_FILES, directory),
        "model.init.vocab_size": 128,
        "train.batch_size": 8,
        "train.num_steps": 2,
        "train.log_every": 1,
        "train.async_checkpoint": False,
        "train.export_hf": False,
        "data.max_length": 32,
        "data.max_prompt_length": 16,
        "data.buckets": "(64,)",  # every shared-prompt row (<= 48 tokens) padded to 64
        "optimizer.learning_rate": 1e-3,
    }
    args = [f"--config.{key}={value}" for key, value in settings.items()]
    return train_run(args, directory / "run")


@pytest.mark.parametrize("case", SFT_FILES)
def test_sft_cli_trains_on_each_format_and_file_kind(sft_run, case):
    records, summary = sft_run
    assert f"{SUMMARY_NAMES[case]} 8" in summary or f"{SUMMARY_NAMES[case]} 16" in summary, summary
    assert "-> 32 examples" in summary
    assert [r["step"] for r in records] == list(range(1, 11))
    assert all(np.isfinite(r["loss"]) for r in records)
    assert {"num_tokens", "mean_token_accuracy", "entropy", "epoch"} <= records[-1].keys()
    assert 0 <= records[-1]["mean_token_accuracy"] <= 1 and records[-1]["entropy"] > 0
    assert records[-1]["epoch"] == pytest.approx(10 / 4)  # 32 examples, batch 8
    assert "tokens_per_sec" in records[-1] and "steps_per_sec" not in records[-1]


@pytest.mark.parametrize("case", DPO_FILES)
def test_dpo_cli_trains_on_each_format_and_file_kind(dpo_run, case):
    records, summary = dpo_run
    assert SUMMARY_NAMES[case] in summary and "-> 32 examples" in summary, summary
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert {"rewards/accuracies", "rewards/margins", "num_tokens"} <= records[-1].keys()
