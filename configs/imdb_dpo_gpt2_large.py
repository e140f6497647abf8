"""The DPO paper's controlled sentiment generation (Rafailov et al. 2023, §6.1 and App. B):
GPT-2-large, IMDb review prefixes, preferences by a sentiment classifier. Sized for a TPU v5e-8
(8 chips × 16 GiB, one host), FSDP over the 8 chips.

The paper's defaults: β = 0.1, 64 pairs per step, RMSprop with lr 1e-6 warmed up linearly over
150 steps and then constant, gradients clipped at norm 10 (the reference implementation's
`max_grad_norm`), 512 tokens with prompts cut to 256. RMSprop here is `optax.scale_by_rms`, which
adds eps inside the square root; eps = 1e-16 matches PyTorch's `RMSprop(alpha=0.99, eps=1e-8)`,
which adds it outside. 390 steps = one pass over 25,000 pairs (one per IMDb train review).

The policy (and reference) is GPT-2-large after SFT on IMDb train reviews, passed as the config
argument; the default is the base `gpt2-large`. The pairs are `{prompt, chosen, rejected}` rows
(strings): the paper samples completions of a review prefix from the SFT model and ranks them
with `siebert/sentiment-roberta-large-english`. No hub dataset has that format as is
(`insub/imdb_prefix20_forDPO_gpt2-large-imdb-FT_siebert_sentiment-roberta-large-english` is
such a dataset with its prompt in `text`), so the data are a JSONL/parquet file:

    python -m jaxalign.plan --config=configs/imdb_dpo_gpt2_large.py --devices=8 \
        --mesh=data=1,fsdp=8,tensor=1 --device-memory-gb=16
    python -m jaxalign.train --config=configs/imdb_dpo_gpt2_large.py:/models/gpt2-large-imdb-sft \
        --workdir=/tmp/imdb-dpo --config.data.train=/data/imdb-prefs/train.jsonl
"""

from jaxalign.config import base_config

NUM_DEVICES = 8  # the hardware this recipe was sized for; `validate(config, num_devices=...)`


def get_config(model: str = ""):
    config = base_config()
    config.algorithm = "dpo"
    config.model.name_or_path = model or "gpt2-large"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat_policy = "full"
    config.model.scan_layers = True
    config.model.logits_chunk_size = 512

    config.data.train = "/tmp/imdb-prefs/train.jsonl"
    config.data.max_length = 512
    config.data.max_prompt_length = 256
    config.data.buckets = (128, 256, 512)

    config.dpo.beta = 0.1
    config.dpo.loss_type = "sigmoid"

    config.optimizer.name = "rmsprop"
    config.optimizer.learning_rate = 1e-6
    config.optimizer.schedule = "constant"
    config.optimizer.warmup_steps = 150
    config.optimizer.b2 = 0.99  # PyTorch RMSprop's alpha
    config.optimizer.eps = 1e-16  # inside the sqrt: (1e-8)² (see the docstring)
    config.optimizer.weight_decay = 0.0
    config.optimizer.max_grad_norm = 10.0

    config.train.batch_size = 64
    config.train.num_steps = 390
    config.train.log_every = 10
    config.train.checkpoint_every = 100

    config.mesh.shape = (1, NUM_DEVICES, 1)  # (data, fsdp, tensor)
    return config
