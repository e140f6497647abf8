"""Schedules, weight-decay masking and microbatched gradient accumulation."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxalign import optim, sharding


def opt_config(**overrides):
    base = dict(
        name="adamw",
        learning_rate=1e-3,
        schedule="cosine",
        warmup_steps=10,
        min_lr_ratio=0.1,
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        max_grad_norm=1.0,
        grad_accum_steps=1,
    )
    base.update(overrides)
    return ml_collections.ConfigDict(base)


def test_warmup_cosine_values():
    _, schedule = optim.make_optimizer(opt_config(), total_steps=110)
    lr, end = 1e-3, 1e-4
    assert float(schedule(0)) == pytest.approx(0.0)
    assert float(schedule(5)) == pytest.approx(lr * 0.5)
    assert float(schedule(10)) == pytest.approx(lr)
    mid = end + (lr - end) * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert float(schedule(60)) == pytest.approx(mid, rel=1e-5)
    assert float(schedule(110)) == pytest.approx(end, rel=1e-5)
    assert float(schedule(500)) == pytest.approx(end, rel=1e-5)


def test_linear_and_constant_values():
    _, linear = optim.make_optimizer(
        opt_config(schedule="linear", warmup_steps=0, min_lr_ratio=0.0), total_steps=100
    )
    assert float(linear(0)) == pytest.approx(1e-3)
    assert float(linear(25)) == pytest.approx(0.75e-3)
    _, constant = optim.make_optimizer(
        opt_config(schedule="constant", warmup_steps=4), total_steps=100
    )
    assert float(constant(2)) == pytest.approx(0.5e-3)
    assert float(constant(99)) == pytest.approx(1e-3)


def test_no_weight_decay_on_biases_norms_and_1d():
    # Zero gradients: any update comes from weight decay alone.
    tx, _ = optim.make_optimizer(
        opt_config(schedule="constant", warmup_steps=0, max_grad_norm=0.0), total_steps=10
    )
    params = {
        "dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))},
        "norm": {"scale": jnp.ones((2, 4))},  # 2-D as under nn.scan: still no decay
        "gain": jnp.ones((5,)),
    }
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -1e-3 * 0.1 * np.ones((4, 3)), rtol=1e-6)
    for leaf in (updates["dense"]["bias"], updates["norm"]["scale"], updates["gain"]):
        np.testing.assert_array_equal(leaf, 0.0)


def test_decay_mask_sees_through_logical_boxes():
    import flax.linen as nn

    boxed = {
        "bias": nn.LogicallyPartitioned(jnp.ones((2, 3)), ("layers", "embed")),
        "kernel": jnp.ones((3, 3)),
    }
    assert jax.tree.leaves(optim.decay_mask(boxed)) == [False, True]


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_steps(name):
    tx, _ = optim.make_optimizer(opt_config(name=name, weight_decay=0.0), total_steps=10)
    params = {"w": jnp.ones((4, 3))}
    updates, _ = tx.update({"w": jnp.full((4, 3), 0.5)}, tx.init(params), params)
    assert np.all(np.isfinite(updates["w"]))


def test_adam_with_weight_decay_is_rejected():
    with pytest.raises(ValueError, match="adamw"):
        optim.make_optimizer(opt_config(name="adam"), total_steps=10)


def _sum_loss(params, batch):
    """Masked squared error, summed; aux carries sums and the token count."""
    pred = batch["x"] @ params["w"] + params["b"]
    per_token = jnp.sum((pred - batch["y"]) ** 2, axis=-1) * batch["mask"]
    return jnp.sum(per_token), {
        "token_count": jnp.sum(batch["mask"]).astype(jnp.int32),
        "sq": jnp.sum(per_token**2),
    }


def test_accumulate_gradients_matches_full_batch():
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32),
        "b": jnp.zeros((2,), jnp.float32),
    }
    batch = {
        "x": rng.normal(size=(16, 5)).astype(np.float32),
        "y": rng.normal(size=(16, 2)).astype(np.float32),
        "mask": (rng.random(16) > 0.3).astype(np.float32),
    }
    mesh = sharding.make_mesh(shape=(-1, 1, 1), axis_names=("data", "fsdp", "tensor"))
    batch = sharding.shard_batch(batch, mesh)
    value_and_grad = jax.value_and_grad(_sum_loss, has_aux=True)

    (loss, aux), grads = jax.jit(value_and_grad)(params, batch)
    accumulated = optim.accumulate_gradients(value_and_grad, 4)
    (acc_loss, acc_aux), acc_grads = jax.jit(accumulated)(params, batch)

    np.testing.assert_allclose(acc_loss, loss, rtol=1e-5)
    assert acc_aux["token_count"].dtype == jnp.int32
    assert int(acc_aux["token_count"]) == int(aux["token_count"])
    np.testing.assert_allclose(acc_aux["sq"], aux["sq"], rtol=1e-5)
    for full, acc in zip(jax.tree.leaves(grads), jax.tree.leaves(acc_grads), strict=True):
        np.testing.assert_allclose(acc, full, rtol=1e-5, atol=1e-6)
    # Mean taken once, from sums.
    mean_grads = jax.tree.map(lambda g: g / acc_aux["token_count"], acc_grads)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(mean_grads))
    assert optim.accumulate_gradients(value_and_grad, 1) is value_and_grad
    with pytest.raises(ValueError, match="divisible"):
        accumulated(params, {k: v[:6] for k, v in batch.items()})


def test_optax_chain_is_a_gradient_transformation():
    tx, _ = optim.make_optimizer(opt_config(), total_steps=10)
    assert isinstance(tx, optax.GradientTransformation)
