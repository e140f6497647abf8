"""DPO on rule-labelled review pairs with a tiny model (CPU). Pass an SFT export as the policy:

    python -m jaxalign.demo.data --out=/tmp/jaxalign-tiny
    python -m jaxalign.train --config=configs/sft_tiny.py:/tmp/jaxalign-tiny --workdir=/tmp/sft-tiny
    python -m jaxalign.train --config=configs/dpo_tiny.py:/tmp/jaxalign-tiny --workdir=/tmp/dpo-tiny \
        --config.model.name_or_path=/tmp/sft-tiny/hf
"""

from jaxalign.config import base_config


def get_config(data_dir: str = "/tmp/jaxalign-tiny"):
    config = base_config()
    config.algorithm = "dpo"
    config.tokenizer = f"{data_dir}/tokenizer"
    config.data.train = f"{data_dir}/prefs_train.jsonl"
    config.data.eval = f"{data_dir}/prefs_eval.jsonl"
    config.data.max_length = 96
    config.data.max_prompt_length = 32
    config.data.buckets = (64, 96)
    config.dpo.beta = 0.1
    config.dpo.loss_type = "sigmoid"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 5
    config.train.batch_size = 16
    config.train.num_steps = 60
    config.train.log_every = 10
    config.train.checkpoint_every = 30
    config.train.eval_batches = 10
    return config
