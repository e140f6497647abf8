"""RoPE scaling (YaRN, llama3, linear) and the precedence of RoPE fields in `config.json`, checked
against `transformers`: its rotary-embedding module for the frequencies and attention factor of
many configs, and full logits of tiny random models for YaRN."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxalign.models import (
    UnsupportedConfigError,
    from_hf_config,
    from_pretrained,
    save_pretrained,
    to_hf_config,
)
from jaxalign.models.transformer import rope_inv_freq

TOL = 1e-4

# head_dim 32 gives 16 frequency bands; with θ = 1e4 and original length 32, YaRN's ramp runs
# over bands 0..3, and bands 3..15 are interpolated.
_BASE = dict(
    model_type="qwen2",
    architectures=["Qwen2ForCausalLM"],
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}

# name -> extra config.json fields; every one is read by transformers and by jaxalign.
RoPE_CASES = {
    "yarn": dict(rope_parameters={**_YARN, "rope_theta": 1e4}),
    "yarn_betas_untruncated": dict(
        rope_parameters={**_YARN, "rope_theta": 500.0, "beta_fast": 8, "beta_slow": 2.0}
        | {"truncate": False}
    ),
    "yarn_mscale_all_dim": dict(
        rope_parameters={**_YARN, "rope_theta": 1e4, "mscale": 1.0, "mscale_all_dim": 0.707}
    ),
    "yarn_attention_factor": dict(rope_parameters={**_YARN, "attention_factor": 1.25}),
    "yarn_factor_from_lengths": dict(rope_parameters={**_YARN, "factor": None}),
    "yarn_original_length_defaults_to_max": dict(
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    ),
    "yarn_top_level_original_length_wins": dict(
        original_max_position_embeddings=64, rope_parameters={**_YARN, "rope_theta": 1e4}
    ),
    # Qwen2.5's long-context recipe: a v4 config.json with rope_theta and a legacy rope_scaling.
    "legacy_rope_scaling": dict(
        rope_theta=1e6,
        rope_scaling={"type": "yarn", "factor": 4.0} | {"original_max_position_embeddings": 32},
    ),
    # Issue 11: rope_parameters of type default plus a legacy yarn rope_scaling -> yarn.
    "conflict_legacy_wins": dict(
        rope_theta=1e6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    ),
    "rope_type_beats_type": dict(
        rope_parameters={"type": "yarn", "rope_type": "default", "rope_theta": 1e4}
    ),
    "theta_in_parameters_beats_top_level": dict(
        rope_theta=5e5, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
    ),
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
    "llama3_original_length_defaults_to_max": dict(
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}
        | {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
    ),
}


def _write_config(directory, extra):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**_BASE, **extra}))
    return directory


def _hf_rope(directory):
    """(inv_freq, attention_scaling) as the transformers model built from `directory` uses them."""
    config = transformers.AutoConfig.from_pretrained(directory)
    rotary = transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding(config)
    return rotary.inv_freq.numpy(), float(rotary.attention_scaling)


@pytest.mark.parametrize("case", sorted(RoPE_CASES))
def test_rope_frequencies_and_attention_factor_match_transformers(tmp_path, case):
    directory = _write_config(tmp_path, RoPE_CASES[case])
    inv_freq, attention_factor = _hf_rope(directory)
    config = from_hf_config(json.loads((directory / "config.json").read_text()))
    np.testing.assert_allclose(np.asarray(rope_inv_freq(config)), inv_freq, rtol=2e-6)
    assert config.rope_attention_factor == pytest.approx(attention_factor, rel=1e-12)
    # Export and re-read: the same RoPE in jaxalign, and in transformers.
    assert from_hf_config(to_hf_config(config)) == config
    exported = _write_config(tmp_path / "export", to_hf_config(config))
    exported_inv_freq, exported_factor = _hf_rope(exported)
    np.testing.assert_allclose(exported_inv_freq, inv_freq, rtol=2e-6)
    assert exported_factor == pytest.approx(attention_factor, rel=1e-12)


def test_yarn_cases_exercise_the_ramp_and_the_attention_factor(tmp_path):
    """The cases above would not catch a wrong ramp or a missing mscale if they never used them."""
    inv_freq, attention_factor = _hf_rope(_write_config(tmp_path, RoPE_CASES["yarn"]))
    plain = 1e4 ** -(np.arange(0, 32, 2) / 32)
    ratio = inv_freq / plain
    assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(0.25)
    assert np.sum((ratio > 0.26) & (ratio < 0.99)) >= 2  # bands on the ramp
    assert attention_factor == pytest.approx(0.1 * np.log(4.0) + 1)


def test_conflicting_theta_is_refused(tmp_path):
    """transformers would drop rope_parameters' θ = 1e6 for its default 1e4: refuse, naming both."""
    config = {
        **_BASE,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    }
    at_default_theta = {"rope_scaling": {**config["rope_scaling"], "rope_theta": 1e4}}
    np.testing.assert_array_equal(
        _hf_rope(_write_config(tmp_path / "conflict", config))[0],
        _hf_rope(_write_config(tmp_path / "default_theta", at_default_theta))[0],
    )
    with pytest.raises(UnsupportedConfigError, match=r"rope_scaling.*rope_theta=10000 .*1e\+06"):
        from_hf_config(config)


