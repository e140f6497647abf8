"""The one config schema: every key any trainer reads, its default, and `validate`.

Config files in `configs/` start from `base_config()` and change values; they never add keys.
`validate` runs before anything compiles and names the offending key in every error.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

import ml_collections

from jaxalign.models.config import (
    ATTENTION_IMPLS,
    REMAT_POLICIES,
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
)

ON_LONG_ROW_CHOICES = ("truncate", "skip", "error")

ALGORITHMS = ("sft", "reward", "dpo", "ppo", "grpo")
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    # Mixture-of-experts kernels [X, E, F]: experts whole by default (embed/mlp shard them);
    # put e.g. ("expert", "fsdp") first for expert parallelism.
    ("expert", None),
    # Activations (`jaxalign.sharding.ACTIVATION_AXES`, MaxText's names): batch over the
    # data-parallel axes; heads, MLP hidden and vocab over tensor like their weights. The residual
    # stream's embed dim stays whole: MaxText puts it on tensor (residual memory / tensor), which
    # on a (1, 4, 2) mesh costs ~16 more all-gathers per step, and norm-scale reshuffles, here.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


def tiny_model_init() -> ml_collections.ConfigDict:
    """A random-init Llama-style model small enough for CPU tests."""
    return ml_collections.ConfigDict(
        dict(
            model_type="llama",
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
        )
    )


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.algorithm = "sft"  # "sft" | "reward" | "dpo" | "ppo" | "grpo": the trainer to run
    c.seed = 0  # seed of init, data order, dropout and sampling

    # Policy (and, by default, reference) weights: a HF directory or hub id, or random init.
    c.model = ml_collections.ConfigDict()
    c.model.name_or_path = ""  # empty: random init from `model.init`
    c.model.init = tiny_model_init()  # random-init shape (ModelConfig fields), no name_or_path
    c.model.dtype = "float32"  # compute dtype
    c.model.param_dtype = "float32"  # master weights
    c.model.remat_policy = "none"  # activation rematerialisation (compute for memory)
    c.model.scan_layers = False  # run the layers as one nn.scan (faster compiles for deep models)
    # "auto" (TPU: splash; GPU: cudnn in bf16/fp16 without logit soft-cap, else xla; CPU: xla) |
    # "xla" | "cudnn" (GPU flash attention) | "splash" (Pallas TPU kernel); see models/attention.py
    c.model.attention_impl = "auto"
    c.model.logits_chunk_size = 0  # tokens per log-softmax chunk; 0 = whole sequence
    # Low-rank adapters (LoRA; QLoRA with a quantized base): only adapters train, and the
    # reference of DPO/PPO/GRPO is the base with adapters off (no second params tree).
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 0  # 0 = full fine-tuning
    c.model.lora.alpha = 16.0  # LoRA scale numerator (update scaled by alpha / rank)
    c.model.lora.dropout = 0.0  # dropout on the adapter input
    # Hugging Face module names (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; GPT-2:
    # c_attn,c_proj,c_fc) comma-separated, or "all-linear" (every projection but the LM head).
    c.model.lora.target_modules = "all-linear"
    c.model.lora.quantization = "none"  # base weights stored as "none" | "int8" | "nf4" (QLoRA)
    c.model.lora.init_from = ""  # a PEFT adapter directory to continue training from

    c.tokenizer = ""  # default: model.name_or_path

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # file(s) (comma-separated), directory or hub dataset name
    c.data.train_split = "train"  # split of a hub dataset, save_to_disk folder or data folder
    c.data.eval = ""  # held-out data, same forms as data.train; empty = no evaluation
    c.data.eval_split = "test"  # split of data.eval
    c.data.max_length = 512  # tokens per example (prompt + response); see on_long_row
    c.data.max_prompt_length = 256  # prompt tokens kept (its end) in preference and prompt rows
    # Padded lengths batches may take (one compilation each).
    c.data.buckets = (64, 128, 256, 512, 1024, 2048, 4096)
    # Pack several examples per row: SFT examples into rows of max_length; DPO and reward pairs
    # into rows of max_length (two-row layout) or 2 * max_length (dpo.share_prompt).
    c.data.pack = False
    c.data.max_pairs_per_row = 16  # packed DPO / reward rows: pair slots per row (static shape)
    c.data.on_bad_row = "error"  # "error" | "skip" (counted and logged)
    # Rows longer than max_length: "truncate" (prompt keeps its end, responses are cut),
    # "skip" or "error"; truncated and skipped rows are counted in the start-up summary.
    c.data.on_long_row = "truncate"
    c.data.subset = ""  # hub datasets: the subset (`name` of datasets.load_dataset)
    c.data.data_files = ""  # hub datasets: files of the repo to read (comma-separated globs)
    c.data.revision = ""  # hub datasets: branch, tag or commit
    c.data.shuffle = True  # shuffle the training examples each epoch

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"  # "adamw" | "adam" | "sgd" | "rmsprop" | "adafactor"
    c.optimizer.learning_rate = 1e-5  # peak learning rate
    c.optimizer.schedule = "cosine"  # "constant" | "cosine" | "linear" decay after warmup
    c.optimizer.warmup_steps = 0  # linear warmup in optimizer updates (clamped to the run)
    c.optimizer.warmup_ratio = 0.0  # warmup as a fraction of the run's updates (or warmup_steps)
    c.optimizer.min_lr_ratio = 0.1  # final learning rate as a fraction of the peak (cosine, linear)
    c.optimizer.weight_decay = 0.0  # decoupled weight decay (no decay on biases and norm scales)
    c.optimizer.b1 = 0.9  # Adam beta1 (momentum for sgd/adafactor)
    c.optimizer.b2 = 0.999  # Adam beta2
    c.optimizer.eps = 1e-8  # Adam epsilon
    c.optimizer.max_grad_norm = 1.0  # clip the global gradient norm to this; 0 = no clipping
    c.optimizer.grad_accum_steps = 1  # microbatches per optimizer step (batch_size split)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8  # global batch (prompts for PPO, pairs for reward/DPO)
    c.train.num_steps = 100  # optimizer steps of the run (iterations for PPO/GRPO)
    c.train.num_epochs = 0.0  # > 0: passes over data.train; sets num_steps from the data size
    c.train.log_every = 10  # steps between metric records and progress-bar updates
    c.train.eval_every = 0  # 0: only at the end (if eval data is given)
    c.train.eval_batches = 8  # batches of data.eval per evaluation
    c.train.checkpoint_every = 100  # steps between checkpoints (the last step is always saved)
    c.train.keep_checkpoints = 2  # checkpoints kept (the newest verified one is never pruned)
    c.train.async_checkpoint = True  # write checkpoints in the background
    c.train.max_consecutive_nonfinite = 5  # stop after this many non-finite steps in a row
    c.train.export_hf = True  # write the Hugging Face model to <workdir>/hf at the end
    c.train.push_to_hub = ""  # Hub repo id: upload the export (with its model card) at the end
    c.train.wandb_project = ""  # Weights & Biases project; empty = off (needs `pip install wandb`)
    c.train.wandb_mode = "online"  # "online" | "offline" (logged locally, `wandb sync` later)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # devices per mesh axis (data, fsdp, tensor); -1 fills the rest
    c.mesh.axis_names = ("data", "fsdp", "tensor")  # mesh axis names
    c.mesh.logical_rules = DEFAULT_LOGICAL_RULES  # parameter/batch logical axis -> mesh axis rules
    c.mesh.distributed = False  # multi-host: call jax.distributed.initialize() first
    c.mesh.dcn_shape = ()  # multi-slice: e.g. (2, 1, 1) data-parallel across slices

    c.reward = ml_collections.ConfigDict()
    c.reward.margin = 0.0  # Bradley-Terry margin m in -log sigmoid(r_c - r_r - m)
    c.reward.center_coef = 0.0  # λ of λ·(r_c + r_r)²

    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.1  # KL strength of the implicit reward
    c.dpo.loss_type = "sigmoid"  # sigmoid | ipo | hinge | robust | simpo | orpo
    c.dpo.label_smoothing = 0.0  # assumed label noise (cDPO / robust DPO), in [0, 0.5)
    c.dpo.reference_free = False  # drop the reference log-probs (reference = uniform)
    c.dpo.rpo_alpha = 0.0  # weight of RPO's NLL term on chosen responses; 0 = off
    c.dpo.simpo_gamma = 0.5  # SimPO target reward margin
    c.dpo.reference_name_or_path = ""  # default: the policy's initial weights
    c.dpo.precompute_reference = False  # reference log-probs once before training (one model)
    # One `prompt + chosen + rejected` row per pair (the prompt run once) instead of two rows.
    c.dpo.share_prompt = True

    c.ppo = ml_collections.ConfigDict()
    c.ppo.reward_model = ""  # HF dir of a scalar-head model, or "judge:<name>" for a Python judge
    c.ppo.critic_init = "reward"  # "reward" | "policy"
    c.ppo.reference_name_or_path = ""  # default: the policy's initial weights
    c.ppo.max_new_tokens = 32  # response tokens sampled per prompt
    c.ppo.temperature = 1.0  # sampling temperature
    c.ppo.top_k = 0  # sample from the k most likely tokens; 0 = all
    c.ppo.top_p = 1.0  # nucleus sampling mass; 1 = off
    c.ppo.stop_token = ""  # extra stop string (a single token); EOS always stops
    c.ppo.num_epochs = 4  # passes over each rollout batch
    c.ppo.num_minibatches = 2  # minibatches per pass
    c.ppo.clip_eps = 0.2  # policy ratio clip range
    c.ppo.value_clip_eps = 0.2  # value clip range
    c.ppo.value_coef = 0.1  # weight of the value loss
    c.ppo.entropy_coef = 0.0  # weight of the entropy bonus
    c.ppo.gamma = 1.0  # discount
    c.ppo.lam = 0.95  # GAE lambda
    c.ppo.kl_coef = 0.05  # KL penalty coefficient beta in the per-token reward
    c.ppo.kl_estimator = "k1"  # "k1" | "k2" | "k3"
    c.ppo.adaptive_kl = False  # adapt kl_coef towards kl_target (Ziegler et al. 2019)
    c.ppo.kl_target = 6.0  # target KL of the adaptive controller
    c.ppo.kl_horizon = 10000  # horizon of the adaptive controller
    c.ppo.whiten_advantages = True  # normalise advantages per batch
    c.ppo.whiten_rewards = False  # normalise rewards per batch
    c.ppo.missing_eos_penalty = -1.0  # added to the score of responses without EOS; 0 = off

    # Critic-free online RL (GRPO family). train.batch_size counts prompts; each iteration samples
    # num_generations completions of each, scores them, and makes num_iterations updates.
    c.grpo = ml_collections.ConfigDict()
    c.grpo.num_generations = 8  # G completions per prompt (one prefill per prompt)
    # Comma-separated: `module:function` (TRL's reward-function signature), `judge:NAME`, or a
    # reward-model directory; weighted by reward_weights (comma-separated floats; empty = all 1).
    c.grpo.reward_funcs = ""
    c.grpo.reward_weights = ""  # comma-separated weights of reward_funcs; empty = all 1
    c.grpo.advantage_estimator = "grpo"  # "grpo" (group-normalised) | "rloo" (leave-one-out)
    c.grpo.scale_rewards = "group"  # "group" | "batch" | "none" (Dr. GRPO)
    c.grpo.loss_type = "grpo"  # "grpo" | "dr_grpo" | "dapo"
    c.grpo.epsilon_low = 0.2  # lower clip range of the ratio
    c.grpo.epsilon_high = 0.2  # > epsilon_low: DAPO's clip-higher
    c.grpo.importance_sampling_level = "token"  # "token" | "sequence" (GSPO)
    c.grpo.num_iterations = 1  # updates per rollout batch (μ)
    c.grpo.beta = 0.0  # KL coefficient (k3 against the reference); 0 loads no reference model
    c.grpo.reference_name_or_path = ""  # default: the policy's initial weights
    c.grpo.mask_truncated_completions = False  # completions without EOS do not count in the loss
    c.grpo.dynamic_sampling = False  # DAPO: drop groups whose rewards are all equal (counted)
    c.grpo.max_refill_batches = 0  # with dynamic_sampling: extra prompt batches to refill from
    c.grpo.max_new_tokens = 64  # completion tokens sampled per prompt
    c.grpo.temperature = 1.0  # sampling temperature
    c.grpo.top_k = 0  # sample from the k most likely tokens; 0 = all
    c.grpo.top_p = 1.0  # nucleus sampling mass; 1 = off
    c.grpo.stop_token = ""  # extra stop string (a single token); EOS always stops
    return c


def _unknown_keys(config: Any, schema: Any, prefix: str = "") -> list[str]:
    problems = []
    for key in config.keys():
        path = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema.keys()), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            problems.append(f"unknown config key '{path}'{hint}")
        elif isinstance(schema[key], ml_collections.ConfigDict) and key != "init":
            if not isinstance(config[key], ml_collections.ConfigDict):
                problems.append(f"config key '{path}' must be a section, got {config[key]!r}")
            else:
                problems += _unknown_keys(config[key], schema[key], prefix=f"{path}.")
    return problems


def _unknown_init_keys(init: Any) -> list[str]:
    """`model.init` holds `ModelConfig` fields, less the run settings that `model.*` sets."""
    run_settings = {"dtype", "param_dtype", "remat_policy", "scan_layers", "attention_impl", "head"}
    fields = sorted({f.name for f in dataclasses.fields(ModelConfig)} - run_settings)
    problems = []
    for key in init.keys():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean 'model.init.{close[0]}'?)" if close else ""
            problems.append(f"unknown config key 'model.init.{key}'{hint}")
    return problems


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key}: {message}")


def _check_choice(config: Any, key: str, choices: tuple[str, ...]) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    _check(value in choices, key, f"{value!r} is not one of {', '.join(map(str, choices))}")


def resolve_mesh_shape(shape: tuple[int, ...], num_devices: int) -> tuple[int, ...]:
    fixed = math.prod(s for s in shape if s != -1)
    _check(sum(s == -1 for s in shape) <= 1, "mesh.shape", f"{shape} has more than one -1")
    _check(all(s == -1 or s >= 1 for s in shape), "mesh.shape", f"{shape} has a size < 1")
    if -1 in shape:
        _check(
            num_devices % fixed == 0,
            "mesh.shape",
            f"{shape} cannot fill {num_devices} devices ({num_devices} is not a multiple of {fixed})",
        )
        shape = tuple(num_devices // fixed if s == -1 else s for s in shape)
    _check(
        math.prod(shape) == num_devices,
        "mesh.shape",
        f"{shape} needs {math.prod(shape)} devices but {num_devices} are available",
    )
    return tuple(shape)


def mesh_axis_sizes(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Global size of each mesh axis: the per-slice `mesh.shape` times `mesh.dcn_shape`."""
    dcn = tuple(mesh_config.dcn_shape) or (1,) * len(mesh_config.shape)
    _check(
        len(dcn) == len(mesh_config.shape) and all(s >= 1 for s in dcn),
        "mesh.dcn_shape",
        f"{dcn} must be () or positive sizes, one per mesh axis {tuple(mesh_config.axis_names)}",
    )
    _check(
        num_devices % math.prod(dcn) == 0,
        "mesh.dcn_shape",
        f"{dcn} needs a multiple of {math.prod(dcn)} devices, got {num_devices}",
    )
    shape = resolve_mesh_shape(tuple(mesh_config.shape), num_devices // math.prod(dcn))
    return {
        name: ici * slices
        for name, ici, slices in zip(mesh_config.axis_names, shape, dcn, strict=True)
    }


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
    """Checks keys, types and values; raises `ConfigError` naming the first bad key."""
    problems = _unknown_keys(config, base_config())
    if "model" in config and "init" in config.model:
        problems += _unknown_init_keys(config.model.init)
    if problems:
        raise ConfigError("; ".join(problems))
    _check_choice(config, "algorithm", ALGORITHMS)
    _check_choice(config, "model.dtype", DTYPES)
    _check_choice(config, "model.param_dtype", DTYPES)
    _check_choice(config, "model.remat_policy", REMAT_POLICIES)
    _check_choice(config, "model.attention_impl", ATTENTION_IMPLS)
    _check_choice(config, "model.lora.quantization", ("none", "int8", "nf4"))
    _check(config.model.lora.rank >= 0, "model.lora.rank", "must be >= 0 (0 = off)")
    # qwix's LoRA dropout needs a per-step rng inside the model call, which the trainers' loss
    # functions do not thread through yet: refuse rather than silently train without it.
    _check(
        config.model.lora.dropout == 0,
        "model.lora.dropout",
        "LoRA dropout is not supported by the trainers yet; use 0",
    )
    _check(
        config.model.lora.quantization == "none" or config.model.lora.rank > 0,
        "model.lora.quantization",
        "a quantized base (QLoRA) needs adapters: set model.lora.rank > 0",
    )
    _check_choice(config, "data.on_bad_row", ("error", "skip"))
    _check_choice(config, "data.on_long_row", ON_LONG_ROW_CHOICES)
    _check(
        not config.data.pack or config.algorithm in ("sft", "dpo", "reward"),
        "data.pack",
        f"packs sft, dpo and reward data; {config.algorithm} samples its responses",
    )
    _check_choice(config, "train.wandb_mode", ("online", "offline"))
    _check(config.train.num_epochs >= 0, "train.num_epochs", "must be >= 0 (0: use num_steps)")
    _check(0 <= config.optimizer.warmup_ratio < 1, "optimizer.warmup_ratio", "must be in [0, 1)")
    _check(
        not (config.optimizer.warmup_ratio and config.optimizer.warmup_steps),
        "optimizer.warmup_ratio",
        "set warmup_ratio or warmup_steps, not both",
    )
    _check_choice(config, "optimizer.name", ("adamw", "adam", "sgd", "rmsprop", "adafactor"))
    _check_choice(config, "optimizer.schedule", ("constant", "cosine", "linear"))
    if not config.model.name_or_path:
        _check_choice(config, "model.init.model_type", SUPPORTED_MODEL_TYPES)
    for key in (
        "train.batch_size",
        "train.num_steps",
        "train.log_every",
        "train.checkpoint_every",
        "train.max_consecutive_nonfinite",
        "data.max_length",
        "data.max_pairs_per_row",
    ):
        section, name = key.split(".")
        value = config[section][name]
        _check(
            isinstance(value, int) and value > 0, key, f"must be a positive integer, got {value!r}"
        )
    _check(config.optimizer.learning_rate > 0, "optimizer.learning_rate", "must be > 0")
    _check(config.optimizer.grad_accum_steps >= 1, "optimizer.grad_accum_steps", "must be >= 1")
    # Warmup counts optimizer updates; one longer than the run is clamped to it (a short smoke
    # run of a long recipe needs no override), see `jaxalign.optim.warmup_steps_for`.
    _check(config.optimizer.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
    # Rows per update: GRPO trains on num_generations completions of each prompt.
    rows = config.train.batch_size
    if config.algorithm == "grpo":
        _check(config.grpo.num_generations >= 2, "grpo.num_generations", "must be >= 2")
        rows *= config.grpo.num_generations
    _check(
        rows % config.optimizer.grad_accum_steps == 0,
        "train.batch_size",
        f"{rows} rows are not divisible by optimizer.grad_accum_steps="
        f"{config.optimizer.grad_accum_steps}",
    )
    _check(
        0 < config.data.max_prompt_length < config.data.max_length or config.algorithm == "sft",
        "data.max_prompt_length",
        f"must be in (0, data.max_length={config.data.max_length})",
    )
    _check(
        len(config.mesh.shape) == len(config.mesh.axis_names),
        "mesh.shape",
        f"{tuple(config.mesh.shape)} does not match mesh.axis_names {tuple(config.mesh.axis_names)}",
    )
    _check(
        {"data", "fsdp", "tensor"} <= set(config.mesh.axis_names),
        "mesh.axis_names",
        "must include 'data', 'fsdp' and 'tensor'",
    )
    _validate_logical_rules(config.mesh)
    if num_devices is not None:
        axes = mesh_axis_sizes(config.mesh, num_devices)
        shape = tuple(axes.values())
        data_parallel = axes["data"] * axes["fsdp"]
        micro_batch = rows // config.optimizer.grad_accum_steps
        _check(
            micro_batch % data_parallel == 0 and config.train.batch_size % data_parallel == 0,
            "train.batch_size",
            f"{rows} rows (/{config.optimizer.grad_accum_steps} accumulation steps) are not "
            f"divisible by the data-parallel size data*fsdp={data_parallel} of mesh {shape}",
        )
    if config.algorithm == "dpo":
        from jaxalign.losses import DPO_LOSS_TYPES

        _check_choice(config, "dpo.loss_type", DPO_LOSS_TYPES)
        _check(config.dpo.beta > 0, "dpo.beta", "must be > 0")
        _check(0 <= config.dpo.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)")
    if config.algorithm == "ppo":
        _check(bool(config.ppo.reward_model), "ppo.reward_model", "is required for PPO")
        _check_choice(config, "ppo.kl_estimator", ("k1", "k2", "k3"))
        _check_choice(config, "ppo.critic_init", ("reward", "policy"))
        _check(
            config.train.batch_size % config.ppo.num_minibatches == 0,
            "ppo.num_minibatches",
            f"must divide train.batch_size={config.train.batch_size}",
        )
    if config.algorithm == "grpo":
        _validate_grpo(config.grpo)
    _check(bool(config.data.train), "data.train", "is required")


def _validate_logical_rules(mesh_config: ml_collections.ConfigDict) -> None:
    """Rules are `(logical_name, mesh_axes)` pairs over known mesh axes, with every activation
    name the model constrains."""
    from jaxalign.sharding import ACTIVATION_AXES

    names = set(mesh_config.axis_names)
    for rule in mesh_config.logical_rules:
        _check(
            len(rule) == 2 and isinstance(rule[0], str),
            "mesh.logical_rules",
            f"{rule!r} is not a (logical_name, mesh_axes) pair",
        )
        axes = () if rule[1] is None else (rule[1],) if isinstance(rule[1], str) else rule[1]
        _check(
            set(axes) <= names,
            "mesh.logical_rules",
            f"{rule!r} names mesh axes outside mesh.axis_names {tuple(mesh_config.axis_names)}",
        )
    named = {rule[0] for rule in mesh_config.logical_rules}
    missing = [name for name in ACTIVATION_AXES if name not in named]
    _check(
        not missing,
        "mesh.logical_rules",
        f"has no rule for activation axes {missing} (see config.DEFAULT_LOGICAL_RULES)",
    )


def _validate_grpo(grpo: ml_collections.ConfigDict) -> None:
    from jaxalign.advantages import ADVANTAGE_ESTIMATORS, SCALE_REWARDS
    from jaxalign.losses import GRPO_LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS

    _check(bool(grpo.reward_funcs), "grpo.reward_funcs", "is required for GRPO")
    _check(
        grpo.advantage_estimator in ADVANTAGE_ESTIMATORS,
        "grpo.advantage_estimator",
        f"{grpo.advantage_estimator!r} is not one of {', '.join(ADVANTAGE_ESTIMATORS)}",
    )
    _check(
        grpo.scale_rewards in SCALE_REWARDS,
        "grpo.scale_rewards",
        f"{grpo.scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)}",
    )
    _check(
        grpo.loss_type in GRPO_LOSS_TYPES,
        "grpo.loss_type",
        f"{grpo.loss_type!r} is not one of {', '.join(GRPO_LOSS_TYPES)}",
    )
    _check(
        grpo.importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS,
        "grpo.importance_sampling_level",
        f"{grpo.importance_sampling_level!r} is not one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}",
    )
    _check(
        grpo.epsilon_low >= 0 and grpo.epsilon_high >= 0,
        "grpo.epsilon_low",
        "epsilon_low and epsilon_high must be >= 0",
    )
    _check(grpo.beta >= 0, "grpo.beta", "must be >= 0")
    _check(grpo.num_iterations >= 1, "grpo.num_iterations", "must be >= 1")
    _check(grpo.max_new_tokens >= 1, "grpo.max_new_tokens", "must be >= 1")
    _check(grpo.max_refill_batches >= 0, "grpo.max_refill_batches", "must be >= 0")
    if grpo.reward_weights:
        try:
            weights = [float(w) for w in grpo.reward_weights.split(",")]
        except ValueError:
            raise ConfigError(
                f"config.grpo.reward_weights: {grpo.reward_weights!r} is not comma-separated floats"
            ) from None
        funcs = [f for f in grpo.reward_funcs.split(",") if f.strip()]
        _check(
            len(weights) == len(funcs),
            "grpo.reward_weights",
            f"has {len(weights)} weights for {len(funcs)} reward_funcs",
        )
