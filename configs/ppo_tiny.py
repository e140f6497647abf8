"""PPO on review prompts with a tiny model (CPU, minutes). Reward: a Python judge or an RM export.

    python -m jaxalign.demo.data --out=/tmp/jaxalign-tiny
    python -m jaxalign.train --config=configs/sft_tiny.py:/tmp/jaxalign-tiny --workdir=/tmp/sft-tiny
    python -m jaxalign.train --config=configs/ppo_tiny.py:/tmp/jaxalign-tiny --workdir=/tmp/ppo-tiny \
        --config.model.name_or_path=/tmp/sft-tiny/hf
    # with a trained reward model instead of the VADER judge:
    #   --config.ppo.reward_model=/tmp/rm-tiny/hf --config.ppo.critic_init=reward
"""

from jaxalign.config import base_config


def get_config(data_dir: str = "/tmp/jaxalign-tiny"):
    config = base_config()
    config.algorithm = "ppo"
    config.tokenizer = f"{data_dir}/tokenizer"
    config.data.train = f"{data_dir}/prompts_train.jsonl"
    config.data.max_length = 64
    config.data.max_prompt_length = 16
    config.data.buckets = (16,)
    config.ppo.reward_model = "judge:vader"
    config.ppo.critic_init = "policy"
    config.ppo.max_new_tokens = 24
    config.ppo.num_epochs = 2
    config.ppo.num_minibatches = 2
    config.ppo.kl_coef = 0.05
    config.optimizer.learning_rate = 3e-4
    config.optimizer.schedule = "constant"
    config.optimizer.weight_decay = 0.0
    config.train.batch_size = 32
    config.train.num_steps = 20
    config.train.log_every = 2
    config.train.checkpoint_every = 10
    return config
