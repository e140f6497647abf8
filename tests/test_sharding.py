"""Mesh construction and logical-rule sharding, checked on real arrays over 8 fake CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxalign import distributed, optim, sharding

AXES = ("data", "fsdp", "tensor")
RULES = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("batch", ("data", "fsdp")),
)


class ToyBlock(nn.Module):
    """One transformer-shaped block using the model contract's logical names."""

    embed: int = 16
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    mlp: int = 32

    @nn.compact
    def __call__(self, x, _):
        q = self.param(
            "q",
            nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("embed", "heads", "head_dim")
            ),
            (self.embed, self.heads, self.head_dim),
        )
        k = self.param(
            "k",
            nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("embed", "kv_heads", "head_dim")
            ),
            (self.embed, self.kv_heads, self.head_dim),
        )
        o = self.param(
            "o",
            nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("heads", "head_dim", "embed")
            ),
            (self.heads, self.head_dim, self.embed),
        )
        up = self.param(
            "up",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "mlp")),
            (self.embed, self.mlp),
        )
        down = self.param(
            "down",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("mlp", "embed")),
            (self.mlp, self.embed),
        )
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (self.embed,)
        )
        del q, k, o, up, down  # only their creation matters here; keep compiles cheap
        return x * scale, None


class ToyLM(nn.Module):
    vocab: int = 64
    embed: int = 16
    num_layers: int = 2

    @nn.compact
    def __call__(self, tokens):
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (self.vocab, self.embed),
        )
        blocks = nn.scan(
            ToyBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(embed=self.embed)
        x, _ = blocks(table[tokens], None)
        return x


# RBG keys compile ~4x faster than threefry on CPU; these tests check placement, not values.
KEY = jax.random.key(0, impl="rbg")


def toy_init(vocab=64):
    model = ToyLM(vocab=vocab)
    return lambda rng: model.init(rng, jnp.zeros((2, 4), jnp.int32))["params"]


def test_mesh_fills_minus_one():
    mesh = sharding.make_mesh(shape=(-1, 2, 1), axis_names=AXES)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert mesh.devices.size == 8


@pytest.mark.parametrize("shape", [(3, -1, 1), (2, 2, 1), (-1, -1, 1)])
def test_mesh_bad_shape_names_config_key(shape):
    with pytest.raises(ValueError, match=r"mesh\.shape"):
        sharding.make_mesh(shape=shape, axis_names=AXES)


def test_logical_to_mesh_axes_falls_back_when_axis_used():
    rules = (("heads", "tensor"), ("mlp", "tensor"), ("mlp", None))
    assert sharding.logical_to_mesh_axes(("heads", "mlp", None), rules) == P("tensor", None, None)
    mesh = sharding.make_mesh(shape=(2, 2, 2), axis_names=AXES)
    assert sharding.logical_sharding(mesh, RULES, ("batch", None, "embed")).spec == P(
        ("data", "fsdp"), None, None
    )
    with pytest.raises(ValueError, match="embd"):
        sharding.logical_to_mesh_axes(("embd",), RULES)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_init_sharded_follows_rules(mesh_shape):
    mesh = sharding.make_mesh(shape=mesh_shape, axis_names=AXES)
    params, shardings = sharding.init_sharded(toy_init(), mesh, RULES, KEY)

    emb = params["embedding"]
    blocks = params["ScanToyBlock_0"]
    assert emb.sharding.spec == P("tensor", "fsdp")
    assert blocks["q"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert blocks["k"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert blocks["o"].sharding.spec == P(None, "tensor", None, "fsdp")
    assert blocks["up"].sharding.spec == P(None, "fsdp", "tensor")
    assert blocks["down"].sharding.spec == P(None, "tensor", "fsdp")
    assert blocks["scale"].sharding.spec == P(None, "fsdp")
    assert blocks["q"].shape == (2, 16, 4, 8)
    # Each of these is split over fsdp x tensor, so that many distinct shards exist.
    for leaf in (emb, blocks["q"], blocks["up"]):
        distinct = {str(idx) for idx in leaf.sharding.devices_indices_map(leaf.shape).values()}
        assert len(distinct) == mesh.shape["fsdp"] * mesh.shape["tensor"]
    # Returned shardings equal the arrays' shardings.
    same = jax.tree.map(lambda a, s: a.sharding == s, params, shardings)
    assert all(jax.tree.leaves(same))
    np.testing.assert_array_equal(np.asarray(blocks["scale"]), np.ones((2, 16), np.float32))


def test_init_sharded_train_state_shards_optimizer_moments_like_params():
    mesh = sharding.make_mesh(shape=(2, 2, 2), axis_names=AXES)
    tx, _ = optim.make_optimizer(
        ml_collections.ConfigDict(
            dict(
                name="adamw",
                learning_rate=1e-3,
                schedule="constant",
                warmup_steps=0,
                min_lr_ratio=0.0,
                weight_decay=0.1,
                b1=0.9,
                b2=0.95,
                eps=1e-8,
                max_grad_norm=1.0,
            )
        ),
        total_steps=10,
    )

    def init_state(rng):
        params = toy_init()(rng)  # boxed: optax keeps the boxes on its moments
        return {"params": params, "opt_state": tx.init(params)}

    state, _ = sharding.init_sharded(init_state, mesh, RULES, KEY)
    adam = state["opt_state"][1]  # chain: clip, scale_by_adam, decay, lr
    assert adam.mu["embedding"].sharding.spec == P("tensor", "fsdp")
    assert adam.nu["ScanToyBlock_0"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert adam.count.sharding.spec == P()


def test_indivisible_dim_raises_with_path_and_sizes():
    mesh = sharding.make_mesh(shape=(2, 2, 2), axis_names=AXES)
    # vocab=65 over tensor=2 cannot split evenly.
    with pytest.raises(ValueError) as err:
        sharding.init_sharded(toy_init(vocab=65), mesh, RULES, KEY)
    msg = str(err.value)
    assert "'embedding'" in msg and "size 65" in msg and "tensor=2" in msg


def test_shard_batch_global_array():
    mesh = sharding.make_mesh(shape=(2, 4, 1), axis_names=AXES)
    local = {
        "input_ids": np.arange(16 * 3, dtype=np.int32).reshape(16, 3),
        "weights": np.linspace(0, 1, 16, dtype=np.float32),
    }
    batch = sharding.shard_batch(local, mesh)
    for name, value in local.items():
        arr = batch[name]
        assert arr.sharding.spec == P(("data", "fsdp"))
        assert arr.shape == value.shape
        np.testing.assert_array_equal(np.asarray(arr), value)
        assert {s.data.shape[0] for s in arr.addressable_shards} == {2}
    assert sharding.replicated(mesh).spec == P()


def test_distributed_noop_when_disabled():
    assert distributed.maybe_initialize(ml_collections.ConfigDict({"distributed": False})) is False
    assert distributed.is_main_process()
