"""GRPO / RLOO advantages with group, batch or no reward scaling, against plain Python."""

import itertools
import math

import jax
import numpy as np
import pytest

from jaxalign.advantages import (
    ADVANTAGE_ESTIMATORS,
    SCALE_REWARDS,
    group_relative_advantages,
    groups_with_equal_rewards,
    grpo_advantages,
    rloo_advantages,
)

GROUP_SIZE = 4
# Three prompts × 4 completions: a spread group, an all-equal group (no signal), and a group
# with one unscorable completion (NaN: every reward function returned None).
REWARDS = [1.0, 0.0, 0.5, 3.0, 2.0, 2.0, 2.0, 2.0, 0.25, math.nan, 1.0, -0.5]


def _std(values):
    """Unbiased std of the non-NaN values; NaN with fewer than two."""
    values = [v for v in values if not math.isnan(v)]
    if len(values) < 2:
        return math.nan
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _reference(rewards, group_size, estimator, scale_rewards, eps=1e-4):
    batch_std = _std(rewards)
    advantages = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        scorable = [r for r in group if not math.isnan(r)]
        for reward in group:
            if math.isnan(reward):
                advantages.append(0.0)
                continue
            if estimator == "grpo":
                baseline = sum(scorable) / len(scorable)
            else:
                others = list(scorable)
                others.remove(reward)
                baseline = sum(others) / len(others) if others else math.nan
            scale = {"group": _std(group) + eps, "batch": batch_std + eps, "none": 1.0}
            advantage = (reward - baseline) / scale[scale_rewards]
            advantages.append(0.0 if math.isnan(advantage) else advantage)
    return advantages


@pytest.mark.parametrize(
    "estimator,scale_rewards", list(itertools.product(ADVANTAGE_ESTIMATORS, SCALE_REWARDS))
)
def test_matches_plain_python(estimator, scale_rewards):
    rng = np.random.default_rng(0)
    random_rewards = list(rng.normal(size=4 * GROUP_SIZE))
    for rewards in (REWARDS, random_rewards):
        got = jax.jit(
            lambda r, e=estimator, s=scale_rewards: grpo_advantages(
                r, GROUP_SIZE, estimator=e, scale_rewards=s
            )
        )(np.asarray(rewards, np.float32))
        want = _reference(rewards, GROUP_SIZE, estimator, scale_rewards)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_equal_rewards_and_unscorable_rows_get_zero():
    for estimator, scale_rewards in itertools.product(ADVANTAGE_ESTIMATORS, SCALE_REWARDS):
        got = np.asarray(
            grpo_advantages(REWARDS, GROUP_SIZE, estimator=estimator, scale_rewards=scale_rewards)
        )
        np.testing.assert_array_equal(got[4:8], 0.0)  # the all-equal group
        assert got[9] == 0.0  # the unscorable row
        assert np.all(np.isfinite(got))


def test_agrees_with_existing_estimators_without_nan():
    rewards = np.random.default_rng(1).normal(size=3 * GROUP_SIZE).astype(np.float32)
    np.testing.assert_allclose(
        grpo_advantages(rewards, GROUP_SIZE, estimator="rloo", scale_rewards="none"),
        rloo_advantages(rewards, GROUP_SIZE),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        grpo_advantages(rewards, GROUP_SIZE, scale_rewards="none"),
        group_relative_advantages(rewards, GROUP_SIZE, normalize_std=False),
        rtol=1e-5,
        atol=1e-7,
    )
    np.testing.assert_allclose(
        grpo_advantages(rewards, GROUP_SIZE, eps=1e-6),
        group_relative_advantages(rewards, GROUP_SIZE),
        rtol=1e-5,
    )


def test_groups_with_equal_rewards():
    rewards = REWARDS + [math.nan] * GROUP_SIZE + [1.0, math.nan, 1.0, 1.0]
    got = jax.jit(lambda r: groups_with_equal_rewards(r, GROUP_SIZE))(np.asarray(rewards))
    np.testing.assert_array_equal(got, [False, True, False, True, True])


def test_rejects_bad_options_and_shapes():
    with pytest.raises(ValueError, match="estimator"):
        grpo_advantages(REWARDS, GROUP_SIZE, estimator="ppo")
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_advantages(REWARDS, GROUP_SIZE, scale_rewards="std")
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(REWARDS, 5)
