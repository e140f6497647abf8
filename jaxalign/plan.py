"""Memory plan: will a config fit a mesh of N devices? Answered without the devices.

    python -m jaxalign.plan --config=configs/llama3_8b_dpo.py --devices=8 \
        --mesh=data=1,fsdp=8,tensor=1 --device-memory-gb=80 [--config.<key>=<value> ...]

`--devices` defaults to the product of `--mesh`; `--mesh` axes left out are 1, and without
`--mesh` the config's `mesh.shape` is used. `--device-memory-gb` is in GiB (2**30 bytes).
`--backend=gpu|tpu|cpu` (default gpu) is where `model.attention_impl="auto"` is resolved: the
activation estimate has a `T²` score term only for the `xla` kernel.

Nothing full-size is allocated. The model config is read from `config.json` when a
`name_or_path` is a local directory, else taken from `PUBLISHED_CONFIGS` (the recipes' hub ids;
the hub is never needed for those). Params and optimizer state are `jax.eval_shape`d, and the
trainers' own `sharding.param_shardings` over a `jax.sharding.AbstractMesh` gives each leaf's
shard shape (it raises if a rule does not divide a dim). Bytes per device:

  params           Σ shard sizes × param_dtype of the trained models (PPO: policy + critic)
  optimizer state  Σ shard sizes of `jax.eval_shape(tx.init, params)` for `config.optimizer`
  gradients        params × 2 when grad_accum_steps > 1 (float32 accumulator + a microbatch's)
  frozen models    DPO: the reference (not when reference-free or precomputed); PPO: the
                   reference and the reward model; GRPO: the reference when grpo.beta > 0.
                   Stored in param_dtype, as the trainers do.
  activations      `activation_bytes` for one microbatch; PPO and GRPO: the larger of the update
                   step (PPO: policy + critic) and the rollout (KV cache + one forward)

With LoRA (`model.lora.rank > 0`) the policy (or reward model) is `jaxalign.models.lora`'s
`LoraModel`: its abstract params give every count, so the plan is what the trainers allocate.

  params           the trainable leaves only: adapters A [in, r] and B [r, out] of every targeted
                   projection (`LoraConfig.flax_targets`: r·(in + out) per layer and target),
                   plus the scalar head of a reward model (PEFT's `modules_to_save`)
  optimizer state  of the trainable leaves only; gradients likewise
  frozen base      the base in param_dtype, or (QLoRA) its targeted kernels quantized: int8 one
                   byte per weight + one float32 scale per output channel; nf4 half a byte per
                   weight + one float32 scale per block of `nf4_block_size` (64) inputs
  frozen models    no reference copy for DPO, PPO or GRPO (the reference is the base with the
                   adapters off); PPO's reward model is still a frozen model and its critic is
                   trained fully (its own model, not the policy's base)
  activations      as without LoRA (the frozen base still needs the backward through every layer;
                   the adapters' [n, r] activations are negligible)
The printed plan puts the full fine-tuning plan beside it and the saving per device.

Not counted: XLA temporaries beyond the estimate, fragmentation, and the runtime's own share
(on GPU, JAX preallocates 75% of memory unless XLA_PYTHON_CLIENT_MEM_FRACTION is raised).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh

from jaxalign import sharding as shd
from jaxalign.config import validate
from jaxalign.models import ModelConfig, Transformer, from_hf_config
from jaxalign.models.attention import resolve_attention_impl
from jaxalign.models.kv_cache import window_layers, window_length
from jaxalign.models.lora import LoraConfig, is_adapter, make_lora_model
from jaxalign.optim import make_optimizer
from jaxalign.trainers.dpo import needs_reference_model
from jaxalign.trainers.setup import abstract_params, model_config_for

GIB = 2**30

_LLAMA3_8B = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
)
_MISTRAL_7B = dict(
    model_type="mistral",
    architectures=["MistralForCausalLM"],
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    sliding_window=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
_QWEN25_05B = dict(
    model_type="qwen2",
    architectures=["Qwen2ForCausalLM"],
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    use_sliding_window=False,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    hidden_act="silu",
    tie_word_embeddings=True,
    bos_token_id=151643,
    eos_token_id=151643,
)
_GPT2_LARGE = dict(
    model_type="gpt2",
    architectures=["GPT2LMHeadModel"],
    vocab_size=50257,
    n_embd=1280,
    n_layer=36,
    n_head=20,
    n_positions=1024,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    bos_token_id=50256,
    eos_token_id=50256,
)
_GEMMA2_2B = dict(
    model_type="gemma2",
    architectures=["Gemma2ForCausalLM"],
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    attention_bias=False,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
    tie_word_embeddings=True,
)
_GEMMA2_9B = {
    **_GEMMA2_2B,
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "num_hidden_layers": 42,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
}
_GEMMA3_1B = dict(
    model_type="gemma3_text",
    architectures=["Gemma3ForCausalLM"],
    vocab_size=262144,
    hidden_size=1152,
    intermediate_size=6912,
    num_hidden_layers=26,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    rope_local_base_freq=10000.0,
    rope_scaling=None,
    query_pre_attn_scalar=256,
    sliding_window=512,
    sliding_window_pattern=6,
    attn_logit_softcapping=None,
    final_logit_softcapping=None,
    bos_token_id=2,
    eos_token_id=[1, 106],
    pad_token_id=0,
)


def _gemma3_multimodal(**text: object) -> dict:
    """A `Gemma3ForConditionalGeneration` config.json: its `text_config` lists only these fields
    (the rest are `Gemma3TextConfig` defaults); jaxalign reads the text tower."""
    return dict(
        model_type="gemma3",
        architectures=["Gemma3ForConditionalGeneration"],
        eos_token_id=[1, 106],
        text_config=dict(
            model_type="gemma3_text",
            rope_scaling={"factor": 8.0, "rope_type": "linear"},
            sliding_window=1024,
            **text,
        ),
    )


_QWEN3_30B_A3B = dict(
    model_type="qwen3_moe",
    architectures=["Qwen3MoeForCausalLM"],
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    router_aux_loss_coef=0.001,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    hidden_act="silu",
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    attention_bias=False,
    use_sliding_window=False,
    bos_token_id=151643,
    eos_token_id=151645,
    tie_word_embeddings=False,
)
_MIXTRAL_8X7B = dict(
    model_type="mixtral",
    architectures=["MixtralForCausalLM"],
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_local_experts=8,
    num_experts_per_tok=2,
    router_aux_loss_coef=0.02,
    hidden_act="silu",
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=1_000_000.0,
    sliding_window=None,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
_LLAMA32_1B = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    hidden_act="silu",
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=128001,
)
# The `config.json` fields (those `from_hf_config` reads) of the hub models the recipes name,
# copied from the published files. Fine-tunes share their base model's architecture.
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": {**_LLAMA3_8B, "eos_token_id": 128009},
    "meta-llama/Llama-3.2-1B": _LLAMA32_1B,  # bench/bench.py --preset llama-1b
    "meta-llama/Llama-3.2-1B-Instruct": {**_LLAMA32_1B, "eos_token_id": 128009},
    "mistralai/Mistral-7B-v0.1": _MISTRAL_7B,
    "alignment-handbook/zephyr-7b-sft-full": _MISTRAL_7B,  # Mistral-7B-v0.1 fine-tune
    "Qwen/Qwen2.5-0.5B": _QWEN25_05B,
    "Qwen/Qwen2.5-0.5B-Instruct": {**_QWEN25_05B, "eos_token_id": 151645},
    "Qwen/Qwen2.5-7B": {
        **_QWEN25_05B,
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
    },
    "gpt2-large": _GPT2_LARGE,
    "openai-community/gpt2-large": _GPT2_LARGE,
    # Gemma 3 4B/12B are multimodal checkpoints: their counts are the text tower's (what jaxalign
    # loads and trains), 3.88B and 11.77B, not the 4.30B / 12.19B that include the vision tower.
    "google/gemma-2-2b": _GEMMA2_2B,
    "google/gemma-2-2b-it": _GEMMA2_2B,
    "google/gemma-2-9b": _GEMMA2_9B,
    "google/gemma-2-9b-it": _GEMMA2_9B,
    "google/gemma-3-1b-pt": _GEMMA3_1B,
    "google/gemma-3-1b-it": _GEMMA3_1B,
    "google/gemma-3-4b-pt": _gemma3_multimodal(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=34
    ),
    "google/gemma-3-4b-it": _gemma3_multimodal(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=34
    ),
    "google/gemma-3-12b-it": _gemma3_multimodal(
        hidden_size=3840,
        intermediate_size=15360,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=8,
    ),
    "Qwen/Qwen3-30B-A3B": _QWEN3_30B_A3B,
    "mistralai/Mixtral-8x7B-v0.1": _MIXTRAL_8X7B,
}


class PlanError(ValueError):
    """The plan cannot be made (unknown model, mesh that does not fit the config)."""


# ----------------------------------------------------------------------------- models


def resolve_model_config(
    model_cfg: ml_collections.ConfigDict,
    name_or_path: str,
    *,
    head: str = "lm",
    backend: str | None = None,
) -> tuple[ModelConfig, str]:
    """`(ModelConfig, where it came from)` for a local HF dir, a known hub id, or random init.

    With `backend` ("tpu", "gpu", "cpu"), `attention_impl="auto"` is resolved to the kernel that
    backend would run (`models.attention.resolve_attention_impl`).
    """
    config, where = _model_config(model_cfg, name_or_path, head=head)
    if backend is not None:
        config = config.replace(attention_impl=resolve_attention_impl(config, backend))
    return config, where


def _model_config(
    model_cfg: ml_collections.ConfigDict, name_or_path: str, *, head: str
) -> tuple[ModelConfig, str]:
    if not name_or_path or Path(name_or_path).expanduser().is_dir():
        where = f"{name_or_path}/config.json" if name_or_path else "config.model.init"
        return model_config_for(model_cfg, name_or_path=name_or_path, head=head), where
    if name_or_path in PUBLISHED_CONFIGS:
        config = from_hf_config(
            PUBLISHED_CONFIGS[name_or_path],
            dtype=model_cfg.dtype,
            param_dtype=model_cfg.param_dtype,
            remat_policy=model_cfg.remat_policy,
            scan_layers=model_cfg.scan_layers,
            attention_impl=model_cfg.attention_impl,
        )
        return config.replace(head=head), "published config (built in)"
    raise PlanError(
        f"{name_or_path!r} is neither a local checkpoint directory nor one of the built-in "
        f"published configs ({', '.join(sorted(PUBLISHED_CONFIGS))}). Pass a directory holding "
        "its config.json, or, before that checkpoint exists, a hub id of the same architecture."
    )


@functools.lru_cache(maxsize=32)
def _abstract(config: ModelConfig) -> Any:
    # Shapes do not depend on the attention kernel; cudnn's cannot be traced without a GPU.
    return abstract_params(Transformer(config.replace(attention_impl="xla")))


def sharded_bytes(tree: Any, mesh: AbstractMesh, rules: Any) -> int:
    """Per-device bytes of a boxed abstract pytree under the logical `rules` on `mesh`.

    Quantized leaves (qwix `QArray`: codes + scales) count their codes in bits (nf4: 4 per weight).
    """
    shardings = shd.param_shardings(tree, mesh, rules)
    sizes = jax.tree.map(
        lambda leaf, s: math.ceil(
            math.prod(s.shard_shape(leaf.shape)) * jax.dtypes.itemsize_bits(leaf.dtype) / 8
        ),
        shd.unbox(tree),
        shardings,
    )
    return int(sum(jax.tree.leaves(sizes)))


def lora_config_of(model_cfg: ml_collections.ConfigDict) -> LoraConfig | None:
    """The run's `LoraConfig`, or None for full fine-tuning (`model.lora.rank == 0`)."""
    lora = model_cfg.lora
    if not lora.rank:
        return None
    return LoraConfig(
        rank=lora.rank,
        alpha=lora.alpha,
        dropout=lora.dropout,
        target_modules=lora.target_modules,
        quantization=lora.quantization,
    )


