#!/usr/bin/env bash
# Start `python -m jaxalign.train` on every worker of a TPU slice (or multislice), in the
# background with its log on each worker; optionally watch for preemption and restart.
# DRY_RUN=1 prints the launch command.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat << 'USAGE'
Usage: tpu/launch.sh --name NAME --zone ZONE --config CONFIG --workdir DIR
                     [--project PROJECT] [--queued] [--run-name RUN]
                     [--restart-on-preemption --type TYPE --runtime VERSION
                      [--spot | --best-effort] [--num-slices N]
                      [--repo URL] [--ref REF] [--python VERSION] [--poll-seconds S]]
                     [-- EXTRA_TRAIN_FLAGS ...]

Runs, on every worker (all nodes with --queued), in ~/jaxalign under nohup:
  python -m jaxalign.train --config=CONFIG --workdir=DIR \
      --config.mesh.distributed=True EXTRA_TRAIN_FLAGS...
Output goes to ~/jaxalign-logs/RUN.log on each worker (see tpu/logs.sh); the
process id and, once it ends, its exit code go to RUN.pid and RUN.exit.
Refuses to start while a RUN of the same name is still alive on a worker.

Required:
  --name NAME          TPU / queued-resource name.
  --zone ZONE          Its zone.
  --config CONFIG      Config file (and argument), e.g. configs/zephyr_dpo.py or
                       configs/dpo_tiny.py:/data, relative to the repository root.
  --workdir DIR        Checkpoints and exports; use gs://BUCKET/PATH so they
                       outlive the VM. Training resumes from the latest
                       checkpoint found there.
Options:
  --project PROJECT    GCP project (default: gcloud's configured project).
  --queued             The TPU was created with tpu/create.sh --queued.
  --run-name RUN       Names the log/pid/exit files (default: train).
  --restart-on-preemption
                       Stay in the foreground and poll the TPU every S seconds.
                       When it is PREEMPTED (TPU VM) or SUSPENDED/FAILED
                       (queued resource), delete that preempted resource,
                       recreate it with tpu/create.sh, reinstall with
                       tpu/setup.sh and relaunch; training resumes from the
                       workdir, which must therefore be a gs:// path. Exits with
                       the training's exit code once it ends on worker 0.
                       Needs --type and --runtime (as given to create.sh); pass
                       the same --spot/--best-effort/--num-slices, and the same
                       --repo/--ref as setup.sh (default: this checkout's HEAD,
                       pinned when the watch starts).
  --poll-seconds S     Polling interval for the watch (default: 60).
  -h, --help           Show this help.

Environment:
  DRY_RUN=1            Print the launch command instead of running it (the
                       watch loop is not simulated).
USAGE
}

CONFIG=""
WORKDIR=""
RUN_NAME="train"
RESTART=0
POLL_SECONDS=60
TYPE=""
RUNTIME=""
NUM_SLICES=""
SPOT=0
BEST_EFFORT=0
REPO_URL=""
REF=""
PYTHON_VERSION=""
EXTRA_TRAIN_FLAGS=()

while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      EXTRA_TRAIN_FLAGS=("$@")
      break
      ;;
    --config)
      need_value "$@"
      CONFIG=$2
      shift 2
      ;;
    --workdir)
      need_value "$@"
      WORKDIR=$2
      shift 2
      ;;
    --run-name)
      need_value "$@"
      RUN_NAME=$2
      shift 2
      ;;
    --restart-on-preemption)
      RESTART=1
      shift
      ;;
    --poll-seconds)
      need_value "$@"
      POLL_SECONDS=$2
      shift 2
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
    --repo)
      need_value "$@"
      REPO_URL=$2
      shift 2
      ;;
    --ref)
      need_value "$@"
      REF=$2
      shift 2
      ;;
    --python)
      need_value "$@"
      PYTHON_VERSION=$2
      shift 2
      ;;
    *)
      take_common_arg "$@"
      shift "$TAKEN"
      ;;
  esac
done

