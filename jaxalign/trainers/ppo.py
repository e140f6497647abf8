"""RLHF with PPO: maximise r(x, y) − β·KL(π ‖ π_ref) (Ziegler et al. 2019; Ouyang et al. 2022).

Four models, one module family: the policy (trained), the reference (frozen copy), the reward model
(frozen scalar head, or a Python judge `judge:<name>`) and the critic (scalar head, trained,
initialised from the reward model or the policy). One iteration:

  1. sample responses for a batch of prompts (KV-cache sampler, jitted, fixed shapes);
  2. score: old log-probs (training forward), reference log-probs, values, reward at the last token;
  3. per-token reward −β·KL_t, plus the score (and a penalty if no EOS) at the last token;
  4. GAE(γ, λ) advantages and returns (Schulman et al. 2016), whitened;
  5. `ppo.num_epochs` passes over `ppo.num_minibatches` minibatches of the clipped surrogate,
     clipped value loss and entropy bonus (Schulman et al. 2017).

Group-based critic-free methods (GRPO, RLOO) reuse steps 1–2 and 5 with a different advantage
function (`jaxalign.advantages.group_relative_advantages` / `rloo_advantages`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxalign import advantages as adv
from jaxalign import checkpoint as ckpt
from jaxalign import sharding as shd
from jaxalign.data import build_prompt_dataset
from jaxalign.judges import get_judge
from jaxalign.losses import kl_penalty, ppo_policy_loss, ppo_value_loss
from jaxalign.metrics import MetricWriter
from jaxalign.models import Transformer, sequence_token_logprobs
from jaxalign.optim import make_optimizer
from jaxalign.sampling import SamplingConfig, generate
from jaxalign.trainers import common, engine
from jaxalign.trainers.pairwise import sequence_scores

logger = logging.getLogger(__name__)


@flax.struct.dataclass
class Rollout:
    """One batch of experience; all `[B, P+N]` (sequence) or `[B, N]` (response) arrays."""

    input_ids: jax.Array  # [B, P+N] prompt (left-padded) + response (right-padded)
    attention_mask: jax.Array  # [B, P+N]
    response_mask: jax.Array  # [B, N] float, 1 up to and including EOS
    old_logprobs: jax.Array  # [B, N]
    old_values: jax.Array  # [B, N]
    advantages: jax.Array  # [B, N]
    returns: jax.Array  # [B, N]


def response_slice(x: jax.Array, prompt_len: int, offset: int = 0) -> jax.Array:
    """Columns of a `[B, P+N]` array that belong to the response (shifted by `offset`)."""
    return x[:, prompt_len + offset : x.shape[1] + offset]


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
) -> dict[str, jax.Array]:
    """Old and reference log-probs, entropy and values of the response tokens, and RM scores."""
    logprobs, entropy = sequence_token_logprobs(
        policy,
        params["policy"],
        input_ids,
        attention_mask,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    ref_logprobs, _ = sequence_token_logprobs(
        policy,
        ref_params,
        input_ids,
        attention_mask,
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=False,
    )
    values = critic.apply({"params": params["critic"]}, input_ids, attention_mask)
    out = {
        "old_logprobs": response_slice(logprobs, prompt_len),
        "ref_logprobs": response_slice(ref_logprobs, prompt_len),
        "entropy": response_slice(entropy, prompt_len),
        # V(s_t) is read at the token before response token t.
        "old_values": response_slice(values, prompt_len, offset=-1),
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
        logprobs, entropy = sequence_token_logprobs(
            policy,
            params["policy"],
            batch["input_ids"],
            batch["attention_mask"],
            temperature=ppo_cfg.temperature,
            chunk_size=chunk_size,
        )
        logprobs = response_slice(logprobs, prompt_len)
        entropy = response_slice(entropy, prompt_len)
        values = critic.apply(
            {"params": params["critic"]}, batch["input_ids"], batch["attention_mask"]
        )
        values = response_slice(values, prompt_len, offset=-1)
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
        return loss_sum, {"denominator": mask.sum(), "metrics": metrics}

    return loss_fn


def load_reward(config: ml_collections.ConfigDict, mesh, rules):
    """(reward_model, reward_params, judge): a frozen scalar-head model or a Python judge."""
    spec = config.ppo.reward_model
    if spec.startswith("judge:"):
        return None, None, get_judge(spec[len("judge:") :])
    model, params, _ = engine.load_model(
        config.model, mesh, rules, name_or_path=spec, head="scalar", seed=config.seed
    )
    return model, params, None


def _decode_responses(tokenizer, tokens: np.ndarray, response_mask: np.ndarray) -> list[str]:
    return [
        tokenizer.decode(row[: int(m.sum())], skip_special_tokens=True)
        for row, m in zip(tokens, response_mask, strict=True)
    ]


def train(config: ml_collections.ConfigDict, workdir: Path) -> engine.RunResult:
    ppo_cfg = config.ppo
    mesh = engine.make_mesh(config.mesh)
    rules = config.mesh.logical_rules
    chunk_size = config.model.logits_chunk_size or None

    policy, policy_params, policy_shardings = engine.load_model(
        config.model, mesh, rules, name_or_path=config.model.name_or_path, seed=config.seed
    )
    tokenizer = engine.load_run_tokenizer(config, policy)
    policy = engine.with_special_tokens(policy, tokenizer)
    if ppo_cfg.reference_name_or_path:
        _, ref_params, _ = engine.load_model(
            config.model, mesh, rules, name_or_path=ppo_cfg.reference_name_or_path
        )
    else:
        ref_params = jax.tree.map(jnp.copy, policy_params)
    reward_model, reward_params, judge = load_reward(config, mesh, rules)
    if ppo_cfg.critic_init == "reward":
        if judge is not None:
            raise ValueError("config.ppo.critic_init='reward' needs a reward model, not a judge")
        critic_source = ppo_cfg.reward_model
    else:
        critic_source = config.model.name_or_path
    critic, critic_params, critic_shardings = engine.load_model(
        config.model, mesh, rules, name_or_path=critic_source, head="scalar", seed=config.seed + 1
    )

    prompts = build_prompt_dataset(
        common.data_source(config.data.train),
        tokenizer,
        max_prompt_length=config.data.max_prompt_length,
        split=config.data.train_split,
        on_bad_row=config.data.on_bad_row,
        buckets=tuple(config.data.buckets),
    )
    logger.info("PPO prompts: %s", prompts.stats)
    iterator = common.train_iterator(prompts, config)

    eos_ids = [tokenizer.eos_token_id]
    if ppo_cfg.stop_token:
        stop_id = tokenizer.convert_tokens_to_ids(ppo_cfg.stop_token)
        if stop_id is None or stop_id == tokenizer.unk_token_id:
            raise ValueError(f"config.ppo.stop_token={ppo_cfg.stop_token!r} is not a single token")
        eos_ids.append(stop_id)
    sampling = SamplingConfig(
        max_new_tokens=ppo_cfg.max_new_tokens,
        temperature=ppo_cfg.temperature,
        top_k=ppo_cfg.top_k,
        top_p=ppo_cfg.top_p,
        eos_token_ids=tuple(eos_ids),
        pad_token_id=tokenizer.pad_token_id,
    )

    num_updates = config.train.num_steps * ppo_cfg.num_epochs * ppo_cfg.num_minibatches
    tx, schedule = make_optimizer(config.optimizer, total_steps=num_updates)
    params = {"policy": policy_params, "critic": critic_params}
    param_shardings = {"policy": policy_shardings, "critic": critic_shardings}
    boxed = {"policy": engine.abstract_params(policy), "critic": engine.abstract_params(critic)}
    state, state_shardings = engine.create_train_state(
        params, param_shardings, boxed, tx, mesh, rules, seed=config.seed
    )
    new_tokens = ppo_cfg.max_new_tokens
    loss_fn = ppo_loss_fn(
        policy,
        critic,
        ppo_cfg,
        prompt_len_of=lambda batch: batch["input_ids"].shape[1] - new_tokens,
        chunk_size=chunk_size,
    )
    update_step = engine.jit_train_step(
        engine.make_train_step(
            loss_fn, tx, grad_accum_steps=config.optimizer.grad_accum_steps, schedule=schedule
        ),
        state_shardings,
        mesh,
        None,
    )
    batch_sharding = shd.batch_sharding(mesh)
    score_fn = jax.jit(
        lambda params, ref, rm, ids, mask, prompt_len: score_rollout(
            policy,
            critic,
            reward_model,
            params,
            ref,
            rm,
            ids,
            mask,
            prompt_len=prompt_len,
            temperature=ppo_cfg.temperature,
            chunk_size=chunk_size,
        ),
        static_argnums=(5,),
    )
    advantage_fn = jax.jit(
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
    take_rows = jax.jit(
        lambda tree, idx: jax.tree.map(lambda x: x[idx], tree), out_shardings=batch_sharding
    )

    minibatch_size = config.train.batch_size // ppo_cfg.num_minibatches
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if minibatch_size % data_parallel:
        raise ValueError(
            f"config.ppo.num_minibatches: minibatches of {minibatch_size} rows do not split over "
            f"the data-parallel size {data_parallel}"
        )

    checkpointer = ckpt.Checkpointer(
        workdir / "checkpoints",
        save_every=config.train.checkpoint_every,
        keep=config.train.keep_checkpoints,
        async_save=config.train.async_checkpoint,
    )
    config_json = json.loads(config.to_json_best_effort())
    kl_state = adv.kl_controller_init(ppo_cfg.kl_coef)
    iteration = 0
    latest = checkpointer.latest_step()
    if latest is not None:
        restored = checkpointer.restore(
            latest, abstract_state=ckpt.abstract_with_shardings(state, state_shardings)
        )
        state = restored.state
        iterator.load_state_dict(restored.data_state["iterator"])
        kl_state = adv.KLControllerState(beta=jnp.float32(restored.data_state["kl_coef"]))
        iteration = latest
        logger.info("resumed PPO from iteration %d", latest)
    elif jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(config_json, indent=2))

    writer = MetricWriter(workdir, total_steps=config.train.num_steps)
    preemption = ckpt.install_preemption_handler()
    last_metrics: dict[str, float] = {}
    stopped_early = None
    base_rng = jax.random.PRNGKey(config.seed)
    try:
        while iteration < config.train.num_steps:
            t0 = time.perf_counter()
            local_prompts = next(iterator)
            prompt_texts = [prompts.texts[i] for i in iterator.last_batch_indices]
            batch = shd.shard_batch(local_prompts, mesh)
            prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
            prompt_len = prompt_ids.shape[1]
            gen = generate(
                policy,
                state.params["policy"],
                prompt_ids,
                prompt_mask,
                rng=jax.random.fold_in(base_rng, iteration),
                config=sampling,
            )
            response_mask = gen.response_mask.astype(jnp.float32)
            input_ids = jnp.concatenate([prompt_ids, gen.tokens], axis=1)
            attention_mask = jnp.concatenate(
                [(prompt_mask != 0).astype(jnp.int32), gen.response_mask.astype(jnp.int32)], axis=1
            )
            jax.block_until_ready(gen.tokens)
            t_rollout = time.perf_counter() - t0

            scored = score_fn(
                state.params, ref_params, reward_params, input_ids, attention_mask, prompt_len
            )
            if judge is not None:
                host_tokens, host_mask = jax.device_get((gen.tokens, gen.response_mask))
                responses = _decode_responses(tokenizer, host_tokens, host_mask)
                scores = jnp.asarray(judge(prompt_texts, responses), jnp.float32)
            else:
                scores = scored["scores"]
            raw_scores = scores
            if ppo_cfg.missing_eos_penalty:
                scores = jnp.where(gen.finished, scores, scores + ppo_cfg.missing_eos_penalty)
            advantages = advantage_fn(scored, scores, response_mask, kl_state.beta)
            rollout = Rollout(
                input_ids=input_ids,
                attention_mask=attention_mask,
                response_mask=response_mask,
                old_logprobs=scored["old_logprobs"],
                old_values=scored["old_values"],
                advantages=advantages["advantages"],
                returns=advantages["returns"],
            )
            rollout_batch = flax.serialization.to_state_dict(rollout)
            t1 = time.perf_counter()
            update_metrics = []
            epoch_rng = np.random.default_rng([config.seed, iteration])
            for _ in range(ppo_cfg.num_epochs):
                order = epoch_rng.permutation(config.train.batch_size)
                for start in range(0, config.train.batch_size, minibatch_size):
                    rows = jnp.asarray(order[start : start + minibatch_size])
                    state, metrics = update_step(state, take_rows(rollout_batch, rows), None)
                    update_metrics.append(metrics)
            jax.block_until_ready(state.step)
            t_update = time.perf_counter() - t1

            mean_kl = float(advantages["mean_kl"])
            if ppo_cfg.adaptive_kl:
                kl_state = adv.kl_controller_update(
                    kl_state,
                    mean_kl,
                    config.train.batch_size,
                    target=ppo_cfg.kl_target,
                    horizon=ppo_cfg.kl_horizon,
                )
            iteration += 1
            if iteration % config.train.log_every == 0 or iteration == config.train.num_steps:
                updates = jax.device_get(update_metrics)
                last_metrics = {k: float(np.mean([m[k] for m in updates])) for k in updates[0]}
                generated = float(jax.device_get(response_mask.sum()))
                sequence_tokens = float(jax.device_get((attention_mask != 0).sum()))
                last_metrics.update(
                    {
                        "objective/score": float(jnp.mean(raw_scores)),
                        "objective/kl": mean_kl,
                        "objective/entropy": float(
                            (scored["entropy"] * response_mask).sum() / response_mask.sum()
                        ),
                        "objective/non_score_reward": float(advantages["mean_non_score_reward"]),
                        "objective/kl_coef": float(kl_state.beta),
                        "response_length": generated / config.train.batch_size,
                        "eos_rate": float(jnp.mean(gen.finished.astype(jnp.float32))),
                        "time/rollout_s": t_rollout,
                        "time/update_s": t_update,
                        "rollout_tokens_per_s": generated / max(t_rollout, 1e-9),
                        "update_tokens_per_s": sequence_tokens
                        * ppo_cfg.num_epochs
                        / max(t_update, 1e-9),
                    }
                )
                writer.write(iteration, last_metrics)
            if preemption.should_stop(iteration):
                stopped_early = "preemption signal"
            data_state = {"iterator": iterator.state_dict(), "kl_coef": float(kl_state.beta)}
            checkpointer.save(
                iteration,
                state=state,
                data_state=data_state,
                config=config_json,
                force=bool(stopped_early) or iteration == config.train.num_steps,
            )
            if stopped_early:
                break
    finally:
        checkpointer.wait_until_finished()
        checkpointer.close()
        preemption.uninstall()
        writer.close()

    export_dir = None
    if config.train.export_hf and not stopped_early:
        export_dir = workdir / "hf"
        common.exporter(policy, tokenizer)(state.params["policy"], export_dir)
        common.exporter(critic, tokenizer)(state.params["critic"], workdir / "hf_critic")
    return engine.RunResult(
        state=state,
        last_metrics=last_metrics,
        eval_metrics={},
        checkpoint_dir=workdir / "checkpoints",
        export_dir=export_dir,
        stopped_early=stopped_early,
    )
