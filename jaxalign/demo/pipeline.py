"""The end-to-end controlled-sentiment experiment: SFT → (RM → PPO) and DPO, judged by VADER.

Reads one demo config (configs/demo.py) whose `sft`, `reward`, `ppo`, `dpo` sections are ordinary
training configs; this module only fills in the paths each stage produces and runs
`jaxalign.train.run` on them, then evaluates every policy against the SFT reference.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from jaxalign.demo.corpus import generate_reviews, make_prompts, write_sft_jsonl
from jaxalign.demo.tokenizer import train_tokenizer
from jaxalign.evaluate import sample_and_score, summarize
from jaxalign.judges import get_judge
from jaxalign.models import from_pretrained, load_tokenizer
from jaxalign.sampling import SamplingConfig
from jaxalign.train import run

logger = logging.getLogger(__name__)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _sampling(tokenizer: Any, max_new_tokens: int) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
    )


def make_corpus(demo: ml_collections.ConfigDict, data_dir: Path) -> dict[str, Path]:
    """Reviews → tokenizer + SFT JSONL; distinct held-in / held-out prompt sets."""
    data_dir.mkdir(parents=True, exist_ok=True)
    reviews = generate_reviews(demo.num_reviews, seed=demo.seed)
    train_tokenizer(reviews, data_dir / "tokenizer", vocab_size=demo.tokenizer_vocab_size)
    write_sft_jsonl(data_dir / "sft_train.jsonl", reviews, seed=demo.seed)
    paths = {"tokenizer": data_dir / "tokenizer", "sft": data_dir / "sft_train.jsonl"}
    for split, count in (("train", demo.num_train_prompts), ("eval", demo.num_eval_prompts)):
        prompts = make_prompts(count, seed=demo.seed, split=split)
        paths[f"prompts_{split}"] = data_dir / f"prompts_{split}.jsonl"
        _write_jsonl(paths[f"prompts_{split}"], [{"prompt": p} for p in prompts])
    return paths


def make_preferences(
    demo: ml_collections.ConfigDict, sft_dir: Path, prompts_file: Path, data_dir: Path
) -> tuple[Path, Path, dict[str, int]]:
    """Two SFT samples per prompt, the judge's preferred one is `chosen` (as in the DPO paper)."""
    policy, params = from_pretrained(sft_dir)
    tokenizer = load_tokenizer(sft_dir)
    judge = get_judge("vader")
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    sampling = _sampling(tokenizer, demo.preferences.max_new_tokens)
    rng = jax.random.PRNGKey(demo.seed + 100)
    first = sample_and_score(
        policy, params, params, tokenizer, prompts, rng=rng, sampling=sampling, judge=judge
    )
    second = sample_and_score(
        policy,
        params,
        params,
        tokenizer,
        prompts,
        rng=jax.random.fold_in(rng, 1),
        sampling=sampling,
        judge=judge,
    )
    rows, ties = [], 0
    for prompt, a, sa, b, sb in zip(
        prompts,
        first["responses"],
        first["scores"],
        second["responses"],
        second["scores"],
        strict=True,
    ):
        if abs(sa - sb) < demo.preferences.min_score_gap or a.strip() == b.strip():
            ties += 1
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    random.Random(demo.seed).shuffle(rows)
    num_eval = max(int(len(rows) * demo.preferences.eval_fraction), 1)
    train_file, eval_file = data_dir / "prefs_train.jsonl", data_dir / "prefs_eval.jsonl"
    _write_jsonl(train_file, rows[num_eval:])
    _write_jsonl(eval_file, rows[:num_eval])
    return train_file, eval_file, {"pairs": len(rows), "dropped_ties": ties, "eval_pairs": num_eval}


