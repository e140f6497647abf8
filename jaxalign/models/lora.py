"""LoRA and QLoRA on the decoder: low-rank adapters `W + (α/r)·A·B` on chosen projections.

    lora_model, params = init_lora(model, base_params, LoraConfig(rank=8, alpha=16.0), rng=rng)
    trainable, frozen = lora_model.split(params)          # adapters (+ score head) | base
    logits = lora_model.apply(lora_model.combine(trainable, frozen), ids, attention_mask=mask)
    ref_logits = lora_model.reference_apply(frozen, ids, attention_mask=mask)  # adapters off

For a kernel `W [*in, *out]` (its input dims first, as every Dense of `Transformer` has them) the
adapter is `A [prod(in), r]` and `B [r, prod(out)]` and the projection computes
`x·W + (α/r)·(dropout(x)·A)·B`. A is kaiming-uniform with PEFT's bound 1/√fan_in, B is zero, so
at initialisation the LoRA forward equals the base forward bit for bit (`res + 0`).

**Why qwix.** qwix 0.1.8 (`qwix.LoraProvider`, used by Tunix and MaxText) intercepts the
`dot_general` of the matched Flax modules, so `Transformer` needs no LoRA code and no config
switch: one model definition, the adapters are added from outside. Checked here: it runs
our Linen model unrolled and under `nn.scan` + `nn.remat`; its adapter params are boxed with
the base kernel's logical names (`A: (in_axis, None)`, `B: (None, out_axis)`, plus `layers`
when scanned), so `jaxalign.sharding` shards them like their kernels; its rank-flattened
layout is PEFT's `[r, in]` / `[out, r]` transposed. A hand-written layer would repeat all that.
What qwix does not do cleanly, we do here:
  - `quantize_params` mis-shapes the scales of scanned (layer-stacked) kernels and a quantized
    model's `init` under scan drops some adapters: the base is quantized here (per layer, vmapped)
    and the adapters come from the float LoRA model's shapes.
  - its dropout is always on: `apply` uses a dropout-free twin unless a `dropout_rng` is given.

QLoRA (`quantization="int8" | "nf4"`): the targeted base kernels are stored quantized (qwix
`QArray`: codes + float scales) and dequantized inside each projection, per layer; the adapters
stay float. int8 is symmetric absmax per output channel; nf4 is the 16-level NormalFloat code of
QLoRA (Dettmers et al. 2023) with one absmax scale per block of `nf4_block_size` (64) consecutive
input features of one output channel, as bitsandbytes blocks a `[out, in]` weight (the block is
gcd(64, width) when the input width is not a multiple; for `o`, whose input is `[heads, head_dim]`,
a block spans head_dim-sized runs of every head). Embeddings, norms and the head stay float.
Measured on tiny random models (tests/test_lora.py): max |Δlogit| / max |logit| ≈ 1 % (int8) and
≈ 15 % (nf4) against the float base; kernels cost ~1/4 (int8) and ~1/7 (nf4) of fp32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src.core import qarray  # quantize(array, how): the per-layer quantizer qwix lacks
from qwix._src.providers.ptq import WithAux

from jaxalign.models.transformer import Transformer

Params = dict[str, Any]
Path = tuple[str, ...]

QUANTIZATIONS = ("none", "int8", "nf4")
ALL_LINEAR = "all-linear"

# Hugging Face module name -> the Flax modules (inside a decoder layer) it covers.
_LLAMA_TARGETS = {
    "q_proj": ("attn/q",),
    "k_proj": ("attn/k",),
    "v_proj": ("attn/v",),
    "o_proj": ("attn/o",),
    "gate_proj": ("mlp/gate",),
    "up_proj": ("mlp/up",),
    "down_proj": ("mlp/down",),
}
_GPT2_TARGETS = {
    "c_attn": ("attn/q", "attn/k", "attn/v"),  # one fused Conv1D in HF
    "c_proj": ("attn/o", "mlp/proj"),  # PEFT matches both `attn.c_proj` and `mlp.c_proj`
    "c_fc": ("mlp/fc",),
}
# Flax module -> its HF module inside layer i (for PEFT's key names).
_LLAMA_HF = {
    "attn/q": "self_attn.q_proj",
    "attn/k": "self_attn.k_proj",
    "attn/v": "self_attn.v_proj",
    "attn/o": "self_attn.o_proj",
    "mlp/gate": "mlp.gate_proj",
    "mlp/up": "mlp.up_proj",
    "mlp/down": "mlp.down_proj",
}
_GPT2_HF = {"attn/o": "attn.c_proj", "mlp/fc": "mlp.c_fc", "mlp/proj": "mlp.c_proj"}
_GPT2_QKV = ("attn/q", "attn/k", "attn/v")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapters of rank `rank` scaled by `alpha / rank` on `target_modules` (HF names).

    `target_modules`: HF module names (`q_proj`, ..., GPT-2's `c_attn, c_proj, c_fc`), as a
    tuple or a comma-separated string, or `"all-linear"` (every projection, never the LM head).
    `quantization`: how the targeted base kernels are stored, "none" | "int8" | "nf4".
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ALL_LINEAR
    quantization: str = "none"
    nf4_block_size: int = 64

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"lora rank={self.rank} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout={self.dropout} must be in [0, 1)")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"lora quantization={self.quantization!r}; allowed: {QUANTIZATIONS}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def hf_targets(self, model_type: str) -> tuple[str, ...]:
        """The HF module names targeted, `all-linear` expanded, validated for `model_type`."""
        table = _GPT2_TARGETS if model_type == "gpt2" else _LLAMA_TARGETS
        names = self.target_modules
        if isinstance(names, str):
            names = tuple(n.strip() for n in names.split(",") if n.strip())
        if tuple(names) == (ALL_LINEAR,):
            return tuple(table)
        unknown = sorted(set(names) - set(table))
        if unknown or not names:
            raise ValueError(
                f"lora target_modules {unknown or names} not valid for {model_type}; "
                f"allowed: {ALL_LINEAR!r} or any of {sorted(table)}"
            )
        return tuple(n for n in table if n in names)

    def flax_targets(self, model_type: str) -> tuple[str, ...]:
        """The Flax modules (`attn/q`, `mlp/down`, ...) that get adapters, in a fixed order."""
        table = _GPT2_TARGETS if model_type == "gpt2" else _LLAMA_TARGETS
        return tuple(t for n in self.hf_targets(model_type) for t in table[n])


def is_adapter(path: Path) -> bool:
    return path[-1].endswith(("_lora_a", "_lora_b"))


@dataclasses.dataclass(frozen=True)
class LoraModel:
    """A base `Transformer` with adapters; a params tree is the base's plus `kernel_lora_a/b`.

    `module`: the LoRA forward without dropout; `train_module`: with dropout (rng "dropout");
    `reference`: adapters off, the base (`Transformer` itself, or its quantized twin for QLoRA).
    """

    base: Transformer
    config: LoraConfig
    module: nn.Module
    train_module: nn.Module
    reference: nn.Module
    targets: tuple[str, ...]

    @property
    def trainable_modules(self) -> tuple[str, ...]:
        """Top-level base modules trained fully (PEFT's `modules_to_save`): the scalar head."""
        return ("score",) if self.base.config.head == "scalar" else ()

    def is_trainable(self, path: Path) -> bool:
        return is_adapter(path) or path[0] in self.trainable_modules

    def split(self, params: Params) -> tuple[Params, Params]:
        """`(trainable, frozen)`: adapters and the scalar head | everything else."""
        flat = flax.traverse_util.flatten_dict(params, is_leaf=_is_quantized)
        trainable = {p: v for p, v in flat.items() if self.is_trainable(p)}
        frozen = {p: v for p, v in flat.items() if not self.is_trainable(p)}
        unflatten = flax.traverse_util.unflatten_dict
        return unflatten(trainable), unflatten(frozen)

    @staticmethod
    def combine(trainable: Params, frozen: Params) -> Params:
        """`split`'s inverse (a dict union; cheap inside `jit`)."""
        flatten = flax.traverse_util.flatten_dict
        return flax.traverse_util.unflatten_dict(
            {**flatten(frozen, is_leaf=_is_quantized), **flatten(trainable)}
        )

    def apply(self, params: Params, *args: Any, dropout_rng: Any = None, **kwargs: Any) -> Any:
        """The LoRA forward (`Transformer.__call__`'s arguments); dropout only with `dropout_rng`."""
        if dropout_rng is not None and self.config.dropout > 0:
            return self.train_module.apply(
                {"params": params}, *args, rngs={"dropout": dropout_rng}, **kwargs
            )
        return self.module.apply({"params": params}, *args, **kwargs)

    def reference_apply(self, params: Params, *args: Any, **kwargs: Any) -> Any:
        """Adapters off: the base forward on the base leaves of `params` (full tree or `frozen`,
        plus the scalar head if the model has one); no second params tree."""
        flat = flax.traverse_util.flatten_dict(params, is_leaf=_is_quantized)
        base = flax.traverse_util.unflatten_dict(
            {p: v for p, v in flat.items() if not is_adapter(p)}
        )
        return self.reference.apply({"params": base}, *args, **kwargs)

    def abstract_params(self) -> Params:
        """Boxed `ShapeDtypeStruct` tree of the full params (logical axis names on every array,
        quantized kernels as `WithAux(QArray(qvalue, scale))`), for `sharding.param_shardings`."""
        dummy = jnp.zeros((1, 1), jnp.int32)
        base = jax.eval_shape(lambda: self.reference.init(jax.random.PRNGKey(0), dummy)["params"])
        lora = jax.eval_shape(lambda: _float_lora(self).init(jax.random.PRNGKey(0), dummy))
        flat = flax.traverse_util.flatten_dict(lora["params"])
        adapters = {p: v for p, v in flat.items() if is_adapter(p)}
        return flax.traverse_util.unflatten_dict(
            {**flax.traverse_util.flatten_dict(base, is_leaf=_is_quantized), **adapters}
        )


def _is_quantized(_: Any, value: Any = None) -> bool:
    return isinstance(value if value is not None else _, WithAux)


def _contracted_width(config: Any, target: str) -> int:
    """Size of the innermost contracted dim of the target's kernel (where NF4 blocks run)."""
    if target in ("attn/o",):
        return config.head_dim
    if target in ("mlp/down", "mlp/proj"):
        return config.intermediate_size
    return config.hidden_size


def _rules(base: Transformer, lora: LoraConfig, *, adapters: bool, dropout: float) -> list[Any]:
    quantized = lora.quantization != "none"
    rules = []
    for target in lora.flax_targets(base.config.model_type):
        kwargs = dict(module_path=rf".*/{re.escape(target)}$")
        if quantized:
            kwargs["weight_qtype"] = lora.quantization
            if lora.quantization == "nf4":
                width = _contracted_width(base.config, target)
                kwargs["tile_size"] = math.gcd(lora.nf4_block_size, width)
        if adapters:
            rules.append(
                qwix.LoraRule(
                    **kwargs,
                    rank=lora.rank,
                    alpha=lora.alpha,
                    dropout=dropout,
                    # PEFT's kaiming_uniform(a=√5): U(±1/√fan_in).
                    lora_a_initializer=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                )
            )
        else:
            rules.append(qwix.QuantizationRule(**kwargs))
    return rules


class _LoraProvider(qwix.LoraProvider):
    """qwix's LoRA, with the output kept in the layer's compute dtype.

    qwix adds `x·A·B` in the adapters' (param) dtype, so with bf16 compute over fp32 params a
    projection's output is promoted to fp32: the residual stream changes dtype and `nn.scan`
    rejects its carry. The sum is cast back to what the base matmul returns.
    """

    def dot_general(self, lhs, rhs, *args, **kwargs):
        out = super().dot_general(lhs, rhs, *args, **kwargs)
        preferred = kwargs.get("preferred_element_type") or (args[2] if len(args) > 2 else None)
        # Flax layers cast their inputs to the compute dtype, which is the base matmul's output.
        return out.astype(preferred or lhs.dtype)

    def einsum(self, einsum_str, *operands, **kwargs):
        out = super().einsum(einsum_str, *operands, **kwargs)
        return out.astype(kwargs.get("preferred_element_type") or operands[0].dtype)


def _float_lora(lora_model: LoraModel) -> nn.Module:
    """The LoRA module over a float base (adapter shapes and names; qwix's quantized init under
    `nn.scan` drops some adapters)."""
    rules = _rules(
        lora_model.base,
        dataclasses.replace(lora_model.config, quantization="none"),
        adapters=True,
        dropout=0.0,
    )
    return qwix.apply_lora_to_model(lora_model.base, _LoraProvider(rules))


def make_lora_model(model: Transformer, lora: LoraConfig) -> LoraModel:
    """The LoRA model definition (no params) of a base `Transformer`."""
    provider = lambda dropout: _LoraProvider(  # noqa: E731
        _rules(model, lora, adapters=True, dropout=dropout)
    )
    module = qwix.apply_lora_to_model(model, provider(0.0))
    train_module = (
        qwix.apply_lora_to_model(model, provider(lora.dropout)) if lora.dropout else module
    )
    if lora.quantization == "none":
        reference = model
    else:
        reference = qwix.quantize_model(
            model, qwix.PtqProvider(_rules(model, lora, adapters=False, dropout=0.0))
        )
    return LoraModel(
        base=model,
        config=lora,
        module=module,
        train_module=train_module,
        reference=reference,
        targets=lora.flax_targets(model.config.model_type),
    )


def quantize_base(lora_model: LoraModel, base_params: Params) -> Params:
    """The base params with every targeted kernel quantized (identity when quantization=none)."""
    if lora_model.config.quantization == "none":
        return base_params
    abstract = flax.traverse_util.flatten_dict(
        nn.unbox(lora_model.abstract_params()), is_leaf=_is_quantized
    )
    scanned = lora_model.base.config.scan_layers
    out = {}
    for path, value in flax.traverse_util.flatten_dict(nn.unbox(base_params)).items():
        spec = abstract.get(path)
        if isinstance(spec, WithAux):
            quantize = lambda w, how=spec.how: qarray.quantize(w, how)  # noqa: E731
            # qwix's `how` names the axes of one layer's kernel: vmap over the stacked layers.
            value = WithAux(jax.jit(jax.vmap(quantize) if scanned else quantize)(value), spec.how)
        out[path] = value
    return flax.traverse_util.unflatten_dict(out)


def init_adapters(lora_model: LoraModel, rng: jax.Array) -> Params:
    """Fresh adapters: A ~ U(±1/√fan_in) (PEFT's kaiming-uniform), B = 0."""
    flat = flax.traverse_util.flatten_dict(
        nn.unbox(lora_model.abstract_params()), is_leaf=_is_quantized
    )
    adapters = {}
    for i, (path, spec) in enumerate(sorted((p, v) for p, v in flat.items() if is_adapter(p))):
        if path[-1].endswith("_lora_b"):
            adapters[path] = jnp.zeros(spec.shape, spec.dtype)
        else:
            bound = 1.0 / math.sqrt(spec.shape[-2])
            key = jax.random.fold_in(rng, i)
            adapters[path] = jax.random.uniform(key, spec.shape, spec.dtype, -bound, bound)
    return flax.traverse_util.unflatten_dict(adapters)


def init_lora(
    model: Transformer, params: Params, lora: LoraConfig, *, rng: jax.Array
) -> tuple[LoraModel, Params]:
    """`(lora_model, params)`: the base params (quantized for QLoRA) plus fresh adapters.

    Place the result into its shardings with
    `sharding.param_shardings(lora_model.abstract_params(), mesh, rules)`.
    """
    lora_model = make_lora_model(model, lora)
    frozen = quantize_base(lora_model, nn.unbox(params))
    return lora_model, LoraModel.combine(init_adapters(lora_model, rng), frozen)


def dequantized_base(lora_model: LoraModel, params: Params) -> Params:
    """The base params of `params` in float (quantized kernels dequantized), adapters dropped."""
    flat = flax.traverse_util.flatten_dict(params, is_leaf=_is_quantized)
    dtype = jnp.dtype(lora_model.base.config.param_dtype)
    out = {
        path: (qwix.dequantize(value.array) if isinstance(value, WithAux) else value).astype(dtype)
        for path, value in flat.items()
        if not is_adapter(path)
    }
    return flax.traverse_util.unflatten_dict(out)


def merge_adapters(lora_model: LoraModel, params: Params) -> Params:
    """Base params with `W + (α/r)·A·B` folded in (float, dequantized): `save_pretrained(
    lora_model.base, merged, out_dir)` writes the merged `hf/` export."""
    base = flax.traverse_util.flatten_dict(dequantized_base(lora_model, params))
    flat = flax.traverse_util.flatten_dict(params, is_leaf=_is_quantized)
    scaling = lora_model.config.scaling
    for path, lora_a in flat.items():
        if not path[-1].endswith("_lora_a"):
            continue
        kernel_path = path[:-1] + (path[-1][: -len("_lora_a")],)
        lora_b = flat[kernel_path[:-1] + (kernel_path[-1] + "_lora_b",)]
        kernel = base[kernel_path]
        delta = jnp.einsum(
            "...ir,...ro->...io", lora_a.astype(jnp.float32), lora_b.astype(jnp.float32)
        )
        base[kernel_path] = (
            kernel.astype(jnp.float32) + scaling * delta.reshape(kernel.shape)
        ).astype(kernel.dtype)
    return flax.traverse_util.unflatten_dict(base)


# ----------------------------------------------------------------------------- PEFT adapters

_PEFT_PREFIX = "base_model.model."
_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _layer_modules(lora_model: LoraModel, layer: int) -> list[tuple[str, tuple[str, ...]]]:
    """`(PEFT module name, Flax targets)` of one decoder layer; GPT-2's c_attn covers q, k, v."""
    if lora_model.base.config.model_type == "gpt2":
        prefix, table = f"transformer.h.{layer}.", _GPT2_HF
        modules = [(prefix + "attn.c_attn", _GPT2_QKV)] if "attn/q" in lora_model.targets else []
        modules += [(prefix + table[t], (t,)) for t in lora_model.targets if t in table]
        return modules
    return [(f"model.layers.{layer}.{_LLAMA_HF[t]}", (t,)) for t in lora_model.targets]


def _adapter_path(
    lora_model: LoraModel, layer: int, target: str, which: str
) -> tuple[Path, int | None]:
    leaf = (*target.split("/"), f"kernel_lora_{which}")
    if lora_model.base.config.scan_layers:
        return ("layers", *leaf), layer
    return (f"layers_{layer}", *leaf), None


def save_peft_adapter(
    lora_model: LoraModel,
    params: Params,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str = "",
) -> pathlib.Path:
    """Writes `adapter_config.json` + `adapter_model.safetensors` that
    `peft.PeftModel.from_pretrained(base, out_dir)` loads on the `transformers` base.

    PEFT's layout: `lora_A.weight [r, in]`, `lora_B.weight [out, r]` (our `A.T`, `B.T`). GPT-2's
    fused `c_attn` gets the q, k, v adapters side by side: rank 3r (block-diagonal B) and alpha 3α,
    via `rank_pattern` / `alpha_pattern`, so its scaling is still α/r. The scalar head is saved
    whole (`modules_to_save`). Only process 0 writes; every process must call this.
    """
    from safetensors.numpy import save_file

    from jaxalign.models.hf import _to_host

    config, lora = lora_model.base.config, lora_model.config
    flat = flax.traverse_util.flatten_dict(params, is_leaf=_is_quantized)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(config.num_layers):
        for name, targets in _layer_modules(lora_model, layer):
            parts = {}
            for target in targets:
                for which in ("a", "b"):
                    path, index = _adapter_path(lora_model, layer, target, which)
                    value = _to_host(flat[path])
                    parts[target, which] = (value if index is None else value[index]).astype(
                        np.float32
                    )
            lora_a = np.concatenate([parts[t, "a"] for t in targets], axis=1)  # [in, k·r]
            lora_b = _block_diagonal([parts[t, "b"] for t in targets])  # [k·r, k·out]
            tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(lora_a.T)
            tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(lora_b.T)
    for module in lora_model.trainable_modules:  # the scalar head: `score.weight [1, E]`
        tensors[f"{_PEFT_PREFIX}{module}.weight"] = (
            _to_host(flat[(module, "kernel")]).astype(np.float32).T.copy()
        )
    hf_targets = lora.hf_targets(config.model_type)
    fused = config.model_type == "gpt2" and "c_attn" in hf_targets
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if config.head == "scalar" else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": list(hf_targets),
        "rank_pattern": {"c_attn": 3 * lora.rank} if fused else {},
        "alpha_pattern": {"c_attn": 3 * lora.alpha} if fused else {},
        "bias": "none",
        "fan_in_fan_out": config.model_type == "gpt2",  # GPT-2's Conv1D stores [in, out]
        "modules_to_save": list(lora_model.trainable_modules) or None,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out = pathlib.Path(out_dir)
    if jax.process_index() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / _ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    save_file(tensors, str(out / _ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out


def _block_diagonal(blocks: list[np.ndarray]) -> np.ndarray:
    rows, cols = sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)
    out = np.zeros((rows, cols), np.float32)
    r = c = 0
    for block in blocks:
        out[r : r + block.shape[0], c : c + block.shape[1]] = block
        r, c = r + block.shape[0], c + block.shape[1]
    return out


def _pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: a key matches a module name's suffix."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def load_peft_adapter(
    lora_model: LoraModel, params: Params, adapter_dir: str | os.PathLike
) -> Params:
    """`params` with its adapters (and scalar head) replaced by a PEFT adapter's.

    The adapter must target the modules `lora_model` targets, with rank r (GPT-2's c_attn: r with
    one A shared by q, k, v, or 3r block-diagonal as `save_peft_adapter` writes it). A different
    alpha is folded into B, so the forward is unchanged.
    """
    from safetensors.numpy import load_file

    directory = pathlib.Path(adapter_dir)
    try:
        peft_config = json.loads((directory / _ADAPTER_CONFIG).read_text())
        tensors = load_file(str(directory / _ADAPTER_WEIGHTS))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{directory} is not a readable PEFT adapter directory: {e}") from e
    if peft_config.get("peft_type") != "LORA" or peft_config.get("use_dora"):
        raise ValueError(
            f"{directory}: only plain LoRA adapters load (got {peft_config.get('peft_type')}, dora={peft_config.get('use_dora')})"
        )
    if peft_config.get("bias", "none") != "none":
        raise ValueError(
            f"{directory}: adapters with bias={peft_config['bias']!r} are not supported"
        )
    tensors = {
        k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
        for k, v in tensors.items()
    }
    config, lora = lora_model.base.config, lora_model.config
    rank = lora.rank
    flat = dict(flax.traverse_util.flatten_dict(params, is_leaf=_is_quantized))
    used: set[str] = set()
    updates: dict[Path, list[Any]] = {}
    for layer in range(config.num_layers):
        for name, targets in _layer_modules(lora_model, layer):
            key_a, key_b = (f"{_PEFT_PREFIX}{name}.lora_{w}.weight" for w in "AB")
            if key_a not in tensors or key_b not in tensors:
                raise ValueError(
                    f"{directory}: adapter has no {key_a} (lora targets {lora_model.targets})"
                )
            used.update((key_a, key_b))
            lora_a, lora_b = tensors[key_a].T, tensors[key_b].T  # [in, r'], [r', out]
            peft_rank = lora_a.shape[1]
            alpha = _pattern_value(
                peft_config.get("alpha_pattern"), name, peft_config["lora_alpha"]
            )
            peft_scaling = alpha / (
                math.sqrt(peft_rank) if peft_config.get("use_rslora") else peft_rank
            )
            lora_b = lora_b * (peft_scaling / lora.scaling)
            out_width = lora_b.shape[1] // len(targets)
            for k, target in enumerate(targets):
                b_cols = slice(k * out_width, (k + 1) * out_width)
                if peft_rank == rank:
                    a_k, b_k = lora_a, lora_b[:, b_cols]
                elif peft_rank == len(targets) * rank:  # block-diagonal (GPT-2's fused c_attn)
                    rows = slice(k * rank, (k + 1) * rank)
                    a_k, b_k = lora_a[:, rows], lora_b[rows, b_cols]
                    off_block = np.delete(lora_b[:, b_cols], np.r_[rows], axis=0)
                    if np.any(off_block):
                        raise ValueError(f"{directory}: {key_b} is not block-diagonal over q, k, v")
                else:
                    raise ValueError(
                        f"{directory}: {key_a} has rank {peft_rank}; lora rank is {rank}"
                    )
                for which, value in (("a", a_k), ("b", b_k)):
                    path, index = _adapter_path(lora_model, layer, target, which)
                    slot = updates.setdefault(path, [None] * config.num_layers)
                    slot[0 if index is None else index] = value
    for path, values in updates.items():
        old = flat[path]
        value = values[0] if not config.scan_layers else np.stack(values)
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(
                f"{directory}: adapter for {'/'.join(path)} has shape {value.shape}, expected {old.shape}"
            )
        flat[path] = jax.device_put(jnp.asarray(value, old.dtype), getattr(old, "sharding", None))
    for module in lora_model.trainable_modules:
        key = f"{_PEFT_PREFIX}{module}.weight"
        if key in tensors:
            used.add(key)
            old = flat[(module, "kernel")]
            flat[(module, "kernel")] = jax.device_put(
                jnp.asarray(tensors[key].T, old.dtype), old.sharding
            )
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(
            f"{directory}: adapter tensors {unused[:4]} match no module of this LoRA model"
        )
    return flax.traverse_util.unflatten_dict(flat)
