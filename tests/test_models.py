"""Flax decoder vs Hugging Face `transformers` (PyTorch) on tiny random checkpoints."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_hf import ARCHITECTURES, load_hf, make_tiny_hf_model

from jaxalign import sharding as shd
from jaxalign.models import (
    CheckpointError,
    Transformer,
    UnsupportedConfigError,
    from_pretrained,
    gather_last_token,
    init_cache,
    save_pretrained,
    sequence_token_logprobs,
)

TOL = 1e-4


def _batch(padding: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 97, (3, 10))
    mask = np.ones((3, 10), np.int64)
    if padding == "right":
        mask[1, 7:] = 0
        mask[2, 4:] = 0
    elif padding == "left":
        mask[1, :3] = 0
        mask[2, :6] = 0
    ids = np.where(mask == 1, ids, 0)  # pad id 0, as HF's sequence classifier expects
    return ids, mask


def _positions(mask: np.ndarray) -> np.ndarray:
    """Position of each real token among its row's real tokens (0 on left padding), computed here
    and not by jaxalign's `default_positions`, so a positions bug cannot pass on both sides."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


def _hf_outputs(hf_model, ids, mask, head):
    positions = _positions(mask)
    kwargs = dict(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        position_ids=torch.tensor(positions),
    )
    with torch.no_grad():
        if head == "lm":
            return hf_model(**kwargs).logits.numpy()
        backbone = getattr(hf_model, hf_model.base_model_prefix)
        return hf_model.score(backbone(**kwargs).last_hidden_state)[..., 0].numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        (arch, head): make_tiny_hf_model(arch, root / f"{arch}-{head}", head=head)
        for arch in ARCHITECTURES
        for head in ("lm", "scalar")
    }


