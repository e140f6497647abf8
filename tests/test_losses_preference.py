"""DPO-family and Bradley–Terry losses against float64 PyTorch references written from the papers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxalign.losses import (
    DPO_LOSS_TYPES,
    bradley_terry_loss,
    dpo_loss,
    preference_metrics,
)

BATCH = 16
TOL = dict(rtol=1e-5, atol=1e-5)


def _random_inputs(seed: int) -> dict[str, np.ndarray]:
    """Summed log-probs and lengths, drawn in float32 so both sides see identical numbers."""
    rng = np.random.default_rng(seed)
    chosen_lengths = rng.integers(1, 12, size=BATCH).astype(np.float32)
    rejected_lengths = rng.integers(1, 12, size=BATCH).astype(np.float32)
    # Per-token log-probs in [-3, -0.05] so ORPO's log-odds stay finite (avg logp < 0).
    return {
        "policy_chosen_logps": (rng.uniform(-3.0, -0.05, BATCH) * chosen_lengths).astype(
            np.float32
        ),
        "policy_rejected_logps": (rng.uniform(-3.0, -0.05, BATCH) * rejected_lengths).astype(
            np.float32
        ),
        "reference_chosen_logps": (rng.uniform(-3.0, -0.05, BATCH) * chosen_lengths).astype(
            np.float32
        ),
        "reference_rejected_logps": (rng.uniform(-3.0, -0.05, BATCH) * rejected_lengths).astype(
            np.float32
        ),
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
    }


def _torch_reference(
    pc, pr, rc, rr, lc, lr, *, loss_type, beta, eps=0.0, gamma=0.5, reference_free=False, alpha=None
):
    """Losses straight from the paper formulas, float64 torch; returns per-example losses."""
    if reference_free:
        rc, rr = torch.zeros_like(rc), torch.zeros_like(rr)
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":  # Rafailov et al. 2023 eq. 7, cDPO smoothing
        loss = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":  # Azar et al. 2023 on length-averaged log-ratios
        loss = ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":  # SLiC
        loss = torch.clamp(1 - beta * h, min=0)
    elif loss_type == "robust":  # Chowdhury et al. 2024
        loss = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (
            1 - 2 * eps
        )
    elif loss_type == "simpo":  # Meng et al. 2024
        loss = -F.logsigmoid(beta * pc / lc - beta * pr / lr - gamma)
    elif loss_type == "orpo":  # Hong et al. 2024: odds = p / (1 - p), p = exp(avg logp)
        p_c, p_r = torch.exp(pc / lc), torch.exp(pr / lr)
        log_odds_ratio = torch.log(p_c / (1 - p_c)) - torch.log(p_r / (1 - p_r))
        loss = -pc / lc - beta * F.logsigmoid(log_odds_ratio)
    else:
        raise AssertionError(loss_type)
    if alpha is not None:
        loss = loss + alpha * (-pc / lc)
    return loss


_NAMES = (
    "policy_chosen_logps",
    "policy_rejected_logps",
    "reference_chosen_logps",
    "reference_rejected_logps",
)

_CASES = [
    ("sigmoid", {}, 0.0),
    ("sigmoid", {}, 0.1),
    ("sigmoid", {"reference_free": True}, 0.0),
    ("sigmoid", {"rpo_alpha": 0.7}, 0.0),
    ("ipo", {}, 0.0),
    ("hinge", {}, 0.0),
    ("robust", {}, 0.0),
    ("robust", {}, 0.2),
    ("simpo", {}, 0.0),
    ("simpo", {"simpo_gamma": 1.3}, 0.0),
    ("orpo", {}, 0.0),
    ("hinge", {"reference_free": True, "rpo_alpha": 0.3}, 0.0),
]


def test_cases_cover_every_loss_type():
    assert {case[0] for case in _CASES} == set(DPO_LOSS_TYPES)


@pytest.mark.parametrize("loss_type,variant_kwargs,label_smoothing", _CASES)
def test_dpo_loss_and_grads_match_torch(loss_type, variant_kwargs, label_smoothing):
    beta = 0.1 if loss_type != "simpo" else 2.0
    inputs = _random_inputs(seed=len(loss_type) + 7 * len(variant_kwargs))
    lengths = {k: inputs[k] for k in ("chosen_lengths", "rejected_lengths")}

    def total_loss(*logps):
        losses, _, _ = dpo_loss(
            *logps,
            beta=beta,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
            **lengths,
            **variant_kwargs,
        )
        return jnp.sum(losses), losses

    # Eager on purpose: op-by-op kernels are shared across cases, a jit would compile each case.
    loss_and_grads = jax.value_and_grad(total_loss, argnums=(0, 1, 2, 3), has_aux=True)
    (_, losses), grads = loss_and_grads(*(jnp.asarray(inputs[n]) for n in _NAMES))

    torch_logps = [torch.tensor(inputs[n], dtype=torch.float64, requires_grad=True) for n in _NAMES]
    torch_losses = _torch_reference(
        *torch_logps,
        torch.tensor(inputs["chosen_lengths"], dtype=torch.float64),
        torch.tensor(inputs["rejected_lengths"], dtype=torch.float64),
        loss_type=loss_type,
        beta=beta,
        eps=label_smoothing,
        gamma=variant_kwargs.get("simpo_gamma", 0.5),
        reference_free=variant_kwargs.get("reference_free", False),
        alpha=variant_kwargs.get("rpo_alpha"),
    )
    torch_losses.sum().backward()

    assert losses.shape == (BATCH,)
    np.testing.assert_allclose(np.asarray(losses), torch_losses.detach().numpy(), **TOL)
    for name, grad, torch_logp in zip(_NAMES, grads, torch_logps, strict=True):
        expected = torch_logp.grad.numpy() if torch_logp.grad is not None else np.zeros(BATCH)
        np.testing.assert_allclose(np.asarray(grad), expected, err_msg=name, **TOL)
    # The losses must actually depend on the policy.
    assert np.abs(np.asarray(grads[0])).max() > 0


def test_dpo_sigmoid_at_reference_is_log2():
    logps = jnp.array([-3.0, -10.0, -0.5])
    losses, chosen_rewards, rejected_rewards = dpo_loss(logps, logps - 1.0, logps, logps - 1.0)
    np.testing.assert_allclose(np.asarray(losses), math.log(2.0), rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(chosen_rewards), 0.0)
    np.testing.assert_array_equal(np.asarray(rejected_rewards), 0.0)


def test_reference_based_rewards_are_beta_logratios_without_gradient():
    inputs = _random_inputs(seed=3)
    logps = [jnp.asarray(inputs[n]) for n in _NAMES]
    _, chosen_rewards, rejected_rewards = dpo_loss(*logps, beta=0.5)
    np.testing.assert_allclose(
        np.asarray(chosen_rewards),
        0.5 * (inputs["policy_chosen_logps"] - inputs["reference_chosen_logps"]),
        **TOL,
    )
    np.testing.assert_allclose(
        np.asarray(rejected_rewards),
        0.5 * (inputs["policy_rejected_logps"] - inputs["reference_rejected_logps"]),
        **TOL,
    )
    reward_grad = jax.grad(lambda pc: jnp.sum(dpo_loss(pc, *logps[1:])[1]))(logps[0])
    np.testing.assert_array_equal(np.asarray(reward_grad), 0.0)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_types_reward_is_beta_avg_logp(loss_type):
    inputs = _random_inputs(seed=4)
    _, chosen_rewards, rejected_rewards = dpo_loss(
        *(jnp.asarray(inputs[n]) for n in _NAMES),
        beta=0.3,
        loss_type=loss_type,
        chosen_lengths=inputs["chosen_lengths"],
        rejected_lengths=inputs["rejected_lengths"],
    )
    np.testing.assert_allclose(
        np.asarray(chosen_rewards),
        0.3 * inputs["policy_chosen_logps"] / inputs["chosen_lengths"],
        **TOL,
    )
    np.testing.assert_allclose(
        np.asarray(rejected_rewards),
        0.3 * inputs["policy_rejected_logps"] / inputs["rejected_lengths"],
        **TOL,
    )


def test_orpo_near_probability_one_matches_its_value():
    """ORPO's log-odds log(p / (1 − p)) at p̄ = exp(avg logp) → 1, checked against float64.

    Naive float32 `log(1 − exp(x))` is log(0) = −inf at x = −1e-8 and loses most digits at
    x = −1e-6; the loss and its gradient must match float64 `x − log(−expm1(x))` there.
    """
    chosen_avg = np.array([-1e-8, -1e-6, -1e-4, -0.5], np.float32)
    rejected_avg = np.array([-2.0, -1e-5, -3.0, -1e-7], np.float32)
    lengths = np.array([1.0, 3.0, 2.0, 5.0], np.float32)
    beta = 0.25

    def loss_sum(chosen, rejected):
        losses, _, _ = dpo_loss(
            chosen,
            rejected,
            jnp.zeros(4),
            jnp.zeros(4),
            beta=beta,
            loss_type="orpo",
            chosen_lengths=lengths,
            rejected_lengths=lengths,
        )
        return losses.sum(), losses

    (_, losses), grads = jax.jit(jax.value_and_grad(loss_sum, argnums=(0, 1), has_aux=True))(
        chosen_avg * lengths, rejected_avg * lengths
    )

    c, r = chosen_avg.astype(np.float64), rejected_avg.astype(np.float64)
    log_odds = lambda x: x - np.log(-np.expm1(x))  # noqa: E731
    z = log_odds(c) - log_odds(r)
    expected = -c + beta * np.logaddexp(0.0, -z)  # −logσ(z) = log(1 + e^−z)
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-5)
    # d/dπ_c (π_c = |c|·c̄): (−1 − β·σ(−z)·d log_odds/dc̄) / |c|, d log_odds/dx = 1 / (1 − e^x).
    sig_neg = 1 / (1 + np.exp(z))
    d_chosen = (-1 - beta * sig_neg / -np.expm1(c)) / lengths
    d_rejected = beta * sig_neg / -np.expm1(r) / lengths
    np.testing.assert_allclose(np.asarray(grads[0]), d_chosen, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grads[1]), d_rejected, rtol=1e-4)


def test_dpo_loss_jits():
    inputs = _random_inputs(seed=5)
    jitted = jax.jit(
        lambda pc, pr, rc, rr, lc, lr: dpo_loss(
            pc, pr, rc, rr, beta=0.2, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr
        )
    )
    args = [jnp.asarray(inputs[n]) for n in _NAMES]
    losses, _, _ = jitted(*args, inputs["chosen_lengths"], inputs["rejected_lengths"])
    eager, _, _ = dpo_loss(
        *args,
        beta=0.2,
        loss_type="ipo",
        chosen_lengths=inputs["chosen_lengths"],
        rejected_lengths=inputs["rejected_lengths"],
    )
    np.testing.assert_allclose(np.asarray(losses), np.asarray(eager), rtol=1e-6)


# ----------------------------------------------------------------------------- errors


_ONE = jnp.zeros(2)


@pytest.mark.parametrize("loss_type", ["ipo", "simpo", "orpo"])
def test_missing_lengths_raise(loss_type):
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        dpo_loss(_ONE, _ONE, _ONE, _ONE, loss_type=loss_type)
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        dpo_loss(_ONE, _ONE, _ONE, _ONE, loss_type=loss_type, chosen_lengths=jnp.ones(2))


def test_rpo_alpha_without_lengths_raises():
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(_ONE, _ONE, _ONE, _ONE, rpo_alpha=1.0)


def test_unknown_loss_type_raises_and_lists_allowed():
    with pytest.raises(ValueError, match="'kto'") as info:
        dpo_loss(_ONE, _ONE, _ONE, _ONE, loss_type="kto")
    for allowed in DPO_LOSS_TYPES:
        assert allowed in str(info.value)


def test_unknown_kwarg_raises_and_lists_allowed():
    with pytest.raises(ValueError, match="gama") as info:
        dpo_loss(_ONE, _ONE, _ONE, _ONE, gama=0.5)
    assert "rpo_alpha" in str(info.value) and "reference_free" in str(info.value)


def test_invalid_label_smoothing_raises():
    with pytest.raises(ValueError, match="0.5"):
        dpo_loss(_ONE, _ONE, _ONE, _ONE, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(_ONE, _ONE, _ONE, _ONE, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="simpo_gamma"):
        dpo_loss(_ONE, _ONE, _ONE, _ONE, loss_type="sigmoid", simpo_gamma=0.1)


# ----------------------------------------------------------------------------- Bradley–Terry


def test_bradley_terry_hand_computed():
    chosen = np.array([2.0, 0.0], np.float32)
    rejected = np.array([1.0, 1.0], np.float32)
    margin = np.array([0.5, 0.0], np.float32)

    @jax.jit  # one program instead of op-by-op dispatch
    def evaluate(chosen, rejected, margin):
        full = bradley_terry_loss(chosen, rejected, margin=margin, center_coef=0.1)
        plain = bradley_terry_loss(chosen, rejected)
        grad = jax.grad(lambda c: jnp.sum(bradley_terry_loss(c, rejected)))(chosen)
        return full, plain, grad

    full, plain, grad = jax.device_get(evaluate(chosen, rejected, margin))
    # ex0: -logσ(2 - 1 - 0.5) = log(1 + e^-0.5) = 0.47407698; centering 0.1·(2 + 1)² = 0.9
    # ex1: -logσ(0 - 1 - 0)   = log(1 + e)      = 1.31326169; centering 0.1·(0 + 1)² = 0.1
    np.testing.assert_allclose(full, [1.37407698, 1.41326169], rtol=1e-6)
    # -logσ(1) = 0.31326169, -logσ(-1) = 1.31326169
    np.testing.assert_allclose(plain, [0.31326169, 1.31326169], rtol=1e-6)
    # d/dr_c of -logσ(r_c − r_r) = -σ(r_r − r_c): -σ(-1) = -0.26894142, -σ(1) = -0.73105858
    np.testing.assert_allclose(grad, [-0.26894142, -0.73105858], rtol=1e-6)


def test_preference_metrics():
    metrics = preference_metrics(jnp.array([2.0, 0.0, 1.0]), jnp.array([1.0, 1.0, 1.0]))
    np.testing.assert_array_equal(np.asarray(metrics["accuracy"]), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(metrics["margin"]), [1.0, -1.0, 0.0])