@functools.lru_cache(maxsize=32)
def _abstract_lora(config: ModelConfig, lora: LoraConfig) -> tuple[Any, Any]:
    """`(trainable, frozen)` boxed abstract params of the LoRA model, split as the trainers do."""
    # Shapes do not depend on the compute dtype (and qwix's float32 adapter output breaks the
    # bfloat16 scan carry of a float32-param model at init).
    shape_config = config.replace(attention_impl="xla", dtype=config.param_dtype)
    lora_model = make_lora_model(Transformer(shape_config), lora)
    return lora_model.split(lora_model.abstract_params())


def count_params(tree: Any, *, adapters_only: bool = False) -> int:
    """Parameters (weights, not bytes) in a boxed abstract tree; `adapters_only`: A and B alone."""
    leaves = jax.tree_util.tree_leaves_with_path(shd.unbox(tree))
    return sum(
        math.prod(leaf.shape)
        for path, leaf in leaves
        if not adapters_only or is_adapter(tuple(getattr(k, "key", str(k)) for k in path))
    )


# ----------------------------------------------------------------------------- activations


def layer_activation_bytes(
    config: ModelConfig, *, rows: int, seq_len: int, tensor: int
) -> tuple[int, int]:
    """`(working, kept)`: per-device bytes of one decoder layer for `rows` sequences of T tokens.

    n = rows·T tokens, b = bytes of the compute dtype, t = tensor size, E/F/H/K/D as in the model,
    S = rows·(H/t)·T² attention scores (xla attention; with cudnn only S/T softmax statistics):

      working  = n·b·(8E + 4(H + K)·D/t + 8F/t) + 16·S
                 the backward of one layer: its residuals plus their cotangents
      kept, what each layer saves for the backward under `remat_policy`:
        none           n·b·(4E + 2(H + K)·D/t + 7F/t) + 10·S
        dots           n·b·(3E + (2H + 2K)·D/t + 2F/t) + 4·S     every matmul output
        dots_no_batch  n·b·(3E + (H + 2K)·D/t + 2F/t)            projections, not attention
        full           n·b·E                                     the layer input

    The factors are fitted (rounded up) to `compiled.memory_analysis()` of the jitted SFT
    value-and-grad of a small Llama-style model in float32 on CPU (per-layer slopes in L, T and
    F); they are conservative for bfloat16 on GPU/TPU, which keeps some of these in 16 bits.

    Mixture-of-experts layers (`jaxalign.models.moe`, k = experts per token, F_x = expert width,
    X = experts): the MLP terms count each token's k expert rows, F -> k·F_x, plus the dispatch
    buffers, i.e. the token rows gathered per assignment and the experts' outputs (`[n·k, E]`
    each) and the fp32 router logits and probabilities (`[n, X]`):
        working += n·(4·k·E·b + 16·X);  kept += n·(2·k·E·b + 8·X) (none), n·(k·E·b + 4·X) (dots
        and dots_no_batch: `ragged_dot` has no batch dimension), 0 (full).
    This is the grouped-matmul cost of a backend with a native `ragged_dot` (TPU, GPU). XLA:CPU
    expands `ragged_dot` into a dense product over all X experts: measured there, a MoE layer
    (X=8, k=2, F_x=96, fp32) keeps 18.3 KB more per token than a dense one, ≈ 3·k·X·F_x·4 bytes.
    """
    c = config
    b = np.dtype(c.dtype).itemsize
    n = rows * seq_len
    e, f, d = c.hidden_size, c.intermediate_size / tensor, c.head_dim
    h, k = c.num_heads / tensor, c.num_kv_heads / tensor
    dispatch = router = 0.0  # per token: [k, E] rows in the compute dtype; [X] fp32 router values
    if c.num_experts:
        f = c.num_experts_per_tok * c.moe_intermediate_size / tensor
        dispatch, router = c.num_experts_per_tok * e * b, c.num_experts * 4
    # Fused kernels (splash, cudnn) keep per-query softmax statistics, not [T, S] scores.
    scores = rows * h * seq_len * (seq_len if c.attention_impl in ("xla", "auto") else 1)
    working = n * b * (8 * e + 4 * (h + k) * d + 8 * f) + 16 * scores
    working += n * (4 * dispatch + 4 * router)
    kept = {
        "none": n * b * (4 * e + 2 * (h + k) * d + 7 * f) + 10 * scores,
        "dots": n * b * (3 * e + (2 * h + 2 * k) * d + 2 * f) + 4 * scores,
        "dots_no_batch": n * b * (3 * e + (h + 2 * k) * d + 2 * f),
        "full": n * b * e,
    }[c.remat_policy]
    kept += (
        n
        * {"none": 2, "dots": 1, "dots_no_batch": 1, "full": 0}[c.remat_policy]
        * (dispatch + router)
    )
    return int(working), int(kept)


