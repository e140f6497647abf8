"""Zephyr-7B-β step 2: DPO of the Zephyr SFT model on UltraFeedback, sized for 8× H100 80GB.

The alignment-handbook recipe (`recipes/zephyr-7b-beta/dpo/config_full.yaml`): pairs from
`HuggingFaceH4/ultrafeedback_binarized` split `train_prefs` (61,135), β = 0.01, AdamW lr 5e-7
with cosine decay and 10% warm-up, 128 pairs per step (8 per GPU × 2 accumulation × 8 GPUs),
1,024 tokens with prompts cut to 512, one epoch (477 steps). (The Zephyr paper itself used β = 0.1,
32 pairs per step and 3 epochs; the handbook's README explains the change.) The reference is the
frozen initial policy.

    python -m jaxalign.plan --config=configs/zephyr_dpo.py --devices=8 \
        --mesh=data=1,fsdp=8,tensor=1 --device-memory-gb=80
    python -m jaxalign.train --config=configs/zephyr_dpo.py --workdir=/tmp/zephyr-dpo
    # after configs/zephyr_sft.py, on its export:
    python -m jaxalign.train --config=configs/zephyr_dpo.py:/tmp/zephyr-sft/hf --workdir=/tmp/zephyr-dpo

Offline, the config argument is a local SFT model directory (with its tokenizer), and the data
parquet/JSONL files of the two splits:

    python -m jaxalign.train --config=configs/zephyr_dpo.py:/models/zephyr-7b-sft-full \
        --workdir=/tmp/zephyr-dpo --config.data.train=/data/ultrafeedback/train_prefs.parquet \
        --config.data.eval=/data/ultrafeedback/test_prefs.parquet
"""

from jaxalign.config import base_config

NUM_DEVICES = 8  # the hardware this recipe was sized for; `validate(config, num_devices=...)`


def get_config(model: str = ""):
    config = base_config()
    config.algorithm = "dpo"
    config.model.name_or_path = model or "alignment-handbook/zephyr-7b-sft-full"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat_policy = "full"
    config.model.scan_layers = True
    config.model.logits_chunk_size = 512

    config.data.train = "HuggingFaceH4/ultrafeedback_binarized"
    config.data.train_split = "train_prefs"
    config.data.eval = "HuggingFaceH4/ultrafeedback_binarized"
    config.data.eval_split = "test_prefs"
    config.data.max_length = 1024
    config.data.max_prompt_length = 512
    config.data.buckets = (256, 512, 1024)

    config.dpo.beta = 0.01
    config.dpo.loss_type = "sigmoid"

    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 5e-7
    config.optimizer.schedule = "cosine"
    config.optimizer.min_lr_ratio = 0.0
    config.optimizer.warmup_steps = 48
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_accum_steps = 2  # 64 pairs = 128 rows per microbatch, 16 per device

    config.train.batch_size = 128
    config.train.num_steps = 477
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.eval_batches = 16
    config.train.checkpoint_every = 100

    config.mesh.shape = (1, NUM_DEVICES, 1)  # (data, fsdp, tensor)
    return config
