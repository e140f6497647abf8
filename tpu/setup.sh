#!/usr/bin/env bash
# Copy jaxalign to every worker of a TPU VM / queued resource and install it there in a
# virtualenv with `pip install -e '.[tpu]'`. DRY_RUN=1 prints the commands.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat << 'USAGE'
Usage: tpu/setup.sh --name NAME --zone ZONE [--project PROJECT] [--queued]
                    [--repo URL] [--ref REF] [--python VERSION]

Install jaxalign on all workers (--worker=all; with --queued, all nodes too):
  * default: `git archive REF` of this checkout (committed files only) is copied
    with `gcloud compute tpus tpu-vm scp` and unpacked to ~/jaxalign;
  * with --repo: each worker runs `git clone URL ~/jaxalign` (and checks out REF).
Then each worker creates ~/jaxalign-venv (Python VERSION, via uv) and runs
`pip install -e '.[tpu]'` in ~/jaxalign. Re-running replaces ~/jaxalign and
updates the venv in place.

Required:
  --name NAME          TPU / queued-resource name.
  --zone ZONE          Its zone, e.g. us-west4-a.
Options:
  --project PROJECT    GCP project (default: gcloud's configured project).
  --queued             The TPU was created with tpu/create.sh --queued.
  --repo URL           Clone this git URL on the workers instead of copying.
  --ref REF            Commit, branch or tag (default: HEAD for the copy, the
                       remote's default branch for --repo).
  --python VERSION     Python for the venv (default: 3.11).
  -h, --help           Show this help.

Environment:
  DRY_RUN=1            Print the commands instead of running them.
  TMPDIR               Where the local archive is written (default: /tmp).
USAGE
}

REPO_URL=""
REF=""
PYTHON_VERSION="3.11"

while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    -h | --help)
      usage
      exit 0
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

validate_common
check_format --python "$PYTHON_VERSION" '^3\.[0-9]+$' "a Python version such as 3.11"
check_format --ref "$REF" '^[A-Za-z0-9][A-Za-z0-9_./~^@{}-]*$' "a git commit, branch or tag"
require_gcloud

# Ubuntu images on TPU VMs ship an older system Python than jaxalign needs, so the venv
# is made by uv, which fetches the requested interpreter; pip then installs as usual.
# shellcheck disable=SC2016
install_command="python3 -m pip install --user --quiet uv"
install_command+=" && \"\$HOME/.local/bin/uv\" venv --allow-existing --seed --python $PYTHON_VERSION $REMOTE_VENV"
install_command+=" && cd $REMOTE_SRC && $REMOTE_PYTHON -m pip install -e \".[tpu]\""

if [[ -n $REPO_URL ]]; then
  fetch_command="rm -rf $REMOTE_SRC && git clone --quiet $(quote_arg "$REPO_URL") $REMOTE_SRC"
  if [[ -n $REF ]]; then
    fetch_command+=" && git -C $REMOTE_SRC checkout --quiet $(quote_arg "$REF")"
  fi
  tpu_ssh all "$fetch_command && $install_command"
  exit 0
fi

REF=${REF:-HEAD}
git -C "$REPO_ROOT" rev-parse --verify --quiet "$REF^{commit}" > /dev/null \
  || usage_error "--ref '$REF' is not a commit in $REPO_ROOT"
if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
  log "warning: uncommitted changes are not copied (git archive ships $REF only)"
fi
archive="${TMPDIR:-/tmp}/jaxalign-$NAME.tar.gz"
if ! is_dry_run; then
  trap 'rm -f "$archive"' EXIT
fi
run git -C "$REPO_ROOT" archive --format=tar.gz --prefix=jaxalign/ --output="$archive" "$REF"
tpu_scp all "$archive" "$NAME:jaxalign.tar.gz"
unpack_command="rm -rf $REMOTE_SRC && tar -xzf \"\$HOME/jaxalign.tar.gz\" -C \"\$HOME\" && rm \"\$HOME/jaxalign.tar.gz\""
tpu_ssh all "$unpack_command && $install_command"
