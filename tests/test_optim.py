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


def reference_updates(name: str, grads: list[dict], params: dict, *, lr, wd, b1, b2, eps, clip):
    """NumPy updates of the documented chain, step by step: clip by global norm → scale_by_<name>
    → + wd·param on rank >= 2 leaves not named bias/scale (decoupled) → × −lr(t).

    Written from the papers' update rules (Adam: Kingma & Ba 2015 with bias correction; SGD with
    heavy-ball momentum g + b1·m; RMSProp g/sqrt(ν + eps) without bias correction; Adafactor,
    Shazeer & Stern 2018, unfactored for these small leaves: ν_t = ρ_t ν + (1−ρ_t)(g² + 1e-30),
    ρ_t = 1 − t^−0.8, then momentum b1), not from optax's code.
    """
    state = {k: {"m": np.zeros_like(v), "v": np.zeros_like(v)} for k, v in params.items()}
    params = {k: v.astype(np.float64) for k, v in params.items()}
    out = []
    for t, grad in enumerate(grads, start=1):
        grad = {k: g.astype(np.float64) for k, g in grad.items()}
        norm = np.sqrt(sum((g**2).sum() for g in grad.values()))
        if clip and norm > clip:
            grad = {k: g * clip / norm for k, g in grad.items()}
        updates = {}
        for key, g in grad.items():
            m, v = state[key]["m"], state[key]["v"]
            if name in ("adamw", "adam"):
                m[:] = b1 * m + (1 - b1) * g
                v[:] = b2 * v + (1 - b2) * g**2
                u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
            elif name == "sgd":
                m[:] = g + b1 * m
                u = m.copy()
            elif name == "rmsprop":
                v[:] = b2 * v + (1 - b2) * g**2
                u = g / np.sqrt(v + eps)
            else:  # adafactor
                rho = 1 - t**-0.8
                v[:] = rho * v + (1 - rho) * (g**2 + 1e-30)
                m[:] = g / np.sqrt(v) + b1 * m
                u = m.copy()
            if wd and params[key].ndim >= 2 and key not in ("bias", "scale"):
                u = u + wd * params[key]
            updates[key] = -lr(t - 1) * u
            params[key] = params[key] + updates[key]
        out.append(updates)
    return out


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_update_matches_its_rule(name):
    """Three steps of each optimizer against `reference_updates`: the first clipped (grad norm
    above max_grad_norm), a decaying learning rate, weight decay on the kernel only."""
    wd = 0.0 if name == "adam" else 0.1
    config = opt_config(
        name=name, weight_decay=wd, schedule="linear", warmup_steps=0, min_lr_ratio=0.5
    )
    tx, schedule = optim.make_optimizer(config, total_steps=4)
    rng = np.random.default_rng(0)
    params = {
        "kernel": rng.normal(size=(4, 3)).astype(np.float32),
        "bias": rng.normal(size=(3,)).astype(np.float32),
    }
    grads = [
        {k: (scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
        for scale in (3.0, 0.2, 0.05)  # step 1's norm is above max_grad_norm=1
    ]
    expected = reference_updates(
        name,
        grads,
        params,
        lr=lambda t: float(schedule(t)),
        wd=wd,
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        clip=config.max_grad_norm,
    )
    step = jax.jit(tx.update)
    state, current = tx.init(params), dict(params)
    for t, (grad, want) in enumerate(zip(grads, expected, strict=True), start=1):
        updates, state = step(grad, state, current)
        for key in params:
            np.testing.assert_allclose(
                updates[key], want[key], rtol=2e-5, atol=1e-9, err_msg=f"{name} {key} step {t}"
            )
        current = jax.tree.map(lambda p, u: p + u, current, updates)


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
