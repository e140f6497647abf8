"""Qwen2.5-0.5B pipeline, step 1 of 3: SFT on UltraChat 200k. Sized for a TPU v5e-8 (8 chips ×
16 GiB, one host), FSDP over the 8 chips.

`HuggingFaceH4/ultrachat_200k` split `train_sft` (207,865 dialogues), 2,048 tokens, 128
sequences per step, AdamW lr 2e-5, cosine decay with 10% warm-up, one epoch (1,624 steps): the
Zephyr SFT recipe scaled down. Qwen's tokenizer carries its ChatML template, exported beside the
model for steps 2 and 3.

    python -m jaxalign.plan --config=configs/qwen25_05b_sft.py --devices=8 \
        --mesh=data=1,fsdp=8,tensor=1 --device-memory-gb=16
    python -m jaxalign.train --config=configs/qwen25_05b_sft.py --workdir=/tmp/qwen25-05b-sft
    python -m jaxalign.train --config=configs/qwen25_05b_rm.py:/tmp/qwen25-05b-sft/hf \
        --workdir=/tmp/qwen25-05b-rm
    python -m jaxalign.train --config=configs/qwen25_05b_ppo.py:/tmp/qwen25-05b-sft/hf,/tmp/qwen25-05b-rm/hf \
        --workdir=/tmp/qwen25-05b-ppo

Offline, the config argument is a local Qwen2.5-0.5B directory; the data are parquet/JSONL files
with `messages` (`--config.data.train=... --config.data.eval=...`).
"""

from jaxalign.config import base_config

NUM_DEVICES = 8  # the hardware this recipe was sized for; `validate(config, num_devices=...)`


def get_config(model: str = ""):
    config = base_config()
    config.algorithm = "sft"
    config.model.name_or_path = model or "Qwen/Qwen2.5-0.5B"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat_policy = "full"
    config.model.scan_layers = True
    config.model.logits_chunk_size = 256  # 152k-token vocabulary: keep fp32 logit chunks small

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
    config.optimizer.grad_accum_steps = 2  # 64 sequences per microbatch, 8 per chip

    config.train.batch_size = 128
    config.train.num_steps = 1624
    config.train.log_every = 10
    config.train.eval_every = 200
    config.train.eval_batches = 16
    config.train.checkpoint_every = 200

    config.mesh.shape = (1, NUM_DEVICES, 1)  # (data, fsdp, tensor)
    return config
