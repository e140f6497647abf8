"""What makes a checkpoint trustworthy: a manifest of its files and the identity of its run.

Every committed checkpoint step directory holds ``jaxalign_manifest.json``::

    {"version": 1, "step": 10,
     "identity": {"config": {"algorithm": "sft", "model.init.hidden_size": 64, ...},
                  "param_shapes": {"embed/embedding": "float32[512, 64]", ...}},
     "files": {"state/_METADATA": [size_bytes, crc32], "state/d/1f0c...": [...], ...}}

``Checkpointer`` writes it after orbax has written and finalized every item but before the
step directory is committed (renamed into place), so a committed step without a readable
manifest is itself a sign of damage. Checksums are CRC-32 (``zlib.crc32``, streamed, ~GB/s;
it releases the GIL on large buffers), which catches truncation and flipped bytes; it is not a
defence against deliberate tampering.

The *identity* is what a resumed run must share with the run that wrote the checkpoint: every
config key except ``RESUMABLE_KEYS`` (cadences, budgets, memory/performance knobs, the mesh,
which restores are free to change) and the shapes and dtypes of the trained params.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from typing import Any

import jax
from etils import epath

MANIFEST_NAME = "jaxalign_manifest.json"
MANIFEST_VERSION = 1
# Files orbax writes at the top of the step directory *after* the manifest (its step metadata
# with the commit timestamp, the commit marker): not covered, and restores do not need them.
_WRITTEN_AFTER_MANIFEST = frozenset({MANIFEST_NAME, "_CHECKPOINT_METADATA", "commit_success.txt"})
_CHUNK_BYTES = 4 * 1024 * 1024

# Config keys (exact, or a prefix ending in ".") that may change when a run resumes.
RESUMABLE_KEYS = (
    "train.num_steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.async_checkpoint",
    "train.max_consecutive_nonfinite",
    "train.export_hf",
    "data.eval",
    "data.eval_split",
    "mesh.",  # restores are topology-free
    "model.remat_policy",  # the next four change memory use or speed, not the math
    "model.attention_impl",
    "model.logits_chunk_size",
    "optimizer.grad_accum_steps",
)


class IntegrityError(ValueError):
    """A step directory does not match its manifest; the message says which file and how."""


# ----------------------------------------------------------------------------- manifest


def _covered_files(step_dir: epath.Path) -> Iterator[tuple[str, epath.Path]]:
    """(relative posix path, path) of every file under `step_dir` the manifest covers."""
    pending = [(step_dir, "")]
    while pending:
        directory, prefix = pending.pop()
        for child in sorted(directory.iterdir(), key=lambda p: p.name):
            name = prefix + child.name
            if child.is_dir():
                pending.append((child, name + "/"))
            elif not (prefix == "" and child.name in _WRITTEN_AFTER_MANIFEST):
                yield name, child


def _size_and_crc32(path: epath.Path) -> tuple[int, int]:
    size, crc = 0, 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
    return size, crc


def write_manifest(step_dir: epath.Path, *, step: int, identity: dict[str, Any] | None) -> None:
    """Records size and CRC-32 of every file under `step_dir`, and `identity`, in its manifest."""
    files = {name: list(_size_and_crc32(path)) for name, path in _covered_files(step_dir)}
    manifest = {"version": MANIFEST_VERSION, "step": step, "identity": identity, "files": files}
    (step_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(step_dir: epath.Path) -> dict[str, Any]:
    """The manifest of `step_dir`; raises `IntegrityError` if it is missing or unreadable."""
    path = step_dir / MANIFEST_NAME
    if not path.exists():
        raise IntegrityError(f"{MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError(f"'files' is a {type(files).__name__}")
    except (ValueError, KeyError, TypeError) as error:
        raise IntegrityError(f"{MANIFEST_NAME} is unreadable ({error})") from error
    return manifest


def verify_step_dir(step_dir: epath.Path) -> dict[str, Any]:
    """Checks every file the manifest lists (present, same size, same CRC-32).

    Returns:
      The manifest.

    Raises:
      IntegrityError: naming the first file that is missing, of another size, or corrupt.
    """
    manifest = read_manifest(step_dir)
    for name, (size, crc) in sorted(manifest["files"].items()):
        path = step_dir / name
        if not path.exists():
            raise IntegrityError(f"{name} is missing")
        actual_size = path.stat().length
        if actual_size != size:
            raise IntegrityError(f"{name} has {actual_size} bytes, the manifest says {size}")
        if _size_and_crc32(path)[1] != crc:
            raise IntegrityError(f"{name} is corrupt (CRC-32 differs from the manifest)")
    return manifest


# ----------------------------------------------------------------------------- run identity


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def is_resumable(key: str) -> bool:
    """Whether config key `key` (dotted) may change when a run resumes."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def path_name(path: tuple[Any, ...]) -> str:
    """`embed/embedding` for a pytree key path (dict keys, attribute names, sequence indices)."""
    parts = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return "/".join(str(part) for part in parts)


def run_identity(config_json: dict[str, Any], params: Any) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote a checkpoint.

    Args:
      config_json: the run's config as JSON-ready nested dicts.
      params: the trained params (arrays or `ShapeDtypeStruct`s); only shapes and dtypes are used.

    Returns:
      `{"config": {dotted key: value, non-resumable keys only}, "param_shapes": {path: "f32[..]"}}`.
    """
    config = {k: v for k, v in _flatten(config_json).items() if not is_resumable(k)}
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    shapes = {path_name(path): f"{x.dtype}{list(x.shape)}" for path, x in leaves}
    return {"config": config, "param_shapes": shapes}


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def identity_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key (stored -> current)` for each difference, the config keys first.

    Keys only one side has (a key added to or removed from the schema by a library upgrade)
    are not differences; a changed architecture still shows in the param shapes.
    """
    differences = []
    stored_config, current_config = stored.get("config", {}), current.get("config", {})
    for key in sorted(stored_config.keys() & current_config.keys()):
        if stored_config[key] != current_config[key]:
            old, new = _short(stored_config[key]), _short(current_config[key])
            differences.append(f"{key} ({old} -> {new})")
    stored_shapes, current_shapes = stored.get("param_shapes"), current.get("param_shapes")
    if stored_shapes is not None and current_shapes is not None:
        changed = sorted(
            name
            for name in stored_shapes.keys() | current_shapes.keys()
            if stored_shapes.get(name) != current_shapes.get(name)
        )
        if changed:
            first = changed[0]
            old, new = stored_shapes.get(first, "absent"), current_shapes.get(first, "absent")
            differences.append(
                f"param shapes ({len(changed)} differ, e.g. {first}: {old} -> {new})"
            )
    return differences
