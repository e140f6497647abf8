"""Sharing an export: its generated model card (`README.md`) and the upload to the Hugging Face Hub.

write_model_card(out_dir, config, metrics={"loss": 0.41, ...})   # every export gets one
push_to_hub(out_dir, "user/my-dpo-model")                        # `train.push_to_hub`
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ALGORITHM_NAMES = {
    "sft": "supervised fine-tuning (SFT)",
    "reward": "reward modelling (Bradley-Terry)",
    "dpo": "Direct Preference Optimization (DPO)",
    "ppo": "PPO (RLHF)",
    "grpo": "GRPO",
}
# The settings a reader of the card needs to reproduce the run, per algorithm section.
_KEY_SETTINGS = (
    "optimizer.name",
    "optimizer.learning_rate",
    "optimizer.schedule",
    "train.batch_size",
    "train.num_steps",
    "data.max_length",
    "data.max_prompt_length",
    "seed",
)
_ALGORITHM_SETTINGS = {
    "dpo": ("dpo.beta", "dpo.loss_type"),
    "ppo": ("ppo.kl_coef", "ppo.max_new_tokens", "ppo.reward_model"),
    "grpo": ("grpo.num_generations", "grpo.loss_type", "grpo.beta", "grpo.reward_funcs"),
    "reward": ("reward.margin",),
}


def _get(config: Mapping[str, Any], key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _is_hub_id(name: str) -> bool:
    return bool(name) and name.count("/") == 1 and not os.path.exists(name)


def model_card(config: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> str:
    """The card's Markdown: base model, algorithm, data, key settings, final metrics, versions.

    Args:
      config: the run's config as a dict (`ConfigDict.to_dict()` or `config.json`).
      metrics: the last logged (and evaluation) metrics.
    """
    algorithm = str(config.get("algorithm", "") or "")
    base = str(_get(config, "model.name_or_path") or "")
    data = [p.strip() for p in str(_get(config, "data.train") or "").split(",") if p.strip()]
    front = ["---", "library_name: transformers", "tags:", "- jaxalign", f"- {algorithm}"]
    if _is_hub_id(base):
        front.append(f"base_model: {base}")
    hub_data = [name for name in data if _is_hub_id(name)]
    if hub_data:
        front += ["datasets:", *(f"- {name}" for name in hub_data)]
    front.append("---")

    base_text = f"`{base}`" if base else "a randomly initialised model"
    if _is_hub_id(base):
        base_text = f"[{base}](https://huggingface.co/{base})"
    lines = [
        *front,
        "",
        "# Model card",
        "",
        f"This model is {base_text} trained with "
        f"{ALGORITHM_NAMES.get(algorithm, algorithm)} by jaxalign (JAX/Flax), on "
        + (", ".join(f"`{name}`" for name in data) or "(no data recorded)")
        + ".",
        "",
        "## Quick start",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("<this directory or repo id>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this directory or repo id>")',
        "```",
        "",
        "## Training settings",
        "",
        "| setting | value |",
        "|---|---|",
        f"| algorithm | `{algorithm}` |",
    ]
    for key in (*_KEY_SETTINGS, *_ALGORITHM_SETTINGS.get(algorithm, ())):
        value = _get(config, key)
        if value not in (None, ""):
            lines.append(f"| `{key}` | `{value}` |")
    if metrics:
        lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| `{name}` | {value:.6g} |" for name, value in sorted(metrics.items())]
    lines += [
        "",
        "## Framework versions",
        "",
        *(
            f"- {package}: {_version(package)}"
            for package in ("jaxalign", "jax", "flax", "optax", "transformers")
        ),
        "",
        "The full configuration is in `jaxalign_config.json` beside this card.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    out_dir: str | os.PathLike,
    config: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
) -> Path:
    """Writes `README.md` (the card) and `jaxalign_config.json` into an export directory."""
    out = Path(out_dir)
    (out / "README.md").write_text(model_card(config, metrics))
    (out / "jaxalign_config.json").write_text(json.dumps(dict(config), indent=2, default=str))
    return out / "README.md"


def push_to_hub(out_dir: str | os.PathLike, repo_id: str, *, private: bool = False) -> str:
    """Creates `repo_id` (if needed) and uploads the export folder; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=os.fspath(out_dir),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload model trained with jaxalign",
    )
    url = str(getattr(commit, "commit_url", commit))
    logger.info("pushed %s to https://huggingface.co/%s (%s)", out_dir, repo_id, url)
    return url
