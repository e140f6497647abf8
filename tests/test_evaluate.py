"""`python -m jaxalign.evaluate` end to end: the command line, `read_prompts`, prompt truncation
(BOS kept), and reward-model scores and KL, each recomputed with `transformers` from the token ids
the run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from jaxalign.data import DataError
from jaxalign.evaluate import read_prompts

REPO = Path(__file__).resolve().parents[1]
MAX_PROMPT_LENGTH = 16
PROMPTS = [
    "I watched The Golden Frontier",
    # 30+ tokens: cut to its last MAX_PROMPT_LENGTH - 1 tokens after BOS.
    "I watched The Golden Frontier over the weekend and I found it not as powerful as I had "
    "hoped, and the plot was",
    "I went to see The Scarlet",
]


def _tiny_llama(vocab_size: int, **extra) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        **extra,
    )


def _save_random(directory: Path, model_cls, config, seed: int) -> Path:
    torch.manual_seed(seed)
    model = model_cls.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, tiny_data_dir):
    """Policy, reference (another random init) and reward model; one CLI run over PROMPTS."""
    root = tmp_path_factory.mktemp("evaluate")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_data_dir / "tokenizer")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    config = _tiny_llama(len(tokenizer))
    policy = _save_random(root / "policy", transformers.AutoModelForCausalLM, config, seed=0)
    tokenizer.save_pretrained(policy)
    reference = _save_random(root / "reference", transformers.AutoModelForCausalLM, config, 1)
    reward_model = _save_random(
        root / "rm",
        transformers.AutoModelForSequenceClassification,
        _tiny_llama(len(tokenizer), num_labels=1),
        seed=2,
    )
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    command = [
        sys.executable,
        "-m",
        "jaxalign.evaluate",
        f"--policy={policy}",
        f"--reference={reference}",
        f"--prompts={prompts}",
        f"--reward_model={reward_model}",
        "--samples_per_prompt=2",
        "--max_new_tokens=6",
        f"--max_prompt_length={MAX_PROMPT_LENGTH}",
        f"--out={root / 'summary.json'}",
        f"--samples_out={root / 'samples.jsonl'}",
    ]
    done = subprocess.run(
        command, cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        "tokenizer": tokenizer,
        "dirs": {"policy": policy, "reference": reference, "reward_model": reward_model},
        "stdout": done.stdout,
        "stderr": done.stderr,
        "summary": json.loads((root / "summary.json").read_text()),
        "samples": [json.loads(line) for line in (root / "samples.jsonl").read_text().splitlines()],
    }


def test_prompts_are_read_in_order_and_long_ones_keep_bos(eval_run):
    tokenizer, samples = eval_run["tokenizer"], eval_run["samples"]
    assert [s["prompt"] for s in samples] == [p for p in PROMPTS for _ in range(2)]
    assert json.loads(eval_run["stdout"]) == eval_run["summary"]
    for sample in samples:
        text_ids = tokenizer.encode(sample["prompt"], add_special_tokens=False)
        expected = [tokenizer.bos_token_id] + text_ids[-(MAX_PROMPT_LENGTH - 1) :]
        assert sample["prompt_ids"] == expected
    long_ids = tokenizer.encode(PROMPTS[1], add_special_tokens=False)
    assert len(long_ids) > 2 * MAX_PROMPT_LENGTH  # the cut is real
    assert samples[2]["prompt_ids"][0] == tokenizer.bos_token_id
    assert len(samples[2]["prompt_ids"]) == MAX_PROMPT_LENGTH
    assert len(tokenizer.encode(PROMPTS[0], add_special_tokens=False)) < MAX_PROMPT_LENGTH - 1
    assert samples[0]["prompt_ids"][0] == tokenizer.bos_token_id  # a short prompt is kept whole
    assert "2 of 6 prompts were longer than 16 tokens" in eval_run["stderr"]


def test_scores_and_kl_match_transformers(eval_run):
    dirs, samples, summary = eval_run["dirs"], eval_run["samples"], eval_run["summary"]
    load = dict(attn_implementation="eager", dtype=torch.float32)
    policy = transformers.AutoModelForCausalLM.from_pretrained(dirs["policy"], **load).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(dirs["reference"], **load).eval()
    reward_model = transformers.AutoModelForSequenceClassification.from_pretrained(
        dirs["reward_model"], **load
    ).eval()
    assert any(s["response_ids"] for s in samples)
    for sample in samples:
        prompt_ids, response_ids = sample["prompt_ids"], sample["response_ids"]
        ids = torch.tensor([prompt_ids + response_ids])
        with torch.no_grad():
            # The score head on the last token (not HF's pad-id pooling: a sampled token may be 2).
            hidden = reward_model.model(input_ids=ids).last_hidden_state
            score = reward_model.score(hidden)[0, -1, 0].item()
            logps = [
                torch.log_softmax(m(input_ids=ids).logits[0, :-1], -1)
                .gather(-1, ids[0, 1:, None])[:, 0]
                .numpy()
                for m in (policy, reference)
            ]
        response = slice(len(prompt_ids) - 1, None)  # predictions of the response tokens
        kl = float((logps[0][response] - logps[1][response]).sum())
        assert sample["score"] == pytest.approx(score, abs=1e-4)
        assert sample["kl"] == pytest.approx(kl, abs=1e-3)

    scores = np.array([s["score"] for s in samples])
    assert summary["num_samples"] == 6
    assert summary["reward"] == pytest.approx(scores.mean(), abs=1e-6)
    assert summary["reward_se"] == pytest.approx(scores.std(ddof=1) / np.sqrt(6), abs=1e-6)
    assert summary["kl"] == pytest.approx(np.mean([s["kl"] for s in samples]), abs=1e-6)
    assert abs(summary["kl"]) > 1e-2  # policy and reference differ, so the KL check has teeth


def test_read_prompts_names_the_bad_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert read_prompts(path) == ["a", "b"]
    for line, pattern in [
        ('{"text": "a"}', r":1: field 'prompt': required field is missing"),
        ('{"prompt": "   "}', r":1: field 'prompt': prompt is empty"),
        ("[1, 2]", r":1: expected a JSON object"),
    ]:
        path.write_text(line + "\n")
        with pytest.raises(DataError, match=rf"^{path}{pattern}"):
            read_prompts(path)
    (tmp_path / "p.txt").write_text('{"prompt": "a"}\n')
    with pytest.raises(
        DataError, match=r"p\.txt: expected a \.jsonl/\.json/\.parquet/\.csv/.* file"
    ):
        read_prompts(tmp_path / "p.txt")
