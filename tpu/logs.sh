#!/usr/bin/env bash
# Follow or fetch the training log that tpu/launch.sh writes on each TPU worker.
# DRY_RUN=1 prints the commands.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat << 'USAGE'
Usage: tpu/logs.sh --name NAME --zone ZONE [--project PROJECT] [--queued]
                   [--run-name RUN] [--worker N|all] [--lines N] [--fetch DIR]

Default: stream ~/jaxalign-logs/RUN.log of worker 0 (tail -F; Ctrl-C stops
watching, not training). Only process 0 logs metrics, so worker 0 is the one to
watch; the other workers' logs hold their own warnings and errors.
With --fetch DIR: copy the log(s) to DIR instead, as RUN.worker-N.log, or with
--worker all as RUN.<worker hostname>.log (hostnames end in -w-<worker index>).

Required:
  --name NAME          TPU / queued-resource name.
  --zone ZONE          Its zone.
Options:
  --project PROJECT    GCP project (default: gcloud's configured project).
  --queued             The TPU was created with tpu/create.sh --queued.
  --run-name RUN       As given to tpu/launch.sh (default: train).
  --worker N|all       Worker index, or all workers (default: 0). With
                       --queued, N is a worker of the first slice; all is every
                       worker of every slice.
  --lines N            Lines of history to show before following (default: 100).
  --fetch DIR          Copy the log(s) into local directory DIR.
  -h, --help           Show this help.

Environment:
  DRY_RUN=1            Print the commands instead of running them.
USAGE
}

RUN_NAME="train"
WORKER="0"
LINES=100
FETCH_DIR=""

while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --run-name)
      need_value "$@"
      RUN_NAME=$2
      shift 2
      ;;
    --worker)
      need_value "$@"
      WORKER=$2
      shift 2
      ;;
    --lines)
      need_value "$@"
      LINES=$2
      shift 2
      ;;
    --fetch)
      need_value "$@"
      FETCH_DIR=$2
      shift 2
      ;;
    *)
      take_common_arg "$@"
      shift "$TAKEN"
      ;;
  esac
done

validate_common
validate_run_name "$RUN_NAME"
check_format --worker "$WORKER" '^([0-9]+|all)$' "a worker index (0, 1, ...) or 'all'"
check_format --lines "$LINES" '^[0-9]+$' "a number of lines"
require_gcloud

if [[ -z $FETCH_DIR ]]; then
  tpu_ssh "$WORKER" "tail -n $LINES -F $(remote_run_file "$RUN_NAME" log)"
  exit 0
fi

run mkdir -p "$FETCH_DIR"
if [[ $WORKER != all ]]; then
  tpu_scp "$WORKER" "$NAME:$REMOTE_LOGS_RELATIVE/$RUN_NAME.log" "$FETCH_DIR/$RUN_NAME.worker-$WORKER.log"
  exit 0
fi
# Copying one path from every worker into one directory would overwrite; so each worker
# first snapshots its log under its own hostname, and the copy takes each worker's own file.
tpu_ssh all "cp $(remote_run_file "$RUN_NAME" log) \"\$HOME/$REMOTE_LOGS_RELATIVE/$RUN_NAME.\$(hostname).log\""
tpu_scp all "$NAME:$REMOTE_LOGS_RELATIVE/$RUN_NAME.*-w-*.log" "$FETCH_DIR/"
