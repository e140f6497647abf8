"""Qwen2.5-0.5B pipeline, step 2 of 3: a Bradley–Terry reward model on UltraFeedback. Sized for a
TPU v5e-8 (8 chips × 16 GiB, one host), FSDP over the 8 chips.

The SFT model with a scalar head (initialised at random) scores `HuggingFaceH4/ultrafeedback_binarized`
`train_prefs` pairs (61,135): −log σ(r_chosen − r_rejected), 64 pairs per step, AdamW lr 1e-5,
cosine with 10% warm-up, one epoch (955 steps), 1,024 tokens (prompts cut to 512); TRL's
reward-modelling example settings. Without an SFT run of your own, the published
`Qwen/Qwen2.5-0.5B-Instruct` is the default starting point.

    python -m jaxalign.plan --config=configs/qwen25_05b_rm.py --devices=8 \
        --mesh=data=1,fsdp=8,tensor=1 --device-memory-gb=16
    python -m jaxalign.train --config=configs/qwen25_05b_rm.py:/tmp/qwen25-05b-sft/hf \
        --workdir=/tmp/qwen25-05b-rm

The config argument is the model to start from (a local directory, or a hub id when the hub is
reachable); offline, also pass the data as parquet/JSONL (`--config.data.train=...`).
"""

from jaxalign.config import base_config

NUM_DEVICES = 8  # the hardware this recipe was sized for; `validate(config, num_devices=...)`


def get_config(model: str = ""):
    config = base_config()
    config.algorithm = "reward"
    config.model.name_or_path = model or "Qwen/Qwen2.5-0.5B-Instruct"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat_policy = "full"
    config.model.scan_layers = True

    config.data.train = "HuggingFaceH4/ultrafeedback_binarized"
    config.data.train_split = "train_prefs"
    config.data.eval = "HuggingFaceH4/ultrafeedback_binarized"
    config.data.eval_split = "test_prefs"
    config.data.max_length = 1024
    config.data.max_prompt_length = 512
    config.data.buckets = (256, 512, 1024)

    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-5
    config.optimizer.schedule = "cosine"
    config.optimizer.min_lr_ratio = 0.0
    config.optimizer.warmup_steps = 96
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_accum_steps = 1  # 64 pairs = 128 rows, 16 per chip

    config.train.batch_size = 64
    config.train.num_steps = 955
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.eval_batches = 16
    config.train.checkpoint_every = 100

    config.mesh.shape = (1, NUM_DEVICES, 1)  # (data, fsdp, tensor)
    return config
