"""Gemma 2 and Gemma 3 (text) against `transformers` on tiny random checkpoints.

The test batch is 10 tokens and the sliding window 4, so sliding layers cut real context; soft-caps
are small (1 and 2) so that tanh is far from linear on these logits.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_models import TOL, _batch, _hf_outputs
from tiny_hf import load_hf, save_random_hf_model

from jaxalign.models import from_pretrained, init_cache, save_pretrained
from jaxalign.models.config import from_hf_config

_COMMON = dict(
    vocab_size=97,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    sliding_window=4,
    query_pre_attn_scalar=12,  # ≠ head_dim: the scale is 1/√12, not 1/√8
)
_GEMMA3_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
_GEMMA3_ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5},
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
}
ARCHES = ("gemma2", "gemma3")


def tiny_config(arch: str) -> transformers.PretrainedConfig:
    if arch == "gemma2":  # layer_types default: sliding, full, sliding, full
        return transformers.Gemma2Config(
            **_COMMON, attn_logit_softcapping=1.0, final_logit_softcapping=2.0
        )
    return transformers.Gemma3TextConfig(
        **_COMMON, layer_types=_GEMMA3_TYPES, rope_parameters=_GEMMA3_ROPE
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    return {
        (arch, head): save_random_hf_model(tiny_config(arch), root / f"{arch}-{head}", head=head)
        for arch in ARCHES
        for head in ("lm", "scalar")
    }


@pytest.mark.parametrize("head", ["lm", "scalar"])
@pytest.mark.parametrize("arch", ARCHES)
def test_logits_match_transformers_and_round_trip(checkpoints, tmp_path, arch, head):
    hf_dir = checkpoints[(arch, head)]
    hf_model = load_hf(hf_dir, head)
    model, params = from_pretrained(hf_dir)
    assert model.config.mixed_attention and model.config.post_norms
    apply = jax.jit(model.apply)
    for padding in ("none", "right", "left"):
        ids, mask = _batch(padding)
        out = np.asarray(apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
        ref = _hf_outputs(hf_model, ids, mask, head)
        assert np.abs(out - ref)[mask.astype(bool)].max() <= TOL, (arch, head, padding)

    out_dir = save_pretrained(model, params, tmp_path / "export", max_shard_bytes=30_000)
    assert (out_dir / "model.safetensors.index.json").is_file()  # sharded export
    reloaded, info = type(hf_model).from_pretrained(
        out_dir, output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids, mask = _batch("left", seed=1)
    np.testing.assert_allclose(
        _hf_outputs(reloaded.eval(), ids, mask, head)[mask.astype(bool)],
        _hf_outputs(hf_model, ids, mask, head)[mask.astype(bool)],
        atol=TOL,
    )
    _, params_again = from_pretrained(out_dir)
    jax.tree.map(np.testing.assert_array_equal, params, params_again)


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("arch", ARCHES)
def test_kv_cache_decode_equals_full_forward(checkpoints, arch, scan):
    """Left-padded prompts, then one token at a time, well past the window of 4: the sliding
    layers keep rings of 4 slots (`jaxalign.models.kv_cache`), which wrap."""
    model, params = from_pretrained(checkpoints[(arch, "lm")], scan_layers=scan)
    rng = np.random.default_rng(1)
    prompt_len, new_tokens = 6, 7
    prompt_lengths = np.array([6, 3, 1])
    mask = (np.arange(prompt_len)[None] >= prompt_len - prompt_lengths[:, None]).astype(np.int32)
    full_ids = rng.integers(3, 97, (3, prompt_len + new_tokens)).astype(np.int32)
    full_mask = np.concatenate([mask, np.ones((3, new_tokens), np.int32)], axis=1)
    full_logits = model.apply({"params": params}, jnp.asarray(full_ids), jnp.asarray(full_mask))

    cache = init_cache(model.config, 3, prompt_len + new_tokens)
    step = jax.jit(lambda ids, m, c: model.apply({"params": params}, ids, m, cache=c))
    logits, cache = step(jnp.asarray(full_ids[:, :prompt_len]), jnp.asarray(mask), cache)
    decoded = [logits[:, -1]]
    for t in range(prompt_len, prompt_len + new_tokens - 1):
        logits, cache = step(
            jnp.asarray(full_ids[:, t : t + 1]), jnp.ones((3, 1), jnp.int32), cache
        )
        decoded.append(logits[:, -1])
    np.testing.assert_allclose(
        np.stack(decoded, axis=1), np.asarray(full_logits[:, prompt_len - 1 : -1]), atol=TOL
    )


def test_sampler_applies_the_final_softcap(checkpoints):
    """Greedy `generate` on Gemma 2 picks the argmax of full forwards, and its log-probs are those
    of the soft-capped logits (the prefill computes its last logits outside the model)."""
    from jaxalign.sampling import SamplingConfig, generate

    model, params = from_pretrained(checkpoints[("gemma2", "lm")])
    ids, mask = _batch("left")
    config = SamplingConfig(max_new_tokens=3, greedy=True, eos_token_ids=(2,), pad_token_id=0)
    out = generate(
        model, params, jnp.asarray(ids), jnp.asarray(mask), rng=jax.random.key(0), config=config
    )
    logits = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))[:, -1]
    first = np.asarray(jax.nn.log_softmax(logits))
    np.testing.assert_array_equal(np.asarray(out.tokens[:, 0]), first.argmax(-1))
    np.testing.assert_allclose(np.asarray(out.logprobs[:, 0]), first.max(-1), atol=1e-5)


def test_multimodal_gemma3_checkpoint_loads_its_text_tower(tmp_path):
    """`Gemma3ForConditionalGeneration` weights (vision tower included) load as the text model and
    give the multimodal model's logits on text; the export is a text-only `Gemma3ForCausalLM`."""
    text = tiny_config("gemma3").to_dict()
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=96
    )
    hf_dir = save_random_hf_model(
        config, tmp_path / "mm", model_class=transformers.Gemma3ForConditionalGeneration
    )
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "gemma3"
    hf_model = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        hf_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    model, params = from_pretrained(hf_dir)
    assert model.config.model_type == "gemma3_text"
    ids, mask = _batch("right")
    with torch.no_grad():
        ref = hf_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        ).logits.numpy()
    out = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(out - ref)[mask.astype(bool)].max() <= TOL
    exported = json.loads(
        (save_pretrained(model, params, tmp_path / "text") / "config.json").read_text()
    )
    assert exported["architectures"] == ["Gemma3ForCausalLM"]


