"""Throughput of jaxalign's jitted steps (SFT, DPO, reward, PPO update, sampling) and of a GRPO
iteration (rollout + update) on this machine.

    python bench/bench.py --workload dpo --preset trl-tiny --json        # one JSON line
    python bench/bench.py --workload all --preset trl-tiny               # a table, one row each
    python bench/bench.py --workload sft,generate --preset trl-tiny      # several in one process
    python bench/bench.py --workload dpo --preset trl-tiny --compare-torch   # + PyTorch / TRL
    python bench/bench.py --workload grpo --preset trl-tiny --compare-torch  # + TRL GRPOTrainer
    python bench/bench.py --workload sft --preset tiny --quick --json    # CI smoke (seconds)
    python bench/bench.py --lora [--json] [--lora-quantization nf4]      # LoRA-DPO vs full DPO
    python bench/bench.py --workload sft,dpo,generate --preset llama-1b --attention-impl cudnn
    python bench/bench.py --workload sft --preset llama-1b --num-layers 1 --seq-len 128 \
        --batch-size 2 --steps 2                                         # its CPU smoke run

`--preset llama-1b` is Llama-3.2-1B (random init) at a real run's settings: bf16 compute, fp32
master weights, full remat, 2048-token rows (`--seq-len`, `--batch-size`, `--num-layers`,
`--vocab-size`, `--attention-impl`, `--remat` override any preset). Without `--json`, each
workload prints its own table (device kind and count, attention impl, tokens/s per device, step
time, FLOPs per step and their source, MFU; `mfu.format_report`), then one row per workload.

`--lora` runs full DPO and LoRA-DPO (`build_lora_dpo_step`: adapters alone train, the reference is
the base with adapters off) each in its own process on preset `lora-mid`, and adds `vs_full` (LoRA /
full ratios of tokens/s, peak RSS, XLA step memory) to the LoRA line; bench/README.md has the rest.

Each workload builds the library's own step (`make_train_step` + `jit_train_step`, or `generate`)
on random tokens (numpy seed 0), compiles it once ahead of time, runs `--warmup` steps and then
times `--steps` steps, each ended by `jax.block_until_ready`.

The GRPO workload times whole iterations built from the trainer's own pieces (`bench_grpo`):
B prompts of P tokens (the preset's batch and prompt_len; trl-tiny: 8 × 64), G = 8 completions of
N = completion_len new tokens each (64), i.e. R = B·G = 64 rows of P + N. Rollout =
`rollout.sample_rollout` (one shared prefill per prompt) + decode to host + `grpo_reward` (the share
of even token ids, a plain Python function in TRL's signature) through `rewards.score_completions`;
update = `grpo_advantages` + one `make_train_step(grpo_loss_fn)` step on all R rows, with the
default `config.grpo` (β = 0, one update per rollout, loss_type "grpo"). EOS is disabled, so every
completion is N tokens. It defaults to 1 warm-up (the compiling iteration) and 6 timed iterations.

Reported per workload:
  tokens_per_s   counted tokens / mean step time. DPO and reward count prompt + chosen + rejected
                 (B·(P + 2C), the prompt once, as TRL reports it): DPO processes exactly that
                 (B shared-prompt rows; with --dpo-two-rows, and for reward, 2B rows of P + C);
                 SFT and the PPO update count B·(P + C); generate counts generated
                 tokens (B·N; EOS is disabled so every row runs the full N). GRPO counts
                 the R·(P + N) sequence tokens of an iteration (what the update processes, and
                 TRL's `num_tokens`); step_s is the mean iteration_s.
  rollout_tokens_per_s, update_tokens_per_s, rollout_share   GRPO only: generated tokens (R·N) /
                 mean rollout_s, R·(P + N) / mean update_s, rollout_s / iteration_s.
  step_s         mean seconds per timed step; step_s_min the fastest (less sensitive to a shared
                 machine); step_cpu_s the process CPU seconds per step (all threads).
  compile_s      lower + compile of the step (generate: first call minus one steady-state call;
                 GRPO: the first iteration minus the mean one, split in rollout_compile_s and
                 update_compile_s).
  gflops_per_s   analytic FLOPs per step / step_s, with N = parameters that take part in matmuls
                 (all but the input embedding and norms), T the sequence length, R the rows run:
                   forward   F(R, T) = 2·N·R·T + 4·L·H·D·R·T²   (attention: QKᵀ and PV over the full
                             T×T that the einsum computes, masked entries included)
                   training  3·F (forward + backward, Kaplan et al. 2020 / PaLM appendix B)
                   DPO       3·F(B, P+2C) + F(B, P+2C) for the reference forward, one
                             shared-prompt row per pair (`dpo.share_prompt`, the default);
                             with --dpo-two-rows 3·F(2B, P+C) + F(2B, P+C)
                   PPO       3·F for the policy and for the critic (scalar head)
                   generate  2·N·B·P + 4·L·H·D·B·P·(P+N)  prefill into a P+N slot cache, then
                             (N − 1)·(2·N·B + 4·L·H·D·B·(P+N)) decode steps over the full cache.
                   GRPO      generate with the B prompts prefilled once into P slots
                             (2·N·B·P + 4·L·H·D·B·P²) and R decode rows, + 3·F(R, P+N).
  matmul_peak_gflops  measured: best time of a jitted fp32 [n,n]@[n,n] (n = 2048 on CPU, 8192 on
                 accelerators), 2n³ FLOPs; fraction_of_peak = gflops_per_s / it.
  flops_per_step model FLOPs per step, flops_source "xla" (`compiled.cost_analysis()` of the step,
                 times the devices) or "analytic" (the formulas above) with flops_note saying why
                 XLA's count was not taken (remat, a fused attention kernel, a decode loop, no
                 count, or disagreement); flops_per_step_xla and flops_per_step_analytic hold both
                 (bench/mfu.py's docstring has the rules).
  mfu            flops_per_step / (step_s · num_devices · peak_flops): the peak is `--peak-flops`
                 or the device's dense datasheet peak for the compute dtype (`mfu.PEAK_FLOPS`:
                 H100/H200 SXM bf16 989 TFLOP/s, fp32 67; A100 312 / 19.5; TPU v4 275, v5e 197,
                 v5p 459, v6e 918), null when neither is known (CPU). XLA's default fp32 matmul
                 precision on GPU may use TF32, so fp32 mfu can exceed 1.
  tokens_per_s_per_device   tokens_per_s / num_devices (generate runs on one device).
  peak_rss_mb    peak resident memory of this process (`resource.getrusage`), measured before any
                 PyTorch comparison runs. It is the process's peak so far: `--workload all` runs
                 each workload in its own process; a comma list (`sft,dpo`) shares one.

`--compare-torch` (needs torch + transformers; TRL is used when importable) runs the same model size
and batch with a hand-written PyTorch step (`LlamaForCausalLM`, AdamW, clip 1.0, reference forward
under no_grad for DPO), TRL's `DPOTrainer` / `SFTTrainer` (fp32, no gradient checkpointing, timed
between `on_step_end` callbacks, so data collation is included), and HF `generate` for the generate
workload. For GRPO it runs TRL's `GRPOTrainer` (HF `generate`, `use_vllm=False`, fp32) on the same
prompts and reward with one generation batch of R completions per optimizer step, so every step is
one iteration; its rollout is timed around `_generate_and_score_completions` (generate, score,
advantages) and its update is the rest of the step. `min_new_tokens = N` disables EOS there too.
Every baseline gets `jaxalign_speedup` = jaxalign tokens_per_s / its tokens_per_s.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import mfu
import numpy as np

from jaxalign import advantages as adv
from jaxalign import rewards
from jaxalign import rollout as rl
from jaxalign import sharding as shd
from jaxalign.config import base_config, tiny_model_init
from jaxalign.data import collate_preference, collate_preference_shared
from jaxalign.data.batching import Buckets
from jaxalign.models import ModelConfig, Transformer, from_hf_config
from jaxalign.models.attention import resolve_attention_impl
from jaxalign.models.config import ATTENTION_IMPLS, REMAT_POLICIES
from jaxalign.models.lora import QUANTIZATIONS, LoraConfig, init_lora
from jaxalign.optim import make_optimizer
from jaxalign.plan import PUBLISHED_CONFIGS
from jaxalign.sampling import SamplingConfig, generate
from jaxalign.trainers import engine, setup
from jaxalign.trainers.dpo import dpo_loss_fn
from jaxalign.trainers.grpo import grpo_loss_fn
from jaxalign.trainers.ppo import ppo_loss_fn
from jaxalign.trainers.reward import reward_loss_fn
from jaxalign.trainers.sft import sft_loss_fn

WORKLOADS = ("sft", "dpo", "reward", "ppo", "generate", "grpo")
LORA_RANK = 16  # `--lora`'s default rank
TRAIN_WORKLOADS = ("sft", "dpo", "reward", "ppo")

# ----------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class Preset:
    """Model and shapes. Training rows hold a P-token prompt and a C-token completion."""

    model: dict[str, Any]
    batch: int  # sequences (SFT, PPO) or pairs (DPO, reward)
    prompt_len: int
    completion_len: int
    gen_batch: int
    gen_prompt_len: int
    gen_new_tokens: int
    # GRPO: `batch` prompts of `prompt_len` tokens, G completions of `completion_len` new tokens.
    num_generations: int = 8

    def quick(self) -> Preset:
        """Small shapes for CI: the same model, short sequences and a small batch."""
        return dataclasses.replace(
            self,
            batch=min(self.batch, 4),
            prompt_len=16,
            completion_len=16,
            gen_batch=min(self.gen_batch, 4),
            gen_prompt_len=16,
            gen_new_tokens=8,
            num_generations=min(self.num_generations, 4),
        )


# TRL's tiny Llama test size: 4 MHA heads of 64, untied embeddings, fp32.
_TRL_TINY_MODEL = dict(
    model_type="llama",
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=688,
    num_layers=4,
    num_heads=4,
    num_kv_heads=4,
    head_dim=64,
    tie_word_embeddings=False,
)
# meta-llama/Llama-3.2-1B's config.json (not in `jaxalign.plan.PUBLISHED_CONFIGS`): 1.24 B
# parameters, GQA 32 query / 8 kv heads of 64, tied embeddings, llama3 RoPE scaling.
LLAMA_32_1B_HF = PUBLISHED_CONFIGS["meta-llama/Llama-3.2-1B"]


def model_fields(config: ModelConfig) -> dict[str, Any]:
    """A `ModelConfig` as `Preset.model` keyword arguments (the head is the workload's)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "head"}


PRESETS = {
    "trl-tiny": Preset(_TRL_TINY_MODEL, 8, 64, 64, 16, 32, 64),
    "tiny": Preset(tiny_model_init().to_dict(), 8, 32, 32, 8, 16, 16),
    "mid": Preset(
        dict(
            _TRL_TINY_MODEL,
            vocab_size=8192,
            hidden_size=512,
            intermediate_size=1376,
            num_heads=8,
            num_kv_heads=8,
        ),
        4,
        256,
        256,
        8,
        128,
        128,
    ),
    # Llama-3.2-1B at a real run's settings (the recipes' bf16 compute, fp32 master weights,
    # full remat), random init; 2048-token rows. `--num-layers 1 --seq-len 128 --batch-size 2`
    # shrinks it to a CPU smoke run.
    "llama-1b": Preset(
        model_fields(
            from_hf_config(
                LLAMA_32_1B_HF, dtype="bfloat16", param_dtype="float32", remat_policy="full"
            )
        ),
        4,
        1024,
        1024,
        8,
        1024,
        1024,
    ),
    # `--lora`'s default: weights dominate full DPO's memory here (a 55 M-parameter Llama, short
    # pairs), the regime LoRA is for; about a minute per process on 2 CPU cores.
    "lora-mid": Preset(
        dict(
            _TRL_TINY_MODEL,
            vocab_size=8192,
            hidden_size=768,
            intermediate_size=2048,
            num_layers=6,
            num_heads=12,
            num_kv_heads=12,
        ),
        2,
        64,
        64,
        4,
        32,
        32,
    ),
}

# ----------------------------------------------------------------------------- measuring


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def matmul_peak_gflops(*, quick: bool) -> float:
    """Best achieved GFLOP/s of a jitted fp32 square matmul on the first device."""
    on_cpu = jax.devices()[0].platform == "cpu"
    n = 1024 if quick else (2048 if on_cpu else 8192)
    a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n), jnp.float32) for i in range(2))
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    best = float("inf")
    for _ in range(3 if quick else 10):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def time_steps(
    run_step: Callable[[], Any], *, warmup: int, steps: int
) -> tuple[list[float], float]:
    """Wall seconds of each of `steps` calls after `warmup` calls (each blocked on), and the
    process CPU seconds per call, which a shared machine inflates less than wall time."""
    for _ in range(warmup):
        jax.block_until_ready(run_step())
    times = []
    cpu_start = time.process_time()
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(run_step())
        times.append(time.perf_counter() - start)
    return times, (time.process_time() - cpu_start) / steps


