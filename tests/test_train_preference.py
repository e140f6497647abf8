"""Reward-model and DPO training end to end: tiny models, rule-labelled pairs, 8 fake CPU devices.

Runs share compilations: every config uses one padded length and a constant learning rate, so the
compiled steps do not depend on `num_steps` or `seed`, and JAX's persistent compilation cache is on
(the session's from conftest, else this module's): a run repeating an earlier one's programs
compiles nothing. Sharded runs are compared with the same run on 1 device, in a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxalign.data import DataError, build_preference_dataset
from jaxalign.data.batching import Buckets, collate_preference
from jaxalign.demo.data import write_tiny_data
from jaxalign.models import (
    Transformer,
    from_pretrained,
    load_tokenizer,
    save_pretrained,
)
from jaxalign.train import run
from jaxalign.trainers import dpo, engine, setup
from jaxalign.trainers.dpo import precompute_reference_logps
from jaxalign.trainers.pairwise import pair_rewards, response_logps

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = {"reward": REPO / "configs/rm_tiny.py", "dpo": REPO / "configs/dpo_tiny.py"}
ACCURACY_THRESHOLD = 0.65  # seeds 0-2 reach 0.75-0.83 (reward) and 0.79-0.83 (DPO)

# Settings every run here shares: one padded length (one compilation per step function) and a
# constant schedule (the compiled step is the same whatever num_steps is).
FAST = {
    "data.buckets": (96,),
    "optimizer.schedule": "constant",
    "optimizer.warmup_steps": 0,
    "optimizer.learning_rate": 3e-3,
    "train.log_every": 1,
    "train.checkpoint_every": 1000,
    "train.async_checkpoint": False,
    "train.export_hf": False,
}
REWARD_RUN = {"train.num_steps": 40, "train.export_hf": True}
DPO_RUN = {"train.num_steps": 20, "mesh.shape": (2, 2, 2)}


# ----------------------------------------------------------------------------- helpers


def tiny_config(algorithm: str, data_dir: str | Path, overrides: dict[str, Any] | None = None):
    """`configs/{rm,dpo}_tiny.py` on `data_dir` with `FAST` and `overrides` (dotted keys) applied."""
    spec = importlib.util.spec_from_file_location("config_file", CONFIG_FILES[algorithm])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(str(data_dir))
    for key, value in {**FAST, **(overrides or {})}.items():
        *parents, name = key.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        if name not in section:
            raise KeyError(f"no config key {key}")
        section[name] = tuple(value) if isinstance(section[name], tuple) else value
    return config


def flat_params(params: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf) for path, leaf in leaves
    }


def summarize(workdir: Path, params: Any) -> dict[str, Any]:
    """Per-step train losses, the final eval metrics and the final params of a run."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    return {
        "losses": np.asarray([r["loss"] for r in train]),
        "skipped_steps": np.asarray([r["skipped_steps"] for r in train]),
        "eval": {k: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {},
        "params": flat_params(params),
    }


def run_summary(config, workdir: Path) -> tuple[engine.RunResult, dict[str, Any]]:
    result = run(config, workdir)
    return result, summarize(workdir, result.state.params)


def one_device_main(job_json: str) -> None:
    """Subprocess entry (1 CPU device): runs a `tiny_config` and saves its summary as npz."""
    job = json.loads(job_json)
    assert jax.device_count() == 1, jax.devices()
    config = tiny_config(job["algorithm"], job["data_dir"], job["overrides"])
    _, summary = run_summary(config, Path(job["workdir"]))
    params = {f"params/{name}": value for name, value in summary["params"].items()}
    np.savez(
        Path(job["workdir"]) / "summary.npz", losses=summary["losses"], **summary["eval"], **params
    )


