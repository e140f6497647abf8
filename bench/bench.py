"""Throughput of jaxalign's jitted steps (SFT, DPO, reward, PPO update, sampling) on this machine.

    python bench/bench.py --workload dpo --preset trl-tiny --json        # one JSON line
    python bench/bench.py --workload all --preset trl-tiny               # a table, one row each
    python bench/bench.py --workload sft,generate --preset trl-tiny      # several in one process
    python bench/bench.py --workload dpo --preset trl-tiny --compare-torch   # + PyTorch / TRL
    python bench/bench.py --workload sft --preset tiny --quick --json    # CI smoke (seconds)

Each workload builds the library's own step (`make_train_step` + `jit_train_step`, or `generate`)
on random tokens (numpy seed 0), compiles it once ahead of time, runs `--warmup` steps and then
times `--steps` steps, each ended by `jax.block_until_ready`.

Reported per workload:
  tokens_per_s   counted tokens / mean step time. DPO and reward count prompt + chosen + rejected
                 (B·(P + 2C), the prompt once, as TRL reports it): DPO processes exactly that
                 (B shared-prompt rows; with --dpo-two-rows, and for reward, 2B rows of P + C);
                 SFT and the PPO update count B·(P + C); generate counts generated
                 tokens (B·N; EOS is disabled so every row runs the full N).
  step_s         mean seconds per timed step; step_s_min the fastest (less sensitive to a shared
                 machine); step_cpu_s the process CPU seconds per step (all threads).
  compile_s      lower + compile of the step (generate: first call minus one steady-state call).
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
  matmul_peak_gflops  measured: best time of a jitted fp32 [n,n]@[n,n] (n = 2048 on CPU, 8192 on
                 accelerators), 2n³ FLOPs; fraction_of_peak = gflops_per_s / it.
  mfu            accelerators only: gflops_per_s / the device's dense datasheet peak for the compute
                 dtype (H100/H200 SXM bf16 989 TFLOP/s, fp32 67; A100 312 / 19.5; TPU bf16 peaks).
                 XLA's default fp32 matmul precision on GPU may use TF32, so fp32 mfu can exceed 1.
  peak_rss_mb    peak resident memory of this process (`resource.getrusage`), measured before any
                 PyTorch comparison runs. It is the process's peak so far: `--workload all` runs
                 each workload in its own process; a comma list (`sft,dpo`) shares one.

`--compare-torch` (needs torch + transformers; TRL is used when importable) runs the same model size
and batch with a hand-written PyTorch step (`LlamaForCausalLM`, AdamW, clip 1.0, reference forward
under no_grad for DPO), TRL's `DPOTrainer` / `SFTTrainer` (fp32, no gradient checkpointing, timed
between `on_step_end` callbacks, so data collation is included), and HF `generate` for the generate
workload.
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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import sharding as shd
from jaxalign.config import base_config, tiny_model_init
from jaxalign.data import collate_preference, collate_preference_shared
from jaxalign.data.batching import Buckets
from jaxalign.models import ModelConfig, Transformer
from jaxalign.optim import make_optimizer
from jaxalign.sampling import SamplingConfig, generate
from jaxalign.trainers import engine, setup
from jaxalign.trainers.dpo import dpo_loss_fn
from jaxalign.trainers.ppo import ppo_loss_fn
from jaxalign.trainers.reward import reward_loss_fn
from jaxalign.trainers.sft import sft_loss_fn

WORKLOADS = ("sft", "dpo", "reward", "ppo", "generate")
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
}

# Dense datasheet peaks in FLOP/s: (substring of device_kind, {compute dtype: peak}).
DEVICE_PEAKS = (
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}),
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}),
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12}),
    ("TPU v6", {"bfloat16": 918e12}),
    ("TPU v5 lite", {"bfloat16": 197e12}),
    ("TPU v5", {"bfloat16": 459e12}),
    ("TPU v4", {"bfloat16": 275e12}),
)

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


def device_peak_flops(dtype: str) -> float | None:
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    for name, peaks in DEVICE_PEAKS:
        if name in device.device_kind:
            return peaks.get(dtype)
    return None


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


def generate_flops(config: ModelConfig, batch: int, prompt_len: int, new_tokens: int) -> int:
    cache = prompt_len + new_tokens
    prefill = 2 * matmul_params(config) * batch * prompt_len
    prefill += attention_flops(config, batch, prompt_len, cache)
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
    """(run_step, compile_s, tokens per step, FLOPs per step, model config) for a train workload."""
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
    compiled = jitted.lower(state, device_batch, frozen).compile()
    compile_s = time.perf_counter() - start

    def run_step():
        nonlocal state
        state, metrics = compiled(state, device_batch, frozen)
        return metrics["loss"]

    return run_step, compile_s, tokens, flops, model_config


def bench_jax(
    workload: str,
    preset: Preset,
    *,
    warmup: int,
    steps: int,
    chunk_size: int | None,
    dpo_two_rows: bool = False,
):
    """Times one jaxalign workload; returns the result fields (without the machine's peaks)."""
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
    else:
        run_step, compile_s, tokens, flops, model_config = build_train_step(
            workload, preset, chunk_size, dpo_two_rows=dpo_two_rows
        )
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
        "peak_rss_mb": peak_rss_mb(),
        **(
            {"dpo_layout": "two-rows" if dpo_two_rows else "shared-prompt"}
            if workload == "dpo"
            else {}
        ),
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
    results: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    if not has_trl and workload in ("sft", "dpo"):
        results["trl"] = "not installed (pip install trl==1.16.0)"
    for name, run in runs.items():
        try:
            times, cpu_s = run()
        except Exception as err:  # a baseline failing must not lose the jaxalign numbers
            results[name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        step_s = float(np.mean(times))
        results[name] = {"tokens_per_s": tokens / step_s, "step_s": step_s, "step_cpu_s": cpu_s}
    return results


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
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    first = results[0] if results else {}
    lines.append(
        f"device: {first.get('device')}; measured fp32 matmul peak "
        f"{first.get('matmul_peak_gflops', 0):.1f} GFLOP/s"
    )
    for result in results:
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
        print(_format_table(results))
    return 1 if failed else 0


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


def bench_one(workload: str, args: argparse.Namespace, matmul_peak: float) -> dict[str, Any]:
    preset = PRESETS[args.preset].quick() if args.quick else PRESETS[args.preset]
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    steps = args.steps if args.steps is not None else (2 if args.quick else 20)
    result = bench_jax(
        workload,
        preset,
        warmup=warmup,
        steps=steps,
        chunk_size=args.logits_chunk_size or None,
        dpo_two_rows=args.dpo_two_rows,
    )
    device_peak = device_peak_flops(result["dtype"])
    device = jax.devices()[0]
    result.update(
        preset=args.preset,
        quick=args.quick,
        warmup=warmup,
        steps=steps,
        device=f"{device.platform}:{device.device_kind}",
        matmul_peak_gflops=matmul_peak,
        fraction_of_peak=result["gflops_per_s"] / matmul_peak,
        mfu=result["gflops_per_s"] * 1e9 / device_peak if device_peak else None,
    )
    if args.compare_torch:
        # Trainers print their own summaries; keep stdout for our table / JSON line.
        with _stdout_to_stderr():
            result["compare"] = compare_torch(
                workload, preset, result["tokens_per_step"], warmup, steps
            )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workload",
        type=_workloads,
        default=["dpo"],
        help=f"all, or comma-separated {','.join(WORKLOADS)} (run in this one process)",
    )
    parser.add_argument("--preset", choices=tuple(PRESETS), default="trl-tiny")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (20; --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (3; --quick 1)")
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
    parser.add_argument("--matmul-peak-gflops", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (args.steps is not None and args.steps < 1) or (args.warmup is not None and args.warmup < 0):
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.workload == ["all"]:
        return _run_all(args)
    matmul_peak = args.matmul_peak_gflops or matmul_peak_gflops(quick=args.quick)
    results = []
    for workload in args.workload:
        results.append(bench_one(workload, args, matmul_peak))
        if args.json:
            print(json.dumps(results[-1]), flush=True)
    if not args.json:
        print(_format_table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