# ----------------------------------------------------------------------------- FLOPs


def matmul_params(config: ModelConfig) -> int:
    """Parameters used in matmuls: everything but the input embedding (a gather) and norms."""
    e, f, h, kv, d = (
        config.hidden_size,
        config.intermediate_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
    )
    per_layer = 2 * e * h * d + 2 * e * kv * d + (3 if config.mlp_type == "gated" else 2) * e * f
    head = e if config.head == "scalar" else e * config.vocab_size
    return config.num_layers * per_layer + head


def attention_flops(config: ModelConfig, rows: int, queries: int, keys: int) -> int:
    """QKᵀ and PV: 2 matmuls of 2·D FLOPs per (query, key, head) pair."""
    return 4 * config.num_layers * config.num_heads * config.head_dim * rows * queries * keys


def forward_flops(config: ModelConfig, rows: int, seq: int) -> int:
    return 2 * matmul_params(config) * rows * seq + attention_flops(config, rows, seq, seq)


def generate_flops(
    config: ModelConfig, batch: int, prompt_len: int, new_tokens: int, num_generations: int = 1
) -> int:
    """`batch` decode rows; with G = num_generations > 1 the batch/G prompts are prefilled once
    into a P-slot cache (`generate(..., num_generations=G)`), otherwise each row into P+N slots."""
    cache = prompt_len + new_tokens
    prompts = batch // num_generations
    prefill = 2 * matmul_params(config) * prompts * prompt_len
    prefill_keys = prompt_len if num_generations > 1 else cache
    prefill += attention_flops(config, prompts, prompt_len, prefill_keys)
    decode = 2 * matmul_params(config) * batch + attention_flops(config, batch, 1, cache)
    return prefill + (new_tokens - 1) * decode


# ----------------------------------------------------------------------------- data