def one_device_xla_flags(flags: str) -> str:
    """`flags` with one host device (the other flags kept: they can change the numerics)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    return f"{flags} --xla_force_host_platform_device_count=1".strip()


def run_on_one_device(algorithm: str, data_dir: Path, overrides: dict, workdir: Path) -> dict:
    job = dict(
        algorithm=algorithm,
        data_dir=str(data_dir),
        overrides={**overrides, "mesh.shape": (-1, 1, 1)},
        workdir=str(workdir),
    )
    env = {
        **os.environ,
        "XLA_FLAGS": one_device_xla_flags(os.environ.get("XLA_FLAGS", "")),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    code = f"import sys, {Path(__file__).stem} as t; t.one_device_main(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(job)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(workdir / "summary.npz") as saved:
        return {
            "losses": saved["losses"],
            "eval": {k: float(saved[k]) for k in saved if k.startswith("eval/")},
            "params": {k[len("params/") :]: saved[k] for k in saved if k.startswith("params/")},
        }


def assert_runs_match(run_a: dict, run_b: dict) -> None:
    """The same run computed two ways (mesh, reference mode) agrees up to float reassociation.

    Differences start near 1e-7 and Adam amplifies them over the run (to ~1.5e-4 relative after
    40 steps), so the first steps are held tight (a wrong gradient shows there at once) and the
    rest, the final eval and the params loosely.
    """
    np.testing.assert_allclose(run_a["losses"][:5], run_b["losses"][:5], rtol=2e-5)
    np.testing.assert_allclose(run_a["losses"], run_b["losses"], rtol=1e-3)
    assert run_a["eval"].keys() == run_b["eval"].keys()
    for name in run_a["eval"]:
        np.testing.assert_allclose(
            run_a["eval"][name], run_b["eval"][name], rtol=1e-3, atol=2e-3, err_msg=name
        )
    assert run_a["params"].keys() == run_b["params"].keys()
    for name in run_a["params"]:
        np.testing.assert_allclose(
            run_a["params"][name], run_b["params"][name], atol=5e-4, err_msg=name
        )


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """JAX's persistent compilation cache: the session's (conftest) if set, else this module's."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    if jax.config.jax_compilation_cache_dir:
        yield
        return
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    previous = {name: getattr(jax.config, name) for name in names}
    jax.config.update(names[0], str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update(names[1], 1.0)
    cc.reset_cache()
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    cc.reset_cache()


@pytest.fixture(scope="module")
def data_dir(request, tmp_path_factory) -> Path:
    try:  # the session-wide copy, once conftest provides it
        return Path(request.getfixturevalue("tiny_data_dir"))
    except pytest.FixtureLookupError:
        return write_tiny_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="module")
def dpo_run(data_dir, tmp_path_factory):
    """20 DPO steps from a random-init policy on mesh (2, 2, 2), reference in the step."""
    workdir = tmp_path_factory.mktemp("dpo")
    return run_summary(tiny_config("dpo", data_dir, DPO_RUN), workdir)


@pytest.fixture(scope="module")
def reward_run(data_dir, tmp_path_factory):
    """40 reward-model steps from random init on mesh (8, 1, 1), exported to Hugging Face."""
    workdir = tmp_path_factory.mktemp("reward")
    config = tiny_config("reward", data_dir, REWARD_RUN)
    result, summary = run_summary(config, workdir)
    return config, result, summary


@pytest.fixture(scope="module")
def one_device(data_dir, tmp_path_factory):
    """`one_device(algorithm)`: the module's main run of `algorithm` on 1 device (memoised)."""
    runs: dict[str, dict] = {}
    overrides = {"reward": REWARD_RUN, "dpo": DPO_RUN}

    def get(algorithm: str) -> dict:
        if algorithm not in runs:
            workdir = tmp_path_factory.mktemp(f"{algorithm}_1dev")
            runs[algorithm] = run_on_one_device(algorithm, data_dir, overrides[algorithm], workdir)
        return runs[algorithm]

    return get


# ----------------------------------------------------------------------------- log-probs vs HF