def activation_bytes(
    config: ModelConfig, *, rows: int, seq_len: int, tensor: int, chunk_size: int
) -> dict[str, int]:
    """Per-device activation bytes of one forward + backward over `rows` sequences of `seq_len`.

    kept       = L·kept_layer + rows·T² (bool attention mask; none with splash, which builds its
                 mask from segment ids in the kernel) + 2·n·b·E (embeddings, final norm)
    transient  = max(head, working_layer) + gather, where
      working_layer  the backward of one layer (recomputed first unless remat_policy == none)
      head       lm: rows·C·(V/t)·4·3 with C = logits_chunk_size or T (fp32 logits, softmax,
                 their cotangent, one chunk at a time); scalar head: n·4
      gather     2·max(one layer's params, V·E)·b/t: FSDP all-gathered weights of the unit in
                 use and of the next one being prefetched
    total      = kept + transient
    """
    c = config
    b = np.dtype(c.dtype).itemsize
    working, kept_layer = layer_activation_bytes(c, rows=rows, seq_len=seq_len, tensor=tensor)
    n = rows * seq_len
    chunk = min(chunk_size or seq_len, seq_len)
    head = rows * chunk * (c.vocab_size / tensor) * 4 * 3 if c.head == "lm" else n * 4
    embeddings_only = c.replace(num_layers=0, layer_types=None)  # per-layer types need layers
    layer_params = (c.num_params() - embeddings_only.num_params()) / max(c.num_layers, 1)
    gather = 2 * max(layer_params, c.vocab_size * c.hidden_size) * b / tensor
    dense_mask = rows * seq_len**2 if c.attention_impl != "splash" else 0  # bool [B, T, T]
    kept = c.num_layers * kept_layer + dense_mask + 2 * n * b * c.hidden_size
    transient = max(head, working) + gather
    return {"kept": int(kept), "transient": int(transient), "total": int(kept + transient)}