def random_rows(rng: np.random.Generator, vocab: int, rows: int, seq: int) -> dict[str, np.ndarray]:
    """Full-length rows: ids, all-ones mask, positions 0..T-1."""
    return {
        "input_ids": rng.integers(2, vocab, (rows, seq), dtype=np.int32),
        "attention_mask": np.ones((rows, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
    }


def pair_batch(preset: Preset, vocab: int, *, share_prompt: bool) -> dict[str, np.ndarray]:
    """B preference pairs (P-token prompt, C-token chosen and rejected), collated by the library:
    two `[B, P + C]` row sets, or with `share_prompt` one `[B, P + 2C]` row per pair."""
    rng = np.random.default_rng(0)
    examples = [
        {
            "prompt_ids": rng.integers(2, vocab, preset.prompt_len, dtype=np.int32),
            "chosen_ids": rng.integers(2, vocab, preset.completion_len, dtype=np.int32),
            "rejected_ids": rng.integers(2, vocab, preset.completion_len, dtype=np.int32),
        }
        for _ in range(preset.batch)
    ]
    seq = preset.prompt_len + preset.completion_len
    if share_prompt:
        shared_seq = seq + preset.completion_len
        buckets = Buckets((shared_seq,), max_length=shared_seq)
        return collate_preference_shared(examples, buckets=buckets, pad_id=0)
    return collate_preference(examples, buckets=Buckets((seq,), max_length=seq), pad_id=0)


def sft_batch(preset: Preset, vocab: int) -> dict[str, np.ndarray]:
    seq = preset.prompt_len + preset.completion_len
    batch = random_rows(np.random.default_rng(0), vocab, preset.batch, seq)
    batch["loss_mask"] = np.ones((preset.batch, seq), np.float32)
    batch["loss_mask"][:, 0] = 0.0  # nothing predicts the first token
    return batch


def ppo_batch(preset: Preset, vocab: int) -> dict[str, np.ndarray]:
    """A rollout of B rows: P prompt + C response tokens, random old log-probs and advantages."""
    rng = np.random.default_rng(0)
    rows = random_rows(rng, vocab, preset.batch, preset.prompt_len + preset.completion_len)
    response = (preset.batch, preset.completion_len)
    return {
        "input_ids": rows["input_ids"],
        "attention_mask": rows["attention_mask"],
        "response_mask": np.ones(response, np.float32),
        "old_logprobs": -rng.exponential(7.0, response).astype(np.float32),
        "old_values": rng.normal(size=response).astype(np.float32),
        "advantages": rng.normal(size=response).astype(np.float32),
        "returns": rng.normal(size=response).astype(np.float32),
    }


# ----------------------------------------------------------------------------- jaxalign workloads


def bench_mesh(rows: int):
    """Every device on accelerators (batch split over data); one device on CPU, where XLA already
    uses every core and fake host devices would only split the same cores."""
    devices = jax.devices()
    if devices[0].platform == "cpu" or rows % len(devices):
        devices = devices[:1]
    return shd.make_mesh(shape=(-1, 1, 1), axis_names=("data", "fsdp", "tensor"), devices=devices)


def build_train_step(
    workload: str, preset: Preset, chunk_size: int | None, *, dpo_two_rows: bool = False
):
    """(run_step, compile_s, tokens per step, FLOPs per step, model config, extra result fields)
    for a train workload."""
    config = base_config()
    config.dpo.share_prompt = not dpo_two_rows
    rules = config.mesh.logical_rules
    head = "scalar" if workload == "reward" else "lm"
    model_config = ModelConfig(**preset.model, head=head)
    model = Transformer(model_config)
    seq = preset.prompt_len + preset.completion_len
    share_prompt = workload == "dpo" and config.dpo.share_prompt
    rows = preset.batch * (2 if workload in ("dpo", "reward") and not share_prompt else 1)
    mesh = bench_mesh(rows)
    tx, schedule = make_optimizer(config.optimizer, total_steps=10_000)
    dummy = jnp.zeros((1, 1), jnp.int32)

    def init(module: Transformer, seed: int):
        return shd.init_sharded(
            lambda rng: module.init(rng, dummy)["params"], mesh, rules, jax.random.PRNGKey(seed)
        )

    params, param_shardings = init(model, 0)
    boxed, frozen, frozen_shardings = model, None, None
    vocab = model_config.vocab_size
    if workload == "sft":
        loss_fn, batch = sft_loss_fn(model, chunk_size=chunk_size), sft_batch(preset, vocab)
        tokens, flops = preset.batch * seq, 3 * forward_flops(model_config, rows, seq)
    elif workload in ("dpo", "reward"):
        batch = pair_batch(preset, vocab, share_prompt=share_prompt)
        tokens = preset.batch * (preset.prompt_len + 2 * preset.completion_len)
        row_len = batch["input_ids" if share_prompt else "chosen_input_ids"].shape[1]
        flops = 3 * forward_flops(model_config, rows, row_len)
        if workload == "dpo":
            loss_fn = dpo_loss_fn(model, config.dpo, chunk_size=chunk_size)
            frozen = jax.tree.map(jnp.copy, params)  # the reference: the initial policy
            frozen_shardings = param_shardings
            flops += forward_flops(model_config, rows, row_len)
        else:
            loss_fn = reward_loss_fn(model, margin=0.0, center_coef=0.0)
    elif workload == "ppo":
        critic = Transformer(model_config.replace(head="scalar"))
        critic_params, critic_shardings = init(critic, 1)
        params = {"policy": params, "critic": critic_params}
        param_shardings = {"policy": param_shardings, "critic": critic_shardings}
        boxed = {"policy": setup.abstract_params(model), "critic": setup.abstract_params(critic)}
        loss_fn = ppo_loss_fn(
            model,
            critic,
            config.ppo,
            prompt_len_of=lambda b: b["input_ids"].shape[1] - preset.completion_len,
            chunk_size=chunk_size,
        )
        batch = ppo_batch(preset, vocab)
        tokens = preset.batch * seq
        flops = 3 * (
            forward_flops(model_config, rows, seq) + forward_flops(critic.config, rows, seq)
        )
    else:
        raise ValueError(f"not a training workload: {workload}")

    state, state_shardings = engine.create_train_state(
        params, param_shardings, boxed, tx, mesh, rules, seed=0
    )
    step = engine.make_train_step(loss_fn, tx, grad_accum_steps=1, schedule=schedule)
    jitted = engine.jit_train_step(step, state_shardings, mesh, frozen_shardings)
    device_batch = shd.shard_batch(batch, mesh)
    start = time.perf_counter()
    with shd.activation_context(mesh, rules):  # as the engine traces its steps
        compiled = jitted.lower(state, device_batch, frozen).compile()
    compile_s = time.perf_counter() - start

    def run_step():
        nonlocal state
        state, metrics = compiled(state, device_batch, frozen)
        return metrics["loss"]

    info = {
        "step_memory_mb": step_memory_mb(compiled),
        "rows": rows,  # sequences the step runs, of row_len tokens
        "row_len": next(v.shape[1] for k, v in batch.items() if k.endswith("input_ids")),
        "num_devices": mesh.size,
        # one device's share of the SPMD program, times the devices
        "xla_flops": xla_flops(compiled, mesh.size),
    }
    return run_step, compile_s, tokens, flops, model_config, info


def build_lora_dpo_step(preset: Preset, chunk_size: int | None, lora: LoraConfig):
    """`build_train_step("dpo", ...)` with LoRA: only the adapters train, the reference is the
    base with adapters off (no second params tree).

    Built from the library's pieces: `models.lora.init_lora` (adapters on the, for QLoRA
    quantized, base), `LoraModel.split` (trainable adapters | frozen base), and the DPO loss on
    `setup.LoraView`s, the `Transformer`-like views the trainers use (adapters on: the policy;
    off: the reference). The engine's `frozen` input carries the base; the loss sees
    `LoraModel.combine(trainable, base)`, so gradients and optimizer state exist for the
    adapters alone.
    """
    config = base_config()
    rules = config.mesh.logical_rules
    model_config = ModelConfig(**preset.model)
    model = Transformer(model_config)
    mesh = bench_mesh(preset.batch)
    params, _ = shd.init_sharded(
        lambda rng: model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"],
        mesh,
        rules,
        jax.random.PRNGKey(0),
    )
    lora_model, full = init_lora(model, params, lora, rng=jax.random.PRNGKey(1))
    del params  # QLoRA: the float base is dropped once quantized
    boxed = lora_model.abstract_params()
    full_shardings = shd.param_shardings(boxed, mesh, rules)
    trainable, frozen = lora_model.split(jax.device_put(full, full_shardings))
    del full
    trainable_shardings, frozen_shardings = lora_model.split(full_shardings)
    dpo_loss = dpo_loss_fn(
        setup.LoraView(lora_model),
        config.dpo,
        chunk_size=chunk_size,
        reference_model=setup.LoraView(lora_model, adapters=False),
    )

    def loss_fn(adapters, batch, base, rng):
        # The reference's params are the base itself (adapters off).
        return dpo_loss(lora_model.combine(adapters, base), batch, base, rng)

    tx, schedule = make_optimizer(config.optimizer, total_steps=10_000)
    state, state_shardings = engine.create_train_state(
        trainable, trainable_shardings, lora_model.split(boxed)[0], tx, mesh, rules, seed=0
    )
    step = engine.make_train_step(loss_fn, tx, grad_accum_steps=1, schedule=schedule)
    jitted = engine.jit_train_step(step, state_shardings, mesh, frozen_shardings)
    batch = pair_batch(preset, model_config.vocab_size, share_prompt=True)
    device_batch = shd.shard_batch(batch, mesh)
    start = time.perf_counter()
    with shd.activation_context(mesh, rules):  # as the engine traces its steps
        compiled = jitted.lower(state, device_batch, frozen).compile()
    compile_s = time.perf_counter() - start

    def run_step():
        nonlocal state
        state, metrics = compiled(state, device_batch, frozen)
        return metrics["loss"]

    rows, row_len = preset.batch, batch["input_ids"].shape[1]
    # No weight gradients for the frozen base: forward + input gradients (2·F) for the policy,
    # F for the reference; the adapters' r-wide matmuls are left out.
    flops = 3 * forward_flops(model_config, rows, row_len)
    tokens = preset.batch * (preset.prompt_len + 2 * preset.completion_len)
    info = {
        "lora_rank": lora.rank,
        "lora_quantization": lora.quantization,
        "trainable_params": sum(x.size for x in jax.tree.leaves(trainable)),
        "step_memory_mb": step_memory_mb(compiled),
        "rows": rows,
        "row_len": row_len,
        "num_devices": mesh.size,
        "xla_flops": xla_flops(compiled, mesh.size),
    }
    return run_step, compile_s, tokens, flops, model_config, info


def xla_flops(compiled: Any, devices: int) -> float | None:
    """XLA's FLOPs of a compiled SPMD step: one device's share times the devices."""
    flops = mfu.compiled_flops(compiled)
    return None if flops is None else flops * devices


def step_memory_mb(compiled: Any) -> float | None:
    """XLA's own account of a compiled step: arguments + outputs not aliased to them + temporaries
    (`compiled.memory_analysis()`), in MiB; None where the backend gives none."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (not every backend implements it)
        return None
    if stats is None:
        return None
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )
    return total / 2**20


def device_peak_mb() -> float | None:
    """Peak bytes in use on the first device (accelerators), in MiB; None on CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def grpo_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """A cheap programmatic reward in TRL's signature: the share of even token ids in a completion.

    Both jaxalign (`rewards.score_completions`) and TRL's `GRPOTrainer` call it unchanged.
    """
    del prompts, completions, kwargs
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def grpo_prompts(preset: Preset, iterations: int) -> np.ndarray:
    """`[iterations, B, P]` random prompt ids (numpy seed 0), new prompts every iteration; TRL gets
    the same ids as words `t<id>` of `_word_tokenizer`."""
    rng = np.random.default_rng(0)
    shape = (iterations, preset.batch, preset.prompt_len)
    return rng.integers(2, preset.model["vocab_size"], shape, dtype=np.int32)


def bench_grpo(
    preset: Preset, *, warmup: int, steps: int, chunk_size: int | None
) -> dict[str, Any]:
    """Times GRPO iterations built from the trainer's pieces (`jaxalign.trainers.grpo`).

    One iteration, as `grpo.train`'s `iteration` runs it with the default `config.grpo`
    (β = 0: no reference; `num_iterations` = 1: no old log-prob pass):
      rollout  `rollout.sample_rollout` (G completions per prompt, one shared prefill each),
               `rollout.local_responses` (to host, decoded) and `rewards.score_completions`
               with `grpo_reward`;
      update   `advantages.grpo_advantages` and one `engine.make_train_step(grpo_loss_fn)` step
               over all B·G rows.
    EOS is disabled (every completion runs the full N tokens), so token counts are fixed. The first
    iteration compiles; `compile_s` is its excess over the mean timed iteration.
    """
    config = base_config()
    grpo_cfg = config.grpo
    grpo_cfg.num_generations = group = preset.num_generations
    grpo_cfg.max_new_tokens = new_tokens = preset.completion_len
    rules = config.mesh.logical_rules
    model_config = ModelConfig(**preset.model)
    model = Transformer(model_config)
    rows, seq = preset.batch * group, preset.prompt_len + new_tokens
    mesh = bench_mesh(rows)
    params, param_shardings = shd.init_sharded(
        lambda rng: model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"],
        mesh,
        rules,
        jax.random.PRNGKey(0),
    )
    tx, schedule = make_optimizer(config.optimizer, total_steps=10_000)
    state, state_shardings = engine.create_train_state(
        params, param_shardings, model, tx, mesh, rules, seed=0
    )
    update_step = engine.jit_train_step(
        engine.make_train_step(
            grpo_loss_fn(model, grpo_cfg, chunk_size=chunk_size),
            tx,
            grad_accum_steps=1,
            schedule=schedule,
        ),
        state_shardings,
        mesh,
        None,
    )
    advantage_fn = jax.jit(
        lambda r: adv.grpo_advantages(
            r, group, estimator=grpo_cfg.advantage_estimator, scale_rewards=grpo_cfg.scale_rewards
        )
    )
    tokenizer = _word_tokenizer(model_config.vocab_size)
    sampling = dataclasses.replace(rl.sampling_config(grpo_cfg, tokenizer), eos_token_ids=())
    reward_funcs = [rewards.RewardFunction(name="grpo_reward", kind="python", fn=grpo_reward)]
    iterations = 1 + max(warmup - 1, 0) + steps
    prompt_ids = grpo_prompts(preset, iterations)
    base_rng = jax.random.PRNGKey(0)

    def rollout_phase(index: int):
        local_prompts = {
            "prompt_input_ids": prompt_ids[index],
            "prompt_attention_mask": np.ones_like(prompt_ids[index]),
        }
        rollout = rl.sample_rollout(
            model,
            state.params,
            shd.shard_batch(local_prompts, mesh),
            rng=jax.random.fold_in(base_rng, index),
            sampling=sampling,
            num_generations=group,
        )
        completions, completion_ids = rl.local_responses(tokenizer, rollout, mesh)
        prompt_rows = [{"prompt": " ".join(f"t{i}" for i in ids)} for ids in prompt_ids[index]]
        total, _ = rewards.score_completions(
            reward_funcs,
            [row for row in prompt_rows for _ in range(group)],
            completions,
            completion_ids,
        )
        return rollout, total

    def update_phase(rollout: rl.Rollout, local_rewards: np.ndarray):
        nonlocal state
        batch = {
            "input_ids": rollout.input_ids,
            "attention_mask": rollout.attention_mask,
            "loss_mask": rollout.response_mask,
            "advantages": advantage_fn(shd.global_from_local(local_rewards, mesh)),
        }
        state, metrics = update_step(state, batch, None)
        return jax.block_until_ready(metrics["loss"])

    rollout_times, update_times, generated, reward_means = [], [], [], []
    cpu_start = 0.0
    for index in range(iterations):
        if index == iterations - steps:
            cpu_start = time.process_time()
        start = time.perf_counter()
        with shd.activation_context(mesh, rules):  # as the engine runs an iteration
            rollout, local_rewards = rollout_phase(index)
            middle = time.perf_counter()
            update_phase(rollout, local_rewards)
        rollout_times.append(middle - start)
        update_times.append(time.perf_counter() - middle)
        generated.append(int(np.asarray(rollout.response_mask).sum()))
        reward_means.append(float(np.nanmean(local_rewards)))
    cpu_s = (time.process_time() - cpu_start) / steps
    if any(n != rows * new_tokens for n in generated):
        raise RuntimeError(f"generated {generated} tokens, expected {rows * new_tokens} each")

    timed_rollout = np.asarray(rollout_times[-steps:])
    timed_update = np.asarray(update_times[-steps:])
    iteration_times = timed_rollout + timed_update
    rollout_s, update_s = float(timed_rollout.mean()), float(timed_update.mean())
    iteration_s = rollout_s + update_s
    rollout_compile_s = max(rollout_times[0] - rollout_s, 0.0)
    update_compile_s = max(update_times[0] - update_s, 0.0)
    tokens = rows * seq
    flops = generate_flops(model_config, rows, preset.prompt_len, new_tokens, group)
    flops += 3 * forward_flops(model_config, rows, seq)
    return {
        "workload": "grpo",
        "tokens_per_s": tokens / iteration_s,
        "step_s": iteration_s,
        "step_s_min": float(iteration_times.min()),
        "step_cpu_s": cpu_s,
        "compile_s": rollout_compile_s + update_compile_s,
        "tokens_per_step": tokens,
        "gflops_per_step": flops / 1e9,
        "gflops_per_s": flops / iteration_s / 1e9,
        "num_params": model_config.num_params(),
        "batch": rows,
        "seq": seq,
        "dtype": model_config.dtype,
        "param_dtype": model_config.param_dtype,
        "remat_policy": model_config.remat_policy,
        "attention_impl": model_config.attention_impl,
        "attention_impl_run": resolve_attention_impl(model_config),
        "peak_rss_mb": peak_rss_mb(),
        "rows": rows,
        "row_len": seq,
        "num_devices": mesh.size,
        "num_prompts": preset.batch,
        "num_generations": group,
        "iteration_s": iteration_s,
        "rollout_s": rollout_s,
        "update_s": update_s,
        "rollout_tokens_per_s": rows * new_tokens / rollout_s,
        "update_tokens_per_s": tokens / update_s,
        "rollout_share": rollout_s / iteration_s,
        "rollout_compile_s": rollout_compile_s,
        "update_compile_s": update_compile_s,
        "reward_mean": float(np.mean(reward_means[-steps:])),
    }


def bench_jax(
    workload: str,
    preset: Preset,
    *,
    warmup: int,
    steps: int,
    chunk_size: int | None,
    dpo_two_rows: bool = False,
    lora: LoraConfig | None = None,
):
    """Times one jaxalign workload; returns the result fields (without the machine's peaks).
    `lora`: the DPO workload trains these adapters instead of the full model."""
    if workload == "grpo":
        return bench_grpo(preset, warmup=warmup, steps=steps, chunk_size=chunk_size)
    if workload == "generate":
        model_config = ModelConfig(**preset.model)
        model = Transformer(model_config)
        params = jax.jit(lambda rng: model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])(
            jax.random.PRNGKey(0)
        )
        params = shd.unbox(params)
        shape = (preset.gen_batch, preset.gen_prompt_len)
        prompt_ids = jnp.asarray(
            np.random.default_rng(0).integers(2, model_config.vocab_size, shape)
        )
        prompt_mask = jnp.ones(shape, jnp.int32)
        # No EOS id: every row generates all N tokens.
        sampling = SamplingConfig(
            max_new_tokens=preset.gen_new_tokens, temperature=1.0, eos_token_ids=(), pad_token_id=0
        )
        calls = iter(range(1 << 30))

        def run_step():
            rng = jax.random.PRNGKey(next(calls))
            return generate(model, params, prompt_ids, prompt_mask, rng=rng, config=sampling)

        start = time.perf_counter()
        out = jax.block_until_ready(run_step())
        first_call_s = time.perf_counter() - start
        generated = int(out.response_mask.sum())
        tokens = preset.gen_batch * preset.gen_new_tokens
        if generated != tokens:
            raise RuntimeError(f"generated {generated} tokens, expected {tokens}")
        flops = generate_flops(
            model_config, preset.gen_batch, preset.gen_prompt_len, preset.gen_new_tokens
        )
        times, cpu_s = time_steps(run_step, warmup=max(warmup - 1, 0), steps=steps)
        compile_s = max(first_call_s - float(np.median(times)), 0.0)
        batch, seq = preset.gen_batch, preset.gen_prompt_len + preset.gen_new_tokens
        # one unsharded jit on the default device
        extra = {"rows": batch, "row_len": seq, "num_devices": 1}
    else:
        if lora is not None:
            built = build_lora_dpo_step(preset, chunk_size, lora)
        else:
            built = build_train_step(workload, preset, chunk_size, dpo_two_rows=dpo_two_rows)
        run_step, compile_s, tokens, flops, model_config, extra = built
        times, cpu_s = time_steps(run_step, warmup=warmup, steps=steps)
        batch, seq = preset.batch, preset.prompt_len + preset.completion_len
    step_s = float(np.mean(times))
    return {
        "workload": workload,
        "tokens_per_s": tokens / step_s,
        "step_s": step_s,
        "step_s_min": float(np.min(times)),
        "step_cpu_s": cpu_s,
        "compile_s": compile_s,
        "tokens_per_step": tokens,
        "gflops_per_step": flops / 1e9,
        "gflops_per_s": flops / step_s / 1e9,
        "num_params": model_config.num_params(),
        "batch": batch,
        "seq": seq,
        "dtype": model_config.dtype,
        "param_dtype": model_config.param_dtype,
        "remat_policy": model_config.remat_policy,
        "attention_impl": model_config.attention_impl,
        "attention_impl_run": resolve_attention_impl(model_config),
        "peak_rss_mb": peak_rss_mb(),
        "device_peak_mb": device_peak_mb(),
        **(
            {"dpo_layout": "two-rows" if dpo_two_rows else "shared-prompt"}
            if workload == "dpo"
            else {}
        ),
        **extra,
    }


# ----------------------------------------------------------------------------- PyTorch / TRL


def _hf_llama(preset: Preset):
    import torch
    import transformers

    m = preset.model
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=m["vocab_size"],
        hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_layers"],
        num_attention_heads=m["num_heads"],
        num_key_value_heads=m["num_kv_heads"],
        head_dim=m["head_dim"],
        max_position_embeddings=m.get("max_position_embeddings", 2048),
        rms_norm_eps=1e-6,
        tie_word_embeddings=m.get("tie_word_embeddings", False),
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(hf_config).float()


def _torch_timed(step: Callable[[], None], warmup: int, steps: int) -> tuple[list[float], float]:
    for _ in range(warmup):
        step()
    times = []
    cpu_start = time.process_time()
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times, (time.process_time() - cpu_start) / steps


def torch_train_step(workload: str, preset: Preset) -> Callable[[], None]:
    """A hand-written PyTorch SFT or DPO (sigmoid, β = 0.1) step with AdamW and clip 1.0."""
    import torch
    import torch.nn.functional as F

    policy = _hf_llama(preset).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5, weight_decay=0.0)
    vocab = preset.model["vocab_size"]
    if workload == "sft":
        ids = torch.from_numpy(sft_batch(preset, vocab)["input_ids"]).long()

        def loss_fn():
            logits = policy(input_ids=ids).logits[:, :-1]
            return F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))

    else:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        pairs = pair_batch(preset, vocab, share_prompt=False)
        ids = torch.from_numpy(
            np.concatenate([pairs["chosen_input_ids"], pairs["rejected_input_ids"]])
        ).long()
        mask = torch.from_numpy(
            np.concatenate([pairs["chosen_loss_mask"], pairs["rejected_loss_mask"]])
        )[:, 1:]

        def logps(model):
            logits = model(input_ids=ids).logits[:, :-1].float()
            token_logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
            summed = (token_logps * mask).sum(-1)
            return summed[: preset.batch], summed[preset.batch :]

        def loss_fn():
            with torch.no_grad():
                ref_chosen, ref_rejected = logps(reference)
            chosen, rejected = logps(policy)
            margin = (chosen - ref_chosen) - (rejected - ref_rejected)
            return -F.logsigmoid(0.1 * margin).mean()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()

    return step


