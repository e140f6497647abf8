"""GRPO with a verifiable reward on the tiny SFT'd review model (CPU, a few minutes).

Task (`jaxalign.demo.keyword_task`): each prompt is a review opening tagged with an aspect,
"(acting) The film was"; the reward is 1 when the completion mentions that aspect, checked by a
program. No critic, no reward model; β = 0 loads no reference model.

    python -m jaxalign.demo.data --out=/tmp/jaxalign-tiny
    python -m jaxalign.train --config=configs/sft_tiny.py:/tmp/jaxalign-tiny --workdir=/tmp/sft-tiny
    python -m jaxalign.train --config=configs/grpo_tiny.py:/tmp/jaxalign-tiny \
        --workdir=/tmp/grpo-tiny --config.model.name_or_path=/tmp/sft-tiny/hf
"""

from jaxalign.config import base_config


def get_config(data_dir: str = "/tmp/jaxalign-tiny"):
    config = base_config()
    config.algorithm = "grpo"
    config.model.name_or_path = "/tmp/sft-tiny/hf"
    config.tokenizer = f"{data_dir}/tokenizer"
    config.data.train = f"{data_dir}/keyword_train.jsonl"
    config.data.max_length = 64
    config.data.max_prompt_length = 16
    config.data.buckets = (16,)
    config.grpo.reward_funcs = "jaxalign.demo.keyword_task:mentions_keyword"
    config.grpo.num_generations = 8
    config.grpo.max_new_tokens = 24
    config.grpo.beta = 0.0
    config.grpo.loss_type = "dapo"
    config.grpo.epsilon_high = 0.28  # DAPO's clip-higher
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = "constant"
    config.train.batch_size = 16
    config.train.num_steps = 30
    config.train.log_every = 2
    config.train.checkpoint_every = 10
    return config