def test_published_gemma3_text_config_takes_transformers_defaults():
    """A multimodal config.json lists few `text_config` fields (google/gemma-3-4b-it); the rest are
    `Gemma3TextConfig`'s defaults, and its legacy `rope_scaling` applies to global layers only."""
    hf = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "eos_token_id": [1, 106],
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
    }
    config = from_hf_config(hf)
    reference = transformers.Gemma3TextConfig(**hf["text_config"])
    assert config.layer_types == tuple(reference.layer_types)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (8, 4, 256)
    assert config.vocab_size == reference.vocab_size and config.eos_token_id == (1, 106)
    assert config.rope_theta == reference.rope_parameters["full_attention"]["rope_theta"]
    assert config.rope_scaling_dict == {"factor": 8.0, "rope_type": "linear"}
    assert config.local_rope_theta == reference.rope_parameters["sliding_attention"]["rope_theta"]
    assert config.query_pre_attn_scalar == 256 and config.final_logit_softcap is None


# ----------------------------------------------------------------------------- training

TINY_GEMMA2_INIT = dict(
    model_type="gemma2",
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    norm_scale_offset=1.0,
    activation="gelu_tanh",
    scale_embeddings=True,
    tie_word_embeddings=True,
    post_norms=True,
    layer_types=("sliding_attention", "full_attention"),
    sliding_window=8,
    query_pre_attn_scalar=8.0,
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
)


def train_tiny(algorithm: str, data_dir, workdir, model_init: dict) -> list[dict]:
    """`configs/{sft,dpo}_tiny.py` for 4 steps of 8 rows with a random-init `model_init`, through
    `jaxalign.train.run`; returns the logged train records."""
    import importlib.util
    from pathlib import Path

    from jaxalign.train import run

    path = Path(__file__).resolve().parents[1] / "configs" / f"{algorithm}_tiny.py"
    spec = importlib.util.spec_from_file_location(f"{algorithm}_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(str(data_dir))
    config.model.init.update(model_init)
    config.data.eval = ""
    config.data.max_length = 48
    config.data.buckets = (48,)
    config.data.on_bad_row = "skip"
    if algorithm == "dpo":
        config.data.max_prompt_length = 24
    config.optimizer.schedule = "constant"
    config.optimizer.warmup_steps = 0
    config.train.batch_size = 8
    config.train.num_steps = 4
    config.train.log_every = 1
    config.train.checkpoint_every = 1000
    config.train.export_hf = False
    run(config, workdir)
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r for r in records if "loss" in r]


def test_sft_and_dpo_train_a_tiny_gemma2(tiny_data_dir, tmp_path):
    sft = train_tiny("sft", tiny_data_dir, tmp_path / "sft", TINY_GEMMA2_INIT)
    assert len(sft) == 4 and all(np.isfinite(r["loss"]) for r in sft)
    assert sft[-1]["loss"] < sft[0]["loss"]
    dpo = train_tiny("dpo", tiny_data_dir, tmp_path / "dpo", TINY_GEMMA2_INIT)
    assert len(dpo) == 4 and all(np.isfinite(r["loss"]) for r in dpo)
    np.testing.assert_allclose(dpo[0]["loss"], np.log(2), rtol=1e-5)  # policy = reference