def _word_tokenizer(vocab: int):
    """A whitespace word-level tokenizer over 't2'..'t{V-1}' (id i), pad 0 and EOS 1 for TRL."""
    import tokenizers
    import transformers

    words = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<pad>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>"
    )


def trl_train_times(workload: str, preset: Preset, warmup: int, steps: int) -> list[float]:
    """Per-step seconds of TRL's DPOTrainer or SFTTrainer, measured between `on_step_end`s."""
    import datasets
    import transformers
    import trl

    datasets.disable_progress_bars()
    vocab = preset.model["vocab_size"]
    seq = preset.prompt_len + preset.completion_len
    ends: list[float] = []

    class StepClock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    rows = preset.batch * (warmup + steps + 1)
    rng = np.random.default_rng(0)
    words = lambda n: " ".join(f"t{i}" for i in rng.integers(2, vocab, n))  # noqa: E731
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"),
        per_device_train_batch_size=preset.batch,
        max_steps=warmup + steps,
        learning_rate=1e-5,
        max_length=seq,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        # TRL defaults to bf16 autocast and gradient checkpointing; compare the same fp32 work.
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if workload == "dpo":
        # A completion of C tokens ends with EOS, so TRL adds none: P + C tokens per row.
        completion = lambda: " " + words(preset.completion_len - 1) + " <eos>"  # noqa: E731
        data = datasets.Dataset.from_list(
            [
                {
                    "prompt": words(preset.prompt_len),
                    "chosen": completion(),
                    "rejected": completion(),
                }
                for _ in range(rows)
            ]
        )
        policy = _hf_llama(preset)
        trainer = trl.DPOTrainer(
            model=policy,
            ref_model=copy.deepcopy(policy),  # no hub id to load a reference from
            args=trl.DPOConfig(**common, beta=0.1),
            train_dataset=data,
            processing_class=_word_tokenizer(vocab),
            callbacks=[StepClock()],
        )
    else:
        ids = rng.integers(2, vocab, (rows, seq)).tolist()
        trainer = trl.SFTTrainer(
            model=_hf_llama(preset),
            args=trl.SFTConfig(**common, packing=False),
            train_dataset=datasets.Dataset.from_dict({"input_ids": ids}),
            processing_class=_word_tokenizer(vocab),
            callbacks=[StepClock()],
        )
    trainer.train()
    return list(np.diff(ends[warmup - 1 :])) if warmup else list(np.diff(ends)), None


