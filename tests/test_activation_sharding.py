"""Activation sharding: the model's logical constraints inside `shd.activation_context`.

The compiled-HLO tests read the per-device program of a real SFT train step: with FSDP the
weights are all-gathered (expected), but no all-gather may produce an activation carrying the
global batch. Without the constraints XLA's propagation does exactly that on these meshes: it
gathers q/k/v `[B·T, H, D]`, the MLP hidden `[B·T, F]`, the logits and the token ids, and
reshuffles with all-to-alls. The model's dims are picked so no weight shape can be mistaken for an
activation's: B·T = 256 and B·(T-1) = 248 rows, E = 96, F = 160, V = 128, H·D = 64.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxalign import sharding as shd
from jaxalign.config import ConfigError, base_config, validate
from jaxalign.models import Transformer
from jaxalign.optim import make_optimizer
from jaxalign.trainers import engine, setup, sft

BATCH, SEQ = 8, 32


def tiny_config(mesh_shape: tuple[int, ...]):
    config = base_config()
    config.mesh.shape = mesh_shape
    model = config.model.init
    model.hidden_size, model.intermediate_size, model.vocab_size = 96, 160, 128
    model.num_heads, model.num_kv_heads, model.head_dim, model.num_layers = 4, 2, 16, 2
    return config


def token_batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(SEQ // 2, SEQ + 1, size=BATCH)
    attention_mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
    return {
        "input_ids": rng.integers(0, 128, size=(BATCH, SEQ)).astype(np.int32),
        "attention_mask": attention_mask,
        "positions": np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)) * attention_mask,
        "loss_mask": attention_mask.astype(np.float32),
    }


def compiled_sft_step(mesh_shape: tuple[int, ...]) -> str:
    """Per-device HLO of the SFT train step, built as the engine builds it, under the context."""
    config = tiny_config(mesh_shape)
    mesh = setup.make_mesh(config.mesh)
    rules = config.mesh.logical_rules
    model, params, param_shardings = setup.load_model(config.model, mesh, rules, seed=0)
    tx, schedule = make_optimizer(config.optimizer, total_steps=1)
    state, state_shardings = engine.create_train_state(
        params, param_shardings, model, tx, mesh, rules, seed=0
    )
    step = engine.make_train_step(
        sft.sft_loss_fn(model, chunk_size=None), tx, grad_accum_steps=1, schedule=schedule
    )
    train_step = engine.jit_train_step(step, state_shardings, mesh, None)
    batch = shd.shard_batch(token_batch(), mesh)
    with shd.activation_context(mesh, rules):
        return train_step.lower(state, batch, None).compile().as_text()


_RESULT = re.compile(r"=\s*(.+?)\s+(all-gather|all-to-all)(?:-start)?\(")
_SHAPE = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")


def collectives(hlo: str, kind: str) -> list[tuple[int, ...]]:
    """Result shapes of every `kind` op (`all-gather`, `all-to-all`) in an HLO module's text."""
    shapes = []
    for match in _RESULT.finditer(hlo):
        if match.group(2) == kind:
            for dims in _SHAPE.findall(match.group(1)):
                shapes.append(tuple(int(d) for d in dims.split(",") if d))
    return shapes


def carries_global_batch(shape: tuple[int, ...]) -> bool:
    """`[B·T, ...]`, `[B, T, ...]` (or T-1: shifted logits and targets) with the global B."""
    rows = {BATCH * SEQ, BATCH * (SEQ - 1)}
    return shape[:1] in {(r,) for r in rows} or shape[:2] in {(BATCH, SEQ), (BATCH, SEQ - 1)}


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (1, 4, 2)], ids=["fsdp8", "fsdp4_tensor2"])
def test_train_step_gathers_weights_not_activations(mesh_shape):
    hlo = compiled_sft_step(mesh_shape)
    gathered = collectives(hlo, "all-gather")
    assert gathered, "expected FSDP all-gathers of the weights"
    assert [s for s in gathered if carries_global_batch(s)] == []
    # Batch-sharded activations throughout: no reshuffle between batch and feature sharding.
    assert collectives(hlo, "all-to-all") == []


def test_logits_on_mesh_equal_one_device_and_are_sharded_as_named():
    config = tiny_config((1, 1, 1))
    one_device = setup.make_mesh(config.mesh, devices=jax.devices()[:1])
    rules = config.mesh.logical_rules
    model, params, _ = setup.load_model(config.model, one_device, rules, seed=0)
    names = ("input_ids", "attention_mask", "positions")
    batch = {name: value for name, value in token_batch(1).items() if name in names}
    expected = jax.jit(model.apply)({"params": params}, *batch.values())

    mesh = setup.make_mesh(tiny_config((1, 4, 2)).mesh)
    sharded = jax.device_put(
        jax.device_get(params), shd.param_shardings(setup.abstract_params(model), mesh, rules)
    )
    with shd.activation_context(mesh, rules):
        logits = jax.jit(model.apply)({"params": sharded}, *shd.shard_batch(batch, mesh).values())
    named = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
    assert logits.sharding.is_equivalent_to(named, logits.ndim)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=2e-5, atol=2e-5)


def test_constraints_are_identity_outside_a_context():
    model = Transformer(setup.model_config_for(tiny_config((1, 1, 1)).model))
    tokens = jnp.zeros((2, 8), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
    jaxpr = jax.make_jaxpr(model.apply)({"params": shd.unbox(params)}, tokens)
    assert "sharding_constraint" not in str(jaxpr)


def test_context_sets_the_ambient_mesh_and_leaves_indivisible_dims_to_propagation():
    mesh = setup.make_mesh(tiny_config((1, 4, 2)).mesh)
    rules = base_config().mesh.logical_rules
    names = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")

    @jax.jit
    def pin(x):
        return shd.constrain(x, names)

    seen = shd.in_activation_context(jax.sharding.get_abstract_mesh, mesh, rules)()
    assert seen == mesh.abstract_mesh
    assert jax.sharding.get_abstract_mesh().empty
    with shd.activation_context(mesh, rules):
        pinned = pin(jnp.zeros((8, 4, 2, 16)))
        one_kv_head = pin(jnp.zeros((8, 4, 1, 16)))  # 1 head over tensor=2: not constrained
    named = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    assert pinned.sharding.is_equivalent_to(named, pinned.ndim)
    assert one_kv_head.shape == (8, 4, 1, 16)


def test_validate_requires_rules_for_activation_axes():
    config = tiny_config((1, 1, 1))
    config.mesh.logical_rules = tuple(
        rule for rule in config.mesh.logical_rules if rule[0] != "activation_mlp"
    )
    with pytest.raises(ConfigError, match="activation_mlp"):
        validate(config)
    config.mesh.logical_rules = (*base_config().mesh.logical_rules, ("activation_mlp", "model"))
    with pytest.raises(ConfigError, match="mesh.logical_rules.*outside mesh.axis_names"):
        validate(config)