def test_partial_rotary_factor_in_rope_parameters_is_refused():
    rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    with pytest.raises(UnsupportedConfigError, match="partial_rotary_factor=0.5"):
        from_hf_config({**_BASE, "rope_parameters": rope})


def _make_yarn_checkpoint(directory, model_type, rope_fields):
    """A tiny random model saved by transformers, its config.json's RoPE fields then replaced by
    `rope_fields` as a user would edit them, and loaded back by transformers."""
    torch.manual_seed(0)
    cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[model_type]
    config = cls(**{k: v for k, v in _BASE.items() if k not in ("model_type", "architectures")})
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    saved = json.loads((directory / "config.json").read_text())
    for key in ("rope_parameters", "rope_scaling", "rope_theta"):
        saved.pop(key, None)
    (directory / "config.json").write_text(json.dumps({**saved, **rope_fields}))
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32
    ).eval()


def _long_batch(length=112):
    """Two rows 3.5x the original length (32); the second left-padded by 40 tokens."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 97, (2, length))
    mask = np.ones((2, length), np.int64)
    mask[1, :40] = 0
    ids = np.where(mask == 1, ids, 0)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # independent of jaxalign's helper
    return ids, mask, positions


def _hf_logits(hf_model, ids, mask, positions):
    with torch.no_grad():
        return hf_model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).logits.numpy()


@pytest.mark.parametrize(
    "model_type, extra",
    [
        ("qwen2", RoPE_CASES["conflict_legacy_wins"]),
        ("llama", dict(rope_parameters={**_YARN, "rope_theta": 500.0, "beta_fast": 8})),
    ],
    ids=["qwen2-rope_parameters-and-legacy-rope_scaling", "llama-rope_parameters"],
)
def test_yarn_logits_match_transformers(tmp_path, model_type, extra):
    hf_model = _make_yarn_checkpoint(tmp_path / "hf", model_type, extra)
    model, params = from_pretrained(tmp_path / "hf", dtype=jnp.float32)
    assert model.config.rope_scaling_dict["rope_type"] == "yarn"
    ids, mask, positions = _long_batch()
    valid = mask.astype(bool)
    apply = jax.jit(lambda p, i, m, pos: model.apply({"params": p}, i, m, positions=pos))
    out = np.asarray(apply(params, ids, mask, positions))
    ref = _hf_logits(hf_model, ids, mask, positions)
    error = np.abs(out - ref)[valid].max()
    assert error <= TOL, error

    # The scaling matters at this length: without it (or without its attention factor) the
    # logits are far off, so the parity above is not a coincidence of small angles.
    for wrong in (
        None,
        tuple((k, 1.0 if k == "attention_factor" else v) for k, v in model.config.rope_scaling),
    ):
        wrong_model = model.__class__(model.config.replace(rope_scaling=wrong))
        wrong_out = np.asarray(
            wrong_model.apply({"params": params}, ids, mask, positions=positions)
        )
        assert np.abs(wrong_out - ref)[valid].max() > 100 * TOL

    # Export with jaxalign, reload with transformers: the same logits.
    export = save_pretrained(model, params, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        export, attn_implementation="eager", dtype=torch.float32
    ).eval()
    np.testing.assert_allclose(
        _hf_logits(reloaded, ids, mask, positions)[valid], ref[valid], atol=TOL
    )