def trl_grpo_times(preset: Preset, warmup: int, steps: int) -> dict[str, list[float]]:
    """Per-iteration wall and process CPU seconds of TRL's `GRPOTrainer` (HF `generate`, no vLLM),
    and the wall seconds of its rollouts.

    One optimizer step is one iteration: the B·G completions of B prompts are one generation batch
    (`per_device_train_batch_size = B·G`, `steps_per_generation = 1`), so each `on_step_end` ends a
    rollout (generate + score + advantages, timed around `_generate_and_score_completions`) and
    one update. fp32, no gradient checkpointing, β = 0 and the loss aggregation of jaxalign's
    default `config.grpo`; `min_new_tokens = N` disables EOS as in jaxalign's run.
    """
    import datasets
    import transformers
    import trl

    datasets.disable_progress_bars()
    grpo_defaults = base_config().grpo
    group, new_tokens = preset.num_generations, preset.completion_len
    ends: list[float] = []
    cpu_ends: list[float] = []
    rollout_times: list[float] = []

    class StepClock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

    skip = max(warmup, 1)  # iteration 0 has no step end before it: it is always warm-up
    prompt_ids = grpo_prompts(preset, skip + steps).reshape(-1, preset.prompt_len)
    data = datasets.Dataset.from_list(
        [{"prompt": " ".join(f"t{i}" for i in ids)} for ids in prompt_ids]
    )
    args = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"),
        per_device_train_batch_size=preset.batch * group,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=group,
        max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": new_tokens},
        temperature=grpo_defaults.temperature,
        top_p=grpo_defaults.top_p,
        top_k=grpo_defaults.top_k,
        beta=grpo_defaults.beta,
        loss_type=grpo_defaults.loss_type,
        num_iterations=grpo_defaults.num_iterations,
        use_vllm=False,
        max_steps=skip + steps,
        learning_rate=1e-5,
        shuffle_dataset=False,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = trl.GRPOTrainer(
        model=_hf_llama(preset),
        reward_funcs=grpo_reward,
        args=args,
        train_dataset=data,
        processing_class=_word_tokenizer(preset.model["vocab_size"]),
        callbacks=[StepClock()],
    )
    generate_and_score = trainer._generate_and_score_completions

    def timed_rollout(*args, **kwargs):
        start = time.perf_counter()
        out = generate_and_score(*args, **kwargs)
        rollout_times.append(time.perf_counter() - start)
        return out

    trainer._generate_and_score_completions = timed_rollout
    trainer.train()
    # ends[k] closes iteration k, so iteration k (with rollout k) lies between ends[k-1] and ends[k].
    iterations = list(np.diff(ends[skip - 1 :]))
    return {
        "iteration": iterations,
        "rollout": rollout_times[skip : skip + len(iterations)],
        "cpu": list(np.diff(cpu_ends[skip - 1 :])),
    }


