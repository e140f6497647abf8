"""Splash attention (Pallas, run here in interpret mode) computes what the xla path computes.

Model logits at real tokens and parameter gradients of a loss over them agree within 1e-5 (fp32)
for causal, left-padded, packed and shared-prompt (branch ids) masks, with grouped kv heads, a
binding sliding window, soft-capping, and on 8 devices under a mesh. Outputs at padding differ by
design (no loss reads them), so they are excluded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxalign import sharding as shd
from jaxalign.config import base_config
from jaxalign.models import ModelConfig, Transformer, init_cache
from jaxalign.models import attention as attention_lib
from jaxalign.models.attention import SegmentMask, resolve_attention_impl, splash_attention

TOL = 1e-5
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    dtype="float32",
)


def _batch(layout: str, seed: int = 0) -> dict[str, np.ndarray]:
    """`[4, 12]` ids, segment ids, positions (0.. per segment) and, for "shared", branch ids.

    "mixed" has one row of each unshared layout: causal (no padding), left-padded, packed
    (segment ids 1..3) and packed + right-padded."""
    rng = np.random.default_rng(seed)
    batch, seq_len = 4, 12
    segments = np.ones((batch, seq_len), np.int32)
    branch_ids = None
    if layout == "mixed":
        segments[1, :5] = 0
        segments[2] = [1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3]
        segments[3] = [1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0]
    elif layout == "shared":  # prompt | chosen | rejected, right padded
        branch_ids = np.zeros((batch, seq_len), np.int32)
        for row, (n_prompt, n_chosen, n_rejected) in enumerate(
            [(3, 4, 3), (1, 2, 5), (5, 3, 4), (0, 4, 4)]
        ):
            n_real = n_prompt + n_chosen + n_rejected
            segments[row, n_real:] = 0
            branch_ids[row, :n_real] = np.repeat([0, 1, 2], [n_prompt, n_chosen, n_rejected])
    positions = np.zeros_like(segments)
    for row in range(batch):
        for segment in set(segments[row].tolist()) - {0}:
            index = np.flatnonzero(segments[row] == segment)
            positions[row, index] = np.arange(len(index))
    if branch_ids is not None:  # rejected continues after the prompt, as if chosen were absent
        for row in range(batch):
            rejected = np.flatnonzero(branch_ids[row] == 2)
            positions[row, rejected] -= (branch_ids[row] == 1).sum()
    out = dict(
        input_ids=rng.integers(1, TINY["vocab_size"], (batch, seq_len)).astype(np.int32),
        attention_mask=segments,
        positions=positions,
    )
    if branch_ids is not None:
        out["branch_ids"] = branch_ids
    return out


def _logits_and_grads(config: ModelConfig, params, batch):
    """Logits at real tokens (0 elsewhere) and the gradient of their weighted sum."""
    model = Transformer(config)
    real = jnp.asarray(batch["attention_mask"] != 0)[..., None]
    weights = jax.random.normal(jax.random.key(1), (*batch["input_ids"].shape, config.vocab_size))

    def loss(params):
        logits = model.apply({"params": params}, **batch)
        logits = jnp.where(real, logits, 0.0)
        return (logits * weights).mean(-1).sum(), logits  # gradients of order 1

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


def _assert_close(got, want) -> float:
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), got, want))
    assert max(diffs) < TOL, diffs
    return max(diffs)


def _init(config: ModelConfig):
    init = jax.jit(Transformer(config).init)  # eager init dispatches op by op: seconds
    return shd.unbox(init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])


# Soft-capped logits, the 1/sqrt(query_pre_attn_scalar) scale and a window that binds (T = 12 > 5),
# in a rematerialised layer.
_CAPPED_WINDOW = dict(
    sliding_window=5, attn_logit_softcap=2.0, query_pre_attn_scalar=12.0, remat_policy="full"
)


@pytest.mark.parametrize(
    "layout, overrides",
    [
        ("mixed", {}),
        ("shared", {}),
        ("mixed", _CAPPED_WINDOW),
        # Gemma 2-like: a sliding and a global layer, scanned (the kernel picked by lax.cond).
        pytest.param(
            "mixed",
            dict(
                _CAPPED_WINDOW,
                model_type="gemma2",
                num_layers=2,
                layer_types=("sliding_attention", "full_attention"),
                scan_layers=True,
            ),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["causal-left-packed", "shared", "window-softcap", "gemma2-scanned"],
)
def test_splash_matches_xla(layout, overrides):
    config = ModelConfig(**{**TINY, **overrides}, attention_impl="xla")
    params = _init(config)
    batch = _batch(layout)
    want = _logits_and_grads(config, params, batch)
    got = _logits_and_grads(config.replace(attention_impl="splash"), params, batch)
    _assert_close(got, want)


def test_splash_falls_back_to_xla_for_branch_ids_with_a_binding_window(caplog):
    """Rejected positions skip the chosen tokens, so an index window cannot express theirs."""
    attention_lib.log_once.cache_clear()
    config = ModelConfig(**TINY, sliding_window=4, attention_impl="xla")
    params, batch = _init(config), _batch("shared")
    splash_config = config.replace(attention_impl="splash")
    jaxpr = jax.make_jaxpr(lambda p: Transformer(splash_config).apply({"params": p}, **batch))
    assert "pallas_call" not in str(jaxpr(params))
    assert "use the xla path" in caplog.text
    _assert_close(
        _logits_and_grads(splash_config, params, batch), _logits_and_grads(config, params, batch)
    )


def _is_jaxpr(x) -> bool:
    return isinstance(x, jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr)


def _shard_map_specs(fn, *args) -> list:
    """The `in_specs` of every `shard_map` in the traced program of `fn(*args)`."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "shard_map" and "pallas_call" in str(eqn.params["jaxpr"]):
                found.append(eqn.params["in_specs"])
            for param in jax.tree.leaves(list(eqn.params.values()), is_leaf=_is_jaxpr):
                if isinstance(param, jax.extend.core.ClosedJaxpr):
                    visit(param.jaxpr)
                elif isinstance(param, jax.extend.core.Jaxpr):
                    visit(param)

    visit(jaxpr.jaxpr)
    return found


