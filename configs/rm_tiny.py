"""Reward model (Bradley–Terry) on rule-labelled review pairs, tiny random-init model (CPU).

python -m jaxalign.demo.data --out=/tmp/jaxalign-tiny
python -m jaxalign.train --config=configs/rm_tiny.py:/tmp/jaxalign-tiny --workdir=/tmp/rm-tiny
"""

from jaxalign.config import base_config


def get_config(data_dir: str = "/tmp/jaxalign-tiny"):
    config = base_config()
    config.algorithm = "reward"
    config.tokenizer = f"{data_dir}/tokenizer"
    config.data.train = f"{data_dir}/prefs_train.jsonl"
    config.data.eval = f"{data_dir}/prefs_eval.jsonl"
    config.data.max_length = 96
    config.data.max_prompt_length = 32
    config.data.buckets = (64, 96)
    config.reward.center_coef = 0.01
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 5
    config.train.batch_size = 16
    config.train.num_steps = 80
    config.train.log_every = 10
    config.train.checkpoint_every = 40
    config.train.eval_batches = 10
    return config
