"""Qwen3-MoE and Mixtral against `transformers`; the dropless expert computation; the router's
auxiliary loss; experts sharded over 8 fake devices."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import NamedSharding, PartitionSpec
from test_models import TOL, _batch, _hf_outputs, _positions
from tiny_hf import load_hf, save_random_hf_model

from jaxalign import sharding as shd
from jaxalign.config import DEFAULT_LOGICAL_RULES
from jaxalign.models import (
    from_pretrained,
    init_cache,
    moe,
    save_pretrained,
    sequence_token_logprobs,
)

_COMMON = dict(
    vocab_size=97,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    num_experts_per_tok=2,
    router_aux_loss_coef=0.02,
)
ARCHES = ("qwen3_moe", "mixtral")


def tiny_config(arch: str) -> transformers.PretrainedConfig:
    if arch == "qwen3_moe":  # norm_topk_prob=False: Qwen3-MoE's default, unlike Qwen3-30B-A3B
        return transformers.Qwen3MoeConfig(
            **_COMMON, intermediate_size=48, moe_intermediate_size=16, num_experts=8
        )
    return transformers.MixtralConfig(
        **_COMMON, intermediate_size=16, num_local_experts=4, sliding_window=6
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    heads = {"qwen3_moe": ("lm", "scalar"), "mixtral": ("lm",)}
    return {
        (arch, head): save_random_hf_model(tiny_config(arch), root / f"{arch}-{head}", head=head)
        for arch in ARCHES
        for head in heads[arch]
    }


@pytest.mark.parametrize(
    ("arch", "head"), [("qwen3_moe", "lm"), ("qwen3_moe", "scalar"), ("mixtral", "lm")]
)
def test_logits_match_transformers_and_round_trip(checkpoints, tmp_path, arch, head):
    hf_dir = checkpoints[(arch, head)]
    hf_model = load_hf(hf_dir, head)
    model, params = from_pretrained(hf_dir)
    assert model.config.num_experts == (8 if arch == "qwen3_moe" else 4)
    apply = jax.jit(model.apply)
    for padding in ("none", "right", "left"):
        ids, mask = _batch(padding)
        out = np.asarray(apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
        ref = _hf_outputs(hf_model, ids, mask, head)
        assert np.abs(out - ref)[mask.astype(bool)].max() <= TOL, (arch, head, padding)

    out_dir = save_pretrained(model, params, tmp_path / "export", max_shard_bytes=20_000)
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
    assert reloaded.config.router_aux_loss_coef == 0.02


@pytest.mark.parametrize("arch", ARCHES)
def test_kv_cache_decode_equals_full_forward(checkpoints, arch):
    model, params = from_pretrained(checkpoints[(arch, "lm")])
    rng = np.random.default_rng(1)
    prompt_len, new_tokens = 6, 5
    mask = (np.arange(prompt_len)[None] >= prompt_len - np.array([6, 3, 1])[:, None]).astype(
        np.int32
    )
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


def test_grouped_expert_computation_equals_dense_per_token_reference():
    """`ragged_dot` over expert-sorted rows == each token through its k experts' full kernels,
    values and gradients, with some experts receiving no token at all."""
    keys = jax.random.split(jax.random.key(0), 5)
    tokens, embed, width, experts, top_k = 13, 8, 6, 6, 2
    x = jax.random.normal(keys[0], (tokens, embed))
    gate, up = (0.3 * jax.random.normal(k, (experts, embed, width)) for k in keys[1:3])
    down = 0.3 * jax.random.normal(keys[3], (experts, width, embed))
    logits = jax.random.normal(keys[4], (tokens, experts)).at[:, 4:].add(-100.0)  # 4, 5 idle
    _, weights, chosen = moe.route(logits, top_k, norm_topk_prob=True)
    assert not np.isin(np.asarray(chosen), [4, 5]).any()
    act = jax.nn.silu

    def total(fn, x, gate, up, down):
        return jnp.sum(jnp.sin(fn(x, weights, chosen, gate, up, down, act)))

    grouped = jax.value_and_grad(functools.partial(total, moe.expert_mlp), argnums=(0, 1, 2, 3))
    dense = jax.value_and_grad(
        functools.partial(total, moe.dense_reference_mlp), argnums=(0, 1, 2, 3)
    )
    (value, grads), (ref_value, ref_grads) = grouped(x, gate, up, down), dense(x, gate, up, down)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(grads[1][4:]), 0.0)  # idle experts: no gradient


@pytest.mark.parametrize("arch", ARCHES)
def test_aux_loss_equals_transformers(checkpoints, arch):
    """X·Σ f_i·P_i over layers and non-padding tokens, as `output_router_logits=True` computes it,
    and the trainers' term coef·aux·denominator with HF's coefficient."""
    hf_dir = checkpoints[(arch, "lm")]
    hf_model = load_hf(hf_dir)
    model, params = from_pretrained(hf_dir)
    ids, mask = _batch("left")
    with torch.no_grad():
        ref = hf_model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(_positions(mask)),
            output_router_logits=True,
        ).aux_loss.item()
    _, _, stats = sequence_token_logprobs(
        model, params, jnp.asarray(ids), jnp.asarray(mask), return_router_stats=True
    )
    np.testing.assert_allclose(float(moe.aux_loss(stats)), ref, rtol=1e-5)
    assert float(stats.tokens) == model.config.num_layers * mask.sum()
    term, metrics = moe.router_loss_terms(model.config, stats, jnp.float32(7.0))
    np.testing.assert_allclose(float(term), 0.02 * ref * 7.0, rtol=1e-5)
    assert float(metrics["router/dropped_tokens"]) == 0.0
    load = np.asarray(moe.expert_load(stats))
    np.testing.assert_allclose(load.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        float(metrics["router/max_load"]) / 7.0, load.max() * load.size, rtol=1e-5
    )


def test_sft_loss_adds_the_aux_loss(checkpoints):
    """The SFT loss of a MoE model is NLL + coef·aux; with coef 0 it is the NLL alone."""
    from jaxalign.trainers.sft import sft_loss_fn

    model, params = from_pretrained(checkpoints[("qwen3_moe", "lm")])
    ids, mask = (jnp.asarray(a) for a in _batch("right"))
    batch = dict(input_ids=ids, attention_mask=mask, positions=None, loss_mask=mask)
    loss, aux = sft_loss_fn(model, chunk_size=None)(params, batch, None, None)
    bare = model.clone(config=model.config.replace(router_aux_loss_coef=0.0))
    nll, _ = sft_loss_fn(bare, chunk_size=None)(params, batch, None, None)
    aux_loss = aux["metrics"]["router/aux_loss"] / aux["denominator"]
    np.testing.assert_allclose(loss, nll + 0.02 * aux_loss * aux["denominator"], rtol=1e-6)
    assert aux_loss > 0


def test_experts_sharded_over_8_devices_match_one_device(checkpoints):
    """Expert kernels sharded 8 ways on their `expert` axis (one expert per device) and the batch
    split over the same devices: loss, router stats and gradients equal the one-device run (whose
    layers are unrolled; the sharded model's are scanned)."""
    hf_dir = checkpoints[("qwen3_moe", "lm")]
    model, params = from_pretrained(hf_dir)
    ids, mask = (jnp.tile(jnp.asarray(a), (3, 1))[:8] for a in _batch("left"))  # 8 rows

    def loss(params, model, ids, mask):
        logprobs, _, stats = sequence_token_logprobs(
            model, params, ids, mask, return_router_stats=True
        )
        return -(logprobs * mask).sum() + moe.aux_loss(stats), stats

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    (ref_loss, ref_stats), ref_grads = grad_fn(params, model, ids, mask)

    mesh = shd.make_mesh(shape=(1, 8, 1), axis_names=("data", "fsdp", "tensor"))
    rules = (("expert", "fsdp"), *DEFAULT_LOGICAL_RULES)
    scanned, _ = from_pretrained(hf_dir, scan_layers=True)
    abstract = jax.eval_shape(lambda: scanned.init(jax.random.key(0), ids[:1, :1])["params"])
    shardings = shd.param_shardings(abstract, mesh, rules)
    _, sharded_params = from_pretrained(hf_dir, scan_layers=True, shardings=shardings)
    gate = sharded_params["layers"]["moe"]["gate"]  # [L, X, E, F]
    assert gate.sharding.spec == PartitionSpec(None, "fsdp", None, "tensor")
    assert gate.addressable_shards[0].data.shape == (2, 1, 32, 16)
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    ids8, mask8 = (jax.device_put(a, batch_sharding) for a in (ids, mask))
    (value, stats), grads = jax.jit(grad_fn, static_argnums=1)(sharded_params, scanned, ids8, mask8)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), stats, ref_stats)
    for name in ("gate", "up", "down"):
        for layer in (0, 1):
            np.testing.assert_allclose(
                grads["layers"]["moe"][name][layer],
                ref_grads[f"layers_{layer}"]["moe"][name],
                atol=1e-4,
            )


