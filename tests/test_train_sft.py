"""The training engine through SFT: learning, sharding, resumption, non-finite steps, loss masks."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxalign import checkpoint as ckpt
from jaxalign import sharding as shd
from jaxalign.config import base_config, tiny_model_init
from jaxalign.data import build_sft_dataset
from jaxalign.models import ModelConfig, Transformer, load_tokenizer
from jaxalign.optim import make_optimizer
from jaxalign.train import run
from jaxalign.trainers import common, engine, setup, sft

REPO = Path(__file__).resolve().parents[1]


def sft_tiny_config(data_dir: Path, settings: dict) -> ml_collections.ConfigDict:
    """configs/sft_tiny.py with `settings` ({"train.num_steps": 10, ...}) applied."""
    spec = importlib.util.spec_from_file_location("sft_tiny", REPO / "configs" / "sft_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(str(data_dir))
    for key, value in settings.items():
        section, name = key.rsplit(".", 1)
        config[section][name] = value
    return config


def host_tree(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(actual, expected):
    jax.tree.map(np.testing.assert_array_equal, host_tree(actual), host_tree(expected))


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_steps(workdir: Path) -> list[int]:
    with ckpt.Checkpointer(workdir / "checkpoints", save_every=1, keep=None) as checkpointer:
        return checkpointer.all_steps()


# ----------------------------------------------------------------------------- sft_tiny runs

# No eval or export: these runs are about the train loop (the CLI test covers the rest).
RUN_SETTINGS = {"train.log_every": 1, "data.eval": "", "train.export_hf": False}


@pytest.fixture(scope="module")
def run_settings(tiny_sft_settings: dict) -> dict:
    return {**tiny_sft_settings, **RUN_SETTINGS}


@pytest.fixture(scope="module")
def straight_run(tiny_data_dir, run_settings, tmp_path_factory):
    """configs/sft_tiny.py for 10 steps without interruption: (RunResult, workdir)."""
    workdir = tmp_path_factory.mktemp("straight")
    result = run(sft_tiny_config(tiny_data_dir, run_settings), workdir)
    return result, workdir


def test_sft_tiny_trains_and_loss_falls(straight_run):
    result, workdir = straight_run
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, 11))
    losses = np.array([r["loss"] for r in records])
    assert np.all(np.isfinite(losses)) and records[-1]["skipped_steps"] == 0
    assert losses[0] == pytest.approx(np.log(512), abs=0.3)  # random init: ~uniform over the vocab
    assert losses[-2:].mean() < losses[:2].mean() - 0.3, losses
    assert result.stopped_early is None and result.export_dir is None
    assert int(result.state.step) == 10
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10"]


class SignalOnBatch:
    """A train iterator that sends `signum` to this process when its `at`-th batch is taken."""

    def __init__(self, iterator, *, at: int, signum: int = signal.SIGTERM):
        self.iterator, self.at, self.signum, self.taken = iterator, at, signum, 0

    def __next__(self):
        self.taken += 1
        if self.taken == self.at:
            os.kill(os.getpid(), self.signum)
        return next(self.iterator)

    def state_dict(self):
        return self.iterator.state_dict()

    def load_state_dict(self, state):
        self.iterator.load_state_dict(state)


@pytest.fixture(scope="module")
def interrupted_run(tiny_data_dir, run_settings, tmp_path_factory):
    """The straight run's config, sent SIGTERM while batch 5 is fetched: step 5 runs, is
    checkpointed, and `run` returns. (RunResult, workdir, SIGTERM handler before, after)."""
    workdir = tmp_path_factory.mktemp("interrupted")
    make_iterator = common.train_iterator
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "train_iterator", lambda *a: SignalOnBatch(make_iterator(*a), at=5))
        handler_before = signal.getsignal(signal.SIGTERM)
        result = run(sft_tiny_config(tiny_data_dir, run_settings), workdir)
        handler_after = signal.getsignal(signal.SIGTERM)
    return result, workdir, handler_before, handler_after


def copy_run(workdir: Path, destination: Path) -> Path:
    """A copy of a run's workdir (checkpoints, metrics), to resume without touching the original."""
    shutil.copytree(workdir, destination)
    return destination


