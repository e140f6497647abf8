"""One config for the decoder family, and its translation to and from Hugging Face configs.

Every architecture jaxalign supports is the same pre-norm decoder with switches:

| HF class            | norm            | mlp         | positions | qkv bias | qk norm | embed scale |
|---------------------|-----------------|-------------|-----------|----------|---------|-------------|
| LlamaForCausalLM    | RMS             | gated silu  | RoPE      | opt.     | no      | no          |
| MistralForCausalLM  | RMS             | gated silu  | RoPE (+SW)| no       | no      | no          |
| Qwen2ForCausalLM    | RMS             | gated silu  | RoPE      | q,k,v    | no      | no          |
| Qwen3ForCausalLM    | RMS             | gated silu  | RoPE      | opt.     | q,k RMS | no          |
| GemmaForCausalLM    | RMS (1 + w)     | gated gelu  | RoPE      | opt.     | no      | sqrt(d)     |
| Gemma2ForCausalLM   | RMS (1 + w) ×2  | gated gelu  | RoPE (+SW)| opt.     | no      | sqrt(d)     |
| Gemma3ForCausalLM   | RMS (1 + w) ×2  | gated gelu  | RoPE ×2   | opt.     | q,k RMS | sqrt(d)     |
| Qwen3MoeForCausalLM | RMS             | top-k MoE   | RoPE      | opt.     | q,k RMS | no          |
| MixtralForCausalLM  | RMS             | top-k MoE   | RoPE (+SW)| no       | no      | no          |
| GPT2LMHeadModel     | LayerNorm       | plain gelu  | learned   | all      | no      | no          |

Gemma 2 and 3 add: norms after attention and after the MLP too (`post_norms`), per-layer
`layer_types` (sliding-window or global attention), attention scale 1/√`query_pre_attn_scalar`,
tanh soft-capping of attention logits and final logits (Gemma 2), and (Gemma 3) a second RoPE
base for the sliding layers (`local_rope_theta`) while `rope_scaling` applies to the global ones.
Mixture-of-experts layers (`num_experts > 0`) replace every MLP; see `jaxalign.models.moe`.
A `Gemma3ForConditionalGeneration` checkpoint (`model_type: gemma3`) loads as its text tower
(`gemma3_text`); the vision tower is not read.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "qwen3_moe",
    "mixtral",
    "gpt2",
)
# HF `model_type`s read as another: a multimodal Gemma 3 checkpoint is read as its text tower.
_HF_MODEL_TYPE_ALIASES = {"gemma3": "gemma3_text"}
LAYER_TYPES = ("full_attention", "sliding_attention")
_GEMMA_FAMILY = ("gemma", "gemma2", "gemma3_text")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# "auto" resolves per backend; see jaxalign.models.attention.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
HEAD_TYPES = ("lm", "scalar")

logger = logging.getLogger(__name__)


class UnsupportedConfigError(ValueError):
    """A Hugging Face config asks for something this decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a decoder; hashable so it can be a static jit argument."""

    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    max_position_embeddings: int = 2048
    # Normalisation.
    norm_type: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    norm_scale_offset: float = 0.0  # Gemma stores w and multiplies by (1 + w)
    # Feed-forward.
    mlp_type: str = "gated"  # "gated" (gate/up/down) | "plain" (fc/proj)
    activation: str = "silu"  # "silu" | "gelu_tanh" | "gelu"
    mlp_bias: bool = False
    # Attention.
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    # Per layer "full_attention" | "sliding_attention" (Gemma 2/3); None: every layer is the
    # same, windowed by `sliding_window` if set (Mistral). With it, only sliding layers are.
    layer_types: tuple[str, ...] | None = None
    query_pre_attn_scalar: float | None = None  # logits scale 1/sqrt(this); None: 1/sqrt(D)
    attn_logit_softcap: float | None = None  # cap·tanh(logits / cap) before the mask (Gemma 2)
    final_logit_softcap: float | None = None  # the same on the LM head's logits (Gemma 2)
    post_norms: bool = False  # Gemma 2/3: norm the attention and MLP outputs before the residual
    # Mixture of experts (every layer's MLP; 0 = dense): see jaxalign.models.moe.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0  # each expert's F
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss in every trainer's loss
    # Positions.
    position_embedding: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted (key, value) pairs
    local_rope_theta: float | None = None  # Gemma 3: unscaled RoPE base of sliding layers
    # Embeddings.
    tie_word_embeddings: bool = False
    scale_embeddings: bool = False  # Gemma: x * sqrt(hidden_size)
    # Special tokens (used for HF round trips and reward pooling in HF).
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Head: "lm" -> logits [B, T, V]; "scalar" -> values [B, T] (reward model / critic).
    head: str = "lm"
    # Numerics and memory.
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # master params
    remat_policy: str = "none"
    scan_layers: bool = False
    # "auto" | "xla" (einsum, any backend) | "cudnn" (fused, GPU bf16) | "splash" (Pallas, TPU)
    attention_impl: str = "auto"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"model_type={self.model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; allowed: {REMAT_POLICIES}")
        if self.head not in HEAD_TYPES:
            raise ValueError(f"head={self.head!r}; allowed: {HEAD_TYPES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; allowed: {ATTENTION_IMPLS}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
                raise ValueError(
                    f"layer_types={self.layer_types} needs {self.num_layers} entries of "
                    f"{LAYER_TYPES}"
                )
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("layer_types has sliding_attention layers but no sliding_window")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts="
                f"{self.num_experts}]"
            )
        if self.num_experts and self.moe_intermediate_size <= 0:
            raise ValueError("a mixture-of-experts config needs moe_intermediate_size > 0")
        if self.attn_logit_softcap and self.attention_impl == "cudnn":
            raise ValueError(
                "attention_impl='cudnn' has no attention-logit soft-capping; use 'auto' (picks xla "
                "on GPU for soft-capped models), 'xla' or 'splash'"
            )

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def mixed_attention(self) -> bool:
        """Whether layers differ in attention (Gemma 2/3: sliding and global layers)."""
        return self.layer_types is not None

    @property
    def rope_attention_factor(self) -> float:
        """The factor on RoPE's cos and sin (YaRN's mscale; 1 otherwise): attention logits q·k
        scale by its square."""
        return float(dict(self.rope_scaling or ()).get("attention_factor", 1.0))

    def num_params(self) -> int:
        """Parameter count from shapes alone (matches the HF model's count)."""
        e, f, h, kv, d = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        norm = e * (2 if self.norm_type == "layer" else 1)
        attn = e * h * d + 2 * e * kv * d + h * d * e
        if self.qkv_bias:
            attn += h * d + 2 * kv * d
        if self.o_bias:
            attn += e
        if self.qk_norm:
            attn += 2 * d
        mlp = (3 if self.mlp_type == "gated" else 2) * e * f
        if self.mlp_bias:
            mlp += (2 * f if self.mlp_type == "gated" else f) + e
        if self.num_experts:  # router [E, X] + X experts of gate, up [E, F] and down [F, E]
            mlp = e * self.num_experts + self.num_experts * 3 * e * self.moe_intermediate_size
        per_layer = attn + mlp + (4 if self.post_norms else 2) * norm
        total = self.num_layers * per_layer + self.vocab_size * e + norm
        if self.position_embedding == "learned":
            total += self.max_position_embeddings * e
        if self.head == "scalar":
            total += e
        elif not self.tie_word_embeddings:
            total += self.vocab_size * e
        return total


def _get(hf: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    return default


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """Reads RoPE settings with the precedence of `transformers` 5 (`RotaryEmbeddingConfigMixin`).

    1. A non-empty legacy `rope_scaling` replaces `rope_parameters` whole (no merge).
    2. `rope_theta` from that dict, else the top-level `rope_theta`, else 10000.
    3. `rope_type` from that dict, else its legacy `type`, else "default".
    4. llama3/yarn: a top-level `original_max_position_embeddings` overrides the dict's; without
       either it is `max_position_embeddings`.
    Where rule 1 would silently drop a `rope_theta` given only in `rope_parameters`, this refuses
    instead (`transformers` would run the model at the wrong base).
    """
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    scaling = legacy or params
    top_theta = hf.get("rope_theta")
    theta = float(_get(scaling, "rope_theta", default=top_theta or 10000.0))
    if legacy and params and legacy != params:
        dropped_theta = params.get("rope_theta")
        if dropped_theta is not None and float(dropped_theta) != theta:
            raise UnsupportedConfigError(
                f"config.json has rope_parameters={params} and a legacy rope_scaling={legacy}; "
                f"transformers uses rope_scaling alone, at rope_theta={theta:g} instead of "
                f"rope_parameters' {float(dropped_theta):g}. Keep one of the two (with its "
                "rope_theta) in config.json."
            )
        logger.warning(
            "config.json has both rope_parameters=%s and a legacy rope_scaling=%s; as in "
            "transformers, rope_scaling wins",
            params,
            legacy,
        )
    if scaling.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise UnsupportedConfigError(
            f"rope partial_rotary_factor={scaling['partial_rotary_factor']!r} is not supported"
        )
    scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "partial_rotary_factor")}
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type in ("llama3", "yarn"):
        original = hf.get("original_max_position_embeddings") or scaling.get(
            "original_max_position_embeddings"
        )
        scaling["original_max_position_embeddings"] = int(
            original or hf.get("max_position_embeddings", 2048)
        )
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, (("factor", float(scaling["factor"])), ("rope_type", "linear"))
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in scaling]
        if missing:
            raise UnsupportedConfigError(f"rope_scaling type llama3 is missing {missing}")
        return theta, tuple(
            sorted([(k, float(scaling[k])) for k in keys] + [("rope_type", "llama3")])
        )
    if rope_type == "yarn":
        return theta, _yarn_from_hf(scaling, int(hf.get("max_position_embeddings", 2048)))
    raise UnsupportedConfigError(
        f"rope_scaling type {rope_type!r} is not supported (supported: default, linear, llama3, "
        "yarn)"
    )


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_from_hf(
    scaling: dict[str, Any], max_position_embeddings: int
) -> tuple[tuple[str, Any], ...]:
    """YaRN's fields with `transformers`' defaults filled in and its attention factor resolved.

    attention_factor, unless given, is mscale(s) = 0.1·ln(s) + 1 for the factor s, or
    mscale(s, mscale) / mscale(s, mscale_all_dim) when both of those are set (DeepSeek's form).
    """
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    factor = float(max_position_embeddings / original if factor is None else factor)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    fields = {
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": original,
        "attention_factor": float(attention_factor),
        "beta_fast": float(scaling.get("beta_fast") or 32),  # `or`: 0 and None mean the default
        "beta_slow": float(scaling.get("beta_slow") or 1),
        "truncate": bool(scaling.get("truncate", True)),
    }
    return tuple(sorted(fields.items()))