TINY_MOE_INIT = dict(
    model_type="qwen3_moe",
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    qk_norm=True,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    router_aux_loss_coef=0.01,
)


def test_sft_and_dpo_train_a_tiny_moe(tiny_data_dir, tmp_path):
    """Both losses carry coef·aux (the logged `router/aux_loss` is aux itself); DPO's first step is
    log 2 + coef·aux (policy = reference)."""
    from test_models_gemma import train_tiny

    sft = train_tiny("sft", tiny_data_dir, tmp_path / "sft", TINY_MOE_INIT)
    assert len(sft) == 4 and all(np.isfinite(r["loss"]) for r in sft)
    assert sft[-1]["loss"] < sft[0]["loss"]
    assert all(r["router/dropped_tokens"] == 0.0 and r["router/max_load"] >= 1.0 for r in sft)
    dpo = train_tiny("dpo", tiny_data_dir, tmp_path / "dpo", TINY_MOE_INIT)
    assert all(np.isfinite(r["loss"]) for r in dpo)
    aux = dpo[0]["router/aux_loss"]
    assert 0.0 < aux <= 4.0  # k = 2 when balanced, at most X = 4
    np.testing.assert_allclose(dpo[0]["loss"], np.log(2) + 0.01 * aux, rtol=1e-5)