def test_sigterm_checkpoints_then_resume_equals_straight_run(
    straight_run, interrupted_run, tiny_data_dir, run_settings, tmp_path
):
    """Rerun in the interrupted workdir → steps 6..10, bit-identical to the uninterrupted run
    (same compiled step, exact restore of params, optimizer state, rng and data position)."""
    interrupted, interrupted_dir, handler_before, handler_after = interrupted_run
    assert handler_after is handler_before  # the run put it back
    assert interrupted.stopped_early == "preemption signal"
    assert int(interrupted.state.step) == 5
    assert checkpoint_steps(interrupted_dir) == [5]

    workdir = copy_run(interrupted_dir, tmp_path / "resumed")
    resumed = run(sft_tiny_config(tiny_data_dir, run_settings), workdir)
    straight, straight_dir = straight_run
    assert resumed.stopped_early is None
    assert_trees_equal(resumed.state, straight.state)  # step, params, opt_state, rng, counters
    records, straight_records = read_metrics(workdir), read_metrics(straight_dir)
    assert [r["step"] for r in records] == list(range(1, 11))  # appended after the restart
    assert [r["loss"] for r in records] == [r["loss"] for r in straight_records]


def test_resume_under_another_mesh_equals_straight_run(
    straight_run, interrupted_run, tiny_data_dir, run_settings, tmp_path
):
    """Checkpointed on the default (8, 1, 1) mesh, resumed on (2, 2, 2): the state is restored
    onto the new mesh's shardings (FSDP and tensor-parallel shards), and steps 6..10 match the
    straight run up to float reassociation (the reductions run in another order)."""
    straight, straight_dir = straight_run
    workdir = copy_run(interrupted_run[1], tmp_path / "other_mesh")
    resumed = run(
        sft_tiny_config(tiny_data_dir, {**run_settings, "mesh.shape": (2, 2, 2)}), workdir
    )
    assert int(resumed.state.step) == 10 and resumed.stopped_early is None

    embedding = resumed.state.params["embed"]["embedding"]  # logical axes (vocab, embed)
    assert embedding.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    assert tuple(embedding.sharding.spec) == ("tensor", "fsdp")
    assert straight.state.params["embed"]["embedding"].sharding.mesh.shape["data"] == 8
    adam_mu = resumed.state.opt_state[1].mu["embed"]["embedding"]  # clip, then scale_by_adam
    assert adam_mu.sharding == embedding.sharding

    records, straight_records = read_metrics(workdir), read_metrics(straight_dir)
    assert [r["step"] for r in records] == list(range(1, 11))
    np.testing.assert_allclose(
        [r["loss"] for r in records], [r["loss"] for r in straight_records], rtol=2e-5
    )
    straight_state, resumed_state = host_tree(straight.state), host_tree(resumed.state)
    assert_trees_equal(resumed_state.rng, straight_state.rng)
    assert int(resumed_state.opt_state[1].count) == int(straight_state.opt_state[1].count)
    # Adam turns rounding differences of ~1e-7 into parameter differences of up to ~lr per step.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=5e-4),
        (resumed_state.params, resumed_state.opt_state),
        (straight_state.params, straight_state.opt_state),
    )


# ----------------------------------------------------------------------------- subprocess runs

# `python -m jaxalign.train ...` with every batch delayed, so signals land between steps.
PACED_TRAIN = """
import runpy, sys, time
from jaxalign.data import BatchIterator
delay = float(sys.argv.pop(1))
next_batch = BatchIterator.__next__
def paced(self):
    time.sleep(delay)
    return next_batch(self)
BatchIterator.__next__ = paced
runpy.run_module("jaxalign.train", run_name="__main__", alter_sys=True)
"""


