"""Export a verified training checkpoint as a Hugging Face model directory.

    python -m jaxalign.export --workdir=W [--step=N] --out=DIR [--critic_out=DIR2]

Writes `config.json`, safetensors and the tokenizer that `transformers` loads as is, from step `N`
of `W/checkpoints` (default: the newest step that verifies; bad ones are reported and skipped,
never modified). The model is rebuilt from the config stored in the checkpoint: a reward run
(`algorithm=reward`) exports its `*ForSequenceClassification` scalar-head model; PPO exports the
policy (and, with `--critic_out`, the critic); every other algorithm exports its policy.
A LoRA run (`model.lora.rank > 0`) checkpoints its adapters only: the export rebuilds the base
(quantized as in training for QLoRA), writes the merged model to DIR and the PEFT adapter to
DIR/adapter. The base model named by `model.name_or_path` (and the tokenizer) must still be
readable.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import app, flags
from flax.linen import unbox

from jaxalign import checkpoint as ckpt
from jaxalign.models import Transformer, from_pretrained
from jaxalign.models.lora import (
    LoraModel,
    init_lora,
    make_lora_model,
    merge_adapters,
    save_peft_adapter,
)
from jaxalign.trainers.common import exporter
from jaxalign.trainers.setup import (
    abstract_params,
    load_run_tokenizer,
    lora_config,
    model_config_for,
    with_special_tokens,
)

logger = logging.getLogger(__name__)


def _models(config: ml_collections.ConfigDict) -> dict[str, tuple[Transformer, tuple[str, ...]]]:
    """`{"policy" | "critic": (model, path of its params in state.params)}` for `config`."""
    head = "scalar" if config.algorithm == "reward" else "lm"
    policy = Transformer(
        model_config_for(config.model, name_or_path=config.model.name_or_path, head=head)
    )
    if config.algorithm != "ppo":
        return {"policy": (policy, ())}
    critic_source = (
        config.ppo.reward_model if config.ppo.critic_init == "reward" else config.model.name_or_path
    )
    critic = Transformer(model_config_for(config.model, name_or_path=critic_source, head="scalar"))
    return {"policy": (policy, ("policy",)), "critic": (critic, ("critic",))}


def _lora_model(config: ml_collections.ConfigDict, model: Transformer) -> LoraModel:
    return make_lora_model(model, lora_config(config.model))


def _merged_lora(config: ml_collections.ConfigDict, model: Transformer, adapters: Any):
    """`(lora_model, (merged params, adapters, frozen base))`: the base rebuilt as training built
    it (its HF weights, or the seeded random init; quantized for QLoRA) with `adapters` on it."""
    if config.model.name_or_path:
        _, base = from_pretrained(config.model.name_or_path, head=model.config.head)
    else:
        base = model.init(jax.random.PRNGKey(config.seed), jax.numpy.zeros((1, 1), "int32"))
        base = base["params"]
    lora, full = init_lora(model, base, lora_config(config.model), rng=jax.random.PRNGKey(0))
    _, frozen = lora.split(full)
    return lora, (merge_adapters(lora, lora.combine(adapters, frozen)), adapters, frozen)


def _nest(path: tuple[str, ...], value: Any) -> Any:
    for key in reversed(path):
        value = {key: value}
    return value


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _check_out_dir(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise ckpt.CheckpointError(
            f"--out {out} already exists and is not empty; choose a new directory (an export "
            "never overwrites one)"
        )


def export(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    critic_out: str | os.PathLike | None = None,
) -> int:
    """Writes the HF model of a verified checkpoint of `workdir` to `out`; returns its step.

    Args:
      workdir: the training `--workdir` (its `checkpoints/` is read, never modified).
      out: new or empty directory for the model and tokenizer.
      step: checkpoint step; None for the newest one that verifies.
      critic_out: PPO only: also export the critic (a scalar-head model) there.

    Raises:
      CheckpointError: no such or no intact checkpoint, a bad `step`, a non-empty `out`.
    """
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise ckpt.CheckpointError(f"no checkpoint directory {directory}")
    outs = {"policy": Path(out)}
    if critic_out is not None:
        outs["critic"] = Path(critic_out)
    for path in outs.values():
        _check_out_dir(path)
    checkpointer = ckpt.Checkpointer(directory, save_every=1, keep=None, read_only=True)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise ckpt.CheckpointError(f"no checkpoint in {directory}")
        if step is not None and step not in steps:
            raise ckpt.CheckpointError(
                f"no checkpoint step {step} in {directory} (steps: {', '.join(map(str, steps))})"
            )
        # The config comes from a checkpoint that verifies (the newest, unless --step is given).
        config_step = step
        for candidate in reversed(steps) if step is None else [step]:
            try:
                checkpointer.verify(candidate)
                config_step = candidate
                break
            except ckpt.CheckpointCorruptError as error:
                if step is not None:
                    raise
                logger.error("%s; trying the previous checkpoint.", error)
        else:
            raise ckpt.NoIntactCheckpointError(f"no intact checkpoint in {directory}")
        config = ml_collections.ConfigDict(checkpointer.read_config(config_step))
        models = _models(config)
        if "critic" in outs and "critic" not in models:
            raise ckpt.CheckpointError(
                f"--critic_out: the run in {workdir} is algorithm={config.algorithm}, not ppo"
            )
        models = {name: models[name] for name in outs}
        abstract = {}
        for name, (model, path) in models.items():
            # No sharding: the leaves restore as host numpy arrays, no device memory needed.
            boxed = abstract_params(model)
            if name == "policy" and config.model.lora.rank:  # the adapters (and a scalar head)
                lora = _lora_model(config, model)
                boxed = lora.split(lora.abstract_params())[0]
            shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), unbox(boxed))
            abstract.update(_nest(path, shapes) if path else shapes)
        # step=None: the newest step that verifies and holds finite params.
        restored = checkpointer.restore(step, abstract_state={"params": abstract}, partial=True)
    finally:
        checkpointer.close()
    tokenizer = None
    for name, (model, path) in models.items():
        if tokenizer is None:
            tokenizer = load_run_tokenizer(config, model)
        model = with_special_tokens(model, tokenizer)
        params = _get(restored.state["params"], path)
        if name == "policy" and config.model.lora.rank:
            lora, params = _merged_lora(config, model, params)
            save_peft_adapter(
                lora,
                lora.combine(params[1], params[2]),
                outs[name] / "adapter",
                base_model_name_or_path=config.model.name_or_path,
            )
            params = params[0]
        exporter(model, tokenizer, config)(params, outs[name])
        (outs[name] / "jaxalign_export.json").write_text(
            json.dumps(
                {"workdir": str(Path(workdir).resolve()), "step": restored.step, "model": name},
                indent=2,
            )
        )
        logger.info("exported the %s of step %d to %s", name, restored.step, outs[name])
    return restored.step


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    flag = flags.FLAGS
    try:
        step = export(flag.workdir, flag.out, step=flag.step, critic_out=flag.critic_out)
    except (ckpt.CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"done. exported step {step} of {flag.workdir} to {flag.out}", flush=True)


def define_flags() -> None:
    """Command-line flags, defined only when this module is the program (no import side effects)."""
    flags.DEFINE_string("workdir", None, "The training run's --workdir.")
    flags.DEFINE_string("out", None, "New (or empty) directory for the Hugging Face model.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest that verifies).")
    flags.DEFINE_string("critic_out", None, "PPO only: also export the critic here.")
    flags.mark_flags_as_required(["workdir", "out"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
