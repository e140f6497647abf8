#!/usr/bin/env bash
# Stop a training run, or delete a TPU VM / queued resource. Deletes nothing unless
# --yes-delete is given. DRY_RUN=1 prints the commands.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat << 'USAGE'
Usage: tpu/delete.sh --name NAME --zone ZONE [--project PROJECT] [--queued]
                     (--stop-job [--run-name RUN] | --yes-delete)

  --stop-job     Send SIGTERM to the run on every worker; the engine writes a
                 checkpoint to its workdir and exits. Deletes nothing; a later
                 tpu/launch.sh with the same workdir resumes.
  --yes-delete   Delete the TPU VM (or, with --queued, the queued resource and
                 all its nodes). Everything on the workers' disks is lost; the
                 gs:// workdir (checkpoints, exported model) is not touched.
Without either flag nothing is done and the command fails.

Required:
  --name NAME          TPU / queued-resource name.
  --zone ZONE          Its zone.
Options:
  --project PROJECT    GCP project (default: gcloud's configured project).
  --queued             The TPU was created with tpu/create.sh --queued.
  --run-name RUN       As given to tpu/launch.sh (default: train).
  -h, --help           Show this help.

Environment:
  DRY_RUN=1            Print the commands instead of running them.
USAGE
}

RUN_NAME="train"
STOP_JOB=0
YES_DELETE=0

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
    --stop-job)
      STOP_JOB=1
      shift
      ;;
    --yes-delete)
      YES_DELETE=1
      shift
      ;;
    *)
      take_common_arg "$@"
      shift "$TAKEN"
      ;;
  esac
done

validate_common
validate_run_name "$RUN_NAME"
if ((STOP_JOB && YES_DELETE)); then
  usage_error "give --stop-job or --yes-delete, not both: stop the run, wait for its checkpoint in the log, then delete"
fi

if ((STOP_JOB)); then
  require_gcloud
  pid_file=$(remote_run_file "$RUN_NAME" pid)
  tpu_ssh all "if [ -f $pid_file ]; then kill -TERM \"\$(cat $pid_file)\" 2> /dev/null || true; fi"
  exit 0
fi

if ((QUEUED)); then
  what="queued resource '$NAME' and all its TPU nodes"
else
  what="TPU VM '$NAME'"
fi
if ((!YES_DELETE)); then
  echo "$SCRIPT_NAME: refusing to delete the $what in $ZONE without --yes-delete." >&2
  echo "Nothing was deleted. To stop only the training run, use --stop-job." >&2
  exit 1
fi

require_gcloud
log "deleting the $what in $ZONE (the workdir is not touched)"
if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$NAME" "${SCOPE[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${SCOPE[@]}" --quiet
fi