def start_paced_train(config_arg: str, workdir: Path, settings: dict, delay: float):
    flags = [f"--config.{key}={value}" for key, value in settings.items()]
    command = [sys.executable, "-c", PACED_TRAIN, str(delay), f"--config={config_arg}"]
    return subprocess.Popen(
        [*command, f"--workdir={workdir}", *flags],
        cwd=REPO,
        env=os.environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def logged_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    complete_lines = path.read_text().split("\n")[:-1]  # the last one may be half written
    return [json.loads(line)["step"] for line in complete_lines]


def wait_for(condition, process, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"training ended (rc {process.returncode}) too early:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out waiting for the training process")
        time.sleep(0.02)


def test_killed_then_preempted_processes_resume_to_the_straight_run(
    straight_run, tiny_data_dir, run_settings, tmp_path
):
    """`python -m jaxalign.train` in a subprocess, twice in one workdir, then resumed here:

    1. SIGKILL between checkpoints (no chance to save): the steps after checkpoint 3 are lost;
    2. a fresh process resumes from that checkpoint, and SIGTERM makes it save its current step
       (not a periodic one) and exit 0;
    3. this process resumes from there to step 10: bit-identical to the uninterrupted run.

    The subprocesses reuse the straight run's compiled step through the session's compilation
    cache; batches are paced so that the signals land between steps.
    """
    settings = {**run_settings, "train.checkpoint_every": 3}
    config_arg = f"configs/sft_tiny.py:{tiny_data_dir}"

    killed = start_paced_train(config_arg, tmp_path, settings, delay=0.3)
    committed = tmp_path / "checkpoints" / "3"  # orbax renames a finished save's tmp dir to this
    wait_for(lambda: committed.is_dir() and logged_steps(tmp_path)[-1] % 3 != 0, killed)
    killed.kill()
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    done_before_kill = logged_steps(tmp_path)[-1]
    latest = checkpoint_steps(tmp_path)[-1]  # 3, unless the machine stalled the poll
    assert latest % 3 == 0 and latest < done_before_kill < 9  # steps after `latest` are lost

    logged_before = len(logged_steps(tmp_path))
    preempted = start_paced_train(config_arg, tmp_path, settings, delay=0.3)
    wait_for(lambda: len(logged_steps(tmp_path)) > logged_before, preempted)
    preempted.send_signal(signal.SIGTERM)
    out, err = preempted.communicate(timeout=120)
    assert preempted.returncode == 0, err[-3000:]
    assert "stopped early: preemption signal" in out.strip().splitlines()[-1]
    redone = logged_steps(tmp_path)[logged_before:]
    assert redone == list(range(latest + 1, latest + 1 + len(redone))), redone
    assert redone[-1] < 10
    assert checkpoint_steps(tmp_path)[-1] == redone[-1]  # the current step, not a periodic one

    resumed = run(sft_tiny_config(tiny_data_dir, settings), tmp_path)
    assert_trees_equal(resumed.state, straight_run[0].state)


# ----------------------------------------------------------------------------- sharding


def sharded_sft_steps(mesh_shape, *, devices=None, initial_params=None, num_steps: int = 2):
    """`num_steps` SFT steps on fixed batches on a `mesh_shape` mesh.

    Returns (losses, state, mesh, initial params on the host). `initial_params` (host arrays)
    replace the random init, placed by the same rules as `load_model`'s (one init compile less).
    """
    config = base_config()
    config.mesh.shape = mesh_shape
    config.model.init.num_layers = 1
    # SGD with momentum, not Adam: Adam's g/√v turns float-rounding differences of near-zero
    # gradients (different reduction orders per mesh) into O(lr) parameter differences.
    config.optimizer.name = "sgd"
    config.optimizer.b1 = 0.9
    config.optimizer.learning_rate = 0.5
    config.optimizer.schedule = "constant"
    mesh = setup.make_mesh(config.mesh, devices=devices)
    rules = config.mesh.logical_rules
    if initial_params is None:
        model, params, param_shardings = setup.load_model(config.model, mesh, rules, seed=0)
    else:
        model = Transformer(setup.model_config_for(config.model))
        param_shardings = shd.param_shardings(setup.abstract_params(model), mesh, rules)
        params = jax.device_put(initial_params, param_shardings)
    initial_params = host_tree(params)  # the train step donates its input
    tx, schedule = make_optimizer(config.optimizer, total_steps=num_steps)
    state, state_shardings = engine.create_train_state(
        params, param_shardings, model, tx, mesh, rules, seed=0
    )
    step = engine.make_train_step(
        sft.sft_loss_fn(model, chunk_size=None), tx, grad_accum_steps=1, schedule=schedule
    )
    train_step = engine.jit_train_step(step, state_shardings, mesh, None)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(num_steps):
        lengths = rng.integers(8, 33, size=8)
        attention_mask = (np.arange(32)[None] < lengths[:, None]).astype(np.int32)
        batch = {
            "input_ids": rng.integers(0, 512, size=(8, 32)).astype(np.int32),
            "attention_mask": attention_mask,
            "positions": np.tile(np.arange(32, dtype=np.int32), (8, 1)) * attention_mask,
            "loss_mask": (attention_mask * (np.arange(32)[None] >= 4)).astype(np.float32),
        }
        state, metrics = train_step(state, shd.shard_batch(batch, mesh), None)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state, mesh, initial_params


@pytest.fixture(scope="module")
def one_device_steps():
    return sharded_sft_steps((1, 1, 1), devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_steps_equal_one_device(one_device_steps, mesh_shape):
    reference_losses, reference_state, _, initial_params = one_device_steps
    losses, state, mesh, _ = sharded_sft_steps(mesh_shape, initial_params=initial_params)
    data, fsdp, tensor = mesh_shape
    assert mesh.devices.size == 8 and reference_state.params["lm_head"].sharding.num_devices == 1

    # Placement as the default rules say: embed→fsdp, vocab/heads/kv_heads/mlp→tensor.
    expected_specs = {
        ("embed", "embedding"): ("tensor", "fsdp"),  # [vocab, embed]
        ("lm_head",): ("fsdp", "tensor"),  # [embed, vocab]
        ("layers_0", "mlp", "up", "kernel"): ("fsdp", "tensor"),  # [embed, mlp]
        ("layers_0", "mlp", "down", "kernel"): ("tensor", "fsdp"),  # [mlp, embed]
        ("layers_0", "attn", "q", "kernel"): ("fsdp", "tensor", None),  # [embed, heads, head_dim]
        ("layers_0", "attn", "k", "kernel"): ("fsdp", "tensor", None),  # [embed, kv_heads, ...]
        ("final_norm", "scale"): ("fsdp",),
    }
    sizes = {"fsdp": fsdp, "tensor": tensor, None: 1}
    momentum = state.opt_state[1].trace  # clip_by_global_norm, then sgd's momentum trace
    for path, spec in expected_specs.items():
        param = state.params
        moment = momentum
        for key in path:
            param, moment = param[key], moment[key]
        for array in (param, moment):
            assert tuple(array.sharding.spec) == spec, path
            shard_shape = array.addressable_shards[0].data.shape
            assert shard_shape == tuple(
                n // sizes[a] for n, a in zip(array.shape, spec, strict=True)
            ), path
    assert state.params["lm_head"].sharding.mesh.shape == dict(data=data, fsdp=fsdp, tensor=tensor)

    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    moved = jax.tree.map(
        lambda new, old: float(np.abs(np.asarray(new) - np.asarray(old)).max()),
        state.params,
        reference_state.params,
    )
    assert max(jax.tree.leaves(moved)) < 1e-5, moved
    assert_trees_equal(state.step, reference_state.step)


# ----------------------------------------------------------------------------- non-finite steps


def toy_loss(params, batch, frozen, rng):
    """Σ |x·w - y|^p over rows; p = 0.5 at a zero residual has a finite loss but a NaN gradient."""
    del frozen, rng
    residual = batch["x"] @ params["w"] - batch["y"]
    loss = jnp.sum(jnp.abs(residual) ** batch["power"][:, None])
    return loss, {"denominator": jnp.float32(batch["x"].shape[0]), "metrics": {}}


def toy_batch(kind: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = {
        "x": rng.normal(size=(8, 4)).astype(np.float32),
        "y": rng.normal(size=(8, 2)).astype(np.float32),
        "power": np.full((8,), 2.0, np.float32),
    }
    if kind == "inf_input":  # non-finite loss
        batch["x"][3, 1] = np.inf
    elif kind == "nan_grad":  # finite loss, non-finite gradient
        batch["x"][3], batch["y"][3], batch["power"][3] = 0.0, 0.0, 0.5
    return batch


def toy_state_and_step(warmup_steps: int = 0):
    opt_config = base_config().optimizer
    opt_config.learning_rate = 0.1
    opt_config.schedule = "constant"
    opt_config.warmup_steps = warmup_steps
    tx, schedule = make_optimizer(opt_config, total_steps=100)
    params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(4, 2)), jnp.float32)}
    state = engine.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0),
        skipped_steps=jnp.zeros((), jnp.int32),
        consecutive_nonfinite=jnp.zeros((), jnp.int32),
    )
    return state, engine.make_train_step(toy_loss, tx, grad_accum_steps=1, schedule=schedule)