def hf_generate_step(preset: Preset) -> Callable[[], None]:
    import torch

    model = _hf_llama(preset).eval()
    shape = (preset.gen_batch, preset.gen_prompt_len)
    ids = torch.from_numpy(np.random.default_rng(0).integers(2, preset.model["vocab_size"], shape))
    kwargs = dict(
        attention_mask=torch.ones(shape, dtype=torch.long),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=preset.gen_new_tokens,
        min_new_tokens=preset.gen_new_tokens,  # suppresses EOS: full length, like jaxalign's run
        pad_token_id=0,
    )

    def step():
        with torch.inference_mode():
            model.generate(ids, **kwargs)

    return step


def compare_torch(workload: str, preset: Preset, tokens: int, warmup: int, steps: int) -> dict:
    """{name: {tokens_per_s, step_s}} of the PyTorch baselines that apply to `workload`."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as err:
        return {"skipped": f"torch/transformers not importable: {err}"}
    try:
        import trl  # noqa: F401

        has_trl = True
    except ImportError:
        has_trl = False
    runs: dict[str, Callable[[], tuple[list[float], float | None]]] = {}
    if workload in ("sft", "dpo"):
        runs[f"torch_{workload}"] = lambda: _torch_timed(
            torch_train_step(workload, preset), warmup, steps
        )
        if has_trl:
            runs[f"trl_{workload}"] = lambda: trl_train_times(workload, preset, warmup, steps)
    elif workload == "generate":
        runs["hf_generate"] = lambda: _torch_timed(hf_generate_step(preset), warmup, steps)
    elif workload == "grpo" and has_trl:
        runs["trl_grpo"] = lambda: trl_grpo_times(preset, warmup, steps)
    results: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    if not has_trl and workload in ("sft", "dpo", "grpo"):
        results["trl"] = "not installed (pip install trl==1.16.0)"
    for name, run in runs.items():
        try:
            timed = run()
        except Exception as err:  # a baseline failing must not lose the jaxalign numbers
            results[name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        if workload == "grpo":
            results[name] = _grpo_baseline(timed, preset, tokens)
            continue
        times, cpu_s = timed
        step_s = float(np.mean(times))
        results[name] = {"tokens_per_s": tokens / step_s, "step_s": step_s, "step_cpu_s": cpu_s}
    return results


def _grpo_baseline(times: dict[str, list[float]], preset: Preset, tokens: int) -> dict[str, Any]:
    """The GRPO workload's fields (`iteration_s`, rollout/update split) from TRL's timings."""
    iteration_s, rollout_s = float(np.mean(times["iteration"])), float(np.mean(times["rollout"]))
    update_s = iteration_s - rollout_s
    generated = preset.batch * preset.num_generations * preset.completion_len
    return {
        "tokens_per_s": tokens / iteration_s,
        "step_s": iteration_s,
        "step_s_min": float(np.min(times["iteration"])),
        "step_cpu_s": float(np.mean(times["cpu"])),
        "iteration_s": iteration_s,
        "rollout_s": rollout_s,
        "update_s": update_s,
        "rollout_tokens_per_s": generated / rollout_s,
        "update_tokens_per_s": tokens / update_s,
        "rollout_share": rollout_s / iteration_s,
    }


# ----------------------------------------------------------------------------- CLI


def _format_table(results: list[dict[str, Any]]) -> str:
    columns = (
        ("workload", "workload", "{}"),
        ("preset", "preset", "{}"),
        ("batch", "batch", "{}"),
        ("seq", "seq", "{}"),
        ("tok/step", "tokens_per_step", "{:,}"),
        ("compile s", "compile_s", "{:.1f}"),
        ("step s", "step_s", "{:.4f}"),
        ("min s", "step_s_min", "{:.4f}"),
        ("cpu s", "step_cpu_s", "{:.3f}"),
        ("tokens/s", "tokens_per_s", "{:,.0f}"),
        ("GFLOP/s", "gflops_per_s", "{:.1f}"),
        ("% mm peak", "fraction_of_peak", "{:.1%}"),
        ("MFU", "mfu", "{:.1%}"),
        ("RSS MB", "peak_rss_mb", "{:.0f}"),
    )
    cells = [[h for h, _, _ in columns]]
    for result in results:
        cells.append(
            ["-" if result.get(key) is None else fmt.format(result[key]) for _, key, fmt in columns]
        )
        if result.get("lora_rank"):
            cells[-1][0] += f"+lora{result['lora_rank']}"
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    first = results[0] if results else {}
    lines.append(
        f"device: {first.get('device')}; measured fp32 matmul peak "
        f"{first.get('matmul_peak_gflops', 0):.1f} GFLOP/s"
    )
    for result in results:
        if result.get("vs_full"):
            lines.append(_lora_line(result))
        if result["workload"] == "grpo":
            lines += [
                _grpo_split(name, fields)
                for name, fields in (("jaxalign", result), *(result.get("compare") or {}).items())
                if isinstance(fields, dict) and "rollout_s" in fields
            ]
        for name, baseline in (result.get("compare") or {}).items():
            if isinstance(baseline, dict) and "tokens_per_s" in baseline:
                ratio = result["tokens_per_s"] / baseline["tokens_per_s"]
                lines.append(
                    f"{result['workload']:>8}: {name:<12} {baseline['tokens_per_s']:>9,.0f} tok/s "
                    f"(step {baseline['step_s']:.4f} s, cpu {baseline.get('step_cpu_s') or 0:.3f} s)"
                    f"; jaxalign / {name} = {ratio:.2f}x"
                )
            elif name != "torch_threads":
                lines.append(f"{result['workload']:>8}: {name}: {baseline}")
    return "\n".join(lines)


def _lora_line(result: dict[str, Any]) -> str:
    ratios = result["vs_full"]
    parts = [f"tokens/s {ratios['tokens_per_s']:.2f}x", f"peak RSS {ratios['peak_rss_mb']:.2f}x"]
    if ratios.get("step_memory_mb"):
        parts.append(f"XLA step memory {ratios['step_memory_mb']:.2f}x")
    if ratios.get("device_peak_mb"):
        parts.append(f"device peak {ratios['device_peak_mb']:.2f}x")
    quantized = result["lora_quantization"]
    return (
        f"     dpo: LoRA r={result['lora_rank']}"
        + ("" if quantized == "none" else f" ({quantized} base)")
        + f", {result['trainable_params']:,} trainable of {result['num_params']:,} params; "
        + "LoRA / full: "
        + ", ".join(parts)
    )


def _grpo_split(name: str, fields: dict[str, Any]) -> str:
    return (
        f"    grpo: {name:<12} iteration {fields['iteration_s']:.3f} s = rollout "
        f"{fields['rollout_s']:.3f} s ({fields['rollout_tokens_per_s']:,.0f} generated tok/s, "
        f"{fields['rollout_share']:.0%}) + update {fields['update_s']:.3f} s "
        f"({fields['update_tokens_per_s']:,.0f} tok/s)"
    )


def _run_all(args: argparse.Namespace) -> int:
    """Each workload in its own process, so compile caches and peak RSS do not mix."""
    peak = matmul_peak_gflops(quick=args.quick)
    results, failed = [], 0
    for workload in WORKLOADS:
        command = [sys.executable, __file__, "--workload", workload, "--preset", args.preset]
        command += ["--json", "--matmul-peak-gflops", str(peak)]
        command += ["--logits-chunk-size", str(args.logits_chunk_size)]
        for flag in ("steps", "warmup"):
            if getattr(args, flag) is not None:
                command += [f"--{flag}", str(getattr(args, flag))]
        command += ["--quick"] * args.quick + ["--compare-torch"] * args.compare_torch
        command += ["--dpo-two-rows"] * args.dpo_two_rows
        command += _override_flags(args)
        proc = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode:
            failed += 1
            print(f"{workload} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(result)
        if args.json:
            print(json.dumps(result), flush=True)
    if not args.json:
        print(_tables(results))
    return 1 if failed else 0


def _override_flags(args: argparse.Namespace) -> list[str]:
    """The preset overrides and `--peak-flops`, for a child process."""
    flags = []
    for name in (
        "num_layers",
        "vocab_size",
        "seq_len",
        "batch_size",
        "attention_impl",
        "remat",
        "peak_flops",
    ):
        if getattr(args, name) is not None:
            flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags


def _tables(results: list[dict[str, Any]]) -> str:
    """Each workload's own table (`mfu.format_report`), then the one-row-per-workload table."""
    return "\n\n".join([*map(mfu.format_report, results), _format_table(results)])


