"""Hugging Face checkpoints in and out: `config.json` + safetensors <-> (Transformer, params).

Only safetensors are read (pickled `.bin` weights can run code on load). Tensors are read one at a
time from memory-mapped files and placed on device (optionally straight into their sharding), so
a large checkpoint never needs two full copies in host memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxalign.models.config import ModelConfig, from_hf_config, to_hf_config
from jaxalign.models.transformer import Transformer

logger = logging.getLogger(__name__)

Params = dict[str, Any]
FlaxPath = tuple[str, ...]

# Non-parameter buffers some checkpoints carry.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


class CheckpointError(ValueError):
    """A checkpoint directory or tensor is missing, malformed or incompatible."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """How HF tensors become Flax leaves and back (one HF tensor may feed several leaves)."""

    hf_names: tuple[str, ...]
    flax_paths: tuple[FlaxPath, ...]
    to_flax: Callable[..., tuple[np.ndarray, ...]]
    to_hf: Callable[..., tuple[np.ndarray, ...]]


def _same(name: str, path: FlaxPath) -> TensorMap:
    return TensorMap((name,), (path,), lambda w: (w,), lambda w: (w,))


def _linear(name: str, path: FlaxPath, out_shape: tuple[int, ...]) -> TensorMap:
    """torch Linear weight `[out, in]` <-> Flax kernel `[in, *out_shape]`."""
    return TensorMap(
        (name,),
        (path,),
        lambda w: (w.T.reshape(w.shape[1], *out_shape),),
        lambda k: (k.reshape(k.shape[0], -1).T,),
    )


def _linear_in(name: str, path: FlaxPath, in_shape: tuple[int, ...]) -> TensorMap:
    """torch Linear weight `[out, prod(in_shape)]` <-> Flax kernel `[*in_shape, out]`."""
    return TensorMap(
        (name,),
        (path,),
        lambda w: (w.T.reshape(*in_shape, w.shape[0]),),
        lambda k: (k.reshape(-1, k.shape[-1]).T,),
    )


def _reshaped(name: str, path: FlaxPath, shape: tuple[int, ...]) -> TensorMap:
    return TensorMap((name,), (path,), lambda w: (w.reshape(shape),), lambda b: (b.reshape(-1),))


def _experts(names: list[str], path: FlaxPath) -> TensorMap:
    """X per-expert torch Linear weights `[out, in]` <-> one stacked Flax kernel `[X, in, out]`."""
    return TensorMap(
        tuple(names),
        (path,),
        lambda *ws: (np.stack([w.T for w in ws]),),
        lambda k: tuple(np.asarray(k[i]).T for i in range(k.shape[0])),
    )


def _moe_maps(c: ModelConfig, hf: str, fx: str) -> list[TensorMap]:
    """Router and experts: Qwen3-MoE's `mlp.experts.i.{gate,up,down}_proj`, Mixtral's
    `block_sparse_moe.experts.i.{w1,w3,w2}` (gate, up, down)."""
    if c.model_type == "mixtral":
        block, names = f"{hf}.block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}
    else:
        block, names = f"{hf}.mlp", {n: f"{n}_proj" for n in ("gate", "up", "down")}
    experts = range(c.num_experts)
    return [
        _linear(f"{block}.gate.weight", (fx, "moe", "router", "kernel"), (c.num_experts,)),
        *(
            _experts([f"{block}.experts.{i}.{hf_name}.weight" for i in experts], (fx, "moe", name))
            for name, hf_name in names.items()
        ),
    ]


def _llama_layer_maps(c: ModelConfig, hf: str, fx: str) -> list[TensorMap]:
    h, k, d = c.num_heads, c.num_kv_heads, c.head_dim
    maps = [
        _same(f"{hf}.input_layernorm.weight", (fx, "input_norm", "scale")),
        _same(f"{hf}.post_attention_layernorm.weight", (fx, "post_attn_norm", "scale")),
        _linear(f"{hf}.self_attn.q_proj.weight", (fx, "attn", "q", "kernel"), (h, d)),
        _linear(f"{hf}.self_attn.k_proj.weight", (fx, "attn", "k", "kernel"), (k, d)),
        _linear(f"{hf}.self_attn.v_proj.weight", (fx, "attn", "v", "kernel"), (k, d)),
        _linear_in(f"{hf}.self_attn.o_proj.weight", (fx, "attn", "o", "kernel"), (h, d)),
    ]
    if c.num_experts:
        maps += _moe_maps(c, hf, fx)
    else:
        f = c.intermediate_size
        maps += [
            _linear(f"{hf}.mlp.gate_proj.weight", (fx, "mlp", "gate", "kernel"), (f,)),
            _linear(f"{hf}.mlp.up_proj.weight", (fx, "mlp", "up", "kernel"), (f,)),
            _linear(f"{hf}.mlp.down_proj.weight", (fx, "mlp", "down", "kernel"), (c.hidden_size,)),
        ]
    if c.post_norms:  # Gemma 2/3 (their post_attention_layernorm norms the attention output)
        maps += [
            _same(f"{hf}.pre_feedforward_layernorm.weight", (fx, "pre_mlp_norm", "scale")),
            _same(f"{hf}.post_feedforward_layernorm.weight", (fx, "post_mlp_norm", "scale")),
        ]
    if c.qkv_bias:
        maps += [
            _reshaped(f"{hf}.self_attn.q_proj.bias", (fx, "attn", "q", "bias"), (h, d)),
            _reshaped(f"{hf}.self_attn.k_proj.bias", (fx, "attn", "k", "bias"), (k, d)),
            _reshaped(f"{hf}.self_attn.v_proj.bias", (fx, "attn", "v", "bias"), (k, d)),
        ]
    if c.o_bias:
        maps.append(_same(f"{hf}.self_attn.o_proj.bias", (fx, "attn", "o", "bias")))
    if c.qk_norm:
        maps += [
            _same(f"{hf}.self_attn.q_norm.weight", (fx, "attn", "q_norm", "scale")),
            _same(f"{hf}.self_attn.k_norm.weight", (fx, "attn", "k_norm", "scale")),
        ]
    if c.mlp_bias:
        maps += [
            _same(f"{hf}.mlp.{n}_proj.bias", (fx, "mlp", n, "bias")) for n in ("gate", "up", "down")
        ]
    return maps


def _gpt2_layer_maps(c: ModelConfig, hf: str, fx: str) -> list[TensorMap]:
    h, d, e = c.num_heads, c.head_dim, c.hidden_size

    def split_qkv_weight(w: np.ndarray) -> tuple[np.ndarray, ...]:  # Conv1D: [in, out]
        return tuple(part.reshape(e, h, d) for part in np.split(w, 3, axis=1))

    def split_qkv_bias(b: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(part.reshape(h, d) for part in np.split(b, 3))

    qkv = ("q", "k", "v")
    return [
        _same(f"{hf}.ln_1.weight", (fx, "input_norm", "scale")),
        _same(f"{hf}.ln_1.bias", (fx, "input_norm", "bias")),
        _same(f"{hf}.ln_2.weight", (fx, "post_attn_norm", "scale")),
        _same(f"{hf}.ln_2.bias", (fx, "post_attn_norm", "bias")),
        TensorMap(
            (f"{hf}.attn.c_attn.weight",),
            tuple((fx, "attn", n, "kernel") for n in qkv),
            split_qkv_weight,
            lambda q, k, v: (np.concatenate([x.reshape(e, -1) for x in (q, k, v)], axis=1),),
        ),
        TensorMap(
            (f"{hf}.attn.c_attn.bias",),
            tuple((fx, "attn", n, "bias") for n in qkv),
            split_qkv_bias,
            lambda q, k, v: (np.concatenate([x.reshape(-1) for x in (q, k, v)]),),
        ),
        TensorMap(  # Conv1D `[in = H*D, out = E]` <-> `[H, D, E]`
            (f"{hf}.attn.c_proj.weight",),
            ((fx, "attn", "o", "kernel"),),
            lambda w: (w.reshape(h, d, e),),
            lambda k: (k.reshape(h * d, e),),
        ),
        _same(f"{hf}.attn.c_proj.bias", (fx, "attn", "o", "bias")),
        _same(f"{hf}.mlp.c_fc.weight", (fx, "mlp", "fc", "kernel")),
        _same(f"{hf}.mlp.c_fc.bias", (fx, "mlp", "fc", "bias")),
        _same(f"{hf}.mlp.c_proj.weight", (fx, "mlp", "proj", "kernel")),
        _same(f"{hf}.mlp.c_proj.bias", (fx, "mlp", "proj", "bias")),
    ]


def tensor_maps(c: ModelConfig, *, include_head: bool = True) -> list[TensorMap]:
    """All HF <-> Flax tensor correspondences of a model, with unscanned (`layers_i`) paths."""
    if c.model_type == "gpt2":
        base, layer_fn = "transformer", _gpt2_layer_maps
        maps = [
            _same(f"{base}.wte.weight", ("embed", "embedding")),
            _same(f"{base}.wpe.weight", ("pos_embed", "embedding")),
            _same(f"{base}.ln_f.weight", ("final_norm", "scale")),
            _same(f"{base}.ln_f.bias", ("final_norm", "bias")),
        ]
        layer_prefix = f"{base}.h"
    else:
        base, layer_fn = "model", _llama_layer_maps
        maps = [
            _same(f"{base}.embed_tokens.weight", ("embed", "embedding")),
            _same(f"{base}.norm.weight", ("final_norm", "scale")),
        ]
        layer_prefix = f"{base}.layers"
    for i in range(c.num_layers):
        maps += layer_fn(c, f"{layer_prefix}.{i}", f"layers_{i}")
    if not include_head:
        return maps
    if c.head == "scalar":
        maps.append(_linear("score.weight", ("score", "kernel"), (1,)))
    elif not c.tie_word_embeddings:
        maps.append(
            TensorMap(("lm_head.weight",), (("lm_head",),), lambda w: (w.T,), lambda k: (k.T,))
        )
    return maps


# ----------------------------------------------------------------------------- files


def resolve_checkpoint_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id fetched (safetensors + configs) into the cache."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint directory")
    name = str(path_or_hub_id)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CheckpointError(f"checkpoint directory {name} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # network, auth, unknown repo: one clear message
        raise CheckpointError(
            f"{name!r} is neither a local directory nor a downloadable hub model: {e}"
        ) from e


def read_hf_config(directory: Path) -> dict[str, Any]:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} not found: not a Hugging Face model directory")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index or the single `model.safetensors`."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: directory / file for name, file in weight_map.items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from e
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickled:
            raise CheckpointError(
                f"{directory} has only pickled weights ({', '.join(pickled)}); jaxalign reads "
                'safetensors only. Convert once with: python -c "import transformers as t; '
                f"t.AutoModel.from_pretrained('{directory}').save_pretrained('{directory}-st', "
                'safe_serialization=True)"'
            )
        raise CheckpointError(f"{directory} has no *.safetensors weights")
    names: dict[str, Path] = {}
    for file in files:
        with open_safetensors(file) as f:
            names.update(dict.fromkeys(f.keys(), file))
    return names


def open_safetensors(file: Path) -> Any:
    """`safe_open(file)`; an empty, truncated or corrupt-header file raises a `CheckpointError`
    that names it (safetensors' own error does not)."""
    try:
        return safe_open(file, framework="np")
    except (SafetensorError, OSError) as e:
        size = f"{file.stat().st_size} bytes" if file.is_file() else "missing"
        raise CheckpointError(f"{file}: not a readable safetensors file ({size}): {e}") from e


class _TensorReader:
    """Opens each safetensors file once and reads tensors lazily (memory-mapped)."""

    def __init__(self, files: dict[str, Path], stored_names: dict[str, str] | None = None):
        self.files = files
        self.stored_names = stored_names or {}  # name read -> name in the file, where they differ
        self._handles: dict[Path, Any] = {}

    def read(self, name: str) -> np.ndarray:
        file = self.files[name]
        name = self.stored_names.get(name, name)
        if file not in self._handles:
            if not file.is_file():
                raise CheckpointError(f"{file} (listed in the index for {name}) does not exist")
            self._handles[file] = open_safetensors(file)
        try:
            return self._handles[file].get_tensor(name)
        except (SafetensorError, OSError, TypeError) as e:  # TypeError: a dtype numpy lacks
            raise CheckpointError(f"{file}: cannot read tensor {name}: {e}") from e


# A multimodal Gemma 3 checkpoint's text tower, saved by transformers < 5 or >= 5.
_TEXT_TOWER_PREFIXES = {
    "language_model.model.": "model.",
    "model.language_model.": "model.",
    "language_model.lm_head.": "lm_head.",
}
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.")
_VISION_PREFIXES += ("model.multi_modal_projector.",)


def _text_tower_names(files: dict[str, Path]) -> tuple[dict[str, Path], dict[str, str]]:
    """The text tower's tensors of a `Gemma3ForConditionalGeneration` checkpoint under the
    `Gemma3ForCausalLM` names, and each new name's stored name; the vision tower and projector
    are left out."""
    renamed, stored_names = {}, {}
    for stored, file in files.items():
        if stored.startswith(_VISION_PREFIXES):
            continue
        name = stored
        for prefix, replacement in _TEXT_TOWER_PREFIXES.items():
            if stored.startswith(prefix):
                name = replacement + stored[len(prefix) :]
                stored_names[name] = stored
                break
        renamed[name] = file
    return renamed, stored_names


def _strip_prefix_aliases(files: dict[str, Path], expected: set[str]) -> dict[str, Path]:
    """Old GPT-2 files omit `transformer.`; some reward models omit `model.`: accept both."""
    aliased = {}
    for name, file in files.items():
        if name not in expected:
            for prefix in ("transformer.", "model."):
                if prefix + name in expected:
                    name = prefix + name
                    break
        aliased[name] = file
    return aliased


def _get_path(tree: Params, path: FlaxPath) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set_path(tree: Params, path: FlaxPath, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _scanned_path(path: FlaxPath) -> tuple[FlaxPath, int | None]:
    if path[0].startswith("layers_"):
        return ("layers",) + path[1:], int(path[0].split("_")[1])
    return path, None


# ----------------------------------------------------------------------------- public API


def from_pretrained(
    path_or_hub_id: str | os.PathLike,
    dtype: Any = jnp.float32,
    *,
    param_dtype: Any = None,
    head: str | None = None,
    shardings: Params | None = None,
    seed: int = 0,
    **config_overrides: Any,
) -> tuple[Transformer, Params]:
    """Loads a Hugging Face checkpoint as `(model, params)`.

    Args:
      path_or_hub_id: a local model directory or a hub id (`org/name`).
      dtype: compute dtype. `param_dtype` defaults to float32 master weights.
      head: "lm" or "scalar" to override the checkpoint's head; a causal-LM checkpoint loaded with
        head="scalar" gets a fresh score head (how a reward model or critic starts from SFT).
      shardings: optional pytree of `jax.sharding.Sharding` (same structure as params): each
        tensor is placed straight into its sharding as it is read.
      config_overrides: `ModelConfig` fields such as `scan_layers=True`, `remat_policy="full"`.
    """
    directory = resolve_checkpoint_dir(path_or_hub_id)
    hf_config = read_hf_config(directory)
    overrides = dict(config_overrides, dtype=jnp.dtype(dtype).name)
    overrides["param_dtype"] = jnp.dtype(param_dtype or jnp.float32).name
    config = from_hf_config(hf_config, **overrides)
    source_head = config.head
    if head is not None:
        if head == "lm" and source_head == "scalar":
            raise CheckpointError(
                f"{directory} is a sequence-classification checkpoint; it has no LM head"
            )
        config = config.replace(head=head)
    model = Transformer(config)
    expected = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    )
    expected = nn_unbox(expected)

    maps = tensor_maps(config, include_head=False)
    if config.head == source_head:  # a fresh score head (LM checkpoint as reward model) reads none
        maps += tensor_maps(config)[len(maps) :]

    wanted = {n for m in maps for n in m.hf_names}
    source_files, stored_names = weight_files(directory), {}
    if hf_config.get("model_type") == "gemma3":  # multimodal: read the text tower
        source_files, stored_names = _text_tower_names(source_files)
    files = _strip_prefix_aliases(source_files, wanted)
    missing = sorted(wanted - files.keys())
    if missing:
        raise CheckpointError(
            f"{directory}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    unexpected = sorted(
        n
        for n in files.keys() - wanted
        if not n.endswith(_IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and (config.tie_word_embeddings or config.head == "scalar"))
    )
    if unexpected:
        raise CheckpointError(
            f"{directory}: unexpected tensors {unexpected[:5]} (does config.json match the weights?)"
        )

    reader = _TensorReader(files, stored_names)
    param_dtype = jnp.dtype(config.param_dtype)
    params: Params = {}
    layer_slices: dict[FlaxPath, list[Any]] = {}
    for tensor_map in maps:
        hf_tensors = [reader.read(n) for n in tensor_map.hf_names]
        try:
            converted = tensor_map.to_flax(*hf_tensors)
        except ValueError as e:  # a reshape that cannot work: the tensor does not fit config.json
            raise CheckpointError(
                f"{files[tensor_map.hf_names[0]]}: tensor {tensor_map.hf_names[0]} has shape "
                f"{tuple(hf_tensors[0].shape)}, which does not fit config.json ({e})"
            ) from e
        for path, value in zip(tensor_map.flax_paths, converted, strict=True):
            target_path, layer = _scanned_path(path) if config.scan_layers else (path, None)
            target = _get_path(expected, target_path)
            want_shape = target.shape[1:] if layer is not None else target.shape
            if tuple(value.shape) != tuple(want_shape):
                raise CheckpointError(
                    f"{files[tensor_map.hf_names[0]]}: tensor {tensor_map.hf_names[0]} has shape "
                    f"{tuple(hf_tensors[0].shape)}, which does not fit {'/'.join(path)} of shape "
                    f"{tuple(want_shape)} implied by config.json"
                )
            array = np.asarray(value).astype(param_dtype)
            if layer is None:
                sharding = _get_path(shardings, target_path) if shardings is not None else None
                _set_path(params, target_path, jax.device_put(array, sharding))
            else:
                layer_slices.setdefault(target_path, [None] * config.num_layers)[layer] = array
    for target_path, slices in layer_slices.items():
        sharding = _get_path(shardings, target_path) if shardings is not None else None
        _set_path(params, target_path, jax.device_put(np.stack(slices), sharding))
    if config.head == "scalar" and source_head == "lm":
        std = 1.0 / np.sqrt(config.hidden_size + 1)
        score = jax.random.normal(jax.random.PRNGKey(seed), (config.hidden_size, 1)) * std
        sharding = _get_path(shardings, ("score", "kernel")) if shardings is not None else None
        _set_path(params, ("score", "kernel"), jax.device_put(score.astype(param_dtype), sharding))
    logger.info(
        "loaded %s (%s, %.1fM params)", directory, config.model_type, config.num_params() / 1e6
    )
    return model, params


def nn_unbox(tree: Any) -> Any:
    """Strips Flax partitioning boxes (`LogicallyPartitioned`) from a pytree."""
    import flax.linen as nn

    return nn.meta.unbox(tree)


def _iter_hf_tensors(config: ModelConfig, params: Params) -> Iterator[tuple[str, np.ndarray]]:
    params = nn_unbox(params)
    for tensor_map in tensor_maps(config):
        leaves = []
        for path in tensor_map.flax_paths:
            target_path, layer = _scanned_path(path) if config.scan_layers else (path, None)
            leaf = _get_path(params, target_path)
            leaves.append(_to_host(leaf if layer is None else leaf[layer]))
        yield from zip(tensor_map.hf_names, tensor_map.to_hf(*leaves), strict=True)


def _to_host(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save_pretrained(
    model: Transformer,
    params: Params,
    out_dir: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_bytes: int = 2 * 1024**3,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Writes `config.json` and (sharded) safetensors that `transformers` loads as is.

    A scalar-head model is saved as `*ForSequenceClassification` with `num_labels=1`. Only
    process 0 writes; every process must call this (arrays may need an all-gather).
    """
    config = model.config
    out = Path(out_dir)
    is_writer = jax.process_index() == 0
    if is_writer:
        out.mkdir(parents=True, exist_ok=True)
    save_dtype = jnp.dtype(dtype or config.param_dtype)
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    for name, tensor in _iter_hf_tensors(config, params):
        tensor = np.ascontiguousarray(tensor.astype(save_dtype))
        if shards[-1] and shard_bytes + tensor.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += tensor.nbytes
    if not is_writer:
        return out
    hf_config = to_hf_config(config.replace(param_dtype=save_dtype.name))
    hf_config.update(extra_config or {})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=metadata)
        return out
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(t.nbytes for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return out