@pytest.mark.parametrize("bad", ["inf_input", "nan_grad"])
def test_nonfinite_step_leaves_state_unchanged_and_is_counted(bad):
    state, train_step = toy_state_and_step(warmup_steps=10)  # lr(t) = 0.01 t for t < 10
    train_step = jax.jit(train_step)
    state, metrics = train_step(state, toy_batch("good"), None)
    assert np.isfinite(metrics["loss"]) and int(state.skipped_steps) == 0
    before = host_tree(state)
    for expected_consecutive in (1, 2):
        state, metrics = train_step(state, toy_batch(bad), None)
        if bad == "nan_grad":
            assert np.isfinite(metrics["loss"]) and not np.isfinite(metrics["grad_norm"])
        else:
            assert not np.isfinite(metrics["loss"])
        assert_trees_equal(state.params, before.params)
        assert_trees_equal(state.opt_state, before.opt_state)  # Adam moments and count
        assert int(state.skipped_steps) == int(metrics["skipped_steps"]) == expected_consecutive
        assert int(state.consecutive_nonfinite) == expected_consecutive
    assert int(state.step) == 3
    state, metrics = train_step(state, toy_batch("good", seed=1), None)
    assert int(state.consecutive_nonfinite) == 0 and int(state.skipped_steps) == 2
    # The second applied update: the optimizer's schedule is at t=1, not at the step count 3.
    assert float(metrics["learning_rate"]) == pytest.approx(0.01)
    assert not np.array_equal(state.params["w"], before.params["w"])


