"""`jaxalign`: one command for everything, `jaxalign <subcommand> --flag=value ...`.

    jaxalign train --config=configs/dpo_tiny.py:/tmp/jaxalign-tiny --workdir=/tmp/dpo
    jaxalign train --config.algorithm=dpo --config.model.name_or_path=ORG/MODEL \\
        --config.data.train=trl-lib/ultrafeedback_binarized        # no config file needed
    jaxalign train --help                                          # every config key, documented
    jaxalign evaluate | plan | export | demo | data --help

Every subcommand takes `--name=value` flags (underscores in names); `python -m jaxalign.<module>`
runs the same code. A user mistake (a typo in a key, a missing file, a bad row) is one line on
stderr and a non-zero exit, not a traceback.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SUBCOMMANDS: dict[str, str] = {
    "train": "train a model; config.algorithm picks sft | reward | dpo | ppo | grpo",
    "evaluate": "judge reward and KL to the reference of a trained policy",
    "plan": "estimate memory per device of a config on a mesh before renting one",
    "export": "write a checkpoint step of a run as a Hugging Face model",
    "demo": "the offline RLHF-vs-DPO demo (needs the `demo` extra)",
    "data": "write the tiny local datasets and tokenizer the tiny configs use",
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [
        "usage: jaxalign <subcommand> [--flag=value ...]",
        "",
        "subcommands:",
        *(f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items()),
        "",
        "`jaxalign <subcommand> --help` describes its flags; `jaxalign train --help` lists every",
        "config key with its default.",
    ]
    return "\n".join(lines)


def _error(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """The `jaxalign` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        close = difflib.get_close_matches(command, list(SUBCOMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return _error(f"unknown subcommand '{command}'{hint}; one of {', '.join(SUBCOMMANDS)}")
    if command == "train":
        return train_main(rest)
    return _run_module_main(command, rest)


# Subcommands that are another module's command line.
_MODULE_MAINS = {
    "evaluate": "jaxalign.evaluate",
    "plan": "jaxalign.plan",
    "export": "jaxalign.export",
    "demo": "jaxalign.demo.pipeline",
    "data": "jaxalign.demo.data",
}


def _run_module_main(command: str, args: list[str]) -> int:
    """Runs `python -m <module>`'s code with `args` (its flags parse `sys.argv`)."""
    module = importlib.import_module(_MODULE_MAINS[command])
    if command in ("plan", "export", "demo"):
        # absl's --help lists only the program module's flags, which these define elsewhere.
        args = ["--helpfull" if a in ("-h", "--help") else a for a in args]
    sys.argv = [f"jaxalign {command}", *args]
    try:
        if command == "export":
            from absl import app

            module.define_flags()
            app.run(module.main)
        else:
            module.main()
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


# ----------------------------------------------------------------------------- train


def train_main(args: Sequence[str], *, prog: str = "jaxalign train") -> int:
    """`jaxalign train` (and `python -m jaxalign.train`): parse, validate, train, report."""
    args = list(args)
    if any(a in ("-h", "--help", "--helpfull") for a in args):
        print(train_help(prog))
        return 0
    try:
        config, workdir = parse_train_flags(args, prog=prog)
    except UsageError as error:
        return _error(str(error))
    configure_logging()
    return _train(config, workdir)


class UsageError(ValueError):
    """A command line that cannot be parsed; the message is one line."""


def _override_keys(args: Sequence[str]) -> list[tuple[str, str]]:
    """`(key, arg)` of every `--config.KEY=VALUE` (or `--config.KEY VALUE`) argument."""
    keys = []
    for arg in args:
        match = re.match(r"^--?config\.([^=]+)", arg)
        if match:
            keys.append((match.group(1), arg))
    return keys


def check_override_keys(args: Sequence[str]) -> None:
    """Raises `UsageError` (one line, with a did-you-mean) for an override key not in the schema."""
    from jaxalign.config import base_config

    known = set(flat_config(base_config()))
    sections = {key.rsplit(".", 1)[0] for key in known if "." in key}
    for key, arg in _override_keys(args):
        if key in known or key.startswith("model.init."):
            continue  # model.init fields are checked by `validate` (any ModelConfig field)
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean --config.{close[0]}?" if close else ""
        what = "a section, not a key" if key in sections else "unknown config key"
        raise UsageError(f"{arg.split('=', 1)[0]}: {what}{hint} (jaxalign train --help lists all)")


def parse_train_flags(args: Sequence[str], *, prog: str = "jaxalign train") -> tuple[Any, Path]:
    """`(config, workdir)` from `--config=FILE[:ARG]` (or the base config), `--config.KEY=VALUE`
    overrides and `--workdir` (default `runs/<algorithm>-<time>`)."""
    from absl import flags
    from ml_collections import config_flags

    from jaxalign.config import base_config

    for arg in args:
        if not arg.startswith("-"):
            raise UsageError(f"unexpected argument {arg!r}; flags are --name=value")
    check_override_keys(args)
    argv = [prog, *args]
    flag_values = flags.FlagValues()
    has_file = any(a in ("--config", "-config") or a.startswith("--config=") for a in args)
    try:
        if has_file:
            config_flags.DEFINE_config_file(
                "config",
                None,
                "a configs/*.py file",
                flag_values=flag_values,
                lock_config=True,
                sys_argv=argv,
            )
        else:
            config_flags.DEFINE_config_dict(
                "config",
                base_config(),
                "the base config",
                flag_values=flag_values,
                lock_config=True,
                sys_argv=argv,
            )
        flags.DEFINE_string("workdir", None, "output directory", flag_values=flag_values)
        flag_values(argv)
        config = flag_values.config
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as error:
        raise UsageError(_first_line(error)) from None
    workdir = flag_values.workdir or f"runs/{config.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"
    return config, Path(workdir)


def _first_line(error: BaseException) -> str:
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__


def _train(config: Any, workdir: Path) -> int:
    import jax

    from jaxalign.checkpoint import CheckpointError, CheckpointSaveError
    from jaxalign.config import ConfigError
    from jaxalign.data import DataError
    from jaxalign.models.config import UnsupportedConfigError
    from jaxalign.models.hf import CheckpointError as ModelCheckpointError
    from jaxalign.train import run

    try:
        result = run(config, workdir)
    except (
        CheckpointError,
        ConfigError,
        DataError,
        ModelCheckpointError,
        UnsupportedConfigError,
    ) as error:
        # Known, user-fixable problems: one line naming the file, key, step or directory.
        print(f"error: {error}", file=sys.stderr, flush=True)
        if isinstance(error, CheckpointSaveError):
            # A failed background save can leave orbax threads that never finish: do not
            # wait for them at interpreter exit.
            sys.stdout.flush()
            os._exit(1)
        return 1
    if jax.process_index() == 0:
        where = f"checkpoints: {result.checkpoint_dir}"
        if result.export_dir is not None:
            where += f"; Hugging Face model: {result.export_dir}"
        if result.stopped_early:
            where += f"; stopped early: {result.stopped_early}"
        print(f"done. {where}", flush=True)
    return 0


# ----------------------------------------------------------------------------- logging


class _Formatter(logging.Formatter):
    """`HH:MM:SS message` for INFO, `HH:MM:SS WARNING logger: message` above it."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno > logging.INFO:
            return f"{stamp} {record.levelname} {record.name}: {message}"
        return f"{stamp} {message}"


def configure_logging(verbose: bool | None = None) -> None:
    """jaxalign's INFO lines on stderr; other libraries (orbax, absl, jax, datasets) only from
    WARNING up, unless `JAXALIGN_VERBOSE=1`."""
    if verbose is None:
        verbose = os.environ.get("JAXALIGN_VERBOSE", "") not in ("", "0")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("jaxalign").setLevel(logging.INFO)
    try:  # absl's own logger (orbax logs through it) filters by its verbosity, not the root's
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    except ImportError:
        pass


# ----------------------------------------------------------------------------- train --help


def flat_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """`{"train.batch_size": 8, ...}`: every leaf key of a ConfigDict (sections flattened)."""
    import ml_collections

    flat = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_descriptions(source: str | None = None) -> dict[str, str]:
    """One line per key of `base_config()`, from the comments in `jaxalign/config.py`: the
    comment after the key, else the comment block right above it."""
    if source is None:
        import jaxalign.config

        source = Path(jaxalign.config.__file__).read_text()
    body = source[source.index("def base_config(") :]
    descriptions: dict[str, str] = {}
    block: list[str] = []
    for line in body.splitlines()[1:]:
        stripped = line.strip()
        if line and not line.startswith(" "):
            break  # the end of base_config
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"^c\.([\w.]+)\s*=\s*(.*)$", stripped)
        if match:
            key, rest = match.groups()
            comment = rest.split("  # ", 1)[1].strip() if "  # " in rest else ""
            descriptions[key] = comment or " ".join(block)
        block = []
    return descriptions


def train_help(prog: str = "jaxalign train") -> str:
    from jaxalign.config import base_config, tiny_model_init

    descriptions = config_descriptions()
    init_fields = set(tiny_model_init().keys())
    lines = [
        f"usage: {prog} [--config=FILE[:ARG]] [--workdir=DIR] [--config.KEY=VALUE ...]",
        "",
        "Trains the model of config.algorithm on config.data.train and writes checkpoints,",
        "metrics (metrics.jsonl, tensorboard/) and a Hugging Face export with a model card into",
        "--workdir. Without --config the run starts from jaxalign.config.base_config(). Re-running",
        "with the same --workdir resumes from its latest checkpoint.",
        "",
        "flags:",
        "  --config=FILE[:ARG]  a configs/*.py file (get_config(ARG)); default: the base config",
        "  --workdir=DIR        output directory (default: runs/<algorithm>-<date>-<time>)",
        "  --config.KEY=VALUE   set one config key; the keys, their defaults and meaning:",
        "",
    ]
    flat = flat_config(base_config())
    # In the order of config.py (sections as it groups them); then anything it did not name.
    ordered = []
    for key in descriptions:
        if key in flat:
            ordered.append(key)
        elif key == "model.init":  # a dict of ModelConfig fields, not a section of its own
            ordered += [k for k in flat if k.startswith("model.init.")]
    ordered += [key for key in flat if key not in ordered]
    section = None
    for key in dict.fromkeys(ordered):
        default = flat[key]
        head = key.rsplit(".", 1)[0] if "." in key else ""
        if head != section:
            section = head
            lines.append(f"[{head or 'top level'}]")
        text = descriptions.get(key, "")
        if not text and key.startswith("model.init.") and key.split(".")[-1] in init_fields:
            text = "random-init model: ModelConfig." + key.split(".")[-1]
        lines.append(f"  {key} = {default!r}" + (f"  # {text}" if text else ""))
    return "\n".join(lines)


def entry_point() -> None:
    """The `jaxalign` console script (pyproject.toml)."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