require_args --name "$NAME" --zone "$ZONE" --config "$CONFIG" --workdir "$WORKDIR"
validate_common
validate_run_name "$RUN_NAME"
check_seconds --poll-seconds "$POLL_SECONDS"
if ((RESTART)); then
  if [[ $WORKDIR != gs://?* ]]; then
    usage_error "--restart-on-preemption needs --workdir on Cloud Storage (gs://BUCKET/PATH), got '$WORKDIR': a recreated TPU VM starts with an empty disk, so checkpoints in a local workdir would be lost and training could not resume"
  fi
  require_args --type "$TYPE" --runtime "$RUNTIME"
else
  for flag_value in "--type=$TYPE" "--runtime=$RUNTIME" "--num-slices=$NUM_SLICES" \
    "--repo=$REPO_URL" "--ref=$REF" "--python=$PYTHON_VERSION"; do
    if [[ -n ${flag_value#*=} ]]; then
      usage_error "${flag_value%%=*} is only used with --restart-on-preemption"
    fi
  done
  if ((SPOT || BEST_EFFORT)); then
    usage_error "--spot/--best-effort are only used with --restart-on-preemption"
  fi
fi
require_gcloud

# --- the command each worker runs -------------------------------------------------------
log_file=$(remote_run_file "$RUN_NAME" log)
pid_file=$(remote_run_file "$RUN_NAME" pid)
exit_file=$(remote_run_file "$RUN_NAME" exit)

train_command="$REMOTE_PYTHON -m jaxalign.train $(quote_cmd --config="$CONFIG" --workdir="$WORKDIR" \
  --config.mesh.distributed=True "${EXTRA_TRAIN_FLAGS[@]}")"
# Runs in the background under nohup: the pid is that of python itself, so a SIGTERM
# (tpu/delete.sh --stop-job, or a preemption) reaches the engine, which checkpoints.
job_script="$train_command & echo \$! > $pid_file; wait \$!; echo \$? > $exit_file"
# Only the job goes to the background: the checks before it decide ssh's exit status.
launch_command="mkdir -p $REMOTE_LOGS && cd $REMOTE_SRC || exit 1"
launch_command+="; if [ -f $pid_file ] && kill -0 \"\$(cat $pid_file)\" 2> /dev/null; then"
launch_command+=" echo \"$RUN_NAME is already running on \$(hostname); stop it first with tpu/delete.sh --stop-job\" >&2; exit 1; fi"
launch_command+="; rm -f $exit_file"
launch_command+="; nohup bash -c $(quote_arg "$job_script") > $log_file 2>&1 < /dev/null &"

logs_hint="tpu/logs.sh --name $NAME --zone $ZONE"
((QUEUED)) && logs_hint+=" --queued"
[[ $RUN_NAME == train ]] || logs_hint+=" --run-name $RUN_NAME"

launch() {
  tpu_ssh all "$launch_command" || return
  log "started '$RUN_NAME' on all workers; follow it with: $logs_hint"
}

if ((!RESTART)); then
  launch
  exit 0
fi

# --- watch for preemption ---------------------------------------------------------------
common_flags=(--name "$NAME" --zone "$ZONE")
[[ -n $PROJECT ]] && common_flags+=(--project "$PROJECT")
((QUEUED)) && common_flags+=(--queued)
create_flags=("${common_flags[@]}" --type "$TYPE" --runtime "$RUNTIME" --poll-seconds "$POLL_SECONDS")
[[ -n $NUM_SLICES ]] && create_flags+=(--num-slices "$NUM_SLICES")
((SPOT)) && create_flags+=(--spot)
((BEST_EFFORT)) && create_flags+=(--best-effort)
setup_flags=("${common_flags[@]}")
[[ -n $PYTHON_VERSION ]] && setup_flags+=(--python "$PYTHON_VERSION")
if [[ -n $REPO_URL ]]; then
  setup_flags+=(--repo "$REPO_URL")
  [[ -n $REF ]] && setup_flags+=(--ref "$REF")
else
  # Pin the commit now: the checkout may move on while this loop runs for days.
  commit=$(git -C "$REPO_ROOT" rev-parse --verify --quiet "${REF:-HEAD}^{commit}") \
    || usage_error "--ref '${REF:-HEAD}' is not a commit in $REPO_ROOT"
  setup_flags+=(--ref "$commit")
fi
# Check now, not hours later after a preemption, that create.sh and setup.sh accept these.
preflight() {
  local errors
  if ! errors=$(DRY_RUN=1 "$TPU_DIR/$1" "${@:2}" 2>&1 > /dev/null); then
    usage_error "with --restart-on-preemption: $(head -n 1 <<< "$errors")"
  fi
}
preflight create.sh "${create_flags[@]}"
preflight setup.sh "${setup_flags[@]}"

launch
if is_dry_run; then
  log "dry run: the preemption watch loop is not simulated"
  exit 0
fi

# Exit code of the run on worker 0, or nothing while it is still running.
worker0_exit_code() {
  local output
  output=$(tpu_ssh 0 "cat $exit_file 2> /dev/null || true" 2> /dev/null) || return 0
  output=$(tail -n 1 <<< "$output" | tr -d '[:space:]')
  if [[ $output =~ ^[0-9]+$ ]]; then echo "$output"; fi
}

recreate_and_relaunch() {
  log "recreating $NAME (state: $1)"
  # Only the preempted resource is deleted: its VMs and local disks are already gone.
  until
    if ((QUEUED)); then
      gcloud compute tpus queued-resources delete "$NAME" "${SCOPE[@]}" --force --quiet || true
    else
      gcloud compute tpus tpu-vm delete "$NAME" "${SCOPE[@]}" --quiet || true
    fi
    "$TPU_DIR/create.sh" "${create_flags[@]}"
  do
    log "create failed; retrying in ${POLL_SECONDS}s"
    sleep "$POLL_SECONDS"
  done
  local attempt
  for attempt in 1 2 3; do
    "$TPU_DIR/setup.sh" "${setup_flags[@]}" && launch && return
    log "setup or launch failed (attempt $attempt of 3)"
    sleep "$POLL_SECONDS"
  done
  die "could not set up and launch on the recreated $NAME"
}

describe_failures=0
restarts=0
while true; do
  sleep "$POLL_SECONDS"
  if ! state=$(tpu_state 2> /dev/null); then
    describe_failures=$((describe_failures + 1))
    log "could not read the state of $NAME ($describe_failures in a row)"
    ((describe_failures < 10)) || die "gave up: $NAME cannot be described (deleted?); not recreating it"
    continue
  fi
  describe_failures=0
  case $state in
    READY | ACTIVE)
      exit_code=$(worker0_exit_code)
      [[ -n $exit_code ]] || continue
      # A preempted job may exit (after checkpointing) moments before the VM goes down:
      # believe the exit code only if the TPU is still up one poll later.
      sleep "$POLL_SECONDS"
      state=$(tpu_state 2> /dev/null) || state=UNKNOWN
      if [[ $state == READY || $state == ACTIVE ]]; then
        log "'$RUN_NAME' finished on worker 0 with exit code $exit_code after $restarts restart(s)"
        exit "$exit_code"
      fi
      ;;
    PREEMPTED | TERMINATED | SUSPENDING | SUSPENDED | FAILED)
      restarts=$((restarts + 1))
      recreate_and_relaunch "$state"
      ;;
    *) log "$NAME is $state; waiting" ;;
  esac
done