class ToyBatches:
    """Resumable iterator: good batches for the first `good` steps, then batches with an inf."""

    def __init__(self, good: int):
        self.good, self.position = good, 0

    def __next__(self):
        self.position += 1
        return toy_batch("good" if self.position <= self.good else "inf_input", self.position)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_consecutive_nonfinite_steps_stop_with_last_good_checkpoint(tmp_path):
    config = base_config()
    config.train.num_steps = 50
    config.train.log_every = 10  # the stop must not wait for a log step
    config.train.max_consecutive_nonfinite = 3
    mesh = setup.make_mesh(config.mesh)
    state, step = toy_state_and_step()
    state_shardings = jax.tree.map(lambda _: shd.replicated(mesh), state)
    state = jax.device_put(state, state_shardings)

    abstract_state = ckpt.abstract_with_shardings(state, state_shardings)
    # The last good state: 4 good steps.
    good_state, plain_step = state, jax.jit(step)
    for position in range(1, 5):
        good_state, _ = plain_step(good_state, toy_batch("good", position), None)
    good_params = host_tree(good_state.params)

    result = engine.run_training(
        config=config,
        workdir=tmp_path,
        mesh=mesh,
        state=state,
        state_shardings=state_shardings,
        train_step=engine.jit_train_step(step, state_shardings, mesh, None),
        frozen=None,
        train_iterator=ToyBatches(good=4),
    )
    assert result.stopped_early == "3 consecutive non-finite steps"
    assert int(result.state.step) == 7 and int(result.state.skipped_steps) == 3
    assert checkpoint_steps(tmp_path) == [7]
    with ckpt.Checkpointer(tmp_path / "checkpoints", save_every=1, keep=None) as checkpointer:
        restored = checkpointer.restore(abstract_state=abstract_state)
    assert restored.data_state == {"iterator": {"position": 7}}
    assert int(restored.state.consecutive_nonfinite) == 3
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        host_tree(restored.state.params),
        good_params,
    )
    assert_trees_equal(restored.state, result.state)


# ----------------------------------------------------------------------------- the SFT loss


class PositionOnlyModel:
    """Stands in for `Transformer`: hidden states depend on positions only, so a token's id
    changes nothing but its own log-prob as a target. A dense model: no router stats, no
    logit soft-cap."""

    config = ModelConfig(**tiny_model_init().to_dict())

    def apply(self, variables, *args, return_hidden=False, method=None, return_router_stats=False):
        params = variables["params"]
        if method == "output_embedding":
            return params["output"]
        _, _, positions = args
        hidden = params["hidden"][positions]
        return (hidden, None) if return_router_stats else hidden


