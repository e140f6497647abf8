"""DPO of Gemma-2-2B-it on UltraFeedback, sized for a TPU v5e-8 (8 chips × 16 GiB, one host).

The alignment-handbook Zephyr DPO hyperparameters (β = 0.01, lr 5e-7, cosine with 10% warm-up,
128 pairs per step, one epoch of `train_prefs`: 61,135 pairs → 477 steps) at Gemma 2's context of
8,192 cut to 1,024 tokens (prompts to 512). Gemma 2 soft-caps its logits (attention 50, final 30)
and alternates 4,096-token sliding-window layers with global ones; the 256k vocabulary is why
log-probs are computed in chunks of 256 tokens. The reference is the frozen initial policy.

    python -m jaxalign.plan --config=configs/gemma2_2b_dpo.py --devices=8 \
        --mesh=data=1,fsdp=8,tensor=1 --device-memory-gb=16
    python -m jaxalign.train --config=configs/gemma2_2b_dpo.py --workdir=/tmp/gemma2-2b-dpo

Offline, pass a local copy of the model (HF directory with safetensors, tokenizer and chat
template) as the config argument and the data as parquet/JSONL
(`--config.data.train=... --config.data.eval=...`).
"""

from jaxalign.config import base_config

NUM_DEVICES = 8  # the hardware this recipe was sized for; `validate(config, num_devices=...)`


def get_config(model: str = ""):
    config = base_config()
    config.algorithm = "dpo"
    config.model.name_or_path = model or "google/gemma-2-2b-it"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat_policy = "full"
    config.model.scan_layers = True
    config.model.logits_chunk_size = 256

    config.data.train = "HuggingFaceH4/ultrafeedback_binarized"
    config.data.train_split = "train_prefs"
    config.data.eval = "HuggingFaceH4/ultrafeedback_binarized"
    config.data.eval_split = "test_prefs"
    config.data.max_length = 1024
    config.data.max_prompt_length = 512
    config.data.buckets = (512, 1024)

    config.dpo.beta = 0.01
    config.dpo.loss_type = "sigmoid"

    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 5e-7
    config.optimizer.schedule = "cosine"
    config.optimizer.min_lr_ratio = 0.0
    config.optimizer.warmup_steps = 48
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_accum_steps = 8  # 16 pairs per microbatch, 2 per chip

    config.train.batch_size = 128
    config.train.num_steps = 477
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.eval_batches = 16
    config.train.checkpoint_every = 100

    config.mesh.shape = (1, NUM_DEVICES, 1)  # (data, fsdp, tensor)
    return config