@contextlib.contextmanager
def _timed(name: str, stage_seconds: dict[str, float]):
    """Adds the wall-clock seconds of the `with` block to `stage_seconds[name]` and logs them."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - start
        stage_seconds[name] = stage_seconds.get(name, 0.0) + seconds
        logger.info("%s done in %.0fs", name, seconds)


def _run_stage(name: str, config: ml_collections.ConfigDict, workdir: Path, **paths: str):
    config = ml_collections.ConfigDict(config.to_dict())  # a private copy
    for key, value in paths.items():
        section, _, field = key.partition("__")
        if field:
            config[section][field] = value
        else:
            config[section] = value
    _banner(f"{name}: {config.algorithm}, {config.train.num_steps} steps")
    return run(config, workdir)


def plot_frontier(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, r in results.items():
        ax.errorbar(
            r["kl"],
            r["reward"],
            xerr=r["kl_se"],
            yerr=r["reward_se"],
            fmt="o",
            capsize=3,
            label=name,
        )
    ax.set_xlabel("KL(π ‖ π_ref) per response (nats)")
    ax.set_ylabel("mean judge reward (VADER compound)")
    ax.set_title("Controlled sentiment: reward vs KL (held-out prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(summary: dict[str, Any], path: Path) -> None:
    lines = [
        "# jaxalign demo: controlled sentiment, RLHF (PPO) vs DPO",
        "",
        f"Reward-model held-out pair accuracy: {summary['reward_model_accuracy']:.3f}",
        f"Preference pairs: {summary['preferences']}",
        "",
        "| policy | judge reward (± s.e.) | KL to SFT (± s.e.) | mean length |",
        "|---|---|---|---|",
    ]
    for name, r in summary["policies"].items():
        lines.append(
            f"| {name} | {r['reward']:.3f} ± {r['reward_se']:.3f} | {r['kl']:.2f} ± {r['kl_se']:.2f} "
            f"| {r['response_length']:.1f} |"
        )
    lines += ["", "![reward vs KL](reward_vs_kl.png)", "", "## Samples", ""]
    for name, r in summary["policies"].items():
        for example in r["examples"]:
            lines.append(
                f"- **{name}** ({example['score']:+.2f}): {example['prompt']} _{example['response']}_"
            )
    path.write_text("\n".join(lines) + "\n")


def evaluate_policies(
    demo: ml_collections.ConfigDict, sft_dir: Path, policies: dict[str, Path], prompts_file: Path
) -> dict[str, dict[str, Any]]:
    """Judge reward and KL to the SFT reference of SFT and every policy, on held-out prompts."""
    judge = get_judge("vader")
    tokenizer = load_tokenizer(sft_dir)
    model, ref_params = from_pretrained(sft_dir)
    eval_prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    eval_prompts = [p for p in eval_prompts for _ in range(demo.eval.samples_per_prompt)]
    sampling = _sampling(tokenizer, demo.eval.max_new_tokens)
    results = {}
    for name, policy_dir in {"SFT": sft_dir, **policies}.items():
        _, params = from_pretrained(policy_dir)
        samples = sample_and_score(
            model,
            params,
            ref_params,
            tokenizer,
            eval_prompts,
            rng=jax.random.PRNGKey(demo.seed + 7),
            sampling=sampling,
            judge=judge,
        )
        results[name] = summarize(samples, num_examples=demo.eval.num_examples)
        r = results[name]
        print(
            f"{name:>20}: reward {r['reward']:+.3f} ± {r['reward_se']:.3f}   KL {r['kl']:.2f} ± {r['kl_se']:.2f}",
            flush=True,
        )
    return results


def run_demo(demo: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    stage_seconds: dict[str, float] = {}
    _banner("corpus and tokenizer")
    with _timed("corpus", stage_seconds):
        paths = make_corpus(demo, data_dir)
    tokenizer_dir = str(paths["tokenizer"])

    with _timed("sft", stage_seconds):
        sft = _run_stage(
            "SFT (reference)",
            demo.sft,
            workdir / "sft",
            tokenizer=tokenizer_dir,
            data__train=str(paths["sft"]),
        )
    sft_dir = sft.export_dir
    _banner("preference pairs sampled from SFT, labelled by the judge")
    with _timed("preferences", stage_seconds):
        prefs_train, prefs_eval, pref_stats = make_preferences(
            demo, sft_dir, paths["prompts_train"], data_dir
        )
    print(pref_stats, flush=True)

    policies: dict[str, Path] = {}
    with _timed("reward_model", stage_seconds):
        rm = _run_stage(
            "reward model",
            demo.reward,
            workdir / "rm",
            tokenizer=tokenizer_dir,
            data__train=str(prefs_train),
            data__eval=str(prefs_eval),
            model__name_or_path=str(sft_dir),
        )
    rm_accuracy = rm.eval_metrics.get("eval/accuracy", float("nan"))
    print(f"reward model held-out accuracy: {rm_accuracy:.3f}", flush=True)
    ppo_common = dict(
        tokenizer=tokenizer_dir,
        data__train=str(paths["prompts_train"]),
        model__name_or_path=str(sft_dir),
    )
    with _timed("ppo_rm", stage_seconds):
        policies["PPO (reward model)"] = _run_stage(
            "PPO with the reward model",
            demo.ppo,
            workdir / "ppo_rm",
            ppo__reward_model=str(rm.export_dir),
            ppo__critic_init="reward",
            **ppo_common,
        ).export_dir
    with _timed("ppo_gt", stage_seconds):
        policies["PPO-GT (judge)"] = _run_stage(
            "PPO with the ground-truth judge",
            demo.ppo,
            workdir / "ppo_gt",
            ppo__reward_model="judge:vader",
            ppo__critic_init="policy",
            **ppo_common,
        ).export_dir
    with _timed("grpo", stage_seconds):
        policies["GRPO (judge)"] = _run_stage(
            "GRPO with the ground-truth judge (no critic)",
            demo.grpo,
            workdir / "grpo",
            **ppo_common,
        ).export_dir
    for beta in demo.dpo_betas:
        with _timed("dpo", stage_seconds):
            policies[f"DPO β={beta}"] = _run_stage(
                f"DPO β={beta}",
                demo.dpo,
                workdir / f"dpo_beta{beta}",
                tokenizer=tokenizer_dir,
                data__train=str(prefs_train),
                model__name_or_path=str(sft_dir),
                dpo__beta=beta,
            ).export_dir

    _banner("evaluation on held-out prompts")
    with _timed("evaluation", stage_seconds):
        results = evaluate_policies(demo, sft_dir, policies, paths["prompts_eval"])
    summary = {
        "policies": results,
        "reward_model_accuracy": rm_accuracy,
        "preferences": pref_stats,
        "seconds": time.perf_counter() - start,
        "stage_seconds": {name: round(seconds, 1) for name, seconds in stage_seconds.items()},
        "workdir": str(workdir),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_frontier(results, workdir / "reward_vs_kl.png")
    write_report(summary, workdir / "report.md")
    return summary


def main() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    default_config = Path(__file__).resolve().parents[2] / "configs" / "demo.py"
    config_flag = config_flags.DEFINE_config_file("config", str(default_config), "Demo config.")
    workdir_flag = flags.DEFINE_string(
        "workdir", None, "Output directory (default runs/demo-<time>)."
    )

    def _main(argv):
        del argv
        logging.getLogger().setLevel(logging.WARNING)
        demo = config_flag.value
        workdir = Path(
            workdir_flag.value or demo.workdir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        summary = run_demo(demo, workdir)
        print(
            f"\ndone in {summary['seconds']:.0f}s. summary: {workdir / 'summary.json'}; "
            f"report: {workdir / 'report.md'}; plot: {workdir / 'reward_vs_kl.png'}",
            flush=True,
        )

    app.run(_main)
