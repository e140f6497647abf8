"""SFT of Qwen3-30B-A3B (mixture of experts: 128 experts, 8 per token, 3.3B active of 30.5B) on
UltraChat 200k, sized for 16× H100 80GB (two hosts of 8), FSDP over the 16 GPUs.

The Zephyr SFT recipe (lr 2e-5, cosine with 10% warm-up, 128 sequences of 2,048 tokens per step,
one epoch of `train_sft`: 207,865 dialogues → 1,624 steps). Every trainer adds the router's
load-balancing loss with the checkpoint's `router_aux_loss_coef` (0.001) and logs
`router/aux_loss`, `router/max_load`, `router/min_load` and `router/dropped_tokens` (always 0: the
expert computation is dropless). Experts are sharded like dense MLPs (their `embed` axis over
`fsdp`); for expert parallelism put `("expert", "fsdp")` first in `mesh.logical_rules`.

    python -m jaxalign.plan --config=configs/qwen3_30b_a3b_sft.py --devices=16 \
        --mesh=data=1,fsdp=16,tensor=1 --device-memory-gb=80
    python -m jaxalign.train --config=configs/qwen3_30b_a3b_sft.py --workdir=/ckpt/qwen3-30b-a3b-sft \
        --config.mesh.distributed=True   # on each host, after setting the coordinator address

Offline, the config argument is a local Qwen3-30B-A3B directory; the data are parquet/JSONL files
with `messages` (`--config.data.train=... --config.data.eval=...`).
"""

from jaxalign.config import base_config

NUM_DEVICES = 16  # the hardware this recipe was sized for; `validate(config, num_devices=...)`


def get_config(model: str = ""):
    config = base_config()
    config.algorithm = "sft"
    config.model.name_or_path = model or "Qwen/Qwen3-30B-A3B"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat_policy = "full"
    config.model.scan_layers = True
    config.model.logits_chunk_size = 512

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
    config.optimizer.grad_accum_steps = 4  # 32 sequences per microbatch, 2 per GPU

    config.train.batch_size = 128
    config.train.num_steps = 1624
    config.train.log_every = 10
    config.train.eval_every = 200
    config.train.eval_batches = 16
    config.train.checkpoint_every = 200

    config.mesh.shape = (1, NUM_DEVICES, 1)  # (data, fsdp, tensor)
    return config
