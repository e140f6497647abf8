"""Model FLOPs utilisation for bench.py: FLOPs per step, the device's peak, and the report.

    MFU = model FLOPs per step / (step seconds × devices × peak dense FLOP/s of one device)

Model FLOPs are the work the model itself needs (PaLM, Chowdhery et al. 2022, appendix B): a
recomputed (rematerialised) forward is not counted. Two counts of them per step:

  xla       `compiled.cost_analysis()["flops"]` of the step as XLA compiled it. For an SPMD
            program that is one device's share, so it is multiplied by the mesh's device count.
            It is the model's FLOPs only when the program does no more and no less: with
            `remat_policy` other than "none" it includes the recomputed forward; a fused
            attention kernel (cudnn, splash) is a custom call whose FLOPs XLA does not see
            (it counts them as 0); and a while loop (generate's decode) has its body counted once, not once per iteration.
            It also counts elementwise work (softmax, norms, the optimizer update), a few percent.
  analytic  bench.py's formulas: training 3·F with F(R, T) = 2·N·R·T + 4·L·H·D·R·T² (6·N per
            token plus the attention term), DPO + F for the reference, generate its prefill and
            decode steps (bench.py's module docstring has them all).

`model_flops` takes XLA's count where none of those caveats applies and it agrees with the
analytic count to within `XLA_AGREEMENT`, else the analytic one, and says which and why.
"""

from __future__ import annotations

from typing import Any

# Dense (no 2:4 sparsity) datasheet peaks per device in FLOP/s: (substring of
# `jax.devices()[0].device_kind`, {compute dtype: peak}); the first match wins, so more specific
# names come first. NVIDIA H100 / H200 datasheets (SXM: BF16 989.5 T dense, FP32 67 T; H100 PCIe
# 756 T); A100 datasheet (BF16 312 T, FP32 19.5 T); Cloud TPU system-architecture pages (per chip
# bf16: v4 275 T, v5e 197 T, v5p 459 T, v6e 918 T). JAX names v5e "TPU v5 lite" and v6e
# "TPU v6 lite"; v5p is "TPU v5p" or "TPU v5".
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12}),
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}),
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}),
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12}),
    ("TPU v6", {"bfloat16": 918e12}),
    ("TPU v5 lite", {"bfloat16": 197e12}),
    ("TPU v5e", {"bfloat16": 197e12}),
    ("TPU v5", {"bfloat16": 459e12}),
    ("TPU v4", {"bfloat16": 275e12}),
)
# XLA's count is used only within this factor of the analytic one (either way).
XLA_AGREEMENT = 1.5
FUSED_ATTENTION = ("cudnn", "splash")  # kernels XLA's cost analysis does not see into


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The datasheet peak FLOP/s of one `device_kind` device for `dtype`; None if not listed."""
    for name, peaks in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def compiled_flops(compiled: Any) -> float | None:
    """`compiled.cost_analysis()["flops"]` (one device's share); None where the backend has none.
    Older JAX returns a list with one dict per program."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (not every backend implements it)
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def xla_caveat(*, remat_policy: str, attention_impl: str, has_loop: bool = False) -> str | None:
    """Why XLA's count of this step is not its model FLOPs; None when it is."""
    if has_loop:
        return "decode loop: XLA counts a while body once"
    if remat_policy != "none":
        return f"remat {remat_policy}: XLA counts the recomputed forward"
    if attention_impl in FUSED_ATTENTION:
        return f"{attention_impl} attention is a custom call, opaque to XLA's count"
    return None


def model_flops(
    analytic: float, xla: float | None, caveat: str | None
) -> tuple[float, str, str | None]:
    """(FLOPs per step, "xla" | "analytic", why the analytic count was used)."""
    if caveat:
        return analytic, "analytic", caveat
    if xla is None:
        return analytic, "analytic", "XLA gave no count"
    ratio = xla / analytic
    if not 1 / XLA_AGREEMENT <= ratio <= XLA_AGREEMENT:
        return analytic, "analytic", f"XLA's count is {ratio:.2f}x the analytic one"
    return xla, "xla", None


def mfu(flops: float, step_s: float, devices: int, peak: float | None) -> float | None:
    return flops / (step_s * devices * peak) if peak else None


# ----------------------------------------------------------------------------- report


def _flops_line(result: dict[str, Any]) -> str:
    used, source = result["flops_per_step"], result["flops_source"]
    analytic, xla = result["flops_per_step_analytic"], result.get("flops_per_step_xla")
    line = f"{used:.4g} ({source})"
    if source == "xla":
        line += f"; analytic {analytic:.4g}"
    elif xla:
        line += f"; xla {xla:.4g} = {xla / analytic:.2f}x"
    else:
        line += "; xla n/a"
    if result.get("flops_note"):
        line += f" [{result['flops_note']}]"
    return line


def _mfu_line(result: dict[str, Any]) -> str:
    if result.get("mfu") is None:
        return f"n/a (unknown peak for {result['device_kind']})"
    peak = result["peak_flops"]
    return (
        f"{result['mfu']:.1%} (peak {peak / 1e12:g} TFLOP/s per device, "
        f"{result['peak_flops_source']})"
    )


def _attention(result: dict[str, Any]) -> str:
    configured, run = result["attention_impl"], result["attention_impl_run"]
    return run if configured == run else f"{configured} -> {run}"


def format_report(result: dict[str, Any]) -> str:
    """One workload's table: where it ran, its speed, FLOPs per step and their source, MFU."""
    rows = (
        ("device kind", f"{result['device_kind']} ({result['platform']})"),
        ("devices", f"{result['num_devices']}"),
        ("attention impl", _attention(result)),
        (
            "dtype",
            f"compute {result['dtype']}, params {result['param_dtype']}, "
            f"remat {result['remat_policy']}",
        ),
        (
            "rows × length",
            f"{result['rows']} × {result['row_len']} "
            f"({result['tokens_per_step']:,} tokens/step counted)",
        ),
        ("step time", f"{result['step_s']:.4f} s (min {result['step_s_min']:.4f} s)"),
        ("tokens/s/device", f"{result['tokens_per_s_per_device']:,.1f}"),
        ("FLOPs/step", _flops_line(result)),
        ("MFU", _mfu_line(result)),
    )
    title = f"== {result['workload']} · {result['preset']} "
    width = max(len(name) for name, _ in rows)
    lines = [title + "=" * max(60 - len(title), 3)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
