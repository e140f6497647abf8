"""RLHF with PPO: maximise r(x, y) − β·KL(π ‖ π_ref) (Ziegler et al. 2019; Ouyang et al. 2022).

Four models, one module family: the policy (trained), the reference (frozen copy), the reward model
(frozen scalar head; or, scored on the host, a judge `judge:<name>` or a Python reward function
`module:function` in TRL's signature, as GRPO takes them) and the critic (scalar head, trained,
initialised from the reward model or the policy). One iteration:

  1. sample responses for a batch of prompts (KV-cache sampler, jitted, fixed shapes);
  2. score: old log-probs (training forward), reference log-probs, values, reward at the last token;
  3. per-token reward −β·KL_t, plus the score (and a penalty if no EOS) at the last token;
  4. GAE(γ, λ) advantages and returns (Schulman et al. 2016), whitened;
  5. `ppo.num_epochs` passes over `ppo.num_minibatches` minibatches of the clipped surrogate,
     clipped value loss and entropy bonus (Schulman et al. 2017).

Sampling and host-side scoring are shared with GRPO (`jaxalign.rollout`); the loop, resume,
preemption, non-finite stop and logging are the engine's (`engine.run_training` with an iteration).
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

from jaxalign import advantages as adv
from jaxalign import rewards
from jaxalign import rollout as rl
from jaxalign import sharding as shd
from jaxalign.losses import kl_penalty, ppo_policy_loss, ppo_value_loss
from jaxalign.models import Transformer, sequence_token_logprobs
from jaxalign.models.moe import router_loss_terms
from jaxalign.optim import make_optimizer
from jaxalign.trainers import common, engine
from jaxalign.trainers.pairwise import sequence_scores
from jaxalign.trainers.setup import RunSetup, abstract_params, load_model, load_reference, setup_run

logger = logging.getLogger(__name__)


def score_rollout(
    policy: Transformer,
    critic: Transformer,
    reward_model: Transformer | None,
    params: dict[str, Any],
    ref_params: Any,
    reward_params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    prompt_len: int,
    temperature: float,
    chunk_size: int | None,
    reference_model: Transformer | None = None,
) -> dict[str, jax.Array]:
    """Old and reference log-probs, entropy and values of the response tokens, and RM scores.

    The reference runs `reference_model` (default: the policy's module; with LoRA, the base with
    adapters off) on `ref_params`."""
    logprobs, entropy = sequence_token_logprobs(
        policy,
        params["policy"],
        input_ids,
        attention_mask,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    ref_logprobs, _ = sequence_token_logprobs(
        policy if reference_model is None else reference_model,
        ref_params,
        input_ids,
        attention_mask,
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=False,
    )
    values = critic.apply({"params": params["critic"]}, input_ids, attention_mask)
    out = {
        "old_logprobs": rl.response_slice(logprobs, prompt_len),
        "ref_logprobs": rl.response_slice(ref_logprobs, prompt_len),
        "entropy": rl.response_slice(entropy, prompt_len),
        # V(s_t) is read at the token before response token t.
        "old_values": rl.response_slice(values, prompt_len, offset=-1),
    }
    if reward_model is not None:
        out["scores"] = sequence_scores(reward_model, reward_params, input_ids, attention_mask)
    return out


def compute_advantages(
    scored: dict[str, jax.Array],
    scores: jax.Array,
    response_mask: jax.Array,
    kl_coef: jax.Array,
    *,
    kl_estimator: str,
    gamma: float,
    lam: float,
    whiten_rewards: bool,
    whiten_advantages: bool,
) -> dict[str, jax.Array]:
    """Per-token rewards r_t = −β·KL_t + 1[t = last]·score, then GAE advantages and returns."""
    kl = (
        kl_penalty(scored["old_logprobs"], scored["ref_logprobs"], kind=kl_estimator)
        * response_mask
    )
    last = jnp.maximum(response_mask.sum(-1).astype(jnp.int32) - 1, 0)
    is_last = jax.nn.one_hot(last, response_mask.shape[1]) * response_mask
    rewards = -kl_coef * kl + is_last * scores[:, None]
    if whiten_rewards:
        rewards = adv.masked_whiten(rewards, response_mask, shift_mean=False)
    advantages, returns = adv.gae(
        rewards, scored["old_values"], response_mask, gamma=gamma, lam=lam
    )
    if whiten_advantages:
        advantages = adv.masked_whiten(advantages, response_mask)
    num_rows = response_mask.shape[0]
    return {
        "advantages": advantages,
        "returns": returns,
        "kl_sum": kl.sum(-1),  # sequence-level KL estimate per row
        "mean_kl": kl.sum() / num_rows,
        "mean_non_score_reward": (-kl_coef * kl).sum() / num_rows,
    }


def ppo_loss_fn(
    policy: Transformer,
    critic: Transformer,
    ppo_cfg: ml_collections.ConfigDict,
    *,
    prompt_len_of,
    chunk_size,
):
    """Clipped surrogate + value_coef·clipped value loss − entropy_coef·entropy, per response token."""

    def loss_fn(params, batch, frozen, rng):
        del frozen, rng
        prompt_len = prompt_len_of(batch)
        mask = batch["response_mask"]
        logprobs, entropy, policy_router = sequence_token_logprobs(
            policy,
            params["policy"],
            batch["input_ids"],
            batch["attention_mask"],
            temperature=ppo_cfg.temperature,
            chunk_size=chunk_size,
            return_router_stats=True,
        )
        logprobs = rl.response_slice(logprobs, prompt_len)
        entropy = rl.response_slice(entropy, prompt_len)
        values, critic_router = critic.apply(
            {"params": params["critic"]},
            batch["input_ids"],
            batch["attention_mask"],
            return_router_stats=True,
        )
        values = rl.response_slice(values, prompt_len, offset=-1)
        pg_sum, pg_stats = ppo_policy_loss(
            logprobs, batch["old_logprobs"], batch["advantages"], mask, clip_eps=ppo_cfg.clip_eps
        )
        vf_sum, vf_stats = ppo_value_loss(
            values, batch["old_values"], batch["returns"], mask, clip_eps=ppo_cfg.value_clip_eps
        )
        entropy_sum = (entropy * mask).sum()
        loss_sum = pg_sum + ppo_cfg.value_coef * vf_sum - ppo_cfg.entropy_coef * entropy_sum
        metrics = {
            "loss/policy": pg_sum,
            "loss/value": vf_sum,
            "policy/entropy": entropy_sum,
            "policy/clipfrac": pg_stats["clipfrac_sum"],
            "policy/approxkl": pg_stats["approxkl_sum"],
            "val/error": vf_stats["value_error_sum"],
            "val/clipfrac": vf_stats["value_clipfrac_sum"],
        }
        # Mixture-of-experts load balancing, for the policy and the critic (0 when dense).
        denominator = mask.sum()
        policy_aux, policy_metrics = router_loss_terms(policy.config, policy_router, denominator)
        critic_aux, critic_metrics = router_loss_terms(critic.config, critic_router, denominator)
        metrics.update(policy_metrics)
        metrics.update({f"critic/{name}": value for name, value in critic_metrics.items()})
        loss_sum = loss_sum + policy_aux + critic_aux
        return loss_sum, {"denominator": denominator, "metrics": metrics}

    return loss_fn


def load_reward(config: ml_collections.ConfigDict, setup: RunSetup):
    """(reward_model, reward_params, host_rewards): a frozen scalar-head model, or host-side
    reward functions (`jaxalign.rewards`: a judge or a TRL-signature Python function)."""
    spec = config.ppo.reward_model
    funcs = rewards.parse_reward_funcs(spec)
    if funcs[0].kind != "model":
        return None, None, funcs
    model, params, _ = load_model(
        config.model, setup.mesh, setup.rules, name_or_path=spec, head="scalar", seed=config.seed
    )
    return model, params, None


class KLCoefficient:
    """β of the KL penalty: fixed, or adapted towards `ppo.kl_target` (Ziegler et al. 2019)."""

    def __init__(self, ppo_cfg: ml_collections.ConfigDict):
        self.cfg = ppo_cfg
        self.state = adv.kl_controller_init(ppo_cfg.kl_coef)

    @property
    def beta(self) -> jax.Array:
        return self.state.beta

    def update(self, mean_kl: float, batch_size: int) -> None:
        if self.cfg.adaptive_kl:
            self.state = adv.kl_controller_update(
                self.state,
                mean_kl,
                batch_size,
                target=self.cfg.kl_target,
                horizon=self.cfg.kl_horizon,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"kl_coef": float(self.state.beta)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = adv.KLControllerState(beta=jnp.float32(state["kl_coef"]))


@dataclasses.dataclass
class PPOIteration:
    """`(state, prompt batch) -> (state, metrics)`: rollout → score → GAE → clipped updates.

    The engine loop calls it once per prompt batch; `kl_coef` is its checkpointed host state.
    """

    config: ml_collections.ConfigDict
    setup: RunSetup
    critic: Transformer
    ref_params: Any
    reward_model: Transformer | None
    reward_params: Any
    host_rewards: list[rewards.RewardFunction] | None  # judge / Python function, or None (RM)
    prompts: Any  # the prompt dataset (rows for the host reward functions)
    iterator: Any  # its batch iterator (which rows the current batch holds)
    update_step: Any  # jitted engine train step of `ppo_loss_fn`
    kl_coef: KLCoefficient
    frozen: Any = None  # what the step takes beside the state (LoRA: the frozen base)

    def __post_init__(self) -> None:
        ppo_cfg, mesh = self.config.ppo, self.setup.mesh
        self.sampling = rl.sampling_config(ppo_cfg, self.setup.tokenizer)
        self.updates_per_iteration = ppo_cfg.num_epochs * ppo_cfg.num_minibatches
        self.minibatch_size = self.config.train.batch_size // ppo_cfg.num_minibatches
        if self.minibatch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
            raise ValueError(
                f"config.ppo.num_minibatches: minibatches of {self.minibatch_size} rows do not "
                f"split over the data-parallel size {mesh.shape['data'] * mesh.shape['fsdp']}"
            )
        policy, critic, reward_model = self.setup.model, self.critic, self.reward_model
        chunk_size = self.config.model.logits_chunk_size or None
        self.score_fn = jax.jit(
            rl.microbatched(
                lambda params, ref, rm, prompt_len, seqs: score_rollout(
                    policy,
                    critic,
                    reward_model,
                    params,
                    ref,
                    rm,
                    *seqs,
                    prompt_len=prompt_len,
                    temperature=ppo_cfg.temperature,
                    chunk_size=chunk_size,
                    reference_model=self.setup.reference_model,
                ),
                self.config.optimizer.grad_accum_steps,
            ),
            static_argnums=(3,),
        )
        self.advantage_fn = jax.jit(
            lambda scored, scores, mask, kl_coef: compute_advantages(
                scored,
                scores,
                mask,
                kl_coef,
                kl_estimator=ppo_cfg.kl_estimator,
                gamma=ppo_cfg.gamma,
                lam=ppo_cfg.lam,
                whiten_rewards=ppo_cfg.whiten_rewards,
                whiten_advantages=ppo_cfg.whiten_advantages,
            )
        )
        self.take_rows = jax.jit(
            lambda tree, idx: jax.tree.map(lambda x: x[idx], tree),
            out_shardings=shd.batch_sharding(mesh),
        )

    def scores(self, rollout: rl.Rollout, scored: dict[str, jax.Array]) -> jax.Array:
        """`[B]` scores: the reward model's, or the host functions' of this process's rows."""
        if self.host_rewards is None:
            return scored["scores"]
        mesh = self.setup.mesh
        completions, completion_ids = rl.local_responses(self.setup.tokenizer, rollout, mesh)
        rows = [self.prompts.rows[i] for i in self.iterator.last_batch_indices]
        total, _ = rewards.score_completions(self.host_rewards, rows, completions, completion_ids)
        return shd.global_from_local(total, mesh)

    def __call__(self, state: engine.TrainState, local_prompts: dict[str, np.ndarray]):
        ppo_cfg, batch_size = self.config.ppo, self.config.train.batch_size
        index = int(jax.device_get(state.step)) // self.updates_per_iteration
        t0 = time.perf_counter()
        rollout = rl.sample_rollout(
            self.setup.model,
            self.setup.full_params(state.params["policy"]),
            shd.shard_batch(local_prompts, self.setup.mesh),
            rng=jax.random.fold_in(jax.random.PRNGKey(self.config.seed), index),
            sampling=self.sampling,
        )
        jax.block_until_ready(rollout.input_ids)
        t_rollout = time.perf_counter() - t0

        sequences = (rollout.input_ids, rollout.attention_mask)
        params = {**state.params, "policy": self.setup.full_params(state.params["policy"])}
        scored = self.score_fn(
            params, self.ref_params, self.reward_params, rollout.prompt_len, sequences
        )
        raw_scores = self.scores(rollout, scored)
        scores = raw_scores
        if ppo_cfg.missing_eos_penalty:
            scores = jnp.where(rollout.finished, scores, scores + ppo_cfg.missing_eos_penalty)
        advantages = self.advantage_fn(scored, scores, rollout.response_mask, self.kl_coef.beta)
        batch = {
            "input_ids": rollout.input_ids,
            "attention_mask": rollout.attention_mask,
            "response_mask": rollout.response_mask,
            "old_logprobs": scored["old_logprobs"],
            "old_values": scored["old_values"],
            "advantages": advantages["advantages"],
            "returns": advantages["returns"],
        }

        t1 = time.perf_counter()
        update_metrics = []
        epoch_rng = np.random.default_rng([self.config.seed, index])
        for _ in range(ppo_cfg.num_epochs):
            order = epoch_rng.permutation(batch_size)
            for start in range(0, batch_size, self.minibatch_size):
                rows = jnp.asarray(order[start : start + self.minibatch_size])
                minibatch = self.take_rows(batch, rows)
                state, metrics = self.update_step(state, minibatch, self.frozen)
                update_metrics.append(metrics)
        jax.block_until_ready(state.step)
        t_update = time.perf_counter() - t1

        mean_kl = float(advantages["mean_kl"])
        self.kl_coef.update(mean_kl, batch_size)
        updates = jax.device_get(update_metrics)
        mask = rollout.response_mask
        generated = float(mask.sum())
        metrics = {k: float(np.mean([m[k] for m in updates])) for k in updates[0]}
        metrics.update(
            {
                "objective/score": float(jnp.mean(raw_scores)),
                "objective/kl": mean_kl,
                "objective/entropy": float((scored["entropy"] * mask).sum() / mask.sum()),
                "objective/non_score_reward": float(advantages["mean_non_score_reward"]),
                "objective/kl_coef": float(self.kl_coef.beta),
                "response_length": generated / batch_size,
                "eos_rate": float(jnp.mean(rollout.finished.astype(jnp.float32))),
                "time/rollout_s": t_rollout,
                "time/update_s": t_update,
                "rollout_tokens_per_sec": generated / max(t_rollout, 1e-9),
                "update_tokens_per_sec": float((rollout.attention_mask != 0).sum())
                * ppo_cfg.num_epochs
                / max(t_update, 1e-9),
            }
        )
        return state, metrics


