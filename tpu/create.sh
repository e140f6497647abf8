#!/usr/bin/env bash
# Create a Cloud TPU VM, or a queued resource (needed for spot/best-effort queueing and
# for multislice). Run from a workstation with gcloud; DRY_RUN=1 prints the commands.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat << 'USAGE'
Usage: tpu/create.sh --name NAME --zone ZONE --type TYPE --runtime VERSION
                     [--project PROJECT] [--queued [--num-slices N] [--no-wait] [--poll-seconds S]]
                     [--spot | --best-effort]

Create a TPU VM (gcloud compute tpus tpu-vm create) or, with --queued, a queued
resource (gcloud compute tpus queued-resources create) and wait until it is ACTIVE.

Required:
  --name NAME          TPU / queued-resource name (lowercase, digits, '-').
  --zone ZONE          e.g. us-west4-a (v5e), us-central2-b (v4), us-east5-a (v5p).
  --type TYPE          accelerator type, e.g. v5litepod-16, v4-32, v5p-64.
  --runtime VERSION    TPU software version, e.g. v2-alpha-tpuv5-lite (v5e),
                       tpu-ubuntu2204-base (v4), v2-alpha-tpuv5 (v5p).
Options:
  --project PROJECT    GCP project (default: gcloud's configured project).
  --queued             Create a queued resource: the request waits for capacity
                       instead of failing. Use the same flag with the other scripts.
  --num-slices N       Multislice: N slices of TYPE joined over the data-center
                       network (queued resources only). Nodes are NAME-0 .. NAME-(N-1).
  --spot               Spot VMs: cheaper, can be preempted at any time.
  --best-effort        Best-effort queued resource (gcloud alpha; --queued only).
  --no-wait            Return once the queued resource is requested.
  --poll-seconds S     How often to check the queued resource (default: 30).
  -h, --help           Show this help.

Environment:
  DRY_RUN=1            Print the commands instead of running them.
USAGE
}

TYPE=""
RUNTIME=""
NUM_SLICES=1
SPOT=0
BEST_EFFORT=0
WAIT=1
POLL_SECONDS=30

while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --type)
      need_value "$@"
      TYPE=$2
      shift 2
      ;;
    --runtime)
      need_value "$@"
      RUNTIME=$2
      shift 2
      ;;
    --num-slices)
      need_value "$@"
      NUM_SLICES=$2
      shift 2
      ;;
    --spot)
      SPOT=1
      shift
      ;;
    --best-effort)
      BEST_EFFORT=1
      shift
      ;;
    --no-wait)
      WAIT=0
      shift
      ;;
    --poll-seconds)
      need_value "$@"
      POLL_SECONDS=$2
      shift 2
      ;;
    *)
      take_common_arg "$@"
      shift "$TAKEN"
      ;;
  esac
done

require_args --name "$NAME" --zone "$ZONE" --type "$TYPE" --runtime "$RUNTIME"
validate_common
check_format --type "$TYPE" '^v[0-9][a-z0-9]*-[0-9]+$' "an accelerator type such as v5litepod-16, v4-32 or v5p-64"
check_format --runtime "$RUNTIME" '^[a-z0-9][-a-z0-9.]*$' "a runtime version such as v2-alpha-tpuv5-lite"
check_format --num-slices "$NUM_SLICES" '^[1-9][0-9]*$' "a positive integer"
check_seconds --poll-seconds "$POLL_SECONDS"
if ((NUM_SLICES > 1 && !QUEUED)); then
  usage_error "--num-slices needs --queued: multislice is only available through queued resources"
fi
if ((BEST_EFFORT && !QUEUED)); then
  usage_error "--best-effort needs --queued"
fi
if ((SPOT && BEST_EFFORT)); then
  usage_error "--spot and --best-effort are mutually exclusive"
fi
require_gcloud

if ((!QUEUED)); then
  # Synchronous: gcloud returns once the VM is READY (or fails, e.g. no capacity).
  command=(gcloud compute tpus tpu-vm create "$NAME" "${SCOPE[@]}"
    --accelerator-type="$TYPE" --version="$RUNTIME")
  ((SPOT)) && command+=(--spot)
  run "${command[@]}"
  exit 0
fi

command=(gcloud)
# --best-effort exists only in the alpha track of queued-resources create.
((BEST_EFFORT)) && command+=(alpha)
command+=(compute tpus queued-resources create "$NAME" "${SCOPE[@]}"
  --accelerator-type="$TYPE" --runtime-version="$RUNTIME")
if ((NUM_SLICES > 1)); then
  command+=(--node-count="$NUM_SLICES" --node-prefix="$NAME")
else
  command+=(--node-id="$NAME")
fi
((SPOT)) && command+=(--spot)
((BEST_EFFORT)) && command+=(--best-effort)
run "${command[@]}"

if ((!WAIT)); then
  exit 0
fi
if is_dry_run; then
  log "dry run: would now poll 'gcloud compute tpus queued-resources describe' until ACTIVE"
  exit 0
fi

# The request is queued; it may wait for capacity for a long time. Report state changes.
last_state=""
while true; do
  state=$(tpu_state) || state="UNKNOWN (describe failed)"
  if [[ $state != "$last_state" ]]; then
    log "queued resource $NAME: $state"
    last_state=$state
  fi
  case $state in
    ACTIVE) exit 0 ;;
    FAILED | SUSPENDING | SUSPENDED)
      die "queued resource $NAME is $state; see: gcloud compute tpus queued-resources describe $NAME --zone=$ZONE"
      ;;
  esac
  sleep "$POLL_SECONDS"
done
