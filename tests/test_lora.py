"""LoRA / QLoRA on the decoder: exact init, adapters off, merge, PEFT interop, sharding, QLoRA."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from tiny_hf import tiny_hf_config

from jaxalign import sharding
from jaxalign.config import DEFAULT_LOGICAL_RULES
from jaxalign.models import Transformer, from_hf_config
from jaxalign.models.lora import (
    LoraConfig,
    dequantized_base,
    init_lora,
    load_peft_adapter,
    merge_adapters,
    save_peft_adapter,
)

IDS = jnp.array([[5, 9, 3, 17, 2, 40], [7, 1, 8, 8, 60, 0]], jnp.int32)
MASK = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]], jnp.int32)


def _base(arch: str, scan: bool = False, head: str = "lm", **overrides):
    config = from_hf_config(
        tiny_hf_config(arch).to_dict(), scan_layers=scan, head=head, **overrides
    )
    model = Transformer(config)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), IDS)["params"])
    return model, params


def _randomize_b(params, seed: int = 1, scale: float = 0.05):
    """Non-zero B (and a fresh A) so an adapter changes the output and the tests can fail."""
    flat = flax.traverse_util.flatten_dict(params, is_leaf=lambda _, v: hasattr(v, "how"))
    for i, path in enumerate(sorted(p for p in flat if p[-1].endswith("_lora_b"))):
        flat[path] = scale * jax.random.normal(jax.random.PRNGKey(seed + i), flat[path].shape)
    return flax.traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_init_logits_equal_base_exactly(arch, scan):
    model, params = _base(arch, scan)
    lora_model, lora_params = init_lora(
        model, params, LoraConfig(rank=4), rng=jax.random.PRNGKey(3)
    )
    base = jax.jit(lambda p: model.apply({"params": p}, IDS, attention_mask=MASK))(params)
    lora = jax.jit(lambda p: lora_model.apply(p, IDS, attention_mask=MASK))(lora_params)
    np.testing.assert_array_equal(np.asarray(lora), np.asarray(base))
    # Every projection of every layer has an adapter; A is random, B zero; the head has none.
    flat = flax.traverse_util.flatten_dict(lora_params)
    adapters = [p for p in flat if p[-1].startswith("kernel_lora")]
    per_layer = 7 if arch == "llama" else 6
    assert len(adapters) == 2 * per_layer * (1 if scan else model.config.num_layers)
    assert all(float(jnp.abs(flat[p]).max()) > 0 for p in adapters if p[-1].endswith("_a"))
    assert all(float(jnp.abs(flat[p]).max()) == 0 for p in adapters if p[-1].endswith("_b"))


def test_target_modules_map_to_flax_modules():
    assert LoraConfig(target_modules="q_proj,v_proj").flax_targets("llama") == ("attn/q", "attn/v")
    assert LoraConfig(target_modules=("c_attn",)).flax_targets("gpt2") == _qkv()
    assert LoraConfig(target_modules="c_proj").flax_targets("gpt2") == ("attn/o", "mlp/proj")
    assert len(LoraConfig().flax_targets("qwen2")) == 7
    with pytest.raises(ValueError, match="c_attn"):
        LoraConfig(target_modules="c_attn").flax_targets("llama")
    with pytest.raises(ValueError, match="quantization"):
        LoraConfig(quantization="int4")


def _qkv():
    return ("attn/q", "attn/k", "attn/v")


@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_split_combine_and_adapters_off(head):
    model, params = _base("llama", head=head)
    lora_model, lora_params = init_lora(
        model,
        params,
        LoraConfig(rank=2, target_modules="q_proj,down_proj"),
        rng=jax.random.PRNGKey(0),
    )
    lora_params = _randomize_b(lora_params)
    trainable, frozen = lora_model.split(lora_params)
    trainable_paths = set(flax.traverse_util.flatten_dict(trainable))
    assert all(p[-1].startswith("kernel_lora") or p[0] == "score" for p in trainable_paths)
    assert (("score", "kernel") in trainable_paths) == (head == "scalar")
    assert len(trainable_paths) == 2 * 2 * model.config.num_layers + (head == "scalar")
    assert jax.tree.structure(lora_model.combine(trainable, frozen)) == jax.tree.structure(
        lora_params
    )

    base = model.apply({"params": params}, IDS, attention_mask=MASK)
    lora = lora_model.apply(lora_params, IDS, attention_mask=MASK)
    assert float(jnp.abs(lora - base).max()) > 1e-3  # the adapters do something
    # Adapters off from the full tree or from `frozen` (+ head): the base model, bit for bit.
    off = lora_model.reference_apply(lora_params, IDS, attention_mask=MASK)
    np.testing.assert_array_equal(np.asarray(off), np.asarray(base))
    if head == "lm":
        off = lora_model.reference_apply(frozen, IDS, attention_mask=MASK)
        np.testing.assert_array_equal(np.asarray(off), np.asarray(base))


def test_dropout_only_with_rng():
    model, params = _base("llama")
    lora_model, lora_params = init_lora(
        model, params, LoraConfig(rank=2, dropout=0.5), rng=jax.random.PRNGKey(0)
    )
    lora_params = _randomize_b(lora_params)
    a = lora_model.apply(lora_params, IDS)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(lora_model.apply(lora_params, IDS)))
    b = lora_model.apply(lora_params, IDS, dropout_rng=jax.random.PRNGKey(1))
    assert float(jnp.abs(a - b).max()) > 1e-4


@pytest.mark.parametrize("arch,scan", [("llama", False), ("gpt2", True)])
def test_merged_params_equal_lora_forward(arch, scan):
    model, params = _base(arch, scan)
    lora_model, lora_params = init_lora(
        model, params, LoraConfig(rank=4), rng=jax.random.PRNGKey(0)
    )
    lora_params = _randomize_b(lora_params)
    merged = merge_adapters(lora_model, lora_params)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    lora = lora_model.apply(lora_params, IDS, attention_mask=MASK)
    out = model.apply({"params": merged}, IDS, attention_mask=MASK)
    np.testing.assert_allclose(np.asarray(out), np.asarray(lora), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    from tiny_hf import make_tiny_hf_model

    root = tmp_path_factory.mktemp("lora_ckpt")
    return {
        (arch, head): make_tiny_hf_model(arch, root / f"{arch}_{head}", head=head)
        for arch, head in (("llama", "lm"), ("gpt2", "lm"), ("llama", "scalar"))
    }


@pytest.mark.parametrize(
    "arch,head,scan,targets",
    [
        ("llama", "lm", False, "all-linear"),
        ("gpt2", "lm", True, "all-linear"),
        ("llama", "scalar", True, "q_proj,v_proj,up_proj"),
    ],
)
def test_peft_loads_our_adapter_on_torch_base(
    tiny_checkpoints, tmp_path, arch, head, scan, targets
):
    import peft
    import torch
    from tiny_hf import load_hf

    from jaxalign.models import from_pretrained

    checkpoint = tiny_checkpoints[arch, head]
    model, params = from_pretrained(checkpoint, scan_layers=scan)
    lora = LoraConfig(rank=4, alpha=8.0, target_modules=targets)
    lora_model, lora_params = init_lora(model, params, lora, rng=jax.random.PRNGKey(0))
    lora_params = _randomize_b(lora_params)
    save_peft_adapter(
        lora_model, lora_params, tmp_path / "adapter", base_model_name_or_path=str(checkpoint)
    )

    torch_model = peft.PeftModel.from_pretrained(load_hf(checkpoint, head), tmp_path / "adapter")
    with torch.no_grad():
        out = torch_model(
            input_ids=torch.tensor(np.asarray(IDS)).long(),
            attention_mask=torch.tensor(np.asarray(MASK)).long(),
        ).logits.numpy()
    ours = np.asarray(lora_model.apply(lora_params, IDS, attention_mask=MASK))
    if head == "scalar":  # HF pools the last non-pad token
        ours = ours[np.arange(2), np.asarray(MASK).sum(-1) - 1][:, None]
    else:
        out, ours = out * np.asarray(MASK)[..., None], ours * np.asarray(MASK)[..., None]
    np.testing.assert_allclose(out, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch,scan", [("llama", True), ("gpt2", False)])
def test_peft_adapter_round_trip(tmp_path, arch, scan):
    model, params = _base(arch, scan, head="scalar" if arch == "llama" else "lm")
    lora = LoraConfig(rank=3, alpha=6.0)
    lora_model, lora_params = init_lora(model, params, lora, rng=jax.random.PRNGKey(0))
    lora_params = _randomize_b(lora_params)
    save_peft_adapter(lora_model, lora_params, tmp_path / "adapter")
    _, fresh = init_lora(model, params, lora, rng=jax.random.PRNGKey(9))
    loaded = load_peft_adapter(lora_model, fresh, tmp_path / "adapter")
    for (path, want), got in zip(
        flax.traverse_util.flatten_dict(lora_params).items(),
        flax.traverse_util.flatten_dict(loaded).values(),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-7, err_msg=str(path))


@pytest.mark.parametrize(
    "scan", [pytest.param(False, marks=pytest.mark.slow), True], ids=["unrolled", "scan"]
)
def test_adapters_shard_like_their_kernels(scan):
    model, params = _base("llama", scan, vocab_size=128, hidden_size=64, intermediate_size=64)
    lora_model, lora_params = init_lora(
        model, params, LoraConfig(rank=4), rng=jax.random.PRNGKey(0)
    )
    lora_params = _randomize_b(lora_params)
    mesh = sharding.make_mesh(shape=(2, 2, 2), axis_names=("data", "fsdp", "tensor"))
    rules = DEFAULT_LOGICAL_RULES
    abstract = lora_model.abstract_params()
    shardings = sharding.param_shardings(abstract, mesh, rules)
    placed = jax.device_put(lora_params, shardings)
    flat = flax.traverse_util.flatten_dict(placed)
    boxes = flax.traverse_util.flatten_dict(abstract)
    layer = ("layers",) if scan else ("layers_0",)
    lead = (None,) if scan else ()
    for module, in_axis, out_axis in [
        (("attn", "q"), "fsdp", "tensor"),
        (("attn", "o"), "tensor", "fsdp"),
        (("mlp", "down"), "tensor", "fsdp"),
    ]:
        kernel = boxes[(*layer, *module, "kernel")].names
        lora_a = flat[(*layer, *module, "kernel_lora_a")]
        lora_b = flat[(*layer, *module, "kernel_lora_b")]
        assert boxes[(*layer, *module, "kernel_lora_a")].names == (*kernel[: len(lead) + 1], None)
        assert lora_a.sharding.spec == jax.sharding.PartitionSpec(*lead, in_axis, None)
        assert lora_b.sharding.spec == jax.sharding.PartitionSpec(*lead, None, out_axis)
        assert len(lora_a.sharding.device_set) == 8
    sharded = jax.jit(lambda p: lora_model.apply(p, IDS))(placed)
    single = lora_model.apply(lora_params, IDS)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)


# Measured on these tiny random models: max|Δlogit| / max|logit| ≈ 0.01 (int8), ≈ 0.15 (nf4).
QLORA_TOLERANCE = {"int8": 0.03, "nf4": 0.3}


@pytest.mark.parametrize(
    "quantization,scan",
    [
        ("int8", False),
        ("nf4", True),
        pytest.param("int8", True, marks=pytest.mark.slow),
        pytest.param("nf4", False, marks=pytest.mark.slow),
    ],
)
def test_qlora_logits_within_tolerance(quantization, scan):
    model, params = _base("llama", scan, hidden_size=64, intermediate_size=128, head_dim=16)
    lora = LoraConfig(rank=4, quantization=quantization)
    lora_model, lora_params = init_lora(model, params, lora, rng=jax.random.PRNGKey(0))
    base = model.apply({"params": params}, IDS, attention_mask=MASK)
    qlora = jax.jit(lambda p: lora_model.apply(p, IDS, attention_mask=MASK))(lora_params)
    error = float(jnp.abs(qlora - base).max() / jnp.abs(base).max())
    assert 0 < error < QLORA_TOLERANCE[quantization], error
    # Adapters off = the quantized base, exactly the LoRA forward at B = 0.
    off = jax.jit(lambda p: lora_model.reference_apply(p, IDS, attention_mask=MASK))(lora_params)
    np.testing.assert_array_equal(np.asarray(off), np.asarray(qlora))
    # Each weight is within half a quantization step (of the largest gap, for nf4) of its absmax.
    half_step = {"int8": 0.5 / 127, "nf4": 0.15}[quantization]  # nf4: (1 - 0.723) / 2 + rounding
    deq = flax.traverse_util.flatten_dict(dequantized_base(lora_model, lora_params))
    for path, weight in flax.traverse_util.flatten_dict(params).items():
        if path[-1] == "kernel" and path[-2] in ("q", "o", "down"):
            assert float(jnp.abs(deq[path] - weight).max()) <= half_step * float(
                jnp.abs(weight).max()
            )

    # Storage: kernels in 8 or 4 bits (+ scales).
    def kernel_bytes(tree):
        leaves = jax.tree.leaves(flax.traverse_util.flatten_dict(tree, sep="/"))
        return sum(
            x.size * (0.5 if x.dtype.itemsize == 1 and "4" in x.dtype.name else x.dtype.itemsize)
            for x in leaves
        )

    frozen = lora_model.split(lora_params)[1]
    stored = kernel_bytes({k: v for k, v in frozen.items() if k.startswith("layers")})
    full = kernel_bytes({k: v for k, v in params.items() if k.startswith("layers")})
    assert stored < {"int8": 0.35, "nf4": 0.25}[quantization] * full, (stored, full)
    # QLoRA trains: gradients exist for the adapters only.
    trainable, frozen = lora_model.split(_randomize_b(lora_params))
    grads = jax.jit(jax.grad(lambda t: lora_model.apply(lora_model.combine(t, frozen), IDS).sum()))(
        trainable
    )
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
