"""LoRA through the trainers: only adapters train, the reference is the base with adapters off, the
exports (merged `hf/`, PEFT `adapter/`) hold the trained model, and 8 devices equal 1.

Runs use the tiny configs on a random-init base (`model.lora.rank = 4`): adapters start at B = 0,
so the first DPO loss is exactly log 2 and every later difference comes from training them.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_multihost import tiny_config

from jaxalign.models import from_pretrained
from jaxalign.train import run
from jaxalign.trainers import common
from jaxalign.trainers.pairwise import response_logps
from jaxalign.trainers.setup import setup_run

REPO = Path(__file__).resolve().parents[1]
LORA = {"model.lora.rank": 4, "model.lora.alpha": 8.0}
RUNS = {
    "sft": (
        "sft_tiny.py",
        {
            "train.num_steps": 4,
            "train.batch_size": 8,
            "data.max_length": 32,
            "data.buckets": (32,),
            "data.on_bad_row": "skip",
            "data.eval": "",
        },
    ),
    "dpo": (
        "dpo_tiny.py",
        {"train.num_steps": 4, "train.batch_size": 8, "data.eval": "", "data.buckets": (96,)},
    ),
}
COMMON = {
    "train.log_every": 1,
    "train.checkpoint_every": 1000,
    # SGD: an update is linear in the gradient, so 1 vs 8 devices compare to float rounding
    # (Adam's g / sqrt(v) turns last-bit differences of near-zero gradients into ±lr).
    "optimizer.name": "sgd",
    "optimizer.learning_rate": 0.5,
    "optimizer.schedule": "constant",
    "optimizer.warmup_steps": 0,
    **LORA,
}


def _settings(algorithm: str) -> tuple[str, dict]:
    config_file, settings = RUNS[algorithm]
    return config_file, {**settings, **COMMON}


def _losses(workdir: Path) -> list[float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [m["loss"] for m in map(json.loads, lines) if "loss" in m]


@pytest.fixture(scope="module")
def lora_run(tiny_data_dir, tmp_path_factory):
    """`lora_run(algorithm)`: (RunResult, workdir) of the LoRA run on 8 devices (memoised)."""
    runs = {}

    def get(algorithm: str):
        if algorithm not in runs:
            config_file, settings = _settings(algorithm)
            workdir = tmp_path_factory.mktemp(f"lora_{algorithm}")
            result = run(tiny_config(config_file, tiny_data_dir, settings), workdir)
            runs[algorithm] = (result, workdir)
        return runs[algorithm]

    return get


@pytest.mark.parametrize("algorithm", ["sft", "dpo"])
def test_only_adapters_have_gradients_and_optimizer_state(algorithm, lora_run):
    result, workdir = lora_run(algorithm)
    paths = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(result.state.params)[0]
    ]
    assert paths and all("lora" in p for p in paths), paths
    trainable = sum(x.size for x in jax.tree.leaves(result.state.params))
    # Optimizer state (SGD with momentum: one trace per trainable value) covers adapters only.
    state_sizes = sorted(x.size for x in jax.tree.leaves(result.state.opt_state) if x.ndim > 0)
    assert state_sizes == sorted(x.size for x in jax.tree.leaves(result.state.params))
    # rank·(in + out) for q, k, v, o, gate, up, down of the 2-layer tiny model (E 64, 4 heads and
    # 2 KV heads of 16, MLP 128): all-linear, the LM head excluded.
    per_layer = (64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64)
    assert trainable == 2 * 4 * per_layer
    base = load_file(workdir / "hf" / "model.safetensors")
    assert trainable < 0.1 * sum(t.size for t in base.values())
    adapter = load_file(workdir / "adapter" / "adapter_model.safetensors")
    assert sum(t.size for t in adapter.values()) == trainable
    assert all(".lora_A." in k or ".lora_B." in k for k in adapter)
    if algorithm == "dpo":
        assert _losses(workdir)[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference


def test_dpo_reference_is_the_base_with_adapters_off(lora_run, tiny_data_dir):
    """After training (adapters non-zero), the reference log-probs equal the plain base model's
    exactly, and differ from the policy's; the merged `hf/` export equals the LoRA forward."""
    result, workdir = lora_run("dpo")
    config_file, settings = _settings("dpo")
    config = tiny_config(config_file, tiny_data_dir, settings)
    setup = setup_run(config)  # same seed: the same random-init base
    train_data, _ = common.preference_datasets(config, setup.tokenizer, share_prompt=True)
    batch = train_data.collate(train_data.examples[:8])
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    trained = setup.full_params(jax.device_get(result.state.params))
    frozen = jax.device_get(setup.frozen)

    reference = response_logps(setup.reference_model, frozen, batch, chunk_size=None)
    base = response_logps(setup.lora.base, frozen, batch, chunk_size=None)
    policy = response_logps(setup.model, trained, batch, chunk_size=None)
    for ref, plain in zip(reference[:2], base[:2], strict=True):
        np.testing.assert_array_equal(np.asarray(ref), np.asarray(plain))
    assert np.max(np.abs(np.asarray(policy[0]) - np.asarray(reference[0]))) > 1e-4

    exported_model, exported = from_pretrained(workdir / "hf")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = batch.get("positions")
    lora_logits = setup.model.apply(
        {"params": trained}, ids, mask, positions, branch_ids=batch["branch_ids"]
    )
    merged_logits = exported_model.apply(
        {"params": exported}, ids, mask, positions, branch_ids=batch["branch_ids"]
    )
    np.testing.assert_allclose(merged_logits, lora_logits, atol=1e-5, rtol=1e-5)