@pytest.mark.parametrize("head", ["lm", "scalar"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_match_transformers_and_round_trip(checkpoints, tmp_path, arch, head):
    hf_dir = checkpoints[(arch, head)]
    hf_model = load_hf(hf_dir, head)
    model, params = from_pretrained(hf_dir, dtype=jnp.float32)
    apply = jax.jit(model.apply)
    for padding in ("none", "right", "left"):
        ids, mask = _batch(padding)
        out = np.asarray(apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
        ref = _hf_outputs(hf_model, ids, mask, head)
        valid = mask.astype(bool)
        assert np.abs(out - ref)[valid].max() <= TOL, (arch, head, padding)

    # Export with jaxalign, reload with transformers: no missing/unexpected keys, same outputs.
    out_dir = save_pretrained(model, params, tmp_path / "export")
    cls = type(hf_model)
    reloaded, info = cls.from_pretrained(
        out_dir, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    arch_name = json.loads((out_dir / "config.json").read_text())["architectures"][0]
    assert arch_name == cls.__name__
    ids, mask = _batch("left", seed=1)
    np.testing.assert_allclose(
        _hf_outputs(reloaded.eval(), ids, mask, head)[mask.astype(bool)],
        _hf_outputs(hf_model, ids, mask, head)[mask.astype(bool)],
        atol=TOL,
    )


def test_reward_pooling_matches_hf_sequence_classifier(checkpoints):
    hf_dir = checkpoints[("llama", "scalar")]
    hf_model = load_hf(hf_dir, "scalar")
    model, params = from_pretrained(hf_dir)
    ids, mask = _batch("right")
    values = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    rewards = np.asarray(gather_last_token(values, jnp.asarray(mask)))
    with torch.no_grad():
        hf_rewards = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    np.testing.assert_allclose(rewards, hf_rewards[:, 0].numpy(), atol=TOL)


def test_sharded_safetensors_round_trip(checkpoints, tmp_path):
    model, params = from_pretrained(checkpoints[("qwen3", "lm")])
    out_dir = save_pretrained(model, params, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _, reloaded = from_pretrained(out_dir)
    jax.tree.map(np.testing.assert_array_equal, params, reloaded)


def test_reward_model_initialised_from_causal_lm(checkpoints):
    model, params = from_pretrained(checkpoints[("llama", "lm")], head="scalar")
    _, lm_params = from_pretrained(checkpoints[("llama", "lm")])
    assert model.config.head == "scalar" and "lm_head" not in params
    np.testing.assert_array_equal(params["embed"]["embedding"], lm_params["embed"]["embedding"])
    values = model.apply({"params": params}, jnp.ones((2, 5), jnp.int32))
    assert values.shape == (2, 5)
    with pytest.raises(CheckpointError, match="no LM head"):
        from_pretrained(checkpoints[("llama", "scalar")], head="lm")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kv_cache_decode_equals_full_forward(checkpoints, arch):
    """Prefill left-padded prompts of different lengths, then decode token by token."""
    model, params = from_pretrained(checkpoints[(arch, "lm")])
    rng = np.random.default_rng(1)
    prompt_len, new_tokens = 6, 5
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
    decoded = np.stack(decoded, axis=1)
    expected = np.asarray(full_logits[:, prompt_len - 1 : -1])
    np.testing.assert_allclose(decoded, expected, atol=TOL)


def test_scan_and_remat_match_unrolled(checkpoints):
    hf_dir = checkpoints[("qwen2", "lm")]
    model, params = from_pretrained(hf_dir)
    ids, mask = _batch("left")
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    loss_mask = mask.astype(jnp.float32)

    def loss(p, m):
        logprobs, _ = sequence_token_logprobs(m, p, ids, mask, chunk_size=4)
        return -(logprobs * loss_mask).sum()

    ref_loss, ref_grads = jax.value_and_grad(loss)(params, model)
    for overrides in (dict(remat_policy="full"), dict(scan_layers=True, remat_policy="dots")):
        variant, variant_params = from_pretrained(hf_dir, **overrides)
        value, grads = jax.value_and_grad(loss)(variant_params, variant)
        np.testing.assert_allclose(value, ref_loss, rtol=1e-5)
        if overrides.get("scan_layers"):
            stacked = grads["layers"]["attn"]["q"]["kernel"]
            np.testing.assert_allclose(
                stacked[1], ref_grads["layers_1"]["attn"]["q"]["kernel"], atol=1e-5
            )
        else:
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, ref_grads)


def test_chunked_logprobs_match_full_log_softmax(checkpoints):
    model, params = from_pretrained(checkpoints[("gemma", "lm")])
    ids, mask = _batch("right")
    logits = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    full = jnp.take_along_axis(
        jax.nn.log_softmax(logits[:, :-1]), jnp.asarray(ids)[:, 1:, None], -1
    )[..., 0]
    for chunk in (None, 3, 4):
        chunked, entropy = sequence_token_logprobs(
            model, params, jnp.asarray(ids), jnp.asarray(mask), chunk_size=chunk
        )
        np.testing.assert_allclose(chunked[:, 1:], full, atol=1e-5)
        assert np.all(np.asarray(entropy) >= -1e-5)


def _dot_dtypes(jaxpr) -> list[tuple[str, ...]]:
    """Operand dtypes of every `dot_general` in a jaxpr, sub-jaxprs (jit, remat, scan) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dot_dtypes(inner)
    return found


def test_bf16_compute_is_bf16_and_close_to_fp32(checkpoints):
    """`dtype=bfloat16` (the `model.dtype` config key) computes every matmul in bf16 over fp32
    master params: the outputs differ from fp32 by bf16 rounding, not by 0, and stay close."""
    from jaxalign.config import base_config
    from jaxalign.trainers import setup

    hf_dir = checkpoints[("llama", "lm")]
    model32, params32 = from_pretrained(hf_dir)
    model16, params16 = from_pretrained(hf_dir, dtype=jnp.bfloat16)
    assert params16["embed"]["embedding"].dtype == jnp.float32  # fp32 master params
    ids, mask = map(jnp.asarray, _batch("none"))

    def matmul_dtypes(model, params):
        jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, ids, mask))(params)
        return set(_dot_dtypes(jaxpr.jaxpr))

    assert matmul_dtypes(model32, params32) == {("float32", "float32")}
    assert matmul_dtypes(model16, params16) == {("bfloat16", "bfloat16")}
    # A random-init model built from the training config's `model` section.
    model_config = base_config().model
    model_config.dtype = "bfloat16"
    model = Transformer(setup.model_config_for(model_config))
    abstract = shd.unbox(setup.abstract_params(model))  # shapes only, nothing allocated
    assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype("float32")}
    assert matmul_dtypes(model, abstract) == {("bfloat16", "bfloat16")}

    ref = np.asarray(model32.apply({"params": params32}, ids, mask))
    out = np.asarray(model16.apply({"params": params16}, ids, mask), np.float32)
    difference = np.abs(out - ref).max()
    assert 1e-3 < difference < 0.1, difference  # bf16 keeps 8 bits of mantissa: ~4e-3 relative


def test_llama3_rope_config_reaches_every_band():
    """The tiny Llama-3 checkpoint's RoPE frequencies fall in all three bands of Llama-3 scaling:
    wavelengths below original_length/high_freq_factor (left unchanged), between the two
    (interpolated) and above original_length/low_freq_factor (divided by `factor`)."""
    from tiny_hf import tiny_hf_config

    config = tiny_hf_config("llama3_rope")
    rope = config.rope_parameters
    head_dim = config.hidden_size // config.num_attention_heads
    wavelengths = 2 * np.pi * rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    original = rope["original_max_position_embeddings"]
    high, low = original / rope["high_freq_factor"], original / rope["low_freq_factor"]
    assert (wavelengths < high).any(), wavelengths
    assert ((wavelengths >= high) & (wavelengths <= low)).any(), wavelengths
    assert (wavelengths > low).any(), wavelengths
    # The test batch is long enough for the unchanged band to turn by more than a radian.
    assert _batch("none")[0].shape[1] > wavelengths.min() / (2 * np.pi)


# ----------------------------------------------------------------------------- bad inputs


def test_directory_without_weights(tmp_path, checkpoints):
    (tmp_path / "config.json").write_text(
        (checkpoints[("llama", "lm")] / "config.json").read_text()
    )
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        from_pretrained(tmp_path / "nothing-here" / "x")
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        from_pretrained(tmp_path)


def test_pickled_bin_refused_with_conversion_hint(tmp_path, checkpoints):
    (tmp_path / "config.json").write_text(
        (checkpoints[("llama", "lm")] / "config.json").read_text()
    )
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*safetensors only.*Convert"):
        from_pretrained(tmp_path)


def test_unsupported_config_option_named(tmp_path, checkpoints):
    src = checkpoints[("qwen2", "lm")]
    for option, value, pattern in [
        ("use_sliding_window", True, "use_sliding_window"),
        ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, "dynamic"),
        ("model_type", "mamba", "mamba"),
    ]:
        out = tmp_path / option
        out.mkdir()
        config = json.loads((src / "config.json").read_text())
        config[option] = value
        (out / "config.json").write_text(json.dumps(config))
        (out / "model.safetensors").symlink_to(src / "model.safetensors")
        with pytest.raises(UnsupportedConfigError, match=pattern):
            from_pretrained(out)


def test_shape_mismatch_names_file_and_tensor(tmp_path, checkpoints):
    src = checkpoints[("llama", "lm")]
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape \(48, 32\)",
    ):
        from_pretrained(tmp_path)
