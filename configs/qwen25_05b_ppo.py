"""Qwen2.5-0.5B pipeline, step 3 of 3: PPO against the step-2 reward model. Sized for a TPU
v5e-8 (8 chips × 16 GiB, one host), FSDP over the 8 chips.

Prompts from `trl-lib/ultrafeedback-prompt` (chat-format prompts, rendered with the policy's
template). Per iteration: 64 prompts, up to 256 sampled tokens each (temperature 0.7), 4 epochs
over 4 minibatches of 16, KL coefficient 0.05 (k1), a −1 score for responses without EOS, critic
initialised from the reward model; AdamW lr 3e-6 constant; 590 iterations ≈ one pass over the
37,775 train prompts. These are TRL's PPO example settings. Four models are resident: policy and
critic (trained), reference and reward model (frozen).

The config argument is `POLICY[,REWARD_MODEL]`: the SFT export (default: the published
`Qwen/Qwen2.5-0.5B-Instruct`) and the reward model from `configs/qwen25_05b_rm.py` (default
/tmp/qwen25-05b-rm/hf). Before that reward model exists, plan with any checkpoint of the same
architecture in its place:

    python -m jaxalign.plan --config=configs/qwen25_05b_ppo.py:Qwen/Qwen2.5-0.5B-Instruct,Qwen/Qwen2.5-0.5B \
        --devices=8 --mesh=data=1,fsdp=8,tensor=1 --device-memory-gb=16
    python -m jaxalign.train --config=configs/qwen25_05b_ppo.py:/tmp/qwen25-05b-sft/hf,/tmp/qwen25-05b-rm/hf \
        --workdir=/tmp/qwen25-05b-ppo

Offline, both are local directories and the prompts a parquet/JSONL file of `prompt` message
lists (`--config.data.train=...`).
"""

from jaxalign.config import base_config

NUM_DEVICES = 8  # the hardware this recipe was sized for; `validate(config, num_devices=...)`


def get_config(models: str = ""):
    policy, _, reward_model = models.partition(",")
    config = base_config()
    config.algorithm = "ppo"
    config.model.name_or_path = policy or "Qwen/Qwen2.5-0.5B-Instruct"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat_policy = "full"
    config.model.scan_layers = True
    config.model.logits_chunk_size = 256

    config.data.train = "trl-lib/ultrafeedback-prompt"
    config.data.train_split = "train"
    config.data.max_prompt_length = 512
    config.data.max_length = 768  # prompt + ppo.max_new_tokens
    config.data.buckets = (128, 256, 512)

    config.ppo.reward_model = reward_model or "/tmp/qwen25-05b-rm/hf"
    config.ppo.critic_init = "reward"
    config.ppo.max_new_tokens = 256
    config.ppo.temperature = 0.7
    config.ppo.num_epochs = 4
    config.ppo.num_minibatches = 4
    config.ppo.kl_coef = 0.05
    config.ppo.kl_estimator = "k1"
    config.ppo.missing_eos_penalty = -1.0

    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 3e-6
    config.optimizer.schedule = "constant"
    config.optimizer.weight_decay = 0.0

    config.train.batch_size = 64
    config.train.num_steps = 590
    config.train.log_every = 1
    config.train.checkpoint_every = 50

    config.mesh.shape = (1, NUM_DEVICES, 1)  # (data, fsdp, tensor)
    return config
