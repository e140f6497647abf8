"""GRPO-family policy loss against a plain-loop NumPy reference written from TRL's
`GRPOTrainer._compute_loss` (values, metric sums, gradients by central differences)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import GRPO_LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS, grpo_policy_loss

GROUP_SIZE, NEW_TOKENS = 3, 6
# Completion lengths: full rows, truncated ones and one empty row (all masked out).
LENGTHS = (6, 4, 1, 6, 0, 3)
# Rewards of two prompts × 3 completions; the second group is all equal (advantage 0).
REWARDS = (1.0, 0.0, 0.2, 2.0, 2.0, 2.0)


def _group_advantages(rewards, group_size):
    """(r − group mean) / (group std (ddof=1) + 1e-4), plain Python."""
    advantages = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        advantages += [(r - mean) / (std + 1e-4) for r in group]
    return np.asarray(advantages)


def _inputs(seed=8):
    rng = np.random.default_rng(seed)
    rows = len(LENGTHS)
    mask = np.zeros((rows, NEW_TOKENS), np.int32)
    for row, length in enumerate(LENGTHS):
        mask[row, :length] = 1
    old = -rng.uniform(0.5, 3.0, (rows, NEW_TOKENS))
    # Moves large enough that both clip bounds are hit, at the token and the sequence level.
    row_drift = rng.normal(0.0, 0.3, (rows, 1))
    logprobs = old + row_drift + rng.normal(0.0, 0.3, (rows, NEW_TOKENS))
    ref = old + rng.normal(0.0, 0.2, (rows, NEW_TOKENS))
    advantages = _group_advantages(REWARDS, GROUP_SIZE)
    # Padding holds junk: it must not reach the loss, the metrics or the gradient.
    logprobs, old, ref = (np.where(mask == 1, x, 40.0) for x in (logprobs, old, ref))
    return logprobs, old, advantages, mask, ref


def _reference(logprobs, old, advantages, mask, ref, *, beta, eps_low, eps_high, loss_type, level):
    """TRL's per-token loss and aggregation, written as loops over rows and tokens (float64).

    The sequence level uses TRL's direct form: one weight `exp(mean_t log ratio)` per row.
    """
    rows, columns = logprobs.shape
    row_sums, row_means, total_tokens = [], [], 0
    kl_sum = low = high = region = clip_count = 0.0
    for i in range(rows):
        tokens = [t for t in range(columns) if mask[i, t]]
        total_tokens += len(tokens)
        seq_log_weight = sum(logprobs[i, t] - old[i, t] for t in tokens) / max(len(tokens), 1)
        loss_i = 0.0
        for t in tokens:
            log_weight = seq_log_weight if level == "sequence" else logprobs[i, t] - old[i, t]
            weight = math.exp(log_weight)
            clipped = min(max(weight, 1 - eps_low), 1 + eps_high)
            token_loss = -min(weight * advantages[i], clipped * advantages[i])
            if beta:
                delta = ref[i, t] - logprobs[i, t]
                kl = math.exp(delta) - delta - 1
                token_loss += beta * kl
                kl_sum += kl
            loss_i += token_loss
            if level == "token":
                is_low = weight < 1 - eps_low and advantages[i] < 0
                is_high = weight > 1 + eps_high and advantages[i] > 0
                low, high, region = low + is_low, high + is_high, region + (is_low or is_high)
                clip_count += 1
        if level == "sequence" and tokens:
            weight = math.exp(seq_log_weight)
            is_low = weight < 1 - eps_low and advantages[i] < 0
            is_high = weight > 1 + eps_high and advantages[i] > 0
            low, high, region = low + is_low, high + is_high, region + (is_low or is_high)
            clip_count += 1
        row_sums.append(loss_i)
        row_means.append(loss_i / max(len(tokens), 1))
    if loss_type == "grpo":
        loss_sum, denominator = sum(row_means), rows
    elif loss_type == "dr_grpo":
        loss_sum, denominator = sum(row_sums), rows * columns
    else:
        loss_sum, denominator = sum(row_sums), total_tokens
    stats = {
        "kl": kl_sum,
        "clip_ratio/low_mean": low,
        "clip_ratio/high_mean": high,
        "clip_ratio/region_mean": region,
        "token_count": total_tokens,
        "clip_count": clip_count,
    }
    return loss_sum, denominator, stats


def _numeric_grad(fn, x, h=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += h
        minus[index] -= h
        grad[index] = (fn(plus) - fn(minus)) / (2 * h)
    return grad


SETTINGS = [  # (beta, eps_low, eps_high): symmetric without KL, clip-higher with KL
    (0.0, 0.2, 0.2),
    (0.04, 0.2, 0.28),
]


@pytest.mark.parametrize(
    "loss_type,level", list(itertools.product(GRPO_LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS))
)
def test_loss_metrics_and_gradient_match_reference(loss_type, level):
    logprobs, old, advantages, mask, ref = _inputs()
    for beta, eps_low, eps_high in SETTINGS:
        options = dict(beta=beta, eps_low=eps_low, eps_high=eps_high, loss_type=loss_type)

        def loss(lp, options=options):
            out = grpo_policy_loss(
                lp,
                old,
                advantages,
                mask,
                ref_logprobs=ref,
                beta=options["beta"],
                epsilon_low=options["eps_low"],
                epsilon_high=options["eps_high"],
                loss_type=loss_type,
                importance_sampling_level=level,
            )
            return out.loss_sum, out

        (loss_sum, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(
            jnp.asarray(logprobs, jnp.float32)
        )
        want_sum, want_denominator, want_stats = _reference(
            logprobs, old, advantages, mask, ref, level=level, **options
        )
        np.testing.assert_allclose(float(loss_sum), want_sum, rtol=1e-5, atol=1e-6)
        assert float(out.denominator) == want_denominator
        for name, value in want_stats.items():
            np.testing.assert_allclose(float(out.stats[name]), value, rtol=1e-5, err_msg=name)

        # The gradient is the intended one (TRL's direct sequence weight at the sequence level),
        # and exactly 0 on padding.
        want_grad = _numeric_grad(
            lambda lp, options=options: _reference(
                lp, old, advantages, mask, ref, level=level, **options
            )[0],
            logprobs,
        )
        np.testing.assert_allclose(np.asarray(grad), want_grad, atol=2e-5)
        assert np.all(np.asarray(grad)[mask == 0] == 0)
        # The inputs (seed 8) hit both bounds in every setting, at both levels.
        assert float(out.stats["clip_ratio/low_mean"]) > 0
        assert float(out.stats["clip_ratio/high_mean"]) > 0


def test_clip_higher_hand_computed():
    # ε_low = 0.2, ε_high = 0.28; old log-probs 0, so ratio = exp(logprobs). Row 0 has A = +1,
    # row 1 has A = −1:
    #  row t  ratio  A    min(ρA, clip(ρ)A)         loss    clipped?
    #  0   0  1.25   +1   min(1.25, 1.25)           −1.25   no (symmetric ε = 0.2 would clip)
    #  0   1  1.5    +1   min(1.5, 1.28) = 1.28     −1.28   high
    #  1   0  0.7    −1   min(−0.7, −0.8) = −0.8    +0.8    low
    #  1   1  0.9    −1   min(−0.9, −0.9)           +0.9    no
    logprobs = np.log(np.array([[1.25, 1.5], [0.7, 0.9]], np.float32))
    out = grpo_policy_loss(
        logprobs,
        np.zeros_like(logprobs),
        np.array([1.0, -1.0], np.float32),
        np.ones_like(logprobs),
        epsilon_low=0.2,
        epsilon_high=0.28,
        loss_type="dapo",
    )
    np.testing.assert_allclose(float(out.loss_sum), -1.25 - 1.28 + 0.8 + 0.9, rtol=1e-6)
    assert float(out.denominator) == 4.0
    assert float(out.stats["clip_ratio/high_mean"]) == 1.0
    assert float(out.stats["clip_ratio/low_mean"]) == 1.0
    assert float(out.stats["clip_ratio/region_mean"]) == 2.0
    assert float(out.stats["token_count"]) == float(out.stats["clip_count"]) == 4.0
    assert float(out.stats["kl"]) == 0.0


def test_gspo_stop_gradient_form():
    """GSPO-token: the value is the sequence weight at every token; the gradient of token t's
    weight is `s_i · ∇ log π(y_t)` (TRL's direct form spreads `s_i/|y_i|` over the tokens)."""
    logprobs, old, advantages, mask, _ = _inputs(seed=3)
    # No clipping (wide bounds), so the gradient is the unclipped −A_i·s_i·(1/|y_i|) per token.
    out_and_grad = jax.jit(
        jax.value_and_grad(
            lambda lp: (
                grpo_policy_loss(
                    lp,
                    old,
                    advantages,
                    mask,
                    epsilon_low=10.0,
                    epsilon_high=10.0,
                    importance_sampling_level="sequence",
                ).loss_sum
            )
        )
    )
    loss_sum, grad = out_and_grad(jnp.asarray(logprobs, jnp.float32))
    want_grad = np.zeros_like(logprobs)
    want_sum = 0.0
    for i, length in enumerate(LENGTHS):
        if not length:
            continue
        weight = math.exp(np.mean(logprobs[i, :length] - old[i, :length]))
        want_sum += -advantages[i] * weight
        want_grad[i, :length] = -advantages[i] * weight / length
    np.testing.assert_allclose(float(loss_sum), want_sum, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)


def test_sums_accumulate_over_microbatches():
    """Σ loss_sum / Σ denominator over two microbatches equals the one-batch loss."""
    logprobs, old, advantages, mask, ref = _inputs(seed=5)
    for loss_type in GRPO_LOSS_TYPES:

        def loss(rows, loss_type=loss_type):
            out = grpo_policy_loss(
                logprobs[rows],
                old[rows],
                advantages[rows],
                mask[rows],
                ref_logprobs=ref[rows],
                beta=0.1,
                loss_type=loss_type,
                max_completion_length=8,
            )
            return np.asarray(out.loss_sum), np.asarray(out.denominator)

        whole_sum, whole_denominator = loss(slice(None))
        first, second = loss(slice(0, 2)), loss(slice(2, None))
        np.testing.assert_allclose(
            (first[0] + second[0]) / (first[1] + second[1]),
            whole_sum / whole_denominator,
            rtol=1e-6,
        )
        if loss_type == "dr_grpo":
            assert float(whole_denominator) == len(LENGTHS) * 8


def test_at_old_policy_without_kl_is_minus_mean_advantage():
    logprobs, _, advantages, mask, _ = _inputs(seed=1)
    out = grpo_policy_loss(logprobs, logprobs, advantages, mask)
    nonempty = np.asarray(LENGTHS) > 0
    np.testing.assert_allclose(
        float(out.loss_sum), -np.sum(advantages[nonempty]), rtol=1e-5, atol=1e-6
    )
    assert float(out.stats["clip_ratio/region_mean"]) == 0.0


def test_rejects_unknown_options_and_missing_reference():
    logprobs, old, advantages, mask, _ = _inputs()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_policy_loss(logprobs, old, advantages, mask, loss_type="bnpo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_policy_loss(logprobs, old, advantages, mask, importance_sampling_level="seq")
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_policy_loss(logprobs, old, advantages, mask, beta=0.1)