def kv_cache_bytes(config: ModelConfig, *, rows: int, seq_len: int) -> int:
    """rows·(L_full·S + L_window·min(W, S))·K·D·2·b: the sampler's cache (sharded over the batch
    only, conservatively); sliding-window layers keep a ring of W slots (`models.kv_cache`)."""
    c = config
    per_token = c.num_kv_heads * c.head_dim * 2 * np.dtype(c.dtype).itemsize
    windowed = sum(window_layers(c))
    slots = (c.num_layers - windowed) * seq_len + windowed * window_length(c, seq_len)
    return int(rows * slots * per_token)


# ----------------------------------------------------------------------------- the plan


def _rows_per_device(examples: int, rows_per_example: int, data_parallel: int, key: str) -> int:
    rows = examples * rows_per_example
    if rows % data_parallel:
        raise PlanError(f"config.{key}: {rows} rows do not split over data*fsdp={data_parallel}")
    return rows // data_parallel


def plan_memory(
    config: ml_collections.ConfigDict,
    *,
    mesh_shape: dict[str, int],
    device_memory_bytes: int,
    backend: str = "gpu",
) -> dict[str, Any]:
    """Bytes per device of training `config` on a mesh of `mesh_shape` (no devices needed).

    Args:
      config: a full config (`base_config()` + changes); validated for this mesh first.
      mesh_shape: size of each axis of `config.mesh.axis_names` over all devices (multislice:
        per-slice size × slices); axes left out are 1.
      device_memory_bytes: memory of one device.
      backend: "gpu", "tpu" or "cpu": where `model.attention_impl="auto"` is resolved (TPU:
        splash; GPU: cudnn in bf16/fp16 without logit soft-capping, else xla).

    Returns:
      A dict: `models` (role, source, params, bytes per device, trained; with LoRA also
      `adapter_params`, `trainable_params`, `trainable_bytes`, `frozen_bytes`), `param_count`
      (trainable parameters), `bytes` (params, optimizer_state, gradients, frozen_base,
      frozen_models, activations), `activations` (the estimate's parts), `rows_per_device`,
      `seq_len`, `total_bytes`, `fits`, `lora` (the `LoraConfig` or None) and, with LoRA,
      `full_finetune` (the same plan with `model.lora.rank = 0`).
    """
    axis_names = tuple(config.mesh.axis_names)
    unknown = set(mesh_shape) - set(axis_names)
    if unknown:
        raise PlanError(f"mesh axes {sorted(unknown)} are not in mesh.axis_names {axis_names}")
    sizes = tuple(int(mesh_shape.get(name, 1)) for name in axis_names)
    config = config.copy_and_resolve_references()
    config.mesh.shape = sizes
    config.mesh.dcn_shape = ()  # `mesh_shape` is the whole mesh, slices included
    validate(config, num_devices=math.prod(sizes))
    mesh = AbstractMesh(sizes, axis_names)
    axes = dict(zip(axis_names, sizes, strict=True))
    data_parallel, tensor = axes["data"] * axes["fsdp"], axes["tensor"]
    rules, model_cfg, algorithm = config.mesh.logical_rules, config.model, config.algorithm
    micro = config.train.batch_size // config.optimizer.grad_accum_steps
    lora = lora_config_of(model_cfg)
    models: list[dict[str, Any]] = []

    def add(
        role: str, name_or_path: str, *, head: str, trained: bool, adapters: bool = False
    ) -> ModelConfig:
        """Adds a model; `adapters`: LoRA on it (only the adapters and a scalar head train)."""
        model_config, source = resolve_model_config(
            model_cfg, name_or_path, head=head, backend=backend
        )
        entry = dict(
            role=role,
            name_or_path=name_or_path or "(random init)",
            source=source,
            config=model_config,
            params=model_config.num_params(),
            trained=trained,
        )
        if adapters:
            trainable, frozen = _abstract_lora(model_config, lora)
            entry.update(
                boxed=trainable,
                adapter_params=count_params(trainable, adapters_only=True),
                trainable_params=count_params(trainable),
                trainable_bytes=sharded_bytes(trainable, mesh, rules),
                frozen_bytes=sharded_bytes(frozen, mesh, rules),
            )
        else:
            boxed = _abstract(model_config)
            size = sharded_bytes(boxed, mesh, rules)
            entry.update(
                boxed=boxed,
                adapter_params=0,
                trainable_params=entry["params"] if trained else 0,
                trainable_bytes=size if trained else 0,
                frozen_bytes=0 if trained else size,
            )
        entry["bytes"] = entry["trainable_bytes"] + entry["frozen_bytes"]
        models.append(entry)
        return model_config

    policy_head = "scalar" if algorithm == "reward" else "lm"
    policy = add(
        "policy", model_cfg.name_or_path, head=policy_head, trained=True, adapters=bool(lora)
    )
    chunk = config.model.logits_chunk_size
    if algorithm == "ppo":
        ppo = config.ppo
        if lora is None:  # with LoRA the reference is the policy's base, adapters off
            add(
                "reference",
                ppo.reference_name_or_path or model_cfg.name_or_path,
                head="lm",
                trained=False,
            )
        has_rm = not ppo.reward_model.startswith("judge:")
        if has_rm:
            add("reward model", ppo.reward_model, head="scalar", trained=False)
        critic_source = ppo.reward_model if ppo.critic_init == "reward" else model_cfg.name_or_path
        critic = add("critic", critic_source, head="scalar", trained=True)
        seq_len = config.data.max_prompt_length + ppo.max_new_tokens
        minibatch = config.train.batch_size // ppo.num_minibatches
        if minibatch % config.optimizer.grad_accum_steps:
            raise PlanError(
                f"config.optimizer.grad_accum_steps={config.optimizer.grad_accum_steps} does not "
                f"divide the PPO minibatch of {minibatch} rows"
            )
        rows = _rows_per_device(
            minibatch // config.optimizer.grad_accum_steps, 1, data_parallel, "ppo.num_minibatches"
        )
        step = [
            activation_bytes(m, rows=rows, seq_len=seq_len, tensor=tensor, chunk_size=chunk)
            for m in (policy, critic)
        ]
        update = sum(a["kept"] for a in step) + max(a["transient"] for a in step)
        rollout_rows = _rows_per_device(
            config.train.batch_size, 1, data_parallel, "train.batch_size"
        )
        kv_cache = kv_cache_bytes(policy, rows=rollout_rows, seq_len=seq_len)
        forward = activation_bytes(
            policy, rows=rollout_rows, seq_len=seq_len, tensor=tensor, chunk_size=chunk
        )["transient"]
        detail = {
            "update step (policy+critic)": update,
            "rollout: KV cache": kv_cache,
            "rollout: scoring forward": forward,
        }
        activations = max(update, kv_cache + forward)
        total_steps = config.train.num_steps * ppo.num_epochs * ppo.num_minibatches
    elif algorithm == "grpo":
        grpo = config.grpo
        if grpo.beta and lora is None:  # β = 0 loads no reference; LoRA's is the base
            reference = grpo.reference_name_or_path or model_cfg.name_or_path
            add("reference", reference, head="lm", trained=False)
        seq_len = config.data.max_prompt_length + grpo.max_new_tokens
        rollout_rows = config.train.batch_size * grpo.num_generations
        rows = _rows_per_device(
            rollout_rows // config.optimizer.grad_accum_steps, 1, data_parallel, "train.batch_size"
        )
        update = activation_bytes(
            policy, rows=rows, seq_len=seq_len, tensor=tensor, chunk_size=chunk
        )["total"]
        per_device = _rows_per_device(rollout_rows, 1, data_parallel, "train.batch_size")
        kv_cache = kv_cache_bytes(policy, rows=per_device, seq_len=seq_len)
        forward = activation_bytes(
            policy, rows=per_device, seq_len=seq_len, tensor=tensor, chunk_size=chunk
        )["transient"]
        detail = {
            "update step": update,
            "rollout: KV cache": kv_cache,
            "rollout: scoring forward": forward,
        }
        activations = max(update, kv_cache + forward)
        total_steps = config.train.num_steps * grpo.num_iterations
    else:
        if algorithm == "dpo" and needs_reference_model(config.dpo) and lora is None:
            if not config.dpo.precompute_reference:
                reference = config.dpo.reference_name_or_path or model_cfg.name_or_path
                add("reference", reference, head="lm", trained=False)
        seq_len = config.data.max_length
        per_example = 1 if algorithm == "sft" else 2  # pairs: chosen and rejected rows
        if algorithm == "dpo" and config.data.pack and config.dpo.share_prompt:
            # packed shared-prompt rows: one row of 2 × max_length per batch row
            seq_len, per_example = 2 * config.data.max_length, 1
        rows = _rows_per_device(micro, per_example, data_parallel, "train.batch_size")
        step = activation_bytes(policy, rows=rows, seq_len=seq_len, tensor=tensor, chunk_size=chunk)
        detail = {"kept across layers": step["kept"], "transient peak": step["transient"]}
        activations = step["total"]
        total_steps = config.train.num_steps

    trained = [m for m in models if m["trained"]]
    boxed = trained[0]["boxed"] if len(trained) == 1 else {m["role"]: m["boxed"] for m in trained}
    tx, _ = make_optimizer(config.optimizer, total_steps=total_steps)
    params_bytes = sum(m["trainable_bytes"] for m in trained)
    grad_copies = 2 if config.optimizer.grad_accum_steps > 1 else 1
    breakdown = {
        "params": params_bytes,
        "optimizer_state": sharded_bytes(jax.eval_shape(tx.init, boxed), mesh, rules),
        "gradients": params_bytes * grad_copies,
        "frozen_base": sum(m["frozen_bytes"] for m in trained),  # LoRA: the base under adapters
        "frozen_models": sum(m["bytes"] for m in models if not m["trained"]),
        "activations": activations,
    }
    total = sum(breakdown.values())
    for m in models:
        del m["boxed"]
    full_finetune = None
    if lora is not None:
        full_config = config.copy_and_resolve_references()
        full_config.model.lora.rank, full_config.model.lora.quantization = 0, "none"
        full_finetune = plan_memory(
            full_config,
            mesh_shape=mesh_shape,
            device_memory_bytes=device_memory_bytes,
            backend=backend,
        )
    return {
        "algorithm": algorithm,
        "backend": backend,
        "attention_impl": models[0]["config"].attention_impl,
        "mesh": axes,
        "num_devices": math.prod(sizes),
        "models": models,
        "param_count": sum(m["trainable_params"] for m in trained),
        "lora": lora,
        "full_finetune": full_finetune,
        "rows_per_device": rows,
        "seq_len": seq_len,
        "grad_copies": grad_copies,
        "bytes": breakdown,
        "activations": detail,
        "total_bytes": total,
        "device_memory_bytes": int(device_memory_bytes),
        "fits": total <= device_memory_bytes,
    }


