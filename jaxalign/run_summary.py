"""What a training run tells its user: the start-up summary, and how long JAX spent compiling.

jaxalign dpo: 8 cpu devices (1 process); mesh data=8 fsdp=1 tensor=1
  parameters: 3.28M trained; frozen (base, reference): 3.28M
  data.train: 600 rows (preference 600) -> 580 examples; dropped: identical_responses 20; ...
  run: 60 steps = 1.7 epochs of 36 steps; batch 16 (16 per microbatch, 2 per device); ...
  outputs: /tmp/dpo: metrics.jsonl, tensorboard/, checkpoints/, hf/ (Hugging Face model)
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

# Trace, lowering and backend compile (or persistent-cache load) of every jitted function.
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_seconds = 0.0
_listener_lock = threading.Lock()
_listening = False


def _on_event_duration(event: str, duration: float, **_: Any) -> None:
    global _compile_seconds
    if event in _COMPILE_EVENTS:
        _compile_seconds += duration


def compile_seconds() -> float:
    """Seconds this process has spent compiling since the first call (a running total)."""
    global _listening
    with _listener_lock:
        if not _listening:  # registered on first use, never at import
            jax.monitoring.register_event_duration_secs_listener(_on_event_duration)
            _listening = True
    return _compile_seconds


def count_params(tree: Any) -> int:
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree)))


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items()) or "none"


def _data_line(stats: dict[str, Any] | None, num_examples: int) -> str:
    if not stats:
        return f"data.train: {num_examples} examples"
    formats = _counts(stats.get("formats", {}))
    line = (
        f"data.train: {stats['rows_read']} rows ({formats}) -> {num_examples} examples; "
        f"skipped: {_counts(stats.get('skipped', {}))}; dropped: {_counts(stats.get('dropped', {}))}; "
        f"truncated: {_counts(stats.get('truncated', {}))}"
    )
    return line


def _tokens_per_example(examples: list[dict[str, Any]]) -> float:
    """Mean token count of the examples (all `*_ids` arrays of each)."""
    sample = examples[: min(len(examples), 1024)]
    lengths = [
        sum(np.size(v) for k, v in example.items() if k.endswith("input_ids") or k.endswith("_ids"))
        for example in sample
    ]
    return float(np.mean(lengths)) if lengths else 0.0


def startup_summary(
    *,
    config: ml_collections.ConfigDict,
    mesh: Any,
    params: Any,
    frozen: Any,
    train_iterator: Any,
    workdir: Path,
    start_step: int,
) -> str:
    """The lines a run logs before its first step (see the module docstring)."""
    devices = jax.devices()
    mesh_shape = " ".join(f"{name}={size}" for name, size in dict(mesh.shape).items())
    lines = [
        f"jaxalign {config.algorithm}: {len(devices)} {devices[0].platform} devices "
        f"({jax.process_count()} process{'es' if jax.process_count() > 1 else ''}); "
        f"mesh {mesh_shape}"
    ]
    trained = count_params(params)
    line = f"parameters: {_millions(trained)} trained"
    if frozen is not None:
        # LoRA passes (base, reference) where the reference *is* the base: count arrays once.
        unique = {id(x): x for x in jax.tree.leaves(frozen)}
        line += f"; frozen (base, reference): {_millions(count_params(list(unique.values())))}"
    lines.append(line)

    examples = getattr(train_iterator, "examples", None)
    if examples is not None:
        lines.append(_data_line(getattr(train_iterator, "source_stats", None), len(examples)))
    batch = config.train.batch_size
    accum = config.optimizer.grad_accum_steps
    data_parallel = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    micro = batch // accum
    run = f"run: {config.train.num_steps} steps"
    per_epoch = getattr(train_iterator, "batches_per_epoch", None)
    if per_epoch:
        run += f" = {config.train.num_steps / per_epoch:.3g} epochs of {per_epoch} steps"
    if start_step:
        run += f", resuming at step {start_step}"
    run += (
        f"; batch {batch} ({accum} microbatch{'es' if accum > 1 else ''} of {micro}, "
        f"{max(micro // data_parallel, 1)} per data-parallel device)"
    )
    if examples:
        run += f"; ~{_tokens_per_example(examples) * batch:,.0f} tokens per step"
    lines.append(run)

    outputs = ["metrics.jsonl", "tensorboard/", "checkpoints/"]
    if config.train.export_hf:
        outputs.append("hf/ (Hugging Face model + README.md model card)")
    line = f"outputs: {workdir}: {', '.join(outputs)}"
    if config.train.push_to_hub:
        line += f"; pushed to https://huggingface.co/{config.train.push_to_hub} at the end"
    if config.train.wandb_project:
        line += f"; Weights & Biases project {config.train.wandb_project!r}"
        line += f" ({config.train.wandb_mode})"
    lines.append(line)
    return "\n  ".join(lines)
