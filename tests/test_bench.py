"""bench/bench.py: quick runs in a subprocess print the JSON contract; FLOP counts add up."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxalign.config import tiny_model_init
from jaxalign.models import ModelConfig

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"
sys.path.insert(0, str(BENCH.parent))
import bench  # noqa: E402

mfu = bench.mfu  # bench/mfu.py, as bench.py imports it

CONTRACT = {
    "workload": str,
    "tokens_per_s": float,
    "step_s": float,
    "peak_rss_mb": float,
    "compile_s": float,
    "gflops_per_s": float,
    "matmul_peak_gflops": float,
    "fraction_of_peak": float,
    "device": str,
    "preset": str,
    "batch": int,
    "seq": int,
    "tokens_per_step": int,
}


def run_bench_stdout(*args: str, timeout: int = 600) -> str:
    """Runs the script as CI would: one real CPU device (conftest's 8 fake ones are dropped)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def run_bench(*args: str, timeout: int = 600) -> list[dict]:
    return [json.loads(line) for line in run_bench_stdout(*args, timeout=timeout).splitlines()]


def check_contract(result: dict, workload: str) -> None:
    for key, kind in CONTRACT.items():
        assert isinstance(result[key], kind), (key, result[key])
    assert result["workload"] == workload
    assert result["tokens_per_s"] > 0 and result["step_s"] > 0 and result["peak_rss_mb"] > 0
    assert result["tokens_per_s"] == pytest.approx(result["tokens_per_step"] / result["step_s"])
    assert result["mfu"] is None or result["mfu"] > 0


def test_dpo_prints_one_json_line():
    (result,) = run_bench("--workload", "dpo", "--preset", "tiny", "--quick", "--json")
    check_contract(result, "dpo")
    assert result["dpo_layout"] == "shared-prompt"
    quick = bench.PRESETS["tiny"].quick()
    # prompt + chosen + rejected, the prompt counted once
    assert result["tokens_per_step"] == quick.batch * (quick.prompt_len + 2 * quick.completion_len)
    assert (result["preset"], result["quick"], result["steps"]) == ("tiny", True, 2)


def test_sft_and_generate_in_one_process():
    sft, gen = run_bench("--workload", "sft,generate", "--preset", "tiny", "--quick", "--json")
    check_contract(sft, "sft")
    check_contract(gen, "generate")
    quick = bench.PRESETS["tiny"].quick()
    assert sft["tokens_per_step"] == quick.batch * (quick.prompt_len + quick.completion_len)
    # every row generates the full max_new_tokens (no EOS)
    assert gen["tokens_per_step"] == quick.gen_batch * quick.gen_new_tokens


def check_grpo(result: dict) -> None:
    """The GRPO fields: rollout + update make the iteration, tokens add up."""
    check_contract(result, "grpo")
    quick = bench.PRESETS["tiny"].quick()
    rows = quick.batch * quick.num_generations
    assert (result["num_prompts"], result["num_generations"]) == (quick.batch, 4)
    assert result["batch"] == rows
    assert result["tokens_per_step"] == rows * (quick.prompt_len + quick.completion_len)
    assert result["iteration_s"] == pytest.approx(result["rollout_s"] + result["update_s"])
    assert result["rollout_share"] == pytest.approx(result["rollout_s"] / result["iteration_s"])
    # EOS is disabled: every completion is N tokens
    generated = rows * quick.completion_len
    assert result["rollout_tokens_per_s"] == pytest.approx(generated / result["rollout_s"])
    assert result["update_tokens_per_s"] == pytest.approx(
        result["tokens_per_step"] / result["update_s"]
    )
    assert 0 <= result["reward_mean"] <= 1


def test_grpo_iteration_prints_one_json_line():
    (result,) = run_bench("--workload", "grpo", "--preset", "tiny", "--quick", "--json")
    check_grpo(result)


def test_grpo_compare_trl_keeps_stdout_to_the_json_line():
    """TRL's GRPOTrainer on the same prompts and reward; its summary print must not reach stdout."""
    pytest.importorskip("trl")
    (result,) = run_bench(
        "--workload", "grpo", "--preset", "tiny", "--quick", "--json", "--compare-torch"
    )
    check_grpo(result)
    baseline = result["compare"]["trl_grpo"]
    assert "error" not in baseline, baseline
    assert baseline["iteration_s"] > 0 and 0 < baseline["rollout_share"] < 1, baseline
    assert baseline["jaxalign_speedup"] == pytest.approx(
        result["tokens_per_s"] / baseline["tokens_per_s"]
    )


def test_lora_dpo_against_full_dpo_in_two_processes():
    """`--lora`: full DPO, then LoRA-DPO (adapters only train, the reference is the base)."""
    full, lora = run_bench(
        *("--lora", "--preset", "tiny", "--quick", "--json", "--lora-rank", "4"),
        *("--steps", "1", "--warmup", "0", "--matmul-peak-gflops", "100"),
    )
    check_contract(full, "dpo")
    check_contract(lora, "dpo")
    assert "lora_rank" not in full and (lora["lora_rank"], lora["lora_quantization"]) == (4, "none")
    assert lora["tokens_per_step"] == full["tokens_per_step"]
    config = ModelConfig(**tiny_model_init().to_dict())
    # r·(in + out) for q, k, v, o, gate, up, down: 4·(2·(64+64) + 2·(64+32) + 3·(64+128)) per layer
    assert lora["trainable_params"] == config.num_layers * 4 * (256 + 192 + 576)
    assert lora["step_memory_mb"] < full["step_memory_mb"]
    assert lora["vs_full"]["tokens_per_s"] == pytest.approx(
        lora["tokens_per_s"] / full["tokens_per_s"]
    )
    assert lora["vs_full"]["peak_rss_mb"] == pytest.approx(
        lora["peak_rss_mb"] / full["peak_rss_mb"]
    )


def test_lora_flags_apply_to_dpo_alone():
    with pytest.raises(SystemExit):
        bench.main(["--workload", "sft", "--lora"])
    with pytest.raises(SystemExit):
        bench.main(["--lora-quantization", "nf4"])  # QLoRA needs adapters


def test_grpo_reward_has_trls_signature():
    scores = bench.grpo_reward(
        prompts=["a", "b"], completions=["x", "y"], completion_ids=[[2, 3], [4]], answer=[1, 2]
    )
    assert scores == [0.5, 1.0]


@pytest.mark.parametrize("workload", ["sft", "dpo"])
def test_compare_torch_keeps_stdout_to_the_json_line(workload):
    """Baselines (and TRL's own printing, when installed) must not break the one-line contract."""
    pytest.importorskip("torch")
    (result,) = run_bench(
        "--workload", workload, "--preset", "tiny", "--quick", "--json", "--compare-torch"
    )
    check_contract(result, workload)
    baseline = result["compare"][f"torch_{workload}"]
    assert baseline["tokens_per_s"] > 0 and baseline["step_s"] > 0, baseline


def test_matmul_params_are_all_but_embedding_and_norms():
    config = ModelConfig(**tiny_model_init().to_dict())
    norms = (2 * config.num_layers + 1) * config.hidden_size
    embedding = config.vocab_size * config.hidden_size
    assert bench.matmul_params(config) == config.num_params() - embedding - norms
    scalar = config.replace(head="scalar")
    assert bench.matmul_params(scalar) == scalar.num_params() - embedding - norms


def test_flop_formulas():
    config = ModelConfig(**bench.PRESETS["trl-tiny"].model)
    n, l_h_d = bench.matmul_params(config), 4 * 4 * 64
    assert bench.forward_flops(config, 16, 128) == 2 * n * 16 * 128 + 4 * l_h_d * 16 * 128 * 128
    # a one-token prompt and one new token is a single forward over a 2-slot cache
    assert bench.generate_flops(config, 3, 1, 1) == 2 * n * 3 + 4 * l_h_d * 3 * 1 * 2
    # G = 4 rows of one 3-token prompt: it is prefilled once, into a 3-slot cache
    assert bench.generate_flops(config, 4, 3, 1, 4) == 2 * n * 3 + 4 * l_h_d * 1 * 3 * 3


def test_workload_argument_and_table():
    assert bench._workloads("sft, dpo") == ["sft", "dpo"]
    for bad in ("bogus", "all,sft", ""):
        with pytest.raises(Exception, match="expected all"):
            bench._workloads(bad)
    row = dict.fromkeys(CONTRACT, 1.0) | {"workload": "dpo", "preset": "tiny", "device": "cpu"}
    row["compare"] = {"torch_dpo": {"tokens_per_s": 0.5, "step_s": 2.0}, "trl": "not installed"}
    table = bench._format_table([row])
    assert "jaxalign / torch_dpo = 2.00x" in table and "trl: not installed" in table


def parse_reports(stdout: str) -> dict[str, dict[str, str]]:
    """{workload: {row name: value}} from the `== workload · preset ==` tables."""
    reports = {}
    for block in stdout.split("\n\n"):
        title = re.match(r"== (\w+) · (\S+) =+\n", block)
        if title:
            rows = re.findall(r"^(\S.*?)  +(.*)$", block[title.end() :], re.M)
            reports[title[1]] = {"preset": title[2], **dict(rows)}
    return reports


def test_llama_1b_shrunk_prints_mfu_tables():
    """llama-1b cut to one layer and a 2048-token vocabulary (the widths, GQA and RoPE stay):
    the SFT table parses, and XLA's FLOP count of the compiled step (no remat, XLA attention)
    agrees with the analytic 6·N·T + attention count."""
    overrides = ("--num-layers", "1", "--vocab-size", "2048", "--seq-len", "32")
    stdout = run_bench_stdout(
        *("--workload", "sft", "--preset", "llama-1b", *overrides, "--batch-size", "2"),
        *("--steps", "1", "--warmup", "0", "--remat", "none", "--attention-impl", "xla"),
        *("--matmul-peak-gflops", "100", "--peak-flops", "1e12"),
    )
    reports = parse_reports(stdout)
    assert set(reports) == {"sft"}, stdout
    config = ModelConfig(**bench.PRESETS["llama-1b"].model).replace(num_layers=1, vocab_size=2048)
    assert (config.hidden_size, config.num_kv_heads, config.dtype) == (2048, 8, "bfloat16")
    for report in reports.values():
        assert report["preset"] == "llama-1b"
        assert (report["device kind"], report["devices"]) == ("cpu (cpu)", "1")
        assert report["attention impl"] == "xla"
        assert report["dtype"] == "compute bfloat16, params float32, remat none"
        rows, length, tokens = map(
            int, re.match(r"(\d+) × (\d+) \(([\d,]+)", report["rows × length"]).groups()
        )
        assert (rows, length) == (2, 32)
        step_s = float(report["step time"].split()[0])
        assert float(report["tokens/s/device"].replace(",", "")) == pytest.approx(
            tokens / step_s, rel=0.01
        )
        flops = float(report["FLOPs/step"].split()[0])
        mfu_percent = float(re.match(r"([\d.]+)% \(peak 1 TFLOP/s", report["MFU"])[1])
        assert mfu_percent == pytest.approx(100 * flops / step_s / 1e12, rel=0.02, abs=0.06)

    # SFT: 3·F(2, 32) = 6·N·T + 12·L·H·D·R·T² over the 64 tokens; XLA also counts the
    # elementwise work (norms, softmax, Adam), a few percent here.
    sft = re.match(r"(\S+) \(xla\); analytic (\S+)$", reports["sft"]["FLOPs/step"])
    assert sft, reports["sft"]["FLOPs/step"]
    xla, analytic = float(sft[1]), float(sft[2])
    expected = 6 * bench.matmul_params(config) * 64 + 12 * 1 * 32 * 64 * 2 * 32 * 32
    assert analytic == pytest.approx(expected, rel=1e-3)
    assert 0.95 < xla / analytic < 1.25
    assert "workload    preset" in stdout  # the one-row-per-workload table follows


def test_mfu_peaks_and_flop_source():
    assert mfu.peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert mfu.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert mfu.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert mfu.peak_flops("TPU v5 lite", "bfloat16") == 197e12
    assert mfu.peak_flops("TPU v5p", "bfloat16") == 459e12
    assert mfu.peak_flops("TPU v6 lite", "bfloat16") == 918e12
    assert mfu.peak_flops("cpu", "bfloat16") is None
    assert mfu.model_flops(100.0, 110.0, None) == (110.0, "xla", None)
    assert mfu.model_flops(100.0, 300.0, None)[1:] == (
        "analytic",
        "XLA's count is 3.00x the analytic one",
    )
    remat = mfu.xla_caveat(remat_policy="full", attention_impl="xla")
    assert mfu.model_flops(100.0, 133.0, remat) == (100.0, "analytic", remat)
    assert "custom call" in mfu.xla_caveat(remat_policy="none", attention_impl="cudnn")
    assert mfu.xla_caveat(remat_policy="none", attention_impl="xla") is None
    assert mfu.mfu(2e12, 2.0, 2, 1e12) == 0.5 and mfu.mfu(1.0, 1.0, 1, None) is None
    # generate on a CPU: the analytic count (XLA counts a while loop's body once), no peak
    loop = mfu.xla_caveat(remat_policy="none", attention_impl="xla", has_loop=True)
    flops, source, note = mfu.model_flops(8e9, None, loop)
    result = {
        **dict(workload="generate", preset="llama-1b", device_kind="cpu", platform="cpu"),
        **dict(num_devices=1, attention_impl="auto", attention_impl_run="xla", dtype="bfloat16"),
        **dict(param_dtype="float32", remat_policy="full", rows=8, row_len=2048),
        **dict(tokens_per_step=8192, step_s=2.0, step_s_min=1.5, tokens_per_s_per_device=4096.0),
        **dict(flops_per_step=flops, flops_source=source, flops_note=note, mfu=None),
        **dict(flops_per_step_analytic=8e9, flops_per_step_xla=None),
    }
    report = parse_reports(mfu.format_report(result))["generate"]
    assert report["attention impl"] == "auto -> xla"
    assert (
        report["FLOPs/step"]
        == "8e+09 (analytic); xla n/a [decode loop: XLA counts a while body once]"
    )
    assert report["MFU"] == "n/a (unknown peak for cpu)"
    assert report["rows × length"] == "8 × 2048 (8,192 tokens/step counted)"


@pytest.mark.slow
def test_trl_tiny_dpo_full_size():
    (result,) = run_bench("--workload", "dpo", "--preset", "trl-tiny", "--json", timeout=1800)
    check_contract(result, "dpo")
    assert (result["batch"], result["seq"], result["tokens_per_step"]) == (8, 128, 1536)