@pytest.fixture(scope="module")
def tokenizer(tiny_data_dir):
    return load_tokenizer(str(tiny_data_dir / "tokenizer"))


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_prompt_tokens_have_zero_loss_weight(tokenizer, tmp_path):
    rows = [
        {"prompt": "I watched The Empty House and", "completion": " it was wooden."},
        {"prompt": "The score", "completion": " was delightful, the acting awful."},
    ]
    dataset = build_sft_dataset(write_rows(tmp_path / "sft.jsonl", rows), tokenizer, max_length=32)
    batch = dataset.collate(dataset.examples)
    for row, mask in zip(rows, batch["loss_mask"], strict=True):
        prompt_length = 1 + len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
        completion_length = 1 + len(
            tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        )  # + EOS
        assert mask.tolist() == [0] * prompt_length + [1] * completion_length + [0] * (
            32 - prompt_length - completion_length
        )

    rng = np.random.default_rng(0)
    params = {
        "hidden": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32),
        "output": jnp.asarray(rng.normal(size=(16, len(tokenizer))), jnp.float32),
    }
    loss_fn = jax.jit(sft.sft_loss_fn(PositionOnlyModel(), chunk_size=None))
    loss, aux = loss_fn(params, batch, None, None)
    assert float(aux["denominator"]) == batch["loss_mask"].sum()

    prompt = (batch["loss_mask"] == 0) & (batch["attention_mask"] != 0)
    changed = dict(
        batch, input_ids=np.where(prompt, (batch["input_ids"] + 7) % 512, batch["input_ids"])
    )
    assert float(loss_fn(params, changed, None, None)[0]) == float(loss)

    completion_token = np.argmax(batch["loss_mask"][0])
    changed = {k: v.copy() for k, v in batch.items()}
    changed["input_ids"][0, completion_token] = (
        changed["input_ids"][0, completion_token] + 7
    ) % 512
    assert float(loss_fn(params, changed, None, None)[0]) != pytest.approx(float(loss))


@pytest.fixture(scope="module")
def sft_eval_datasets(tokenizer, tiny_data_dir, tmp_path_factory):
    """8 rows of sft_eval.jsonl, unpacked and packed, both padded to 96 tokens."""
    rows = [json.loads(line) for line in (tiny_data_dir / "sft_eval.jsonl").open()][:8]
    source = write_rows(tmp_path_factory.mktemp("sft_rows") / "sft.jsonl", rows)
    build = lambda pack: build_sft_dataset(  # noqa: E731
        str(source), tokenizer, max_length=96, pack=pack, buckets=(96,)
    )
    return build(False), build(True)


@pytest.fixture(scope="module")
def tiny_model():
    """(model, params, jitted SFT loss fn) of the default random-init tiny model."""
    model = Transformer(setup.model_config_for(base_config().model))
    init = jax.jit(lambda rng: shd.unbox(model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]))
    return model, init(jax.random.PRNGKey(0)), jax.jit(sft.sft_loss_fn(model, chunk_size=None))


def test_sft_loss_is_next_token_nll_on_completion_tokens(sft_eval_datasets, tiny_model):
    """loss = -Σ_t mask_t · log softmax(logits_{t-1})[x_t] summed over rows, / Σ mask."""
    model, params, loss_fn = tiny_model
    unpacked, _ = sft_eval_datasets
    batch = unpacked.collate(unpacked.examples)
    loss, aux = loss_fn(params, batch, None, None)

    logits = jax.jit(model.apply)({"params": params}, batch["input_ids"], batch["attention_mask"])
    logprobs = np.asarray(jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1))
    targets = np.take_along_axis(logprobs, batch["input_ids"][:, 1:, None], -1)[..., 0]
    expected = -(targets * batch["loss_mask"][:, 1:]).sum()
    assert batch["loss_mask"][:, 0].sum() == 0
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(aux["denominator"]) == batch["loss_mask"].sum()


def test_packed_and_unpacked_batches_give_the_same_per_example_loss(sft_eval_datasets, tiny_model):
    _, params, loss_fn = tiny_model
    unpacked, packed = sft_eval_datasets
    assert len(packed.examples) < len(unpacked.examples)  # some rows hold several examples

    def per_segment_losses(batch):
        """{token tuple: loss sum} for every segment of every row, masking out the others."""
        losses = {}
        for row in range(batch["input_ids"].shape[0]):
            for segment in range(1, batch["attention_mask"][row].max() + 1):
                in_segment = batch["attention_mask"] == segment
                in_segment[np.arange(len(in_segment)) != row] = False
                masked = dict(batch, loss_mask=batch["loss_mask"] * in_segment)
                tokens = tuple(batch["input_ids"][in_segment])
                losses[tokens] = float(loss_fn(params, masked, None, None)[0])
        return losses

    packed_batch = packed.collate(packed.examples)
    # Empty rows up to the unpacked batch size, so both batches share one compiled loss.
    packed_batch = {
        name: np.pad(value, ((0, 8 - len(value)), (0, 0))) for name, value in packed_batch.items()
    }
    expected = per_segment_losses(unpacked.collate(unpacked.examples))
    actual = per_segment_losses(packed_batch)
    assert sorted(actual) == sorted(expected) and len(expected) == 8
    for tokens, loss in expected.items():
        assert actual[tokens] == pytest.approx(loss, rel=1e-5)
