"""The offline main job: controlled-sentiment RLHF vs DPO on a tiny model (Rafailov et al. 2023 §6.1).

    python -m jaxalign.demo                                   # full demo, ~4 min on 2 CPU cores
    python -m jaxalign.demo --config=configs/demo.py:quick    # smoke run, ~2-3 min
    python -m jaxalign.demo --workdir=runs/demo --config.dpo_betas='(0.1,)'

Stages: corpus + BPE tokenizer → SFT (the reference) → preference pairs sampled from SFT and labelled
by the VADER judge → reward model → PPO (RM reward) and PPO-GT (judge reward) → GRPO (judge reward,
no critic) → DPO for several β → evaluation (judge reward vs KL to the reference) → summary.json, report.md, reward_vs_kl.png.
"""

import ml_collections

from jaxalign.config import base_config


def _stage(algorithm: str) -> ml_collections.ConfigDict:
    config = base_config()
    config.algorithm = algorithm
    config.model.init.vocab_size = 512
    config.model.init.hidden_size = 96
    config.model.init.intermediate_size = 256
    config.model.init.num_layers = 3
    config.model.init.num_heads = 4
    config.model.init.num_kv_heads = 2
    config.model.init.head_dim = 24
    config.data.max_length = 64
    config.data.max_prompt_length = 16
    config.data.buckets = (16, 32, 64)
    config.optimizer.warmup_steps = 10
    config.train.log_every = 10
    config.train.checkpoint_every = 1000
    config.train.keep_checkpoints = 1
    return config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """`arg`: "" (full demo), "quick" (smoke run) or "test" (the CI test: seconds per stage)."""
    if arg not in ("", "quick", "test"):
        raise ValueError(f"configs/demo.py takes '', 'quick' or 'test', got {arg!r}")
    quick = arg in ("quick", "test")
    c = ml_collections.ConfigDict()
    c.workdir = ""  # default: runs/demo-<time>
    c.seed = 0
    c.num_reviews = 1500 if quick else 6000
    c.tokenizer_vocab_size = 512
    c.num_train_prompts = 128 if quick else 768
    c.num_eval_prompts = 32 if quick else 128

    c.sft = _stage("sft")
    c.sft.optimizer.learning_rate = 3e-3
    c.sft.train.batch_size = 32
    c.sft.train.num_steps = 60 if quick else 500

    # Preference pairs: two samples per held-in prompt from the SFT model, labelled by the judge.
    c.preferences = ml_collections.ConfigDict()
    c.preferences.max_new_tokens = 24
    c.preferences.min_score_gap = 0.05  # drop near-ties
    c.preferences.eval_fraction = 0.15  # pairs held out for reward-model accuracy

    c.reward = _stage("reward")
    c.reward.optimizer.learning_rate = 1e-3
    c.reward.reward.center_coef = 0.01
    c.reward.train.batch_size = 32
    c.reward.train.num_steps = 30 if quick else 150

    c.ppo = _stage("ppo")
    c.ppo.ppo.max_new_tokens = 24
    c.ppo.ppo.kl_coef = 0.05
    c.ppo.ppo.num_epochs = 2
    c.ppo.ppo.num_minibatches = 2
    c.ppo.ppo.missing_eos_penalty = -0.5
    c.ppo.optimizer.learning_rate = 2e-4
    c.ppo.optimizer.schedule = "constant"
    c.ppo.train.batch_size = 64
    c.ppo.train.num_steps = 8 if quick else 60
    c.ppo.train.log_every = 2

    # GRPO with the judge as reward: no critic, no reward model; β·KL to the SFT reference.
    c.grpo = _stage("grpo")
    c.grpo.grpo.reward_funcs = "judge:vader"
    c.grpo.grpo.num_generations = 8
    c.grpo.grpo.max_new_tokens = 24
    c.grpo.grpo.beta = 0.05
    c.grpo.optimizer.learning_rate = 2e-4
    c.grpo.optimizer.schedule = "constant"
    c.grpo.optimizer.warmup_steps = 2
    c.grpo.train.batch_size = 16
    c.grpo.train.num_steps = 8 if quick else 60
    c.grpo.train.log_every = 2

    c.dpo = _stage("dpo")
    c.dpo.optimizer.learning_rate = 1e-4
    c.dpo.train.batch_size = 32
    c.dpo.train.num_steps = 20 if quick else 120
    c.dpo_betas = (0.1,) if quick else (0.05, 0.1, 0.5)

    c.eval = ml_collections.ConfigDict()
    c.eval.samples_per_prompt = 2 if quick else 4
    c.eval.max_new_tokens = 24
    c.eval.num_examples = 3
    if arg == "test":
        c.num_reviews, c.num_train_prompts, c.num_eval_prompts = 600, 64, 16
        c.sft.train.num_steps = 20
        c.reward.train.num_steps = 4
        c.ppo.train.num_steps = 2
        c.ppo.train.batch_size = 32
        c.grpo.train.num_steps = 2
        c.grpo.train.batch_size = 8
        c.dpo.train.num_steps = 4
        c.dpo.train.batch_size = 16
        c.reward.train.batch_size = 16
        c.preferences.min_score_gap = 0.0
        c.preferences.eval_fraction = 0.25
        c.eval.samples_per_prompt = 1
        for stage in (c.sft, c.reward, c.ppo, c.grpo, c.dpo):
            stage.optimizer.warmup_steps = 1
    return c
