"""bench/bench.py: quick runs in a subprocess print the JSON contract; FLOP counts add up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxalign.config import tiny_model_init
from jaxalign.models import ModelConfig

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"
sys.path.insert(0, str(BENCH.parent))
import bench  # noqa: E402

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


def run_bench(*args: str, timeout: int = 600) -> list[dict]:
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
    return [json.loads(line) for line in proc.stdout.splitlines()]


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


@pytest.mark.slow
def test_trl_tiny_dpo_full_size():
    (result,) = run_bench("--workload", "dpo", "--preset", "trl-tiny", "--json", timeout=1800)
    check_contract(result, "dpo")
    assert (result["batch"], result["seq"], result["tokens_per_step"]) == (8, 128, 1536)