def _left_padded(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same pairs with the padding moved to the left and positions counting real tokens."""
    out = {}
    for side in ("chosen", "rejected"):
        shifts = (batch[f"{side}_attention_mask"] == 0).sum(1)
        for name in ("input_ids", "attention_mask", "loss_mask"):
            rows = batch[f"{side}_{name}"]
            out[f"{side}_{name}"] = np.stack(
                [np.roll(r, s) for r, s in zip(rows, shifts, strict=True)]
            )
        # Counted here, not by jaxalign's `default_positions`: transformers gets them as is.
        mask = out[f"{side}_attention_mask"] != 0
        out[f"{side}_positions"] = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: learned absolute positions
def test_response_logps_match_transformers(tmp_path, arch):
    import torch
    from tiny_hf import load_hf, make_tiny_hf_model

    hf_dir = make_tiny_hf_model(arch, tmp_path / arch)
    hf_model = load_hf(hf_dir)
    model, params = from_pretrained(hf_dir, dtype=jnp.float32)

    rng = np.random.default_rng(0)
    tokens = lambda n: rng.integers(3, 97, n).astype(np.int32)  # noqa: E731
    lengths = [(1, 4, 2), (3, 1, 9), (5, 7, 3), (2, 6, 6)]  # (prompt, chosen, rejected)
    examples = [
        {"prompt_ids": tokens(p), "chosen_ids": tokens(c), "rejected_ids": tokens(r)}
        for p, c, r in lengths
    ]
    # Pad with an ordinary token (not 0) so unmasked padding would change the numbers.
    batch = collate_preference(examples, buckets=Buckets((), max_length=16), pad_id=5)

    # Reference: each unpadded sequence through transformers, summed over response tokens only.
    expected = {"chosen": [], "rejected": []}
    for example in examples:
        prompt = example["prompt_ids"]
        for side in expected:
            ids = np.concatenate([prompt, example[f"{side}_ids"]])
            with torch.no_grad():
                logits = hf_model(input_ids=torch.tensor(ids[None], dtype=torch.long)).logits[0]
            logprobs = torch.log_softmax(logits.double(), -1).numpy()
            targets = np.arange(len(prompt), len(ids))
            expected[side].append(logprobs[targets - 1, ids[targets]].sum())

    logps = jax.jit(response_logps, static_argnums=0, static_argnames="chunk_size")
    for name, padded in (("right", batch), ("left", _left_padded(batch))):
        for chunk_size in (None, 5):
            chosen, rejected, chosen_len, rejected_len = logps(
                model, params, padded, chunk_size=chunk_size
            )
            where = f"{name}-padded, chunk_size={chunk_size}"
            np.testing.assert_allclose(chosen, expected["chosen"], atol=1e-4, err_msg=where)
            np.testing.assert_allclose(rejected, expected["rejected"], atol=1e-4, err_msg=where)
            np.testing.assert_array_equal(chosen_len, [c for _, c, _ in lengths])
            np.testing.assert_array_equal(rejected_len, [r for _, _, r in lengths])


@pytest.mark.parametrize("pad", ["pad", "eos"])  # a tokenizer with a pad token, or padding with EOS
def test_pair_rewards_read_where_transformers_reads(tmp_path, pad):
    import torch
    import transformers
    from tiny_hf import load_hf, tiny_hf_config

    config = tiny_hf_config("llama")
    config.num_labels = 1
    config.pad_token_id = config.eos_token_id if pad == "eos" else 0
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    hf_model = load_hf(tmp_path, "scalar")
    model, params = from_pretrained(tmp_path, dtype=jnp.float32)
    assert model.config.pad_token_id == config.pad_token_id

    rng = np.random.default_rng(0)
    eos = [config.eos_token_id]
    examples = [  # responses end with EOS, except a truncated one
        {"prompt_ids": [1, *rng.integers(3, 97, p)], "chosen_ids": c, "rejected_ids": r}
        for p, c, r in [
            (2, [*rng.integers(3, 97, 3), *eos], [*rng.integers(3, 97, 5), *eos]),
            (4, [*rng.integers(3, 97, 6), *eos], [*rng.integers(3, 97, 2)]),
        ]
    ]
    batch = collate_preference(
        examples, buckets=Buckets((), max_length=16), pad_id=config.pad_token_id
    )
    rewards = jax.jit(lambda p, b: pair_rewards(model, p, b))
    for padded in (batch, _left_padded(batch)):
        for side, ours in zip(("chosen", "rejected"), rewards(params, padded), strict=True):
            with torch.no_grad():
                theirs = hf_model(
                    input_ids=torch.tensor(padded[f"{side}_input_ids"], dtype=torch.long),
                    attention_mask=torch.tensor(padded[f"{side}_attention_mask"]),
                    position_ids=torch.tensor(padded[f"{side}_positions"], dtype=torch.long),
                ).logits[:, 0]
            np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4, err_msg=side)


# ----------------------------------------------------------------------------- DPO


def test_dpo_starts_at_log2_and_raises_heldout_accuracy(dpo_run):
    _, summary = dpo_run
    # Policy == reference at step 1: every margin is 0 and the sigmoid loss is log 2.
    assert summary["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert np.all(np.isfinite(summary["losses"])) and summary["skipped_steps"][-1] == 0
    assert summary["losses"][-5:].mean() < 0.6
    assert summary["eval"]["eval/rewards/accuracies"] > ACCURACY_THRESHOLD, summary["eval"]
    assert summary["eval"]["eval/rewards/margins"] > 0


def test_dpo_params_are_sharded_on_the_mesh(dpo_run):
    result, _ = dpo_run
    embedding = result.state.params["embed"]["embedding"]  # logical axes (vocab, embed)
    assert embedding.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    assert embedding.sharding.spec == PartitionSpec("tensor", "fsdp")
    assert {shard.data.shape for shard in embedding.addressable_shards} == {(256, 32)}


def test_dpo_precomputed_reference_matches_in_step_reference(
    dpo_run, data_dir, tmp_path, monkeypatch
):
    datasets, traced_shapes = [], []

    def precompute_spy(model, ref_params, dataset, mesh, **kwargs):
        datasets.append(dataset)
        return precompute_reference_logps(model, ref_params, dataset, mesh, **kwargs)

    def logps_spy(model, params, batch, **kwargs):  # runs once per trace, i.e. per compilation
        traced_shapes.append(batch["input_ids"].shape)  # dpo.share_prompt: one row per pair
        return response_logps(model, params, batch, **kwargs)

    monkeypatch.setattr(dpo, "precompute_reference_logps", precompute_spy)
    monkeypatch.setattr(dpo, "response_logps", logps_spy)
    _, in_step = dpo_run
    config = tiny_config("dpo", data_dir, {**DPO_RUN, "dpo.precompute_reference": True})
    _, precomputed = run_summary(config, tmp_path)
    # Train and eval examples carry their reference log-probs, so the step ran without a reference.
    assert len(datasets) == 2 and all(d.examples for d in datasets)
    for example in datasets[0].examples + datasets[1].examples:
        assert example["reference_chosen_logps"] < 0 and example["reference_rejected_logps"] < 0
    # A short last batch is padded to the full batch: it needs no compilation of its own.
    assert len(set(traced_shapes)) == 1 and traced_shapes[0][0] == 16, traced_shapes
    np.testing.assert_allclose(precomputed["losses"][0], in_step["losses"][0], atol=1e-5)
    assert_runs_match(precomputed, in_step)


def test_dpo_sharded_matches_one_device(dpo_run, one_device):
    _, sharded = dpo_run
    assert_runs_match(sharded, one_device("dpo"))


def test_dpo_two_row_layout_trains_like_the_shared_prompt_rows(dpo_run, data_dir, tmp_path):
    """`dpo.share_prompt=False` (chosen and rejected as two rows) gives the shared-prompt run's
    losses step by step: same log-probs, same gradients (steps 2-3 start from the updates)."""
    _, shared = dpo_run
    overrides = {**DPO_RUN, "dpo.share_prompt": False, "train.num_steps": 3, "data.eval": ""}
    _, two_rows = run_summary(tiny_config("dpo", data_dir, overrides), tmp_path)
    assert len(two_rows["losses"]) == 3
    np.testing.assert_allclose(two_rows["losses"], shared["losses"][:3], rtol=2e-5)


@pytest.fixture(scope="module")
def policy_dirs(data_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Two random-init tiny policies (seeds 1 and 2) saved as Hugging Face checkpoints."""
    config = tiny_config("dpo", data_dir)
    model = Transformer(setup.model_config_for(config.model))
    init = jax.jit(lambda rng: model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])
    root = tmp_path_factory.mktemp("policies")
    dirs = []
    for seed in (1, 2):
        params = jax.tree.map(
            lambda x: x.value if hasattr(x, "value") else x,
            init(jax.random.PRNGKey(seed)),
            is_leaf=lambda x: hasattr(x, "value"),
        )
        dirs.append(save_pretrained(model, params, root / f"seed{seed}"))
    return dirs[0], dirs[1]


