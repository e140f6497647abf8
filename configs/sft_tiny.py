"""SFT of a tiny random-init Llama-style model on the generated review corpus (CPU, < 1 min).

python -m jaxalign.demo.data --out=/tmp/jaxalign-tiny
python -m jaxalign.train --config=configs/sft_tiny.py:/tmp/jaxalign-tiny --workdir=/tmp/sft-tiny
"""

from jaxalign.config import base_config


def get_config(data_dir: str = "/tmp/jaxalign-tiny"):
    config = base_config()
    config.algorithm = "sft"
    config.tokenizer = f"{data_dir}/tokenizer"
    config.data.train = f"{data_dir}/sft_train.jsonl"
    config.data.eval = f"{data_dir}/sft_eval.jsonl"
    config.data.max_length = 64
    config.data.buckets = (32, 64)
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 5
    config.train.batch_size = 16
    config.train.num_steps = 400  # enough to write reviews that PPO/GRPO can start from
    config.train.log_every = 50
    config.train.checkpoint_every = 200
    config.train.eval_batches = 4
    return config