def test_splash_on_a_mesh_matches_one_device():
    """Batch over (data, fsdp), heads over tensor: the kernel runs in `shard_map`, and logits and
    gradients of shared-prompt rows equal the unsharded splash and the xla results."""
    config = ModelConfig(**TINY, attention_impl="splash")
    params, batch = _init(config), _batch("shared")
    want = _logits_and_grads(config.replace(attention_impl="xla"), params, batch)
    single = _logits_and_grads(config, params, batch)
    mesh = shd.make_mesh(shape=(2, 2, 2), axis_names=("data", "fsdp", "tensor"))
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    with jax.set_mesh(mesh):
        specs = _shard_map_specs(
            lambda p: Transformer(config).apply({"params": p}, **sharded_batch), params
        )
        got = _logits_and_grads(config, params, sharded_batch)
    qkv = PartitionSpec(("data", "fsdp"), "tensor", None, None)
    # q, k and v split over batch and heads (the kernel's mask tables come first, replicated).
    assert specs and all(spec.count(qkv) == 3 for spec in specs), specs
    assert got[0].sharding.mesh.shape == mesh.shape
    _assert_close(got, single)
    _assert_close(got, want)


def test_splash_shards_one_kv_head_by_repeating_it():
    """K = 1 cannot split over tensor = 2: k and v are repeated per query head first."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(4, 12, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(4, 1, 12, 8)), jnp.float32) for _ in range(2))
    segments = SegmentMask(jnp.asarray(_batch("mixed")["attention_mask"]))
    real = (segments.segment_ids != 0)[:, :, None, None]
    attend = jax.jit(lambda q, k, v: jnp.where(real, splash_attention(q, k, v, segments), 0.0))
    want = attend(q, k, v)
    mesh = shd.make_mesh(shape=(2, 2, 2), axis_names=("data", "fsdp", "tensor"))
    with jax.set_mesh(mesh):
        (specs,) = _shard_map_specs(attend, q, k, v)
        got = attend(q, k, v)
    assert specs.count(PartitionSpec(("data", "fsdp"), "tensor", None, None)) == 3
    _assert_close(got, want)


def test_auto_resolves_per_backend(monkeypatch):
    base = ModelConfig(**TINY)
    assert base.attention_impl == "auto"
    bf16 = base.replace(dtype="bfloat16")
    capped = bf16.replace(attn_logit_softcap=50.0)
    assert resolve_attention_impl(base, backend="tpu") == "splash"
    assert resolve_attention_impl(capped, backend="tpu") == "splash"
    assert resolve_attention_impl(bf16, backend="gpu") == "cudnn"
    assert resolve_attention_impl(base, backend="gpu") == "xla"  # fp32
    assert resolve_attention_impl(capped, backend="gpu") == "xla"  # cudnn has no soft-cap
    assert resolve_attention_impl(bf16.replace(head_dim=12), backend="gpu") == "xla"
    assert resolve_attention_impl(bf16, backend="cpu") == "xla"
    assert resolve_attention_impl(bf16.replace(attention_impl="xla"), backend="tpu") == "xla"
    assert resolve_attention_impl(base) == "xla"  # these tests run on CPU

    # The model asks the same question: "tpu" puts the kernel into the traced program.
    batch = _batch("mixed")
    params = _init(base)
    trace = lambda: str(  # noqa: E731
        jax.make_jaxpr(lambda p: Transformer(base).apply({"params": p}, **batch))(params)
    )
    assert "pallas_call" not in trace()
    monkeypatch.setattr(attention_lib, "_backend", lambda: "tpu")
    assert "pallas_call" in trace()


def test_auto_takes_cudnn_only_for_even_cache_free_forwards_on_gpu(monkeypatch):
    monkeypatch.setattr(attention_lib, "_backend", lambda: "gpu")
    auto = ModelConfig(**TINY).replace(dtype="bfloat16")
    assert attention_lib.dense_mask_impl(auto, cached=False, seq_len=64) == "cudnn"
    assert attention_lib.dense_mask_impl(auto, cached=False, seq_len=63) == "xla"
    assert attention_lib.dense_mask_impl(auto, cached=True, seq_len=64) == "xla"
    explicit = auto.replace(attention_impl="cudnn")
    assert attention_lib.dense_mask_impl(explicit, cached=True, seq_len=1) == "cudnn"
    assert (
        attention_lib.dense_mask_impl(auto.replace(dtype="float32"), cached=False, seq_len=64)
        == "xla"
    )


def test_attention_impl_is_validated():
    with pytest.raises(ValueError, match="allowed"):
        ModelConfig(**TINY, attention_impl="flash")
    with pytest.raises(ValueError, match="soft-capping"):
        ModelConfig(**TINY, attention_impl="cudnn", attn_logit_softcap=50.0)
    ModelConfig(**TINY, attention_impl="splash", attn_logit_softcap=50.0)
    assert base_config().model.attention_impl == "auto"


def test_splash_decodes_with_a_kv_cache_on_the_xla_path():
    """Prefill and decode (the cache path) take the dense mask: no kernel, xla's numbers."""
    config = ModelConfig(**TINY, attention_impl="splash")
    params, batch = _init(config), _batch("mixed")
    ids, mask = batch["input_ids"][1:2], batch["attention_mask"][1:2]  # the left-padded row

    @jax.jit
    def prefill(params):
        cache = init_cache(config, 1, 16)
        return Transformer(config).apply({"params": params}, ids, mask, cache=cache)[0]

    assert "pallas_call" not in str(jax.make_jaxpr(prefill)(params))
    want = jax.jit(Transformer(config.replace(attention_impl="xla")).apply)(
        {"params": params}, ids, mask
    )
    np.testing.assert_allclose(prefill(params)[:, 5:], want[:, 5:], atol=TOL)
