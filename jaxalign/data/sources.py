"""Reading raw rows, each with the place it came from, out of local files or hub datasets.

`load_rows` yields `(row, where)` pairs; `where` is what a `DataError` quotes so a bad row can be
found by hand: `path:LINE` (1-based) for JSON Lines (compressed too), `path:row N` (0-based, as
`dataset[N]`) for parquet, CSV/TSV, Arrow, JSON arrays and `datasets` rows.

JSON Lines and JSON are read here, line by line, so a line that is not UTF-8 or not JSON is one bad
row named by its line; parquet with pyarrow; CSV, TSV, Arrow files and hub datasets through
`datasets.load_dataset`; `save_to_disk` folders through `datasets.load_from_disk`.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import io
import json
import lzma
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

from jaxalign.data.errors import DataError, RowStats

__all__ = ["DataError", "DATA_SUFFIXES", "HubDataset", "load_rows"]

Row = dict[str, Any]
# Any: a `datasets.Dataset` / `DatasetDict`, or a `HubDataset`.
Source = str | os.PathLike | Sequence[str | os.PathLike] | Any
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_PLAIN_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".arrow")
DATA_SUFFIXES = _PLAIN_SUFFIXES + tuple(
    f"{suffix}{compression}" for suffix in (".jsonl", ".json") for compression in COMPRESSIONS
)
# Read through `datasets.load_dataset(<builder>, data_files=path)`.
_DATASETS_BUILDERS = {".csv": ("csv", {}), ".tsv": ("csv", {"sep": "\t"}), ".arrow": ("arrow", {})}


@dataclasses.dataclass(frozen=True)
class HubDataset:
    """A hub dataset and the `datasets.load_dataset` options that pick its files.

    Attributes:
      name: `org/name` on the Hub (or a local dataset script/folder `datasets` understands).
      subset: the configuration (`name=` of `load_dataset`); empty for the default.
      data_files: comma-separated files or globs inside the repo; empty for all.
      revision: branch, tag or commit; empty for the default branch.
    """

    name: str
    subset: str = ""
    data_files: str = ""
    revision: str = ""


def load_rows(
    source: Source, *, split: str = "train", stats: RowStats | None = None
) -> Iterator[tuple[Row, str]]:
    """Yields `(row, where)` for every row of `source`, in file order.

    Args:
      source: a `.jsonl`/`.json`/`.parquet` file; a list of such files (read in the order given);
        a directory (a `datasets.save_to_disk` folder, or data files found recursively, narrowed to
        those named after `split` when any are, like `train.jsonl` or `train-0000.parquet`); an
        in-memory `datasets.Dataset`/`DatasetDict`; or a hub dataset name for
        `datasets.load_dataset`.
      split: the split of a directory, `DatasetDict` or hub dataset; ignored for single files.
      stats: when given, every row read is counted and unreadable rows (a line or JSON-array row that
        is not UTF-8, a JSONL line that is not a JSON object) go through `stats.bad_row`, i.e. the `on_bad_row` policy; without it they
        raise `DataError`.
    """
    stats = stats if stats is not None else RowStats("error")
    for row, where in _iter_source(source, split):
        stats.rows_read += 1
        if isinstance(row, DataError):
            stats.bad_row(row)
            continue
        yield row, where


def _iter_source(source: Source, split: str) -> Iterator[tuple[Row | DataError, str]]:
    if _is_hf_dataset(source):
        yield from _iter_hf_dataset(source, split, name=_dataset_name(source))
    elif isinstance(source, HubDataset):
        if os.path.exists(source.name):
            yield from _iter_source(source.name, split)
        else:
            yield from _iter_hub(source, split)
    elif isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if os.path.isdir(path):
            yield from _iter_directory(path, split)
        elif os.path.isfile(path):
            yield from _iter_file(path)
        else:
            yield from _iter_hub(HubDataset(path), split)
    elif isinstance(source, Sequence):
        for item in source:
            yield from _iter_source(item, split)
    else:
        raise TypeError(f"unsupported data source of type {type(source).__name__}: {source!r}")


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _not_found(path: str, cause: str = "") -> DataError:
    detail = "no such file or folder"
    if "/" not in path and not path.endswith(DATA_SUFFIXES):
        detail += " (a Hub dataset is named org/name, e.g. trl-lib/ultrafeedback_binarized)"
    if cause:
        detail += f", and no Hub dataset of that name ({cause})"
    return DataError(path, None, "not_found", detail)


def _looks_like_path(name: str) -> bool:
    """A missing local path must fail as such, not as a confusing hub lookup: a data-file suffix,
    no `org/` (hub datasets have one), characters a hub name has not, or a first component that is
    a local folder."""
    if name.endswith(DATA_SUFFIXES) or not _HUB_NAME.match(name) or "/" not in name:
        return True
    return os.path.isdir(name.split("/", 1)[0])


def _iter_file(path: str) -> Iterator[tuple[Row | DataError, str]]:
    base, compression = os.path.splitext(path)
    if compression not in COMPRESSIONS:
        base, compression = path, ""
    suffix = os.path.splitext(base)[1]
    if suffix == ".jsonl":
        yield from _iter_jsonl(path, compression)
    elif suffix == ".json":
        yield from _iter_json(path, compression)
    elif suffix == ".parquet" and not compression:
        yield from _iter_parquet(path)
    elif suffix in _DATASETS_BUILDERS and not compression:
        yield from _iter_with_datasets(path, *_DATASETS_BUILDERS[suffix])
    else:
        raise DataError(
            path,
            None,
            "bad_file",
            f"unsupported data file; expected one of {', '.join(DATA_SUFFIXES)}",
        )


def _open(path: str, compression: str):
    """The file's bytes, decompressed by its suffix."""
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".bz2":
        return bz2.open(path, "rb")
    if compression == ".xz":
        return lzma.open(path, "rb")
    if compression == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(
                path, None, "bad_file", "reading .zst files needs `pip install zstandard`"
            ) from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def _iter_jsonl(path: str, compression: str = "") -> Iterator[tuple[Row | DataError, str]]:
    # Line by line (never through `datasets`) so every row keeps its exact line number. Lines are
    # split on b"\n" and decoded one at a time, so a line that is not UTF-8 is one bad row.
    with _open(path, compression) as f:
        for line_number, raw in enumerate(f, start=1):
            where = f"{path}:{line_number}"
            try:
                # A byte-order mark may open the file (utf-8-sig strips it); nowhere else.
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield _not_utf8(where, e), where
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield DataError(where, None, "not_json", f"line is not JSON ({e.msg})"), where
                continue
            if not isinstance(row, dict):
                detail = f"expected a JSON object, got {type(row).__name__}"
                yield DataError(where, None, "not_object", detail), where
                continue
            yield row, where