def _workloads(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [n for n in names if n not in (*WORKLOADS, "all")]
    if not names or unknown or ("all" in names and len(names) > 1):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected all, or one or more (comma-separated) of {', '.join(WORKLOADS)}"
        )
    return names


@contextlib.contextmanager
def _stdout_to_stderr():
    """Sends stdout to stderr, at the file-descriptor level too: some libraries (TRL's progress
    callback) write through handles taken before a plain `redirect_stdout` could swap them."""
    sys.stdout.flush()
    saved_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved_fd, 1)
        os.close(saved_fd)


def override_preset(preset: Preset, args: argparse.Namespace) -> Preset:
    """The preset with the command line's `--num-layers`, `--vocab-size`, `--seq-len` (training
    rows of S/2 prompt + S/2 completion tokens, generate S/2 + S/2 new), `--batch-size` (training
    and generate), `--attention-impl` and `--remat`."""
    model = dict(preset.model)
    for flag, key in (
        ("num_layers", "num_layers"),
        ("vocab_size", "vocab_size"),
        ("attention_impl", "attention_impl"),
        ("remat", "remat_policy"),
    ):
        if getattr(args, flag) is not None:
            model[key] = getattr(args, flag)
    changes: dict[str, Any] = {"model": model}
    if args.seq_len is not None:
        half = args.seq_len // 2
        changes.update(prompt_len=half, completion_len=half, gen_prompt_len=half)
        changes.update(gen_new_tokens=half)
    if args.batch_size is not None:
        changes.update(batch=args.batch_size, gen_batch=args.batch_size)
    return dataclasses.replace(preset, **changes)


def add_mfu_fields(result: dict[str, Any], peak_override: float | None) -> None:
    """FLOPs per step (XLA's count or the analytic one, `mfu.model_flops`), the device's peak
    (`--peak-flops`, else the datasheet table) and MFU, in place."""
    device = jax.devices()[0]
    analytic = result["gflops_per_step"] * 1e9
    xla = result.pop("xla_flops", None)
    caveat = mfu.xla_caveat(
        remat_policy=result["remat_policy"],
        attention_impl=result["attention_impl_run"],
        has_loop=result["workload"] in ("generate", "grpo"),
    )
    flops, source, note = mfu.model_flops(analytic, xla, caveat)
    if peak_override:
        peak, peak_source = peak_override, "--peak-flops"
    else:
        peak = mfu.peak_flops(device.device_kind, result["dtype"])  # None on CPU
        peak_source = f"datasheet {result['dtype']}"
    devices = result["num_devices"]
    result.update(
        platform=device.platform,
        device_kind=device.device_kind,
        tokens_per_s_per_device=result["tokens_per_s"] / devices,
        flops_per_step=flops,
        flops_source=source,
        flops_note=note,
        flops_per_step_analytic=analytic,
        flops_per_step_xla=xla,
        peak_flops=peak,
        peak_flops_source=peak_source if peak else None,
        mfu=mfu.mfu(flops, result["step_s"], devices, peak),
    )