def _check_unsupported(hf: dict[str, Any], model_type: str) -> None:
    softcapping = model_type == "gemma2" or model_type == "gemma3_text"
    checks = {
        "use_sliding_window": (lambda v: bool(v) and model_type in ("qwen2", "qwen3", "qwen3_moe")),
        "scale_attn_by_inverse_layer_idx": bool,
        "add_cross_attention": bool,
        "attn_logit_softcapping": (lambda v: v is not None and not softcapping),
        "final_logit_softcapping": (lambda v: v is not None and not softcapping),
        "use_bidirectional_attention": bool,
        "partial_rotary_factor": (lambda v: v is not None and v != 1.0),
        "pretraining_tp": (lambda v: v not in (None, 1)),
        # Qwen3-MoE: dense MLPs in some layers; Mixtral: training-time multiplicative noise.
        "mlp_only_layers": bool,
        "decoder_sparse_step": (lambda v: v not in (None, 1)),
        "router_jitter_noise": bool,
        "shared_expert_intermediate_size": bool,
    }
    for option, is_unsupported in checks.items():
        if option in hf and is_unsupported(hf[option]):
            raise UnsupportedConfigError(
                f"config option {option}={hf[option]!r} ({model_type}) is not supported by jaxalign"
            )
    activation = _get(hf, "hidden_act", "hidden_activation", "activation_function")
    if activation not in (None, "silu", "gelu_pytorch_tanh", "gelu_new", "gelu", "gelu_fast"):
        raise UnsupportedConfigError(f"config option hidden_act={activation!r} is not supported")


