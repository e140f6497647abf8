"""The offline main job end to end, with the `test` preset of configs/demo.py."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_demo_pipeline_outputs(tmp_path):
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxalign.demo",
            "--config=configs/demo.py:test",
            f"--workdir={workdir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done in" in result.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert {"policies", "reward_model_accuracy", "preferences", "seconds"} <= summary.keys()
    assert set(summary["stage_seconds"]) == {
        "corpus",
        "sft",
        "preferences",
        "reward_model",
        "ppo_rm",
        "ppo_gt",
        "grpo",
        "dpo",
        "evaluation",
    }
    assert {"SFT", "PPO (reward model)", "PPO-GT (judge)", "GRPO (judge)", "DPO β=0.1"} <= summary[
        "policies"
    ].keys()
    for stats in summary["policies"].values():
        assert {"reward", "reward_se", "kl", "kl_se", "examples"} <= stats.keys()
    assert abs(summary["policies"]["SFT"]["kl"]) < 1e-3  # the reference against itself
    with Image.open(workdir / "reward_vs_kl.png") as image:
        image.verify()
    rows = [
        json.loads(line)
        for line in (workdir / "data" / "prefs_train.jsonl").read_text().splitlines()
    ]
    assert rows and all({"prompt", "chosen", "rejected"} <= row.keys() for row in rows)
    assert all(row["chosen"] != row["rejected"] for row in rows)
    assert "| policy |" in (workdir / "report.md").read_text()
