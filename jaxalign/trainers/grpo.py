"""Critic-free online RL: GRPO and its variants (Dr. GRPO, DAPO, GSPO, RLOO) on the shared engine.

One iteration (`engine.run_training` calls it once per prompt batch):

  1. sample G completions of each prompt, each prompt prefilled once (`rollout.sample_rollout`);
  2. score them with the reward functions (TRL's signature, judges, reward models), weighted and
     summed (`jaxalign.rewards`), on the host rows each process owns;
  3. outcome advantages: group-normalised (Shao et al. 2024, DeepSeekMath eq. 3) or leave-one-out
     (RLOO, Ahmadian et al. 2024), scaled by the group's, the batch's or no std (Dr. GRPO);
     DAPO's dynamic sampling drops (masks) groups whose rewards are all equal;
  4. `grpo.num_iterations` updates of the clipped surrogate (`losses.grpo_policy_loss`: token- or
     sequence-level ratios, asymmetric clipping, the `grpo` / `dr_grpo` / `dapo` aggregations)
     with β·k3 KL to the reference when `grpo.beta > 0` (β = 0 loads no reference at all).

There is no critic and no second loop: resume, preemption, the non-finite stop and logging are the
engine's; metrics carry TRL's names (`reward`, `reward_std`, `rewards/<f>/mean`, `kl`, …).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxalign import advantages as adv
from jaxalign import rewards
from jaxalign import rollout as rl
from jaxalign import sharding as shd
from jaxalign.losses import grpo_policy_loss
from jaxalign.models import Transformer, sequence_token_logprobs
from jaxalign.models.moe import router_loss_terms
from jaxalign.optim import make_optimizer
from jaxalign.trainers import common, engine
from jaxalign.trainers.pairwise import sequence_scores
from jaxalign.trainers.setup import RunSetup, load_model, load_reference, setup_run

logger = logging.getLogger(__name__)


def grpo_loss_fn(
    policy: Transformer, grpo_cfg: ml_collections.ConfigDict, *, chunk_size: int | None
):
    """The GRPO-family loss on a rollout batch (sum and denominator, see `grpo_policy_loss`).

    Batch: `input_ids`/`attention_mask` `[R, P+N]`, `loss_mask` `[R, N]`, `advantages` `[R]`,
    and `old_logprobs` (only when `num_iterations > 1`; otherwise the sampling policy *is* the
    current one and the ratio is `π / sg(π)`, TRL's shortcut) and `ref_logprobs` (only if β > 0).
    """
    new_tokens = grpo_cfg.max_new_tokens

    def loss_fn(params, batch, frozen, rng):
        del frozen, rng
        prompt_len = batch["input_ids"].shape[1] - new_tokens
        logprobs, entropy, router_stats = sequence_token_logprobs(
            policy,
            params,
            batch["input_ids"],
            batch["attention_mask"],
            temperature=grpo_cfg.temperature,
            chunk_size=chunk_size,
            return_router_stats=True,
        )
        logprobs = rl.response_slice(logprobs, prompt_len)
        entropy = rl.response_slice(entropy, prompt_len)
        mask = batch["loss_mask"]
        out = grpo_policy_loss(
            logprobs,
            batch.get("old_logprobs", jax.lax.stop_gradient(logprobs)),
            batch["advantages"],
            mask,
            ref_logprobs=batch.get("ref_logprobs"),
            beta=grpo_cfg.beta,
            epsilon_low=grpo_cfg.epsilon_low,
            epsilon_high=grpo_cfg.epsilon_high,
            loss_type=grpo_cfg.loss_type,
            importance_sampling_level=grpo_cfg.importance_sampling_level,
            max_completion_length=new_tokens,
        )
        tokens, clipped = out.stats["token_count"], out.stats["clip_count"]
        weighted = {
            "entropy": ((entropy * mask).sum(), tokens),
            "kl": (out.stats["kl"], tokens),
            **{
                name: (out.stats[name], clipped)
                for name in (
                    "clip_ratio/low_mean",
                    "clip_ratio/high_mean",
                    "clip_ratio/region_mean",
                )
            },
        }
        router_loss, router_metrics = router_loss_terms(
            policy.config, router_stats, out.denominator
        )
        return out.loss_sum + router_loss, {
            "denominator": out.denominator,
            "metrics": router_metrics,
            "weighted": weighted,
        }

    return loss_fn


def rollout_logprobs(
    policy: Transformer,
    reference: Transformer,
    params: Any,
    ref_params: Any,
    prompt_len: int,
    sequences: tuple[jax.Array, jax.Array],
    *,
    temperature: float,
    chunk_size: int | None,
) -> dict[str, jax.Array]:
    """Response log-probs under the sampling policy (`params`) and/or the reference, `[R, N]`."""
    out = {}
    for name, model, p in (
        ("old_logprobs", policy, params),
        ("ref_logprobs", reference, ref_params),
    ):
        if p is not None:
            logprobs, _ = sequence_token_logprobs(
                model,
                p,
                *sequences,
                temperature=temperature,
                chunk_size=chunk_size,
                with_entropy=False,
            )
            out[name] = rl.response_slice(logprobs, prompt_len)
    return out


@dataclasses.dataclass
class GRPOIteration:
    """`(state, prompt batch) -> (state, metrics)`: sample G per prompt → rewards → group
    advantages (→ DAPO dynamic sampling) → `grpo.num_iterations` clipped updates."""

    config: ml_collections.ConfigDict
    setup: RunSetup
    ref_params: Any  # None when β = 0
    reward_funcs: list[rewards.RewardFunction]
    reward_models: dict[str, tuple[Transformer, Any]]  # name -> (scalar-head model, params)
    prompts: Any  # the prompt dataset (rows and their extra columns for the reward functions)
    iterator: Any  # its batch iterator (which rows the current batch holds)
    update_step: Any  # jitted engine train step of `grpo_loss_fn`
    frozen: Any = None  # what the step takes beside the state (LoRA: the frozen base)

    def __post_init__(self) -> None:
        cfg, policy = self.config.grpo, self.setup.model
        accum = self.config.optimizer.grad_accum_steps
        chunk_size = self.config.model.logits_chunk_size or None
        group_size = cfg.num_generations
        self.sampling = rl.sampling_config(cfg, self.setup.tokenizer)
        self.logprobs_fn = jax.jit(
            rl.microbatched(
                lambda params, ref, prompt_len, seqs: rollout_logprobs(
                    policy,
                    self.setup.reference_model,
                    params,
                    ref,
                    prompt_len,
                    seqs,
                    temperature=cfg.temperature,
                    chunk_size=chunk_size,
                ),
                accum,
            ),
            static_argnums=(2,),
        )
        self.reward_model_fns = {
            name: jax.jit(
                rl.microbatched(lambda p, seqs, m=model: sequence_scores(m, p, *seqs), accum)
            )
            for name, (model, _) in self.reward_models.items()
        }
        self.advantage_fn = jax.jit(
            lambda r: adv.grpo_advantages(
                r, group_size, estimator=cfg.advantage_estimator, scale_rewards=cfg.scale_rewards
            )
        )
        self.equal_groups_fn = jax.jit(lambda r: adv.groups_with_equal_rewards(r, group_size))

    def sample_and_score(self, state: engine.TrainState, local_prompts, key):
        """One prompt batch → (rollout, this process's rewards `[r]`, per function `[r, F]`)."""
        mesh, group_size = self.setup.mesh, self.config.grpo.num_generations
        rollout = rl.sample_rollout(
            self.setup.model,
            self.setup.full_params(state.params),
            shd.shard_batch(local_prompts, mesh),
            rng=key,
            sampling=self.sampling,
            num_generations=group_size,
        )
        completions, completion_ids = rl.local_responses(self.setup.tokenizer, rollout, mesh)
        rows = [
            self.prompts.rows[i]
            for i in self.iterator.last_batch_indices
            for _ in range(group_size)
        ]
        sequences = (rollout.input_ids, rollout.attention_mask)
        model_scores = {
            name: shd.local_rows(fn(self.reward_models[name][1], sequences), mesh)
            for name, fn in self.reward_model_fns.items()
        }
        total, per_func = rewards.score_completions(
            self.reward_funcs, rows, completions, completion_ids, model_scores=model_scores
        )
        return rollout, total, per_func

    def refill(self, state, rollout, local_rewards, key, dropped: int):
        """DAPO dynamic sampling: sample up to `max_refill_batches` more prompt batches and put
        groups with reward variance in place of all-equal ones (per process, fixed shapes)."""
        mesh, refills = self.setup.mesh, 0
        pool = [(rollout, local_rewards)]
        while dropped and refills < self.config.grpo.max_refill_batches:
            refills += 1
            local_prompts = next(self.iterator)
            extra, extra_rewards, _ = self.sample_and_score(
                state, local_prompts, jax.random.fold_in(key, refills)
            )
            pool.append((extra, extra_rewards))
            dropped = int(self.equal_groups_fn(shd.global_from_local(extra_rewards, mesh)).sum())
        if refills == 0:
            return rollout, local_rewards, 0
        group_size = self.config.grpo.num_generations
        return (*select_varied_groups(pool, group_size, mesh), refills)

    def __call__(self, state: engine.TrainState, local_prompts: dict[str, np.ndarray]):
        cfg, mesh = self.config.grpo, self.setup.mesh
        index = int(jax.device_get(state.step)) // cfg.num_iterations
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), index)
        t0 = time.perf_counter()
        rollout, local_rewards, per_func = self.sample_and_score(state, local_prompts, key)
        sampled_rewards = local_rewards
        dropped = int(self.equal_groups_fn(shd.global_from_local(local_rewards, mesh)).sum())
        refills = 0
        if cfg.dynamic_sampling:
            rollout, local_rewards, refills = self.refill(
                state, rollout, local_rewards, key, dropped
            )
        t_rollout = time.perf_counter() - t0

        t1 = time.perf_counter()
        reward = shd.global_from_local(local_rewards, mesh)
        loss_mask = rollout.response_mask
        if cfg.mask_truncated_completions:
            loss_mask = loss_mask * rollout.finished[:, None]
        if cfg.dynamic_sampling:
            keep = ~jnp.repeat(self.equal_groups_fn(reward), cfg.num_generations)
            loss_mask = loss_mask * keep[:, None]
        old_policy = self.setup.full_params(state.params) if cfg.num_iterations > 1 else None
        batch = {
            "input_ids": rollout.input_ids,
            "attention_mask": rollout.attention_mask,
            "loss_mask": loss_mask,
            "advantages": self.advantage_fn(reward),
            **self.logprobs_fn(
                old_policy,
                self.ref_params,
                rollout.prompt_len,
                (rollout.input_ids, rollout.attention_mask),
            ),
        }
        update_metrics = []
        for _ in range(cfg.num_iterations):
            state, metrics = self.update_step(state, batch, self.frozen)
            update_metrics.append(metrics)
        jax.block_until_ready(state.step)
        t_update = time.perf_counter() - t1

        updates = jax.device_get(update_metrics)
        metrics = {k: float(np.mean([m[k] for m in updates])) for k in updates[0]}
        lengths = rollout.response_mask.sum(-1)
        generated = float(lengths.sum())
        all_rewards, all_per_func = _gather_rows((sampled_rewards, per_func))
        metrics.update(
            {
                **rewards.reward_metrics(self.reward_funcs, all_rewards, all_per_func),
                "frac_reward_zero_std": dropped / (len(all_rewards) // cfg.num_generations),
                "completions/mean_length": float(lengths.mean()),
                "completions/clipped_ratio": float(1.0 - rollout.finished.mean()),
                "time/rollout_s": t_rollout,
                "time/update_s": t_update,
                "rollout_tokens_per_sec": generated / max(t_rollout, 1e-9),
                "update_tokens_per_sec": float((rollout.attention_mask != 0).sum())
                * cfg.num_iterations
                / max(t_update, 1e-9),
            }
        )
        if cfg.dynamic_sampling:
            metrics["dynamic_sampling/dropped_groups"] = dropped
            metrics["dynamic_sampling/refill_batches"] = refills
        return state, metrics


def train(config: ml_collections.ConfigDict, workdir: Path) -> engine.RunResult:
    grpo_cfg = config.grpo
    setup = setup_run(config)
    # β = 0: no reference params exist at all (not even a copy).
    ref_params = (
        load_reference(config, setup, grpo_cfg.reference_name_or_path) if grpo_cfg.beta else None
    )
    reward_funcs = rewards.parse_reward_funcs(grpo_cfg.reward_funcs, grpo_cfg.reward_weights)
    reward_models = {
        func.name: load_model(
            config.model,
            setup.mesh,
            setup.rules,
            name_or_path=func.path,
            head="scalar",
            seed=config.seed,
        )[:2]
        for func in reward_funcs
        if func.kind == "model"
    }
    prompts = common.prompt_dataset(config, setup.tokenizer)
    iterator = common.train_iterator(prompts, config)

    updates = config.train.num_steps * grpo_cfg.num_iterations
    tx, schedule = make_optimizer(config.optimizer, total_steps=updates)
    state, state_shardings = engine.create_train_state(
        setup.params,
        setup.param_shardings,
        setup.boxed_params,
        tx,
        setup.mesh,
        setup.rules,
        seed=config.seed,
    )
    loss_fn = grpo_loss_fn(setup.model, grpo_cfg, chunk_size=config.model.logits_chunk_size or None)
    update_step, frozen, _ = engine.jitted_update_step(
        config, setup, loss_fn, tx, schedule, state_shardings
    )
    iteration = GRPOIteration(
        config=config,
        setup=setup,
        ref_params=ref_params,
        reward_funcs=reward_funcs,
        reward_models=reward_models,
        prompts=prompts,
        iterator=iterator,
        update_step=update_step,
        frozen=frozen,
    )
    return engine.run_training(
        config=config,
        workdir=workdir,
        mesh=setup.mesh,
        state=state,
        state_shardings=state_shardings,
        train_iterator=iterator,
        iteration=iteration,
        export=setup.exporter(config),
    )


def _left_pad(rollout: rl.Rollout, prompt_len: int) -> rl.Rollout:
    pad = ((0, 0), (prompt_len - rollout.prompt_len, 0))
    return rollout.replace(
        input_ids=np.pad(rollout.input_ids, pad),
        attention_mask=np.pad(rollout.attention_mask, pad),
        prompt_len=prompt_len,
    )


def _gather_rows(tree: Any) -> Any:
    """Every process's host rows, concatenated in process order (metrics over the global batch)."""
    if jax.process_count() == 1:
        return tree
    gathered = multihost_utils.process_allgather(tree)
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), gathered)


