"""The decoder family (Llama, Mistral, Qwen2/3, Gemma, GPT-2) and Hugging Face interop.

from jaxalign.models import from_pretrained, save_pretrained
model, params = from_pretrained("path/or/hub-id", dtype=jnp.float32)
logits = model.apply({"params": params}, input_ids, attention_mask=mask, positions=None)
save_pretrained(model, params, "out_dir")
"""

from jaxalign.models.config import (
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    UnsupportedConfigError,
    from_hf_config,
    to_hf_config,
)
from jaxalign.models.hf import CheckpointError, from_pretrained, nn_unbox, save_pretrained
from jaxalign.models.kv_cache import KVCache, init_cache
from jaxalign.models.logprobs import sequence_token_logprobs, token_logprobs_from_hidden
from jaxalign.models.tokenizer import load_tokenizer
from jaxalign.models.transformer import (
    Transformer,
    default_positions,
    gather_last_token,
    last_token_index,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CheckpointError",
    "KVCache",
    "ModelConfig",
    "Transformer",
    "UnsupportedConfigError",
    "default_positions",
    "from_hf_config",
    "from_pretrained",
    "gather_last_token",
    "init_cache",
    "last_token_index",
    "load_tokenizer",
    "nn_unbox",
    "save_pretrained",
    "sequence_token_logprobs",
    "to_hf_config",
    "token_logprobs_from_hidden",
]