def train(config: ml_collections.ConfigDict, workdir: Path) -> engine.RunResult:
    ppo_cfg = config.ppo
    setup = setup_run(config)
    ref_params = load_reference(config, setup, ppo_cfg.reference_name_or_path)
    reward_model, reward_params, host_rewards = load_reward(config, setup)
    if ppo_cfg.critic_init == "reward" and host_rewards is not None:
        raise ValueError("config.ppo.critic_init='reward' needs a reward model, not a judge")
    critic_source = (
        ppo_cfg.reward_model if ppo_cfg.critic_init == "reward" else config.model.name_or_path
    )
    critic, critic_params, critic_shardings = load_model(
        config.model,
        setup.mesh,
        setup.rules,
        name_or_path=critic_source,
        head="scalar",
        seed=config.seed + 1,
    )
    prompts = common.prompt_dataset(config, setup.tokenizer)
    iterator = common.train_iterator(prompts, config)

    # One optimizer over both trained models; num_epochs × num_minibatches updates per iteration.
    updates = config.train.num_steps * ppo_cfg.num_epochs * ppo_cfg.num_minibatches
    tx, schedule = make_optimizer(config.optimizer, total_steps=updates)
    state, state_shardings = engine.create_train_state(
        {"policy": setup.params, "critic": critic_params},
        {"policy": setup.param_shardings, "critic": critic_shardings},
        {"policy": setup.boxed_params, "critic": abstract_params(critic)},
        tx,
        setup.mesh,
        setup.rules,
        seed=config.seed,
    )
    new_tokens = ppo_cfg.max_new_tokens
    loss_fn = ppo_loss_fn(
        setup.model,
        critic,
        ppo_cfg,
        prompt_len_of=lambda batch: batch["input_ids"].shape[1] - new_tokens,
        chunk_size=config.model.logits_chunk_size or None,
    )
    # LoRA: the policy's adapters train, its base rides beside the state (the critic trains fully).
    update_step, frozen, _ = engine.jitted_update_step(
        config, setup, loss_fn, tx, schedule, state_shardings, key="policy"
    )
    iteration = PPOIteration(
        config=config,
        setup=setup,
        critic=critic,
        ref_params=ref_params,
        reward_model=reward_model,
        reward_params=reward_params,
        host_rewards=host_rewards,
        prompts=prompts,
        iterator=iterator,
        update_step=update_step,
        kl_coef=KLCoefficient(ppo_cfg),
        frozen=frozen,
    )

    def export(params: Any, out_dir: Path) -> None:
        setup.exporter(config)(params["policy"], out_dir)
        common.exporter(critic, setup.tokenizer, config)(params["critic"], workdir / "hf_critic")

    return engine.run_training(
        config=config,
        workdir=workdir,
        mesh=setup.mesh,
        state=state,
        state_shardings=state_shardings,
        train_iterator=iterator,
        iteration=iteration,
        host_state=iteration.kl_coef,
        export=export,
    )
