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

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30

# Parameter counts the model publishers (and `transformers`' `num_parameters()`) report.
PUBLISHED_SIZES = {
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "meta-llama/Meta-Llama-3-8B-Instruct": 8_030_261_248,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "alignment-handbook/zephyr-7b-sft-full": 7_241_732_096,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "Qwen/Qwen2.5-0.5B-Instruct": 494_032_768,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "gpt2-large": 774_030_080,
    "openai-community/gpt2-large": 774_030_080,
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
    assert all(value > 0 for key, value in plan["bytes"].items() if key != "frozen_models")
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