def bench_one(workload: str, args: argparse.Namespace, matmul_peak: float) -> dict[str, Any]:
    preset = PRESETS[args.preset].quick() if args.quick else PRESETS[args.preset]
    preset = override_preset(preset, args)
    # A GRPO iteration is a whole rollout and update (seconds each): fewer of them by default.
    long_steps = workload == "grpo"
    warmup = args.warmup if args.warmup is not None else (1 if args.quick or long_steps else 3)
    steps = args.steps if args.steps is not None else (2 if args.quick else 6 if long_steps else 20)
    result = bench_jax(
        workload,
        preset,
        warmup=warmup,
        steps=steps,
        chunk_size=args.logits_chunk_size or None,
        dpo_two_rows=args.dpo_two_rows,
        lora=lora_config_of(args) if workload == "dpo" else None,
    )
    device = jax.devices()[0]
    result.update(
        preset=args.preset,
        quick=args.quick,
        warmup=warmup,
        steps=steps,
        device=f"{device.platform}:{device.device_kind}",
        matmul_peak_gflops=matmul_peak,
        fraction_of_peak=result["gflops_per_s"] / matmul_peak,
    )
    add_mfu_fields(result, args.peak_flops)
    if args.compare_torch:
        # Trainers print their own summaries; keep stdout for our table / JSON line.
        with _stdout_to_stderr():
            result["compare"] = compare_torch(
                workload, preset, result["tokens_per_step"], warmup, steps
            )
        for baseline in result["compare"].values():
            if isinstance(baseline, dict) and "tokens_per_s" in baseline:
                baseline["jaxalign_speedup"] = result["tokens_per_s"] / baseline["tokens_per_s"]
    return result


def lora_config_of(args: argparse.Namespace) -> LoraConfig | None:
    """`--lora-rank R` (0: full fine-tuning): adapters on every projection, alpha = 2R."""
    if not args.lora_rank:
        return None
    return LoraConfig(
        rank=args.lora_rank, alpha=2.0 * args.lora_rank, quantization=args.lora_quantization
    )


def _run_lora_comparison(args: argparse.Namespace) -> int:
    """Full DPO and LoRA-DPO, each in its own process (peak RSS is a process's own) with the same
    steps, then the ratios (LoRA / full) on the LoRA result: `vs_full`."""
    peak = args.matmul_peak_gflops or matmul_peak_gflops(quick=args.quick)
    results = []
    for rank in (0, args.lora_rank or LORA_RANK):
        command = [sys.executable, __file__, "--workload", "dpo", "--preset", args.preset]
        command += ["--json", "--matmul-peak-gflops", str(peak)]
        command += ["--logits-chunk-size", str(args.logits_chunk_size)]
        command += ["--lora-rank", str(rank), "--lora-quantization", args.lora_quantization]
        # Seconds per step on a CPU: 1 warm-up and 6 timed steps unless given (--quick: 1 + 2).
        for flag, default in (("steps", 2 if args.quick else 6), ("warmup", 1)):
            command += [
                f"--{flag}",
                str(default if getattr(args, flag) is None else getattr(args, flag)),
            ]
        command += ["--quick"] * args.quick + _override_flags(args)
        proc = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode:
            print(f"dpo (lora rank {rank}) failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    full, lora = results
    lora["vs_full"] = {
        key: lora[key] / full[key] if lora.get(key) and full.get(key) else None
        for key in ("tokens_per_s", "peak_rss_mb", "step_memory_mb", "device_peak_mb")
    }
    if args.json:
        for result in results:
            print(json.dumps(result), flush=True)
    else:
        print(_tables(results), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workload",
        type=_workloads,
        default=["dpo"],
        help=f"all, or comma-separated {','.join(WORKLOADS)} (run in this one process)",
    )
    parser.add_argument(
        "--preset", choices=tuple(PRESETS), default=None, help="trl-tiny (--lora: lora-mid)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps (20, grpo 6; --quick 2)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up steps (3, grpo 1; --quick 1)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON line per workload")
    parser.add_argument("--quick", action="store_true", help="CI: small shapes, 1 + 2 steps")
    parser.add_argument("--compare-torch", action="store_true", help="also time PyTorch / TRL")
    parser.add_argument(
        "--logits-chunk-size", type=int, default=0, help="model.logits_chunk_size (0: none)"
    )
    parser.add_argument(
        "--dpo-two-rows",
        action="store_true",
        help="DPO with chosen and rejected as two rows (dpo.share_prompt=False)",
    )
    parser.add_argument(
        "--lora",
        action="store_true",
        help=f"LoRA-DPO against full DPO, each in its own process (rank --lora-rank or {LORA_RANK})",
    )
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="DPO trains rank-R adapters on every projection (alpha 2R) in this process; 0: full",
    )
    parser.add_argument(
        "--lora-quantization", choices=QUANTIZATIONS, default="none", help="QLoRA base storage"
    )
    shapes = parser.add_argument_group("preset overrides (e.g. a CPU smoke run of llama-1b)")
    shapes.add_argument("--num-layers", type=int, default=None, help="model.num_layers")
    shapes.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="model.vocab_size (a small one keeps a CPU smoke run's embedding and head cheap)",
    )
    shapes.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="S: training rows of S/2 prompt + S/2 completion tokens (DPO's shared-prompt row "
        "S/2 + 2·S/2), generate S/2 prompt + S/2 new tokens",
    )
    shapes.add_argument(
        "--batch-size", type=int, default=None, help="sequences / pairs / prompts per step"
    )
    shapes.add_argument(
        "--attention-impl", choices=ATTENTION_IMPLS, default=None, help="model.attention_impl"
    )
    shapes.add_argument("--remat", choices=REMAT_POLICIES, default=None, help="model.remat_policy")
    parser.add_argument(
        "--peak-flops",
        type=float,
        default=None,
        help="peak FLOP/s of one device for MFU (default: the datasheet table in bench/mfu.py)",
    )
    parser.add_argument("--matmul-peak-gflops", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.preset = args.preset or ("lora-mid" if args.lora else "trl-tiny")
    if (args.steps is not None and args.steps < 1) or (args.warmup is not None and args.warmup < 0):
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if (args.lora or args.lora_rank) and args.workload != ["dpo"]:
        parser.error("--lora and --lora-rank apply to --workload dpo alone")
    if args.lora_rank < 0 or (
        args.lora_quantization != "none" and not (args.lora or args.lora_rank)
    ):
        parser.error("--lora-rank must be >= 0; --lora-quantization needs --lora or --lora-rank")
    minimum = {"num_layers": 1, "batch_size": 1, "vocab_size": 3, "seq_len": 2}  # ids from 2
    if any(getattr(args, f) is not None and getattr(args, f) < m for f, m in minimum.items()) or (
        (args.seq_len or 0) % 2
    ):
        parser.error(
            "--num-layers and --batch-size must be >= 1, --vocab-size >= 3, --seq-len even >= 2"
        )
    if args.peak_flops is not None and args.peak_flops <= 0:
        parser.error("--peak-flops must be > 0")
    if args.lora:
        return _run_lora_comparison(args)
    if args.workload == ["all"]:
        return _run_all(args)
    matmul_peak = args.matmul_peak_gflops or matmul_peak_gflops(quick=args.quick)
    results, failed = [], 0
    for workload in args.workload:
        try:
            result = bench_one(workload, args, matmul_peak)
        except Exception:  # noqa: BLE001  (one workload failing, e.g. out of memory, must not lose the others)
            failed += 1
            traceback.print_exc()
            print(f"{workload} failed", file=sys.stderr, flush=True)
            continue
        results.append(result)
        # At once, so a run stopped later (a timeout) keeps what it measured.
        print(json.dumps(result) if args.json else mfu.format_report(result) + "\n", flush=True)
    if not args.json and results:
        print(_format_table(results), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