# `transformers`' config defaults for the fields a published Gemma `config.json` may omit (the
# multimodal Gemma 3 checkpoints list only a few fields of their `text_config`).
_GEMMA_COMMON_DEFAULTS = dict(
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    tie_word_embeddings=True,
    attention_bias=False,
    query_pre_attn_scalar=256,
    sliding_window=4096,
)
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": dict(
        _GEMMA_COMMON_DEFAULTS,
        vocab_size=256000,
        max_position_embeddings=8192,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
    ),
    "gemma3_text": dict(
        _GEMMA_COMMON_DEFAULTS,
        vocab_size=262208,
        max_position_embeddings=131072,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
    ),
}
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _text_tower(hf: dict[str, Any]) -> dict[str, Any]:
    """A multimodal Gemma 3 config's `text_config`, with the top level's token ids and head."""
    text = dict(hf.get("text_config") or {})
    text["model_type"] = _HF_MODEL_TYPE_ALIASES[hf["model_type"]]
    text.update({k: hf[k] for k in _TOKEN_ID_KEYS if hf.get(k) is not None})
    text["architectures"] = hf.get("architectures")
    return text


def _layer_types(hf: dict[str, Any], model_type: str, num_layers: int) -> tuple[str, ...]:
    """`layer_types` as given, else `transformers`' default: Gemma 2 alternates sliding and global
    (layer 0 sliding); Gemma 3 has one global layer per `sliding_window_pattern` (6)."""
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    pattern = 2 if model_type == "gemma2" else int(hf.get("sliding_window_pattern") or 6)
    return tuple(
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)
    )