def test_dpo_reference_loaded_from_its_own_checkpoint(data_dir, policy_dirs, tmp_path):
    """`dpo.reference_name_or_path`: the reference is that checkpoint, not the policy's initial
    weights. At step 1, policy A against reference B has rewards β·(log π_A − log π_B) (not 0);
    swapping A and B flips their sign, and loss(m) − loss(−m) = −m for the sigmoid loss. The
    precomputed-reference path reads the same checkpoint."""
    a, b = policy_dirs
    one_step = {**DPO_RUN, "train.num_steps": 1, "data.eval": ""}

    def first_step(name, policy, reference, **extra):
        overrides = {
            **one_step,
            "model.name_or_path": str(policy),
            "dpo.reference_name_or_path": str(reference),
            **extra,
        }
        run(tiny_config("dpo", data_dir, overrides), tmp_path / name)
        (record,) = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        return record

    a_vs_b, b_vs_a = first_step("a_vs_b", a, b), first_step("b_vs_a", b, a)
    precomputed = first_step("a_vs_b_precomputed", a, b, **{"dpo.precompute_reference": True})
    assert abs(a_vs_b["rewards/margins"]) > 1e-3 and abs(a_vs_b["rewards/chosen"]) > 1e-2
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert b_vs_a[name] == pytest.approx(-a_vs_b[name], rel=1e-4, abs=1e-6), name
        assert precomputed[name] == pytest.approx(a_vs_b[name], rel=1e-4, abs=1e-6), name
    assert a_vs_b["loss"] - b_vs_a["loss"] == pytest.approx(-a_vs_b["rewards/margins"], abs=1e-5)
    assert precomputed["loss"] == pytest.approx(a_vs_b["loss"], rel=1e-5)