def verdict_line(plan: dict[str, Any]) -> str:
    total, budget = plan["total_bytes"] / GIB, plan["device_memory_bytes"] / GIB
    word = "FITS" if plan["fits"] else "DOES NOT FIT"
    return f"{word}: {total:.1f} GiB of {budget:.1f} GiB per device ({100 * total / budget:.0f}%)"


def format_plan(plan: dict[str, Any], config: ml_collections.ConfigDict) -> str:
    """The human-readable plan; its last line is `verdict_line`. With LoRA a `full FT` column
    holds the full fine-tuning plan of the same config, and a line the saving per device."""
    mesh = " ".join(f"{k}={v}" for k, v in plan["mesh"].items())
    m, lora, full = config.model, plan["lora"], plan.get("full_finetune")
    lines = [
        f"algorithm {plan['algorithm']} | mesh {mesh} ({plan['num_devices']} devices) | "
        f"dtype {m.dtype}, params {m.param_dtype} | remat {m.remat_policy} | "
        f"attention {m.attention_impl} ({plan['backend']}: {plan['attention_impl']})",
    ]
    for model in plan["models"]:
        c = model["config"]
        lines.append(
            f"  {model['role']:<13} {model['name_or_path']} [{model['source']}]: {c.model_type}, "
            f"{model['params']:,} params, {model['bytes'] / GIB:.2f} GiB/device"
            + ("" if model["trained"] else " (frozen)")
        )
        if model["adapter_params"]:
            targets = ",".join(lora.hf_targets(c.model_type))
            lines.append(
                f"  {'':<13} + LoRA r={lora.rank} alpha={lora.alpha:g} on {targets}: "
                f"{model['adapter_params']:,} adapter params "
                f"({model['adapter_params'] / model['params']:.2%}); base {_base_storage(plan, config)}"
            )
    total_params = sum(x["params"] for x in plan["models"] if x["trained"])
    trained = f"{plan['param_count']:,}"
    if lora is not None:
        trained += f" of {total_params:,} ({plan['param_count'] / total_params:.2%})"
    lines.append(
        f"trained parameters: {trained}; per device per microbatch: "
        f"{plan['rows_per_device']} rows x {plan['seq_len']} tokens"
    )
    gradients = "gradients" + (" (x2: accumulation)" if plan["grad_copies"] == 2 else "")
    labels = {
        "params": "params" + (" (trainable)" if lora else ""),
        "optimizer_state": f"optimizer state ({config.optimizer.name})",
        "gradients": gradients,
        "frozen_base": "frozen base ("
        + (
            f"{lora.quantization} kernels"
            if lora and lora.quantization != "none"
            else m.param_dtype
        )
        + ")",
        "frozen_models": "frozen models" + (" (no reference)" if lora else ""),
        "activations": "activations (estimate)",
    }
    if lora is None:
        del labels["frozen_base"]

    def row(label: str, value: int, full_value: int | None) -> str:
        line = f"  {label:<30}{value / GIB:>9.2f}"
        return line + (f"{full_value / GIB:>10.2f}" if full_value is not None else "")

    lines.append(f"{'per device':<32}{'GiB':>9}" + (f"{'full FT':>10}" if full else ""))
    for key, label in labels.items():
        lines.append(row(label, plan["bytes"][key], full["bytes"][key] if full else None))
        if key == "activations":
            lines += [f"    {k:<28}{v / GIB:>9.2f}" for k, v in plan["activations"].items()]
    lines.append(row("total", plan["total_bytes"], full["total_bytes"] if full else None))
    if full:
        saved = full["total_bytes"] - plan["total_bytes"]
        lines.append(
            f"LoRA saves {saved / GIB:.2f} GiB per device vs full fine-tuning "
            f"({full['total_bytes'] / GIB:.2f} -> {plan['total_bytes'] / GIB:.2f} GiB, "
            f"-{saved / full['total_bytes']:.0%}; {verdict_line(full).split(':')[0].lower()} "
            "without LoRA)"
        )
    lines.append(verdict_line(plan))
    return "\n".join(lines)


