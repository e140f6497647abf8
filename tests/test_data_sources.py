"""Reading rows with their locations from JSONL / JSON / parquet / directories / `datasets`."""

import json
import re

import pytest

from jaxalign.data import DataError, RowStats, load_rows

ROWS = [
    {"prompt": "hello", "completion": "yes"},
    {"prompt": "what is the capital of france ?", "completion": "paris"},
    {"prompt": "tell me a joke", "completion": "no"},
]


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet_and_jsonl_load_the_same_rows(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in ROWS])
    parquet = write_parquet(tmp_path / "a.parquet", ROWS)
    from_jsonl = list(load_rows(jsonl))
    from_parquet = list(load_rows(parquet))
    assert [row for row, _ in from_jsonl] == [row for row, _ in from_parquet] == ROWS
    assert [where for _, where in from_jsonl] == [f"{jsonl}:{n}" for n in (1, 2, 3)]
    assert [where for _, where in from_parquet] == [f"{parquet}:row {n}" for n in (0, 1, 2)]


def test_jsonl_keeps_line_numbers_and_names_bad_line(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [json.dumps(ROWS[0]), "", "{not json", json.dumps(ROWS[1])]
    )
    with pytest.raises(DataError, match=rf"^{path}:3: line is not JSON") as caught:
        list(load_rows(path))
    assert caught.value.reason == "not_json"

    stats = RowStats("skip")
    rows = list(load_rows(path, stats=stats))
    assert [where for _, where in rows] == [f"{path}:1", f"{path}:4"]
    assert stats.skipped == {"not_json": 1} and stats.rows_read == 3


def test_json_array_list_of_files_and_directory_split(tmp_path):
    (tmp_path / "array.json").write_text(json.dumps(ROWS))
    rows = list(load_rows(tmp_path / "array.json"))
    assert rows[2] == (ROWS[2], f"{tmp_path / 'array.json'}:row 2")

    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [json.dumps(r) for r in ROWS[:2]])
    write_parquet(data / "test-00000-of-00001.parquet", ROWS[2:])
    assert [row for row, _ in load_rows(data)] == ROWS[:2]
    assert [row for row, _ in load_rows(data, split="test")] == ROWS[2:]
    both = [data / "test-00000-of-00001.parquet", data / "train.jsonl"]
    assert [row for row, _ in load_rows(both)] == ROWS[2:] + ROWS[:2]


def test_datasets_objects_saved_directories_and_hub_names(tmp_path, monkeypatch):
    import datasets

    jsonl = write_jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in ROWS])
    dataset = datasets.load_dataset("json", data_files=str(jsonl), split="train")
    rows = list(load_rows(dataset))
    assert [row for row, _ in rows] == ROWS
    assert rows[1][1].endswith("[train]:row 1")

    dataset.save_to_disk(tmp_path / "saved")
    assert [row for row, _ in load_rows(tmp_path / "saved")] == ROWS

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return dataset

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = list(load_rows("HuggingFaceH4/ultrafeedback_binarized", split="train_prefs"))
    assert calls == [("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")]
    assert rows[0] == (ROWS[0], "HuggingFaceH4/ultrafeedback_binarized[train_prefs]:row 0")


@pytest.mark.parametrize("name", ["nope.jsonl", "./data/train.jsonl", "my_prefs", "prefs.csv"])
def test_missing_local_path_says_it_does_not_exist(tmp_path, monkeypatch, name):
    """A mistyped local path is reported as missing, never looked up on the hub."""
    import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub lookup"))
    with pytest.raises(DataError, match=rf"^{re.escape(name)}: no such file or folder") as caught:
        list(load_rows(name))
    assert caught.value.reason == "not_found"
