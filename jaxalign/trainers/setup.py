"""The one setup every trainer (and `bench/bench.py`) shares: mesh, models, tokenizer, reference.

    setup = setup_run(config)                       # mesh + policy (sharded) + tokenizer
    ref_params = load_reference(config, setup, config.dpo.reference_name_or_path)

Models are Flax `Transformer`s whose params are created directly in their shardings: HF weights are
streamed into them (`from_pretrained(..., shardings=...)`) or random-initialised by a jitted init
with `out_shardings`, so no host ever holds a full unsharded copy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from jaxalign import sharding as shd
from jaxalign.config import resolve_mesh_shape
from jaxalign.models import (
    ModelConfig,
    Transformer,
    from_hf_config,
    from_pretrained,
    load_tokenizer,
)
from jaxalign.models.hf import read_hf_config, resolve_checkpoint_dir

Params = Any


def make_mesh(
    mesh_config: ml_collections.ConfigDict, *, devices: list[jax.Device] | None = None
) -> Mesh:
    """The `config.mesh` mesh over `devices` (default: all of `jax.devices()`)."""
    devices = jax.devices() if devices is None else list(devices)
    dcn = tuple(mesh_config.dcn_shape) or None
    # With dcn_shape, mesh.shape is the per-slice (ICI) shape.
    shape = resolve_mesh_shape(tuple(mesh_config.shape), len(devices) // math.prod(dcn or (1,)))
    return shd.make_mesh(
        shape=shape, axis_names=tuple(mesh_config.axis_names), devices=devices, dcn_shape=dcn
    )


def model_config_for(
    model_cfg: ml_collections.ConfigDict, *, name_or_path: str = "", head: str = "lm"
) -> ModelConfig:
    """The `ModelConfig` of a HF checkpoint (or of `model.init` for random init) with run settings."""
    run_settings = dict(
        dtype=model_cfg.dtype,
        param_dtype=model_cfg.param_dtype,
        remat_policy=model_cfg.remat_policy,
        scan_layers=model_cfg.scan_layers,
        attention_impl=model_cfg.attention_impl,
    )
    if name_or_path:
        config = from_hf_config(
            read_hf_config(resolve_checkpoint_dir(name_or_path)), **run_settings
        )
        return config.replace(head=head)
    return ModelConfig(**model_cfg.init.to_dict(), **run_settings, head=head)


def abstract_params(model: Transformer) -> Any:
    """Boxed (logically partitioned) parameter shapes, without allocating anything."""
    dummy = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy)["params"])


def load_model(
    model_cfg: ml_collections.ConfigDict,
    mesh: Mesh,
    rules: Any,
    *,
    name_or_path: str = "",
    head: str = "lm",
    seed: int = 0,
) -> tuple[Transformer, Params, Any]:
    """(model, params, param_shardings): HF weights streamed into their shardings, or random init."""
    model = Transformer(model_config_for(model_cfg, name_or_path=name_or_path, head=head))
    shardings = shd.param_shardings(abstract_params(model), mesh, rules)
    if name_or_path:
        settings = model.config
        _, params = from_pretrained(
            name_or_path,
            dtype=jnp.dtype(settings.dtype),
            param_dtype=jnp.dtype(settings.param_dtype),
            head=head,
            shardings=shardings,
            seed=seed,
            remat_policy=settings.remat_policy,
            scan_layers=settings.scan_layers,
            attention_impl=settings.attention_impl,
        )
    else:
        dummy = jnp.zeros((1, 1), jnp.int32)
        params, shardings = shd.init_sharded(
            lambda rng: model.init(rng, dummy)["params"], mesh, rules, jax.random.PRNGKey(seed)
        )
    return model, params, shardings


def load_run_tokenizer(config: ml_collections.ConfigDict, model: Transformer):
    path = config.tokenizer or config.model.name_or_path
    if not path:
        raise ValueError("config.tokenizer is required when config.model.name_or_path is empty")
    tokenizer = load_tokenizer(path)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer {path} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model.config.vocab_size} (config.model.init.vocab_size)"
        )
    return tokenizer


def with_special_tokens(model: Transformer, tokenizer: Any) -> Transformer:
    """Records the tokenizer's bos/eos/pad ids in the model config (they go into config.json)."""
    return Transformer(
        model.config.replace(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


@dataclasses.dataclass
class RunSetup:
    """What every trainer starts from: the mesh and the policy (or scalar-head model) on it."""

    mesh: Mesh
    rules: Any
    model: Transformer
    params: Params
    param_shardings: Any
    tokenizer: Any


def setup_run(config: ml_collections.ConfigDict, *, head: str = "lm") -> RunSetup:
    """Mesh, the `config.model` weights sharded on it, and the run's tokenizer (special ids set)."""
    mesh = make_mesh(config.mesh)
    rules = config.mesh.logical_rules
    model, params, param_shardings = load_model(
        config.model,
        mesh,
        rules,
        name_or_path=config.model.name_or_path,
        head=head,
        seed=config.seed,
    )
    tokenizer = load_run_tokenizer(config, model)
    return RunSetup(
        mesh=mesh,
        rules=rules,
        model=with_special_tokens(model, tokenizer),
        params=params,
        param_shardings=param_shardings,
        tokenizer=tokenizer,
    )


def load_reference(config: ml_collections.ConfigDict, setup: RunSetup, name_or_path: str) -> Params:
    """Frozen reference params: `name_or_path`'s weights, or a copy of the initial policy.

    A copy, not an alias: train steps donate the state, which would free the reference's buffers.
    """
    if name_or_path:
        _, params, _ = load_model(
            config.model, setup.mesh, setup.rules, name_or_path=name_or_path, seed=config.seed
        )
        return params
    return jax.tree.map(jnp.copy, setup.params)
