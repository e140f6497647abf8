"""Tiny random Hugging Face checkpoints built with transformers + PyTorch (test-only)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

ARCHITECTURES = ("llama", "llama3_rope", "mistral", "qwen2", "qwen3", "gemma", "gpt2")

_COMMON = dict(vocab_size=97, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA_LIKE = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)


def tiny_hf_config(arch: str) -> transformers.PretrainedConfig:
    if arch == "llama":
        return transformers.LlamaConfig(**_COMMON, **_LLAMA_LIKE, rope_theta=500.0)
    if arch == "llama3_rope":
        rope = dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            # head_dim 8 at θ = 1e4: wavelengths 6.3, 63, 628, 6283 against the bands' edges
            # 64/4 = 16 and 64/1 = 64: one unchanged, one interpolated, two divided by 8.
            original_max_position_embeddings=64,
        )
        return transformers.LlamaConfig(**_COMMON, **_LLAMA_LIKE, rope_parameters=rope)
    if arch == "mistral":
        return transformers.MistralConfig(**_COMMON, **_LLAMA_LIKE, sliding_window=4, head_dim=8)
    if arch == "qwen2":
        return transformers.Qwen2Config(**_COMMON, **_LLAMA_LIKE, tie_word_embeddings=True)
    if arch == "qwen3":
        return transformers.Qwen3Config(**_COMMON, **_LLAMA_LIKE, head_dim=16)
    if arch == "gemma":
        return transformers.GemmaConfig(**_COMMON, **_LLAMA_LIKE, head_dim=16)
    if arch == "gpt2":
        return transformers.GPT2Config(
            **_COMMON,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    raise ValueError(arch)


def make_tiny_hf_model(arch: str, out_dir: Path, *, head: str = "lm", seed: int = 0) -> Path:
    """Random-init tiny model (every weight perturbed, norms included), saved with save_pretrained."""
    torch.manual_seed(seed)
    config = tiny_hf_config(arch)
    config._attn_implementation = "eager"
    if head == "scalar":
        config.num_labels = 1
        model = transformers.AutoModelForSequenceClassification.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out_dir)
    return Path(out_dir)


def load_hf(out_dir: Path, head: str = "lm"):
    cls = (
        transformers.AutoModelForSequenceClassification
        if head == "scalar"
        else transformers.AutoModelForCausalLM
    )
    model = cls.from_pretrained(out_dir, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def save_random_hf_model(
    config: transformers.PretrainedConfig,
    out_dir: Path,
    *,
    head: str = "lm",
    seed: int = 0,
    model_class: type | None = None,
) -> Path:
    """`make_tiny_hf_model` for a config built by the caller (the newer families' tests)."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    if model_class is not None:
        model = model_class(config)
    elif head == "scalar":
        config.num_labels = 1
        model = transformers.AutoModelForSequenceClassification.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out_dir)
    return Path(out_dir)