@pytest.mark.slow
def test_dpo_data_parallel_matches_one_device(data_dir, tmp_path, one_device):
    config = tiny_config("dpo", data_dir, {**DPO_RUN, "mesh.shape": (8, 1, 1)})
    _, sharded = run_summary(config, tmp_path)
    assert_runs_match(sharded, one_device("dpo"))


# Step-1 loss with policy == reference (β = 0.1, every margin 0), where it is known.
DPO_VARIANTS = {
    "ipo": ({"dpo.loss_type": "ipo"}, (0 - 1 / (2 * 0.1)) ** 2),
    "hinge": ({"dpo.loss_type": "hinge"}, 1.0),
    "robust": ({"dpo.loss_type": "robust", "dpo.label_smoothing": 0.1}, math.log(2)),
    "cdpo": ({"dpo.label_smoothing": 0.1}, math.log(2)),
    "simpo": ({"dpo.loss_type": "simpo"}, None),
    "orpo": ({"dpo.loss_type": "orpo"}, None),
    "reference_free": ({"dpo.reference_free": True}, None),
    "rpo": ({"dpo.rpo_alpha": 1.0}, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(DPO_VARIANTS))
def test_dpo_variant_trains_with_finite_loss(data_dir, tmp_path, variant):
    overrides, initial_loss = DPO_VARIANTS[variant]
    config = tiny_config(
        "dpo",
        data_dir,
        {**overrides, "train.num_steps": 2, "train.batch_size": 8, "data.eval": ""},
    )
    result, summary = run_summary(config, tmp_path)
    assert np.all(np.isfinite(summary["losses"])) and len(summary["losses"]) == 2
    assert summary["skipped_steps"][-1] == 0 and int(result.state.step) == 2
    if initial_loss is not None:
        assert summary["losses"][0] == pytest.approx(initial_loss, rel=1e-5)
    if variant == "rpo":  # DPO's log 2 plus the chosen responses' per-token NLL
        assert summary["losses"][0] > math.log(2) + 1.0


# ----------------------------------------------------------------------------- reward model


def test_reward_model_raises_heldout_accuracy(reward_run):
    _, result, summary = reward_run
    assert np.all(np.isfinite(summary["losses"])) and summary["skipped_steps"][-1] == 0
    assert summary["losses"][-10:].mean() < summary["losses"][:5].mean()
    assert summary["eval"]["eval/accuracy"] > ACCURACY_THRESHOLD, summary["eval"]
    assert result.eval_metrics == pytest.approx(summary["eval"])


def test_reward_export_loads_in_transformers_and_scores_alike(reward_run, data_dir):
    import torch
    import transformers

    config, result, _ = reward_run
    hf_model, loading = transformers.AutoModelForSequenceClassification.from_pretrained(
        result.export_dir, output_loading_info=True, dtype=torch.float32
    )
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched keys
    tokenizer = load_tokenizer(str(result.export_dir))
    assert hf_model.config.pad_token_id == tokenizer.pad_token_id is not None

    dataset = build_preference_dataset(
        str(data_dir / "prefs_eval.jsonl"),
        tokenizer,
        max_length=config.data.max_length,
        max_prompt_length=config.data.max_prompt_length,
        buckets=(96,),
    )
    batch = dataset.collate(dataset.examples[:8])  # right-padded with the tokenizer's pad id
    model = Transformer(setup.model_config_for(config.model, head="scalar"))
    rewards = jax.jit(lambda p, b: pair_rewards(model, p, b))(result.state.params, batch)
    for side, ours in zip(("chosen", "rejected"), rewards, strict=True):
        with torch.no_grad():
            theirs = hf_model(
                input_ids=torch.tensor(batch[f"{side}_input_ids"], dtype=torch.long),
                attention_mask=torch.tensor(batch[f"{side}_attention_mask"], dtype=torch.long),
            ).logits[:, 0]
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4, err_msg=side)


