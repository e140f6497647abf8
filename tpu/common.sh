# shellcheck shell=bash disable=SC2034  # the variables set here are read by the scripts that source this file
# Shared helpers for the tpu/*.sh scripts. Sourced, never run on its own.
#
# Conventions every script follows:
#   * errors go to stderr; a bad or missing argument exits 2, any other failure exits 1;
#   * every gcloud/git command that changes something goes through `run`, so DRY_RUN=1
#     prints it (one line, `+ ` then the command, quoted so it can be pasted back into
#     a shell) instead of running it;
#   * commands that only read state (describe, cat a file on a worker) are used by the
#     watch loops only, which dry runs never enter.

SCRIPT_NAME="tpu/$(basename "$0")"
TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$TPU_DIR/.." && pwd)"

# Layout on every TPU worker. These strings are expanded by the worker's shell, never here.
# shellcheck disable=SC2016
REMOTE_SRC='"$HOME/jaxalign"'
# shellcheck disable=SC2016
REMOTE_VENV='"$HOME/jaxalign-venv"'
# shellcheck disable=SC2016
REMOTE_PYTHON='"$HOME/jaxalign-venv/bin/python"'
# shellcheck disable=SC2016
REMOTE_LOGS='"$HOME/jaxalign-logs"'
# The same log directory, relative to the login directory, for `scp` paths.
REMOTE_LOGS_RELATIVE='jaxalign-logs'

# Worker-side path of one file of a run: remote_run_file train log -> "$HOME/jaxalign-logs/train.log"
remote_run_file() {
  # shellcheck disable=SC2016
  printf '"$HOME/%s/%s.%s"' "$REMOTE_LOGS_RELATIVE" "$1" "$2"
}

# Arguments shared by every script; filled by take_common_arg.
NAME=""
ZONE=""
PROJECT=""
QUEUED=0

log() { echo "[$SCRIPT_NAME] $*" >&2; }

die() {
  echo "$SCRIPT_NAME: error: $*" >&2
  exit 1
}

usage_error() {
  echo "$SCRIPT_NAME: error: $*" >&2
  echo "Run '$SCRIPT_NAME --help' for usage." >&2
  exit 2
}

is_dry_run() { [[ "${DRY_RUN:-0}" == 1 ]]; }

# Quote one word for a POSIX shell: bare when it is made of safe characters, otherwise
# in single quotes (an embedded ' becomes '\'').
quote_arg() {
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# Quote a whole command line, words separated by single spaces.
quote_cmd() {
  local word separator=""
  for word in "$@"; do
    printf '%s' "$separator"
    quote_arg "$word"
    separator=" "
  done
}

# Run a command, or with DRY_RUN=1 print it as `+ <command>` on stdout and return 0.
run() {
  if is_dry_run; then
    printf '+ %s\n' "$(quote_cmd "$@")"
    return 0
  fi
  "$@"
}

require_gcloud() {
  is_dry_run && return 0
  command -v gcloud > /dev/null 2>&1 \
    || die "gcloud not found on PATH. Install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), then run 'gcloud auth login' and 'gcloud config set project PROJECT'."
}

# Fail with exit 2 unless the flag in $1 is followed by a value.
# Usage: need_value "$@"  (inside the argument loop, before `shift 2`).
need_value() {
  if (($# < 2)) || [[ -z $2 || $2 == --* ]]; then
    usage_error "$1 needs a value"
  fi
}

# Parse one argument shared by all scripts. Sets TAKEN to the number of words consumed.
take_common_arg() {
  case $1 in
    --name)
      need_value "$@"
      NAME=$2
      TAKEN=2
      ;;
    --zone)
      need_value "$@"
      ZONE=$2
      TAKEN=2
      ;;
    --project)
      need_value "$@"
      PROJECT=$2
      TAKEN=2
      ;;
    --queued)
      QUEUED=1
      TAKEN=1
      ;;
    *) usage_error "unknown argument: $1" ;;
  esac
}

# Usage: require_args --flag "$VALUE" [--flag "$VALUE" ...]; names every missing one.
require_args() {
  local missing=()
  while (($#)); do
    [[ -n $2 ]] || missing+=("$1")
    shift 2
  done
  if ((${#missing[@]})); then
    local joined
    joined=$(printf ', %s' "${missing[@]}")
    usage_error "missing required argument: ${joined:2}"
  fi
}

# Usage: check_format --flag "$VALUE" REGEX "what it should look like"
check_format() {
  [[ -z $2 || $2 =~ $3 ]] || usage_error "invalid $1 '$2': expected $4"
}

# Validate --name/--zone/--project and build SCOPE, the flags that locate the resource.
validate_common() {
  require_args --name "$NAME" --zone "$ZONE"
  check_format --name "$NAME" '^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$' \
    "lowercase letters, digits and hyphens, starting with a letter (e.g. dpo-v5e)"
  check_format --zone "$ZONE" '^[a-z]+-[a-z]+[0-9]+-[a-z]$' "a zone such as us-west4-a"
  check_format --project "$PROJECT" '^[a-z][-a-z0-9:.]{4,61}[a-z0-9]$' "a project id such as my-project"
  SCOPE=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then
    SCOPE+=(--project="$PROJECT")
  fi
}

# The gcloud command group for the resource: a TPU VM or a queued resource.
tpu_group() {
  if ((QUEUED)); then
    echo queued-resources
  else
    echo tpu-vm
  fi
}

# Where a command runs: "all" is every worker (of every slice, for a queued resource),
# a number N is worker N (of the first slice).
target_flags() {
  local worker=$1
  if ((QUEUED)); then
    if [[ $worker == all ]]; then
      printf '%s\n' --node=all --worker=all
    else
      printf '%s\n' --node=0 "--worker=$worker"
    fi
  else
    printf '%s\n' "--worker=$worker"
  fi
}

# Usage: tpu_ssh WORKER REMOTE_COMMAND
tpu_ssh() {
  local target=()
  mapfile -t target < <(target_flags "$1")
  run gcloud compute tpus "$(tpu_group)" ssh "$NAME" "${SCOPE[@]}" "${target[@]}" --command="$2"
}

# Usage: tpu_scp WORKER SOURCE DESTINATION  (a remote path is written NAME:PATH)
tpu_scp() {
  local target=()
  mapfile -t target < <(target_flags "$1")
  run gcloud compute tpus "$(tpu_group)" scp "$2" "$3" "${SCOPE[@]}" "${target[@]}"
}

# Print the resource's state (READY/PREEMPTED/... for a TPU VM, ACTIVE/SUSPENDED/... for a
# queued resource). Read-only, so it runs even under DRY_RUN; callers skip it there.
tpu_state() {
  if ((QUEUED)); then
    gcloud compute tpus queued-resources describe "$NAME" "${SCOPE[@]}" --format='value(state.state)'
  else
    gcloud compute tpus tpu-vm describe "$NAME" "${SCOPE[@]}" --format='value(state)'
  fi
}

# Validate --run-name, which names the log, pid and exit-code files on every worker.
validate_run_name() {
  check_format --run-name "$1" '^[A-Za-z0-9][A-Za-z0-9_.-]*$' "letters, digits, '.', '_' or '-'"
}

check_seconds() {
  check_format "$1" "$2" '^[0-9]+$' "a whole number of seconds"
}
