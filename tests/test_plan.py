"""Memory planner: published model sizes, every recipe planned abstractly, and the CLI."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxalign import plan as planner
from jaxalign import sharding as shd
from jaxalign.config import base_config, validate
from jaxalign.models import ModelConfig

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30

# Parameter counts the model publishers (and `transformers`' `num_parameters()`) report.
PUBLISHED_SIZES = {
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "meta-llama/Meta-Llama-3-8B-Instruct": 8_030_261_248,
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "meta-llama/Llama-3.2-1B-Instruct": 1_235_814_400,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "alignment-handbook/zephyr-7b-sft-full": 7_241_732_096,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "Qwen/Qwen2.5-0.5B-Instruct": 494_032_768,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "gpt2-large": 774_030_080,
    "openai-community/gpt2-large": 774_030_080,
    # `sum(p.numel())` of the transformers model built on the meta device from each config.
    "google/gemma-2-2b": 2_614_341_888,
    "google/gemma-2-2b-it": 2_614_341_888,
    "google/gemma-2-9b": 9_241_705_984,
    "google/gemma-2-9b-it": 9_241_705_984,
    "google/gemma-3-1b-pt": 999_885_952,
    "google/gemma-3-1b-it": 999_885_952,
    "google/gemma-3-4b-pt": 3_880_263_168,  # text tower (with vision: 4_300_079_472)
    "google/gemma-3-4b-it": 3_880_263_168,
    "google/gemma-3-12b-it": 11_766_034_176,  # text tower (with vision: 12_187_325_040)
    "Qwen/Qwen3-30B-A3B": 30_532_122_624,
    "mistralai/Mixtral-8x7B-v0.1": 46_702_792_704,
}

# (config file, config argument, device memory in GiB of the hardware it was sized for)
RECIPES = [
    ("zephyr_sft.py", "", 80),
    ("zephyr_dpo.py", "", 80),
    ("llama3_8b_dpo.py", "", 80),
    ("qwen25_05b_sft.py", "", 16),
    ("qwen25_05b_rm.py", "", 16),
    # The reward model does not exist before step 2; plan with one of its architecture.
    ("qwen25_05b_ppo.py", "Qwen/Qwen2.5-0.5B-Instruct,Qwen/Qwen2.5-0.5B", 16),
    ("imdb_dpo_gpt2_large.py", "", 16),
]


def load_recipe(filename: str):
    spec = importlib.util.spec_from_file_location(filename[:-3], REPO / "configs" / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mesh_of(config) -> dict[str, int]:
    return dict(zip(config.mesh.axis_names, config.mesh.shape, strict=True))


def test_every_published_config_has_a_size_check():
    assert set(PUBLISHED_SIZES) == set(planner.PUBLISHED_CONFIGS)


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED_SIZES))
def test_abstract_init_of_published_configs_has_the_published_size(hub_id):
    model_cfg = base_config().model
    model_cfg.scan_layers = True
    config, source = planner.resolve_model_config(model_cfg, hub_id)
    assert source == "published config (built in)"
    leaves = jax.tree.leaves(shd.unbox(planner._abstract(config)))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)  # nothing allocated
    assert sum(math.prod(leaf.shape) for leaf in leaves) == PUBLISHED_SIZES[hub_id]
    assert config.num_params() == PUBLISHED_SIZES[hub_id]


def test_scalar_head_replaces_the_lm_head():
    model_cfg = base_config().model
    lm, _ = planner.resolve_model_config(model_cfg, "meta-llama/Meta-Llama-3-8B")
    scalar, _ = planner.resolve_model_config(model_cfg, "meta-llama/Meta-Llama-3-8B", head="scalar")
    assert scalar.num_params() == lm.num_params() - 128256 * 4096 + 4096


def test_local_checkpoint_dir_is_read_from_its_config_json(tmp_path):
    hf_config = planner.PUBLISHED_CONFIGS["Qwen/Qwen2.5-0.5B"]
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    model_cfg = base_config().model
    config, source = planner.resolve_model_config(model_cfg, str(tmp_path))
    assert source.endswith("config.json")
    assert config.num_params() == PUBLISHED_SIZES["Qwen/Qwen2.5-0.5B"]


def test_unknown_hub_id_fails_with_the_alternatives():
    with pytest.raises(planner.PlanError, match="published configs"):
        planner.resolve_model_config(base_config().model, "nobody/unknown-model")


@pytest.mark.parametrize("filename, arg, memory_gib", RECIPES)
def test_recipe_validates_and_fits_its_documented_hardware(filename, arg, memory_gib):
    recipe = load_recipe(filename)
    config = recipe.get_config(arg) if arg else recipe.get_config()
    assert f"python -m jaxalign.plan --config=configs/{filename}" in recipe.__doc__
    assert f"--device-memory-gb={memory_gib}" in recipe.__doc__
    validate(config, num_devices=recipe.NUM_DEVICES)
    assert config.model.dtype == "bfloat16" and config.model.remat_policy != "none"
    mesh = mesh_of(config)
    assert mesh["fsdp"] == recipe.NUM_DEVICES  # FSDP over every device

    plan = planner.plan_memory(config, mesh_shape=mesh, device_memory_bytes=memory_gib * GIB)

    assert plan["num_devices"] == recipe.NUM_DEVICES
    assert plan["fits"], planner.format_plan(plan, config)
    assert plan["total_bytes"] == sum(plan["bytes"].values())
    assert all(value > 0 for key, value in plan["bytes"].items() if not key.startswith("frozen"))
    assert plan["bytes"]["frozen_base"] == 0  # full fine-tuning: nothing frozen under adapters
    trained_bytes = sum(m["params"] for m in plan["models"] if m["trained"]) * 4  # float32
    # fsdp shards every weight matrix; only small biases stay replicated.
    assert trained_bytes / 8 <= plan["bytes"]["params"] <= trained_bytes / 8 * 1.01
    frozen = {m["role"] for m in plan["models"] if not m["trained"]}
    expected_frozen = {
        "sft": set(),
        "reward": set(),
        "dpo": {"reference"},
        "ppo": {"reference", "reward model"},
    }[config.algorithm]
    assert frozen == expected_frozen


def test_recipe_takes_local_paths_as_its_argument():
    assert (
        load_recipe("zephyr_dpo.py").get_config("/models/sft").model.name_or_path == "/models/sft"
    )
    config = load_recipe("qwen25_05b_ppo.py").get_config("/runs/sft/hf,/runs/rm/hf")
    assert (config.model.name_or_path, config.ppo.reward_model) == ("/runs/sft/hf", "/runs/rm/hf")


def test_llama3_dpo_on_8_h100():
    config = load_recipe("llama3_8b_dpo.py").get_config()
    plan = planner.plan_memory(
        config, mesh_shape={"data": 1, "fsdp": 8, "tensor": 1}, device_memory_bytes=80 * GIB
    )
    shard = 8_030_261_248 * 4 // 8  # no replicated leaves in Llama: exactly 1/8 per device
    assert plan["param_count"] == 8_030_261_248
    assert plan["bytes"]["params"] == shard
    assert plan["bytes"]["frozen_models"] == shard  # the reference, float32 like the policy
    assert plan["bytes"]["optimizer_state"] == pytest.approx(2 * shard, abs=1024)  # mu, nu
    assert plan["bytes"]["gradients"] == 2 * shard  # accumulator + microbatch gradients
    assert plan["rows_per_device"] == 128 // 4 * 2 // 8
    assert plan["fits"]


def test_precomputed_or_reference_free_dpo_keeps_no_reference():
    config = load_recipe("imdb_dpo_gpt2_large.py").get_config()
    mesh = mesh_of(config)
    with_reference = planner.plan_memory(config, mesh_shape=mesh, device_memory_bytes=GIB)
    config.dpo.precompute_reference = True
    precomputed = planner.plan_memory(config, mesh_shape=mesh, device_memory_bytes=GIB)
    assert with_reference["bytes"]["frozen_models"] > 0
    assert precomputed["bytes"]["frozen_models"] == 0
    assert not with_reference["fits"]  # 1 GiB is too small
    assert planner.verdict_line(with_reference).startswith("DOES NOT FIT: ")


def test_mesh_that_does_not_divide_the_weights_raises():
    config = load_recipe("qwen25_05b_sft.py").get_config()
    with pytest.raises(ValueError, match="Cannot shard parameter"):  # 14 heads over tensor=4
        planner.plan_memory(
            config, mesh_shape={"fsdp": 8, "tensor": 4}, device_memory_bytes=16 * GIB
        )


def test_activation_estimate_follows_remat_policy_and_batch():
    model_cfg = base_config().model
    model_cfg.dtype = "bfloat16"
    config, _ = planner.resolve_model_config(model_cfg, "mistralai/Mistral-7B-v0.1")
    sizes = {
        policy: planner.activation_bytes(
            config.replace(remat_policy=policy), rows=4, seq_len=1024, tensor=1, chunk_size=512
        )["total"]
        for policy in ("none", "dots", "dots_no_batch", "full")
    }
    assert sizes["full"] < sizes["dots_no_batch"] < sizes["dots"] < sizes["none"]
    full = config.replace(remat_policy="full")
    small = planner.activation_bytes(full, rows=2, seq_len=1024, tensor=1, chunk_size=512)
    large = planner.activation_bytes(full, rows=4, seq_len=1024, tensor=1, chunk_size=512)
    assert large["kept"] == pytest.approx(2 * small["kept"], rel=1e-6)
    # Full remat keeps one bf16 [rows, T, E] per layer.
    per_layer = 4 * 1024 * 4096 * np.dtype("bfloat16").itemsize
    assert large["kept"] >= config.num_layers * per_layer


def test_cudnn_attention_plans_without_a_gpu_and_drops_the_score_matrices():
    config = load_recipe("llama3_8b_dpo.py").get_config()
    config.model.attention_impl = "xla"
    mesh = mesh_of(config)
    xla = planner.plan_memory(config, mesh_shape=mesh, device_memory_bytes=80 * GIB)
    config.model.attention_impl = "cudnn"
    cudnn = planner.plan_memory(config, mesh_shape=mesh, device_memory_bytes=80 * GIB)
    assert cudnn["bytes"]["activations"] < xla["bytes"]["activations"]
    assert cudnn["bytes"]["params"] == xla["bytes"]["params"]


def test_parse_mesh():
    assert planner.parse_mesh("data=1,fsdp=16") == {"data": 1, "fsdp": 16}
    with pytest.raises(planner.PlanError):
        planner.parse_mesh("fsdp:8")


def test_cli_prints_the_plan_and_verdict():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxalign.plan",
            "--config=configs/imdb_dpo_gpt2_large.py",
            "--devices=8",
            "--mesh=data=1,fsdp=8,tensor=1",
            "--device-memory-gb=16",
            "--config.optimizer.grad_accum_steps=2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"FITS: \d+\.\d GiB of 16\.0 GiB per device \(\d+%\)", lines[-1])
    assert any("gpt2-large" in line and "774,030,080 params" in line for line in lines)
    assert any("8 rows x 512 tokens" in line for line in lines)  # 64 pairs / 2 / 8 * 2 rows


# ----------------------------------------------------------------------------- errors, KV cache


def ppo_recipe():
    return load_recipe("qwen25_05b_ppo.py").get_config(
        "Qwen/Qwen2.5-0.5B-Instruct,Qwen/Qwen2.5-0.5B"
    )  # batch 64 in 4 minibatches of 16 rows


def test_unknown_mesh_axis_is_named():
    with pytest.raises(planner.PlanError, match=r"mesh axes \['fdsp'\] are not in"):
        planner.plan_memory(ppo_recipe(), mesh_shape={"fdsp": 8}, device_memory_bytes=16 * GIB)


def test_ppo_minibatch_rows_that_do_not_split_over_data_parallel_raise():
    config = ppo_recipe()
    # 64 rows split over 32 devices, but each 16-row minibatch does not.
    with pytest.raises(planner.PlanError, match=r"ppo\.num_minibatches: 16 rows .* data\*fsdp=32"):
        planner.plan_memory(config, mesh_shape={"fsdp": 32}, device_memory_bytes=16 * GIB)
    plan = planner.plan_memory(config, mesh_shape={"fsdp": 16}, device_memory_bytes=16 * GIB)
    assert plan["rows_per_device"] == 1


def test_ppo_accumulation_must_divide_the_minibatch():
    config = ppo_recipe()
    config.optimizer.grad_accum_steps = 32  # divides the batch of 64, not a minibatch of 16
    with pytest.raises(planner.PlanError, match="does not divide the PPO minibatch of 16 rows"):
        planner.plan_memory(config, mesh_shape={"fsdp": 2}, device_memory_bytes=16 * GIB)
    config.optimizer.grad_accum_steps = 4  # 16 rows in 4 microbatches of 4, over 2 devices
    plan = planner.plan_memory(config, mesh_shape={"fsdp": 2}, device_memory_bytes=16 * GIB)
    assert plan["rows_per_device"] == 2


def test_kv_cache_bytes_of_llama3_8b_is_128_kib_per_token_in_bf16():
    """32 layers x 8 KV heads x 128 dims x (K and V) x 2 bytes = 131,072 bytes per token."""
    model_cfg = base_config().model
    model_cfg.dtype = "bfloat16"
    config, _ = planner.resolve_model_config(model_cfg, "meta-llama/Meta-Llama-3-8B")
    assert planner.kv_cache_bytes(config, rows=1, seq_len=1) == 131_072
    assert planner.kv_cache_bytes(config, rows=4, seq_len=1024) == 4 * 1024 * 131_072
    fp32 = config.replace(dtype="float32")
    assert planner.kv_cache_bytes(fp32, rows=4, seq_len=1024) == 2 * 4 * 1024 * 131_072


def test_kv_cache_bytes_count_window_sized_rings_for_sliding_layers():
    """Gemma-2-2B: 13 global + 13 sliding layers (W = 4096), 4 KV heads x 256 dims x 2 x 2 bytes
    = 4096 bytes per token and layer; at 8192 tokens 13·8192 + 13·4096 slots = 624 MiB."""
    model_cfg = base_config().model
    model_cfg.dtype = "bfloat16"
    config, _ = planner.resolve_model_config(model_cfg, "google/gemma-2-2b")
    assert planner.kv_cache_bytes(config, rows=1, seq_len=8192) == (13 * 8192 + 13 * 4096) * 4096
    # Shorter than the window: every layer holds every token.
    assert planner.kv_cache_bytes(config, rows=2, seq_len=1000) == 2 * 26 * 1000 * 4096


def test_ppo_plan_counts_the_rollout_kv_cache():
    config = ppo_recipe()
    plan = planner.plan_memory(config, mesh_shape={"fsdp": 8}, device_memory_bytes=16 * GIB)
    policy = next(m for m in plan["models"] if m["role"] == "policy")["config"]
    seq_len = config.data.max_prompt_length + config.ppo.max_new_tokens
    expected = planner.kv_cache_bytes(policy, rows=64 // 8, seq_len=seq_len)
    assert plan["activations"]["rollout: KV cache"] == expected
    # Qwen2.5-0.5B: 24 layers x 2 KV heads x 64 dims x 2 x 2 bytes = 12 KiB per token.
    assert expected == 24 * 2 * 64 * 2 * 2 * 8 * seq_len
    assert plan["bytes"]["activations"] >= expected


# ----------------------------------------------------------------------------- LoRA and QLoRA


def tiny_dpo_config(rank: int = 0, quantization: str = "none", targets: str = "all-linear"):
    """DPO of `base_config().model.init` (E 64, F 128, 2 layers, 4 heads and 2 KV heads of 16)."""
    config = base_config()
    config.algorithm = "dpo"
    config.data.train = "unused.jsonl"
    config.data.max_length, config.data.max_prompt_length = 64, 32
    config.train.batch_size = 8
    config.model.scan_layers = True
    config.model.lora.rank = rank
    config.model.lora.quantization = quantization
    config.model.lora.target_modules = targets
    return config


def test_lora_adapter_params_counted_by_hand():
    """r·(in + out) per targeted projection and layer, E = 64, F = 128, H·D = 64, K·D = 32."""
    r, e, f, q, kv, layers = 4, 64, 128, 4 * 16, 2 * 16, 2
    per_layer = {
        "q_proj": r * (e + q),
        "k_proj": r * (e + kv),
        "v_proj": r * (e + kv),
        "o_proj": r * (q + e),
        "gate_proj": r * (e + f),
        "up_proj": r * (e + f),
        "down_proj": r * (f + e),
    }
    assert sum(per_layer.values()) == 4096
    mesh = {"fsdp": 1}
    for targets, expected in (("all-linear", 4096), ("q_proj,v_proj", 512 + 384)):
        plan = planner.plan_memory(
            tiny_dpo_config(rank=r, targets=targets), mesh_shape=mesh, device_memory_bytes=GIB
        )
        (policy,) = plan["models"]
        assert policy["adapter_params"] == plan["param_count"] == expected * layers
        assert plan["bytes"]["params"] == expected * layers * 4  # float32, one device
        assert plan["bytes"]["frozen_base"] == policy["params"] * 4
    # GPT-2's fused c_attn covers q, k and v (our separate modules), c_proj both o and mlp.proj.
    lora = planner.LoraConfig(rank=r, target_modules="c_attn,c_proj")
    assert lora.flax_targets("gpt2") == ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/proj")


def test_qlora_plan_smaller_than_lora_smaller_than_full_and_no_reference():
    mesh = {"fsdp": 2}
    plans = {
        name: planner.plan_memory(
            tiny_dpo_config(rank=rank, quantization=q), mesh_shape=mesh, device_memory_bytes=GIB
        )
        for name, rank, q in (
            ("full", 0, "none"),
            ("lora", 4, "none"),
            ("int8", 4, "int8"),
            ("nf4", 4, "nf4"),
        )
    }
    full, lora = plans["full"], plans["lora"]
    assert full["bytes"]["frozen_models"] == full["bytes"]["params"] > 0  # the reference copy
    for name in ("lora", "int8", "nf4"):
        plan = plans[name]
        assert plan["bytes"]["frozen_models"] == 0  # the reference is the base, adapters off
        assert [m["role"] for m in plan["models"]] == ["policy"]
        assert plan["full_finetune"]["total_bytes"] == full["total_bytes"]
        # gradients and optimizer state for the adapters alone
        assert plan["bytes"]["gradients"] == plan["bytes"]["params"]
        assert plan["bytes"]["optimizer_state"] < full["bytes"]["optimizer_state"] / 4
        assert plan["bytes"]["activations"] == full["bytes"]["activations"]
    assert plans["nf4"]["total_bytes"] < plans["int8"]["total_bytes"] < lora["total_bytes"]
    assert lora["total_bytes"] < full["total_bytes"]
    assert lora["bytes"]["frozen_base"] == full["bytes"]["params"]

    # QLoRA bytes of the 2 layers' 7 kernels (14 E·F-sized and attention matrices) by hand:
    # float32 embeddings, norms and LM head stay; int8 codes 1 byte + a float32 scale per output
    # channel; nf4 codes 4 bits + a float32 scale per 64 inputs (o: per head_dim = 16 inputs).
    e, f, q, kv, v, layers = 64, 128, 64, 32, 512, 2
    kernels = (e * q + 2 * e * kv + q * e + 3 * e * f) * layers
    untargeted = (2 * v * e + (2 * layers + 1) * e) * 4
    out_channels = (q + 2 * kv + e + 2 * f + e) * layers
    int8 = kernels + 4 * out_channels
    nf4_blocks = (e * q + 2 * e * kv + 2 * e * f) // 64 + q * e // 16 + f * e // 64
    nf4 = kernels // 2 + 4 * nf4_blocks * layers
    device_bytes = {name: plans[name]["bytes"]["frozen_base"] for name in ("int8", "nf4")}
    # fsdp=2 halves every leaf but the layer-stacked [2, 1, ...] scales of q, k, v, gate, up
    assert device_bytes["int8"] == pytest.approx((untargeted + int8) / 2, rel=0.02)
    assert device_bytes["nf4"] == pytest.approx((untargeted + nf4) / 2, rel=0.02)


def test_lora_ppo_and_grpo_plans_keep_no_reference():
    ppo = ppo_recipe()
    ppo.model.lora.rank = 8
    plan = planner.plan_memory(ppo, mesh_shape={"fsdp": 8}, device_memory_bytes=16 * GIB)
    roles = {m["role"]: m for m in plan["models"]}
    assert set(roles) == {"policy", "reward model", "critic"}  # no reference
    assert roles["policy"]["adapter_params"] > 0 and roles["critic"]["adapter_params"] == 0
    assert plan["total_bytes"] < plan["full_finetune"]["total_bytes"]

    grpo = tiny_dpo_config(rank=4)
    grpo.algorithm, grpo.grpo.reward_funcs, grpo.grpo.beta = "grpo", "length", 0.04
    grpo.data.max_length, grpo.grpo.max_new_tokens = 64, 32
    plan = planner.plan_memory(grpo, mesh_shape={"fsdp": 2}, device_memory_bytes=GIB)
    assert plan["bytes"]["frozen_models"] == 0
    assert plan["full_finetune"]["bytes"]["frozen_models"] > 0  # β > 0: full FT keeps a reference
    assert plan["seq_len"] == 32 + 32 and plan["rows_per_device"] == 8 * 8 // 2


def test_printed_plan_shows_the_lora_saving():
    config = load_recipe("llama3_8b_dpo.py").get_config()
    config.model.lora.rank, config.model.lora.quantization = 16, "nf4"
    plan = planner.plan_memory(config, mesh_shape=mesh_of(config), device_memory_bytes=80 * GIB)
    out = planner.format_plan(plan, config)
    # Llama-3-8B, r = 16 on all 7 projections: 32·16·(2·(4096+4096) + 2·(4096+1024) + 3·(4096+14336))
    assert plan["param_count"] == 41_943_040
    assert "41,943,040 adapter params (0.52%)" in out
    assert "frozen models (no reference)" in out and "frozen base (nf4 kernels)" in out
    assert re.search(r"LoRA saves \d+\.\d\d GiB per device vs full fine-tuning", out)
    assert out.splitlines()[-1] == planner.verdict_line(plan)


def test_moe_activation_estimate_counts_k_expert_rows_and_the_dispatch_buffers():
    # Hand-computed for E=64, k=2 of X=8 experts of width 96, fp32 (b=4), n = 4·128 tokens:
    # the MLP terms see k·F_x = 192 per token, as a dense MLP of width 192 would, and the
    # dispatch adds per token 4·k·E·b + 16·X = 2176 bytes working, 2·k·E·b + 8·X = 1088 kept.
    common = dict(
        vocab_size=64, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, num_layers=2
    )
    moe = ModelConfig(
        **common, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96, dtype="float32"
    )
    dense = ModelConfig(**common, intermediate_size=192, dtype="float32")
    n = 4 * 128
    for policy, kept_extra in (("none", 1088), ("dots", 544), ("dots_no_batch", 544), ("full", 0)):
        moe_working, moe_kept = planner.layer_activation_bytes(
            moe.replace(remat_policy=policy), rows=4, seq_len=128, tensor=1
        )
        dense_working, dense_kept = planner.layer_activation_bytes(
            dense.replace(remat_policy=policy), rows=4, seq_len=128, tensor=1
        )
        assert moe_working - dense_working == 2176 * n
        assert moe_kept - dense_kept == kept_extra * n, policy


def test_fused_attention_drops_the_score_matrices_from_the_estimate():
    # Hand-computed: xla keeps rows·(H/t)·T² fp32-sized scores per layer, 16 bytes each working
    # and 10 kept (remat none); a fused kernel keeps rows·(H/t)·T softmax statistics instead.
    config = ModelConfig(num_heads=8, num_kv_heads=2, head_dim=16, hidden_size=128)
    rows, seq_len, tensor = 2, 256, 2
    scores_xla = rows * (8 / tensor) * seq_len * seq_len
    scores_fused = rows * (8 / tensor) * seq_len
    xla = planner.layer_activation_bytes(config, rows=rows, seq_len=seq_len, tensor=tensor)
    for impl in ("splash", "cudnn"):
        fused = planner.layer_activation_bytes(
            config.replace(attention_impl=impl), rows=rows, seq_len=seq_len, tensor=tensor
        )
        assert xla[0] - fused[0] == 16 * (scores_xla - scores_fused)
        assert xla[1] - fused[1] == 10 * (scores_xla - scores_fused)


def test_auto_attention_plan_follows_the_backend():
    config = load_recipe("llama3_8b_dpo.py").get_config()
    config.model.attention_impl = "auto"
    mesh = mesh_of(config)
    plans = {
        backend: planner.plan_memory(
            config, mesh_shape=mesh, device_memory_bytes=80 * GIB, backend=backend
        )
        for backend in ("cpu", "gpu", "tpu")
    }
    assert [plans[b]["attention_impl"] for b in ("cpu", "gpu", "tpu")] == ["xla", "cudnn", "splash"]
    activations = {b: plans[b]["bytes"]["activations"] for b in plans}
    # splash also drops the dense [rows, T, T] boolean mask that cudnn is handed.
    assert activations["tpu"] < activations["gpu"] < activations["cpu"]
    assert "attention auto (tpu: splash)" in planner.format_plan(plans["tpu"], config)


def test_packed_shared_prompt_dpo_plans_rows_of_twice_max_length():
    config = load_recipe("llama3_8b_dpo.py").get_config()
    config.model.attention_impl = "xla"
    mesh = mesh_of(config)
    plain = planner.plan_memory(config, mesh_shape=mesh, device_memory_bytes=80 * GIB)
    config.data.pack = True
    packed = planner.plan_memory(config, mesh_shape=mesh, device_memory_bytes=80 * GIB)
    assert packed["seq_len"] == 2 * plain["seq_len"]
    assert packed["rows_per_device"] * 2 == plain["rows_per_device"]
    # Same tokens per device; the xla score term grows with the row length.
    assert packed["bytes"]["activations"] > plain["bytes"]["activations"]