# (8, 1, 1) reuses the module's reward run (the 1-device run in a subprocess costs ~11 s); (2, 2, 2)
# trains once more and runs with `-m slow` (DPO covers FSDP x tensor parallel by default).
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), pytest.param((2, 2, 2), marks=pytest.mark.slow)])
def test_reward_sharded_matches_one_device(reward_run, data_dir, tmp_path, one_device, mesh_shape):
    if mesh_shape == (8, 1, 1):  # the module's reward run
        sharded = reward_run[2]
    else:
        config = tiny_config("reward", data_dir, {**REWARD_RUN, "mesh.shape": mesh_shape})
        _, sharded = run_summary(config, tmp_path)
    assert_runs_match(sharded, one_device("reward"))


# ----------------------------------------------------------------------------- bad rows


def _bad_rows_file(data_dir: Path, tmp_path: Path, bad_line: str) -> Path:
    good = (data_dir / "prefs_train.jsonl").read_text().splitlines()[:16]
    lines = good[:2] + ["{not json"] + good[2:4] + [bad_line] + good[4:]
    path = tmp_path / "prefs_bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_preference_row_is_reported_with_file_and_line(data_dir, tmp_path):
    path = _bad_rows_file(data_dir, tmp_path, json.dumps({"prompt": "Hi", "rejected": " no"}))
    config = tiny_config("reward", data_dir, {"data.train": str(path), "data.eval": ""})
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3: .*\[not_json\]"):
        run(config, tmp_path / "run")
    path.write_text(path.read_text().replace("{not json\n", ""))
    where = re.escape(f"{path}:5: field 'chosen'")
    with pytest.raises(DataError, match=rf"{where}: .*\[missing_field\]"):
        run(config, tmp_path / "run")


def test_bad_preference_rows_are_counted_when_skipped(data_dir, tmp_path, caplog):
    path = _bad_rows_file(data_dir, tmp_path, json.dumps({"prompt": "Hi", "rejected": " no"}))
    overrides = {
        **REWARD_RUN,
        "data.train": str(path),
        "data.eval": "",
        "data.on_bad_row": "skip",
        "train.num_steps": 1,
        "train.export_hf": False,
    }
    caplog.set_level(logging.DEBUG, logger="jaxalign")  # the stats dict is a debug line
    result = run(tiny_config("reward", data_dir, overrides), tmp_path / "run")
    assert int(result.state.step) == 1
    (stats,) = [r.args for r in caplog.records if r.msg == "preference data: %s"]
    assert stats["skipped"] == {"missing_field": 1, "not_json": 1}
    assert stats["rows_read"] == 18 and stats["rows_kept"] == 16
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"{path}:3" in warnings and f"{path}:6" in warnings