def _not_utf8(where: str, error: UnicodeDecodeError) -> DataError:
    bad = error.object[error.start : error.end]
    detail = f"line is not valid UTF-8 (byte {bad!r} at column {error.start + 1})"
    return DataError(where, None, "not_utf8", detail)


def _iter_json(path: str, compression: str = "") -> Iterator[tuple[Row | DataError, str]]:
    """A JSON array of objects, `{"key": [objects]}`, or (as `datasets` allows) JSON Lines.

    Bytes that are not UTF-8 are decoded with `surrogateescape` (one lone surrogate per bad byte),
    so the array still parses and only the rows whose strings hold such bytes are bad rows, each
    named by its index and the line of its first bad byte.
    """
    with _open(path, compression) as f:
        raw = f.read()
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        yield from _iter_jsonl(path, compression)
        return
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(data) != 1 or len(lists) != 1:
            raise DataError(path, None, "bad_file", "expected a JSON array of row objects")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(path, None, "bad_file", "expected a JSON array of row objects")
    # The lines of the undecodable bytes, in file order, and how many each row holds: when every
    # lone surrogate is such a byte (none came from a `\udcxx` escape), row i's first bad byte is
    # bad_lines[sum(counts[:i])].
    bad_lines = [text.count("\n", 0, m.start()) + 1 for m in _LONE_SURROGATE.finditer(text)]
    counts = [_count_lone_surrogates(row) for row in data]
    lines_known = sum(counts) == len(bad_lines)
    bad_seen = 0
    for index, (row, num_bad) in enumerate(zip(data, counts, strict=True)):
        where = f"{path}:row {index}"
        first_bad, bad_seen = bad_seen, bad_seen + num_bad
        if not isinstance(row, dict):
            detail = f"expected a JSON object, got {type(row).__name__}"
            yield DataError(where, None, "not_object", detail), where
            continue
        if num_bad:
            line = f" at line {bad_lines[first_bad]}" if lines_known else ""
            detail = f"row is not valid UTF-8 (undecodable byte{line})"
            yield DataError(where, None, "not_utf8", detail), where
            continue
        yield row, where


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _count_lone_surrogates(value: Any) -> int:
    """Lone surrogates in the strings (keys included) of a parsed JSON value."""
    if isinstance(value, str):
        return len(_LONE_SURROGATE.findall(value))
    if isinstance(value, dict):
        return sum(_count_lone_surrogates(k) + _count_lone_surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_count_lone_surrogates(v) for v in value)
    return 0