def _gemma3_rope(hf: dict[str, Any]) -> tuple[float, Any, float]:
    """`(global theta, global scaling, local theta)` of Gemma 3, from either config layout:
    `rope_parameters: {full_attention: {...}, sliding_attention: {...}}` (transformers 5), or
    `rope_theta` + `rope_scaling` (global layers) + `rope_local_base_freq` (sliding layers)."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:
        global_hf = {**hf, "rope_parameters": params["full_attention"], "rope_scaling": None}
        local = dict(params.get("sliding_attention") or {})
        local_theta = float(local.get("rope_theta", 10000.0))
        if local.get("rope_type", "default") != "default":
            raise UnsupportedConfigError(
                f"Gemma 3 sliding-layer rope_type={local['rope_type']!r} is not supported"
            )
    else:
        global_hf = {**hf, "rope_theta": hf.get("rope_theta") or 1_000_000.0}
        local_theta = float(hf.get("rope_local_base_freq") or 10000.0)
    theta, scaling = _rope_from_hf(global_hf)
    return theta, scaling, local_theta


def _family_fields(hf: dict[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
    """The `ModelConfig` fields of Gemma 2/3 and the mixture-of-experts families."""
    if model_type in ("gemma2", "gemma3_text"):
        fields: dict[str, Any] = dict(
            post_norms=True,
            layer_types=_layer_types(hf, model_type, num_layers),
            sliding_window=int(hf["sliding_window"]),
            query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
        )
        if model_type == "gemma3_text":
            theta, scaling, local_theta = _gemma3_rope(hf)
            fields.update(rope_theta=theta, rope_scaling=scaling, local_rope_theta=local_theta)
        return fields
    if model_type == "qwen3_moe":
        return dict(
            num_experts=int(_get(hf, "num_experts", "num_local_experts")),
            num_experts_per_tok=int(hf.get("num_experts_per_tok", 8)),
            moe_intermediate_size=int(hf["moe_intermediate_size"]),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        )
    if model_type == "mixtral":
        return dict(
            num_experts=int(hf.get("num_local_experts", 8)),
            num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
            moe_intermediate_size=int(hf["intermediate_size"]),
            norm_topk_prob=True,  # Mixtral always renormalises its top-k
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        )
    return {}


def from_hf_config(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Builds a `ModelConfig` from a Hugging Face `config.json` dict."""
    if hf.get("model_type") in _HF_MODEL_TYPE_ALIASES:
        hf = _text_tower(hf)
    model_type = hf.get("model_type")
    if model_type in _HF_DEFAULTS:
        hf = {**_HF_DEFAULTS[model_type], **hf}
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedConfigError(
            f"model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    _check_unsupported(hf, model_type)
    architectures = hf.get("architectures") or []
    head = "scalar" if any(a.endswith("ForSequenceClassification") for a in architectures) else "lm"
    if head == "scalar" and hf.get("num_labels", len(hf.get("id2label") or {0: 0})) != 1:
        raise UnsupportedConfigError("a sequence-classification checkpoint needs num_labels=1")
    common = dict(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(hf["eos_token_id"])
        if isinstance(hf.get("eos_token_id"), list)
        else hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        head=head,
    )
    if model_type == "gpt2":
        hidden = int(hf["n_embd"])
        heads = int(hf["n_head"])
        cfg = dict(
            hidden_size=hidden,
            intermediate_size=int(hf.get("n_inner") or 4 * hidden),
            num_layers=int(hf["n_layer"]),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            max_position_embeddings=int(hf["n_positions"]),
            norm_type="layer",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            mlp_type="plain",
            activation="gelu" if hf.get("activation_function") == "gelu" else "gelu_tanh",
            mlp_bias=True,
            qkv_bias=True,
            o_bias=True,
            position_embedding="learned",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )
    else:
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        theta, scaling = _rope_from_hf(hf) if model_type != "gemma3_text" else (0.0, None)
        bias = bool(hf.get("attention_bias", False))
        gemma = model_type in _GEMMA_FAMILY
        activation = _get(hf, "hidden_activation", "hidden_act", default="silu")
        cfg = dict(
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            norm_scale_offset=1.0 if gemma else 0.0,
            activation="silu" if activation == "silu" else "gelu_tanh",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qkv_bias=True if model_type == "qwen2" else bias,
            o_bias=bias if model_type != "qwen2" else False,
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            sliding_window=hf.get("sliding_window")
            if model_type in ("mistral", "mixtral")
            else None,
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            scale_embeddings=gemma,
        )
        cfg.update(_family_fields(hf, model_type, cfg["num_layers"]))
    return ModelConfig(**{**common, **cfg, **overrides})


_HF_CLASS_PREFIX = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
    "gemma2": "Gemma2",
    "gemma3_text": "Gemma3",
    "qwen3_moe": "Qwen3Moe",
    "mixtral": "Mixtral",
    "gpt2": "GPT2",
}