def _one_device_run(config_file: str, data_dir: Path, settings: dict, workdir: Path) -> None:
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ["XLA_FLAGS"])
    env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=1"}
    overrides = [
        f"--config.{k}=({','.join(map(str, v))},)" if isinstance(v, tuple) else f"--config.{k}={v}"
        for k, v in settings.items()
    ]
    command = [sys.executable, "-m", "jaxalign.train", f"--config=configs/{config_file}:{data_dir}"]
    done = subprocess.run(
        [*command, f"--workdir={workdir}", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("algorithm", ["sft", "dpo"])
def test_lora_on_8_devices_equals_1_device(algorithm, lora_run, tiny_data_dir, tmp_path):
    result, workdir = lora_run(algorithm)
    config_file, settings = _settings(algorithm)
    _one_device_run(config_file, tiny_data_dir, settings, tmp_path / "one")
    np.testing.assert_allclose(_losses(tmp_path / "one"), _losses(workdir), rtol=1e-5, atol=1e-6)
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    eight = load_file(workdir / "adapter" / "adapter_model.safetensors")
    assert one.keys() == eight.keys()
    for name in one:
        np.testing.assert_allclose(one[name], eight[name], atol=1e-6, rtol=1e-5, err_msg=name)
    # The adapters really moved away from B = 0.
    assert any(np.abs(v).max() > 0 for k, v in eight.items() if "lora_B" in k)


def test_export_cli_rebuilds_the_lora_model_from_its_adapter_checkpoint(lora_run, tmp_path):
    """Checkpoints hold adapters only: `python -m jaxalign.export` rebuilds the base and writes
    the same merged model and PEFT adapter as the end of the run."""
    _, workdir = lora_run("dpo")
    out = tmp_path / "exported"
    done = subprocess.run(
        [sys.executable, "-m", "jaxalign.export", f"--workdir={workdir}", f"--out={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        trained = name if name.startswith("adapter") else f"hf/{name}"
        actual, expected = load_file(out / name), load_file(workdir / trained)
        assert actual.keys() == expected.keys()
        for key in expected:
            # A random-init base is re-initialised unsharded here: last-bit differences from
            # the sharded init (an HF base loads the same bytes and exports exactly).
            np.testing.assert_allclose(actual[key], expected[key], atol=1e-7, rtol=1e-6)


def test_qlora_dpo_trains_adapters_on_an_nf4_base(tiny_data_dir, tmp_path):
    """QLoRA: the frozen base is stored NF4 (checkpoints and optimizer hold only adapters); the
    reference is that same quantized base, so the first loss is still exactly log 2."""
    config_file, settings = _settings("dpo")
    settings = {**settings, "train.num_steps": 2, "model.lora.quantization": "nf4"}
    result = run(tiny_config(config_file, tiny_data_dir, settings), tmp_path)
    assert _losses(tmp_path)[0] == pytest.approx(math.log(2), abs=1e-6)
    assert all(
        "lora" in jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(result.state.params)[0]
    )
    merged = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(t.dtype == np.float32 and np.isfinite(t).all() for t in merged.values())


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_online_rl_trains_lora_adapters(algorithm, tiny_data_dir, tmp_path):
    """PPO and GRPO with adapters: the policy's trainable params are adapters only (PPO's critic
    trains fully), the reference is the base with adapters off, exports are merged + PEFT."""
    settings = {
        **COMMON,
        "model.name_or_path": "",
        "train.num_steps": 2,
        "train.batch_size": 8,
        "train.export_hf": True,
    }
    if algorithm == "ppo":
        settings.update(
            {
                "ppo.reward_model": "judge:length",
                "ppo.critic_init": "policy",
                "ppo.max_new_tokens": 8,
                "ppo.num_epochs": 1,
                "ppo.num_minibatches": 1,
            }
        )
    else:
        settings.update(
            {
                "grpo.reward_funcs": "judge:length",
                "grpo.num_generations": 4,
                "grpo.max_new_tokens": 8,
                "grpo.beta": 0.1,
            }
        )
    result = run(tiny_config(f"{algorithm}_tiny.py", tiny_data_dir, settings), tmp_path)
    policy = result.state.params["policy"] if algorithm == "ppo" else result.state.params
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(policy)[0]]
    assert paths and all("lora" in p for p in paths)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_init_from_continues_from_a_peft_adapter(lora_run, tiny_data_dir, tmp_path):
    """`model.lora.init_from` loads the trained adapter: DPO's first loss is no longer log 2."""
    _, workdir = lora_run("dpo")
    config_file, settings = _settings("dpo")
    settings = {**settings, "train.num_steps": 1, "model.lora.init_from": str(workdir / "adapter")}
    run(tiny_config(config_file, tiny_data_dir, settings), tmp_path)
    assert abs(_losses(tmp_path)[0] - math.log(2)) > 1e-4
