"""DPO of Llama-3-8B-Instruct on UltraFeedback, sized for 8× H100 80GB (one host, FSDP over 8).

Hyperparameters of the alignment-handbook Zephyr DPO recipe (β = 0.01, lr 5e-7, cosine with 10%
warm-up, 128 pairs per step, one epoch of `train_prefs`: 61,135 pairs → 477 steps), with Llama-3's
longer context (2,048 tokens, prompts cut to 1,024). The reference is the frozen initial policy.

    python -m jaxalign.plan --config=configs/llama3_8b_dpo.py --devices=8 \
        --mesh=data=1,fsdp=8,tensor=1 --device-memory-gb=80
    python -m jaxalign.train --config=configs/llama3_8b_dpo.py --workdir=/tmp/llama3-8b-dpo

Offline, pass a local copy of the model (HF directory with safetensors, tokenizer and chat
template) as the config argument and the data as parquet/JSONL:

    python -m jaxalign.train --config=configs/llama3_8b_dpo.py:/models/Meta-Llama-3-8B-Instruct \
        --workdir=/tmp/llama3-8b-dpo --config.data.train=/data/ultrafeedback/train_prefs.parquet \
        --config.data.eval=/data/ultrafeedback/test_prefs.parquet
"""

from jaxalign.config import base_config

NUM_DEVICES = 8  # the hardware this recipe was sized for; `validate(config, num_devices=...)`


def get_config(model: str = ""):
    config = base_config()
    config.algorithm = "dpo"
    config.model.name_or_path = model or "meta-llama/Meta-Llama-3-8B-Instruct"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat_policy = "full"
    config.model.scan_layers = True
    config.model.logits_chunk_size = 512

    config.data.train = "HuggingFaceH4/ultrafeedback_binarized"
    config.data.train_split = "train_prefs"
    config.data.eval = "HuggingFaceH4/ultrafeedback_binarized"
    config.data.eval_split = "test_prefs"
    config.data.max_length = 2048
    config.data.max_prompt_length = 1024
    config.data.buckets = (512, 1024, 2048)

    config.dpo.beta = 0.01
    config.dpo.loss_type = "sigmoid"

    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 5e-7
    config.optimizer.schedule = "cosine"
    config.optimizer.min_lr_ratio = 0.0
    config.optimizer.warmup_steps = 48
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_accum_steps = 4  # 32 pairs = 64 rows per microbatch, 8 per device

    config.train.batch_size = 128
    config.train.num_steps = 477
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.eval_batches = 16
    config.train.checkpoint_every = 100

    config.mesh.shape = (1, NUM_DEVICES, 1)  # (data, fsdp, tensor)
    return config