def hf_architecture(config: ModelConfig) -> str:
    prefix = _HF_CLASS_PREFIX[config.model_type]
    if config.head == "scalar":
        if config.model_type == "gemma3_text":
            return "Gemma3TextForSequenceClassification"
        return f"{prefix}ForSequenceClassification"
    return f"{prefix}LMHeadModel" if config.model_type == "gpt2" else f"{prefix}ForCausalLM"


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """The `config.json` dict that `transformers` needs to rebuild the same model."""
    c = config
    hf: dict[str, Any] = {
        "model_type": c.model_type,
        "architectures": [hf_architecture(c)],
        "vocab_size": c.vocab_size,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_id)
        if isinstance(c.eos_token_id, tuple)
        else c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "tie_word_embeddings": c.tie_word_embeddings,
        "dtype": c.param_dtype,
    }
    if c.head == "scalar":
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if c.model_type == "gpt2":
        hf.update(
            n_embd=c.hidden_size,
            n_inner=c.intermediate_size,
            n_layer=c.num_layers,
            n_head=c.num_heads,
            n_positions=c.max_position_embeddings,
            layer_norm_epsilon=c.norm_eps,
            activation_function="gelu" if c.activation == "gelu" else "gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return hf
    rope_parameters: dict[str, Any] = {"rope_theta": c.rope_theta, "rope_type": "default"}
    if c.rope_scaling:
        rope_parameters.update(c.rope_scaling_dict)
    hf.update(
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.norm_eps,
        hidden_act="silu" if c.activation == "silu" else "gelu_pytorch_tanh",
        rope_parameters=rope_parameters,
        rope_theta=c.rope_theta,
        attention_bias=c.qkv_bias if c.model_type != "qwen2" else False,
    )
    if c.model_type in ("llama",):
        hf["mlp_bias"] = c.mlp_bias
    if c.model_type == "gemma":
        hf["hidden_activation"] = hf["hidden_act"]
    if c.model_type == "mistral":
        hf["sliding_window"] = c.sliding_window
    if c.model_type in ("qwen2", "qwen3", "qwen3_moe"):
        hf["use_sliding_window"] = False
        hf["sliding_window"] = None
    if c.model_type in ("gemma2", "gemma3_text"):
        hf.update(
            hidden_activation=hf["hidden_act"],
            layer_types=list(c.layer_types),
            sliding_window=c.sliding_window,
            query_pre_attn_scalar=int(c.query_pre_attn_scalar),  # transformers wants an int
            attn_logit_softcapping=c.attn_logit_softcap,
            final_logit_softcapping=c.final_logit_softcap,
        )
    if c.model_type == "gemma3_text":
        hf["rope_parameters"] = {
            "full_attention": rope_parameters,
            "sliding_attention": {"rope_type": "default", "rope_theta": c.local_rope_theta},
        }
        hf.pop("rope_theta")
    if c.num_experts:
        hf.update(
            num_experts_per_tok=c.num_experts_per_tok,
            router_aux_loss_coef=c.router_aux_loss_coef,
            output_router_logits=False,
        )
    if c.model_type == "qwen3_moe":
        hf.update(
            num_experts=c.num_experts,
            moe_intermediate_size=c.moe_intermediate_size,
            norm_topk_prob=c.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if c.model_type == "mixtral":
        hf.update(num_local_experts=c.num_experts, sliding_window=c.sliding_window)
    return hf


def llama_scaled_inv_freq(inv_freq: Any, scaling: dict[str, Any], xp: Any) -> Any:
    """Llama 3.1 frequency rescaling (`rope_type: llama3`), as in Meta's reference code."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = xp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return xp.where(is_medium, smoothed, scaled)


def yarn_scaled_inv_freq(inv_freq: Any, scaling: dict[str, Any], theta: float, xp: Any) -> Any:
    """YaRN frequencies (Peng et al. 2023, "YaRN", §3.2 "NTK-by-parts"), as `transformers` has them.

    With base θ, D = head_dim and L = original_max_position_embeddings, the band d (of D/2) whose
    frequency ω_d = θ^(−2d/D) makes r rotations over L is d(r) = D·ln(L / (2πr)) / (2 ln θ).
    Bands below lo = ⌊d(β_fast)⌋ keep their frequency (extrapolation), bands above
    hi = ⌈d(β_slow)⌉ are divided by the factor s (interpolation), and a linear ramp
    γ_d = clip((d − lo) / (hi − lo), 0, 1) mixes the two: ω'_d = ω_d·(1 − γ_d) + (ω_d / s)·γ_d.
    `truncate=False` skips the floor/ceil.
    """
    dim = 2 * inv_freq.shape[-1]
    factor = scaling["factor"]
    original = scaling["original_max_position_embeddings"]

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling["beta_fast"]), correction_dim(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid dividing by zero
    ramp = xp.clip((xp.arange(dim // 2, dtype=xp.float32) - low) / (high - low), 0, 1)
    return inv_freq * (1 - ramp) + (inv_freq / factor) * ramp