def _base_storage(plan: dict[str, Any], config: ml_collections.ConfigDict) -> str:
    lora = plan["lora"]
    if lora is None or lora.quantization == "none":
        return config.model.param_dtype
    return f"targeted kernels {lora.quantization}, rest {config.model.param_dtype}"


def parse_mesh(spec: str) -> dict[str, int]:
    """`"data=1,fsdp=8,tensor=1"` -> `{"data": 1, "fsdp": 8, "tensor": 1}`."""
    shape = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, size = part.partition("=")
        if not sep or not size.strip().isdigit() or int(size) < 1:
            raise PlanError(f"--mesh: {part!r} is not AXIS=SIZE with SIZE >= 1")
        shape[name.strip()] = int(size)
    return shape


def main() -> None:
    """The command line (module docstring); flags are defined here, not at import."""
    from absl import app, flags
    from ml_collections import config_flags

    from jaxalign.config import resolve_mesh_shape

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "A configs/*.py file.", lock_config=True
    )
    devices_flag = flags.DEFINE_integer(
        "devices", None, "Device count (default: product of --mesh)."
    )
    mesh_flag = flags.DEFINE_string("mesh", None, "AXIS=SIZE,... e.g. data=1,fsdp=8,tensor=1.")
    memory_flag = flags.DEFINE_float("device-memory-gb", None, "Memory of one device in GiB.")
    backend_flag = flags.DEFINE_enum(
        "backend", "gpu", ["gpu", "tpu", "cpu"], "Where attention_impl='auto' is resolved."
    )
    flags.DEFINE_alias("device_memory_gb", "device-memory-gb")  # the flag style of every command
    flags.mark_flags_as_required(["config", "device-memory-gb"])

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        config = config_flag.value
        if mesh_flag.value:
            mesh_shape = parse_mesh(mesh_flag.value)
            devices = devices_flag.value or math.prod(mesh_shape.values())
        elif devices_flag.value:
            devices = devices_flag.value
            shape = resolve_mesh_shape(tuple(config.mesh.shape), devices)
            mesh_shape = dict(zip(config.mesh.axis_names, shape, strict=True))
        else:
            raise app.UsageError("give --mesh, --devices, or both")
        if math.prod(mesh_shape.values()) != devices:
            raise app.UsageError(
                f"--mesh={mesh_flag.value} covers {math.prod(mesh_shape.values())} devices, "
                f"not --devices={devices}"
            )
        plan = plan_memory(
            config,
            mesh_shape=mesh_shape,
            device_memory_bytes=int(memory_flag.value * GIB),
            backend=backend_flag.value,
        )
        print(format_plan(plan, config), flush=True)

    app.run(run)


if __name__ == "__main__":
    main()