def select_varied_groups(
    pool: list[tuple[rl.Rollout, np.ndarray]], group_size: int, mesh: Any
) -> tuple[rl.Rollout, np.ndarray]:
    """The first batch's worth of this process's groups, those with reward variance first.

    Each process picks among its own rows (no cross-host exchange); groups still all-equal after
    the refill stay in the batch and are masked out of the loss.
    """
    rollouts = [shd.local_rows(r, mesh) for r, _ in pool]
    host_rewards = [np.asarray(r) for _, r in pool]
    # Prompt batches may fall in different length buckets: left-pad every one to the longest
    # (masked; positions come from the attention mask, so the model sees the same sequences).
    prompt_len = max(r.prompt_len for r in rollouts)
    rollouts = [_left_pad(r, prompt_len) for r in rollouts]
    num_groups = len(host_rewards[0]) // group_size
    candidates = []
    for which, r in enumerate(host_rewards):
        grouped = r.reshape(-1, group_size)
        varied = ~np.all(np.isclose(grouped, grouped[:, :1]), axis=1)
        candidates += [(not v, which, g) for g, v in enumerate(varied)]
    chosen = sorted(candidates, key=lambda c: c[0])[:num_groups]  # stable: varied first, in order
    rows = lambda which, g: slice(g * group_size, (g + 1) * group_size)  # noqa: E731
    take = lambda pick: np.concatenate([pick(w, rows(w, g)) for _, w, g in chosen])  # noqa: E731
    selected = rl.Rollout(
        input_ids=take(lambda w, s: rollouts[w].input_ids[s]),
        attention_mask=take(lambda w, s: rollouts[w].attention_mask[s]),
        response_mask=take(lambda w, s: rollouts[w].response_mask[s]),
        finished=take(lambda w, s: rollouts[w].finished[s]),
        prompt_len=prompt_len,
    )
    return shd.global_from_local(selected, mesh), take(lambda w, s: host_rewards[w][s])