def _iter_parquet(path: str) -> Iterator[tuple[Row, str]]:
    import pyarrow.parquet as pq

    index = 0
    for record_batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in record_batch.to_pylist():
            yield row, f"{path}:row {index}"
            index += 1


def _iter_with_datasets(path: str, builder: str, kwargs: dict) -> Iterator[tuple[Row, str]]:
    import datasets

    dataset = datasets.load_dataset(builder, data_files=path, split="train", **kwargs)
    for index, row in enumerate(dataset):
        yield row, f"{path}:row {index}"


def _iter_directory(path: str, split: str) -> Iterator[tuple[Row | DataError, str]]:
    if os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(
        os.path.join(path, "dataset_dict.json")
    ):
        import datasets

        yield from _iter_hf_dataset(datasets.load_from_disk(path), split, name=path)
        return
    files = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(path)
        for name in names
        if name.endswith(DATA_SUFFIXES) and not name.startswith(".")
    )
    if not files:
        detail = f"folder holds no data files ({', '.join(_PLAIN_SUFFIXES)}, compressed JSON)"
        raise DataError(path, None, "not_found", detail)
    split_pattern = re.compile(rf"^{re.escape(split)}([-_.]\d|\.|-|$)")
    in_split = [
        f
        for f in files
        if split_pattern.match(os.path.basename(f))
        or split in os.path.relpath(f, path).split(os.sep)[:-1]
    ]
    for file in in_split or files:
        yield from _iter_file(file)


def _iter_hub(hub: HubDataset, split: str) -> Iterator[tuple[Row, str]]:
    if _looks_like_path(hub.name):
        raise _not_found(hub.name)
    import datasets

    options: dict[str, Any] = {}
    if hub.subset:
        options["name"] = hub.subset
    if hub.data_files:
        options["data_files"] = [f.strip() for f in hub.data_files.split(",") if f.strip()]
    if hub.revision:
        options["revision"] = hub.revision
    try:
        dataset = datasets.load_dataset(hub.name, split=split, **options)
    except (OSError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        # A mistyped local name is the likelier mistake than a missing hub dataset: say so first.
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _not_found(hub.name, cause[:200]) from error
    yield from _iter_hf_dataset(dataset, split, name=hub.name)


def _is_hf_dataset(source: Any) -> bool:
    if not type(source).__module__.startswith("datasets."):
        return False
    import datasets

    return isinstance(source, datasets.Dataset | datasets.DatasetDict)


def _dataset_name(dataset: Any) -> str:
    info = getattr(dataset, "info", None)
    return getattr(info, "dataset_name", None) or "dataset"


def _iter_hf_dataset(dataset: Any, split: str, *, name: str) -> Iterator[tuple[Row, str]]:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise KeyError(f"{name} has no split {split!r}; splits: {sorted(dataset.keys())}")
        dataset = dataset[split]
    for index, row in enumerate(dataset):
        yield row, f"{name}[{split}]:row {index}"
