"""Test-wide setup: 8 fake CPU devices so sharding is exercised without accelerators.

Set before JAX is imported anywhere; tests that need one device build a 1-device mesh.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# LLVM -O0 for XLA's CPU code: tests run tiny programs, so compiling (~40% faster at -O0) costs
# far more than running them.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One XLA compilation cache per test session: runs that build the same program (a run and its
# resumption, a subprocess training the same config; subprocesses inherit the environment)
# compile it once. Only compiles slower than a second are cached, so cheap eager ops do not
# write files. Set JAX_COMPILATION_CACHE_DIR yourself to keep a cache across sessions.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _compilation_cache = tempfile.mkdtemp(prefix="jaxalign-tests-xla-cache-")
    atexit.register(shutil.rmtree, _compilation_cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _compilation_cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")


# configs/sft_tiny.py shrunk to a seconds-long run (`config.<key> = value`, or `--config.<key>=value`
# on the command line). Runs in different test files use the same settings, so the session's
# compilation cache compiles their train step once.
TINY_SFT_SETTINGS = {
    "train.batch_size": 8,
    "train.num_steps": 10,
    "data.max_length": 32,
    "data.on_bad_row": "skip",  # one review's prompt alone is 34 tokens
}


@pytest.fixture(scope="session")
def tiny_sft_settings() -> dict:
    """`TINY_SFT_SETTINGS` (a fresh copy)."""
    return dict(TINY_SFT_SETTINGS)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`write_tiny_data` output (tokenizer/, sft_*.jsonl, prefs_*.jsonl, prompts_*.jsonl), once per
    session; the tiny configs take it as their argument: `get_config(str(tiny_data_dir))`."""
    from jaxalign.demo.data import write_tiny_data

    return write_tiny_data(tmp_path_factory.mktemp("tiny_data"))
