"""Zephyr-7B-β step 1: SFT of Mistral-7B-v0.1 on UltraChat 200k, sized for 8× H100 80GB.

The alignment-handbook recipe (`recipes/zephyr-7b-beta/sft/config_full.yaml`; Tunstall et al.
2023): `HuggingFaceH4/ultrachat_200k` split `train_sft` (207,865 dialogues), 2,048 tokens, 128
sequences per step, AdamW lr 2e-5 with cosine decay and 10% warm-up, one epoch (1,624 steps), bf16
with gradient checkpointing, loss on every assistant turn. Mistral's base tokenizer has no chat
template; the Zephyr tokenizer (same 32k vocabulary, `<|user|>`/`<|assistant|>` template) is used
and is exported beside the model, so step 2 (`configs/zephyr_dpo.py`) reads it from there.

    python -m jaxalign.plan --config=configs/zephyr_sft.py --devices=8 \
        --mesh=data=1,fsdp=8,tensor=1 --device-memory-gb=80
    python -m jaxalign.train --config=configs/zephyr_sft.py --workdir=/tmp/zephyr-sft
    python -m jaxalign.train --config=configs/zephyr_dpo.py:/tmp/zephyr-sft/hf --workdir=/tmp/zephyr-dpo

Offline: the config argument is a local Mistral-7B-v0.1 directory; also pass a tokenizer
directory with the Zephyr chat template and the data as parquet/JSONL files with `messages`:

    python -m jaxalign.train --config=configs/zephyr_sft.py:/models/Mistral-7B-v0.1 \
        --workdir=/tmp/zephyr-sft --config.tokenizer=/models/zephyr-7b-beta \
        --config.data.train=/data/ultrachat_200k/train_sft.parquet \
        --config.data.eval=/data/ultrachat_200k/test_sft.parquet
"""

from jaxalign.config import base_config

NUM_DEVICES = 8  # the hardware this recipe was sized for; `validate(config, num_devices=...)`


def get_config(model: str = ""):
    config = base_config()
    config.algorithm = "sft"
    config.model.name_or_path = model or "mistralai/Mistral-7B-v0.1"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat_policy = "full"
    config.model.scan_layers = True
    config.model.logits_chunk_size = 512
    config.tokenizer = "HuggingFaceH4/zephyr-7b-beta"

    config.data.train = "HuggingFaceH4/ultrachat_200k"
    config.data.train_split = "train_sft"
    config.data.eval = "HuggingFaceH4/ultrachat_200k"
    config.data.eval_split = "test_sft"
    config.data.max_length = 2048
    config.data.buckets = (512, 1024, 2048)

    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 2e-5
    config.optimizer.schedule = "cosine"
    config.optimizer.min_lr_ratio = 0.0
    config.optimizer.warmup_steps = 162
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_accum_steps = 2  # 64 sequences per microbatch, 8 per device

    config.train.batch_size = 128
    config.train.num_steps = 1624
    config.train.log_every = 10
    config.train.eval_every = 200
    config.train.eval_batches = 16
    config.train.checkpoint_every = 200

    config.mesh.shape = (1, NUM_DEVICES, 1)  # (data, fsdp, tensor)
    return config
