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
from pathlib import Path
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
from jaxalign.models.lora import (
    LoraConfig,
    LoraModel,
    init_lora,
    load_peft_adapter,
    merge_adapters,
    save_peft_adapter,
)
from jaxalign.trainers import common

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


@dataclasses.dataclass(frozen=True)
class LoraView:
    """A `LoraModel` where code expects a `Transformer`: `.apply({"params": p}, ...)` and `.config`.

    `adapters=False` is the reference of DPO/PPO/GRPO: the base forward (adapters off) on the same
    params, so the reference needs no second params tree.
    """

    lora: LoraModel
    adapters: bool = True

    @property
    def config(self) -> ModelConfig:
        return self.lora.base.config

    def apply(self, variables: dict[str, Params], *args: Any, **kwargs: Any) -> Any:
        if self.adapters:
            return self.lora.apply(variables["params"], *args, **kwargs)
        return self.lora.reference_apply(variables["params"], *args, **kwargs)


@dataclasses.dataclass
class RunSetup:
    """What every trainer starts from: the mesh and the policy (or scalar-head model) on it.

    With LoRA (`model.lora.rank > 0`), `model` is a `LoraView`, `params` are the trainable adapters
    (and a reward model's scalar head) and `frozen` the base (quantized for QLoRA); gradients and
    optimizer state exist for `params` alone.
    """

    mesh: Mesh
    rules: Any
    model: Transformer | LoraView
    params: Params
    param_shardings: Any
    tokenizer: Any
    boxed_params: Any  # logically-partitioned abstract `params`, for optimizer-state shardings
    lora: LoraModel | None = None
    frozen: Params = None
    frozen_shardings: Any = None

    @property
    def reference_model(self) -> Transformer | LoraView:
        """The reference's module: the policy's own, or (LoRA) the base with adapters off."""
        return LoraView(self.lora, adapters=False) if self.lora is not None else self.model

    @property
    def reference_shardings(self) -> Any:
        """Shardings of `load_reference`'s params: the policy's (LoRA: the frozen base's)."""
        return self.frozen_shardings if self.lora is not None else self.param_shardings

    def full_params(self, params: Params) -> Params:
        """Params the model's `apply` takes: the trainable ones, plus the frozen base (LoRA)."""
        return params if self.lora is None else self.lora.combine(params, self.frozen)

    def bind_frozen(self, loss_fn: Any, frozen: Any, frozen_shardings: Any, *, key: str = ""):
        """`(loss_fn, frozen, frozen_shardings)` for the engine's step: with LoRA the loss sees
        full params (trainable ∪ base; under `params[key]` when the params are a dict of models)
        and the engine passes the base beside the loss's own frozen input."""
        if self.lora is None:
            return loss_fn, frozen, frozen_shardings
        combine = self.lora.combine

        def with_base(params, batch, frozen_pair, rng):
            base, loss_frozen = frozen_pair
            if key:
                params = {**params, key: combine(params[key], base)}
            else:
                params = combine(params, base)
            return loss_fn(params, batch, loss_frozen, rng)

        return with_base, (self.frozen, frozen), (self.frozen_shardings, frozen_shardings)

    def exporter(self, config: ml_collections.ConfigDict | None = None):
        """`(params, out_dir) -> None`: the HF model (LoRA: merged) and, with LoRA, the PEFT
        adapter in `out_dir/../adapter`."""
        if self.lora is None:
            return common.exporter(self.model, self.tokenizer, config)
        lora, tokenizer, frozen = self.lora, self.tokenizer, self.frozen
        merged_export = common.exporter(lora.base, tokenizer, config)

        def export(params: Params, out_dir: Path) -> None:
            full = lora.combine(params, frozen)
            merged_export(merge_adapters(lora, full), out_dir)
            if jax.process_index() == 0:
                save_peft_adapter(
                    lora,
                    jax.device_get(full),
                    out_dir.parent / "adapter",
                    base_model_name_or_path=self.base_name_or_path,
                )

        return export

    base_name_or_path: str = ""  # LoRA: recorded in the PEFT adapter config


def lora_config(model_cfg: ml_collections.ConfigDict) -> LoraConfig:
    lora = model_cfg.lora
    return LoraConfig(
        rank=lora.rank,
        alpha=lora.alpha,
        dropout=lora.dropout,
        target_modules=lora.target_modules,
        quantization=lora.quantization,
    )


def setup_run(config: ml_collections.ConfigDict, *, head: str = "lm") -> RunSetup:
    """Mesh, the `config.model` weights sharded on it, and the run's tokenizer (special ids set);
    with `model.lora.rank > 0`, adapters on the (optionally quantized) frozen base."""
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
    model = with_special_tokens(model, tokenizer)
    if not config.model.lora.rank:
        return RunSetup(
            mesh=mesh,
            rules=rules,
            model=model,
            params=params,
            param_shardings=param_shardings,
            tokenizer=tokenizer,
            boxed_params=abstract_params(model),
        )
    lora, full = init_lora(
        model, params, lora_config(config.model), rng=jax.random.PRNGKey(config.seed)
    )
    if config.model.lora.init_from:
        full = load_peft_adapter(lora, full, config.model.lora.init_from)
    boxed = lora.abstract_params()
    full_shardings = shd.param_shardings(boxed, mesh, rules)
    full = jax.device_put(full, full_shardings)
    params, frozen = lora.split(full)
    param_shardings, frozen_shardings = lora.split(full_shardings)
    return RunSetup(
        mesh=mesh,
        rules=rules,
        model=LoraView(lora),
        params=params,
        param_shardings=param_shardings,
        tokenizer=tokenizer,
        boxed_params=lora.split(boxed)[0],
        lora=lora,
        frozen=frozen,
        frozen_shardings=frozen_shardings,
        base_name_or_path=config.model.name_or_path,
    )


def load_reference(config: ml_collections.ConfigDict, setup: RunSetup, name_or_path: str) -> Params:
    """Frozen reference params: `name_or_path`'s weights, or a copy of the initial policy.

    A copy, not an alias: train steps donate the state, which would free the reference's buffers.
    With LoRA the reference is the base with adapters off (`setup.reference_model`): its params
    are the frozen base itself, never donated, so no copy is made.
    """
    if setup.lora is not None:
        if name_or_path:
            raise ValueError(
                f"a reference checkpoint ({name_or_path}) with model.lora: the LoRA reference is "
                f"the base with adapters off; leave the reference_name_or_path key empty"
            )
        return setup.frozen
    if name_or_path:
        _, params, _ = load_model(
            config.model, setup.mesh, setup.rules, name_or_path=name_or_path, seed=config.seed
        )
        return params
    return jax.tree.map(jnp.copy, setup.params)
