#!/usr/bin/env bash
# One-call GPU check of bench.py's llama-1b preset: SFT, DPO and generate with attention xla,
# then cudnn, 1 warm-up + 3 timed steps each, one process per attention impl (about 5-8 minutes
# on one H200). From the repository root, on the GPU machine:
#
#   bash bench/gpu_check.sh
#
# It runs under that machine's own python3 (PYTHON=... picks another) with the repository on
# PYTHONPATH: nothing is built or installed into that python. Packages it lacks (on this
# workplace's CUDA image: ml_collections and qwix) travel as wheels in .whl/ (git-ignored through
# .git/info/exclude), fetched once on a machine with network:
#
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp -d .whl ml-collections==1.1.0 qwix==0.1.8
#
# and are installed here with --no-index into /tmp/jaxalign-site. Each attention impl gets
# BUDGET_S seconds (default 220); a workload's table is printed as soon as it finishes, so a
# run cut short keeps what it measured. Exit status: 0 when every run finished.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

python=${PYTHON:-python3}
budget=${BUDGET_S:-220}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# A second run of this script on the same machine compiles nothing.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxalign-xla-cache}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

if compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/jaxalign-site .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/jaxalign-site"
fi

echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv 2> /dev/null
"$python" - << 'EOF' || exit 1
import sys

import jax

print(f"python {sys.version.split()[0]}, jax {jax.__version__}, devices {jax.devices()}")
if jax.default_backend() != "gpu":
    sys.exit(f"JAX sees no GPU (backend {jax.default_backend()})")
import jaxalign.trainers.engine  # noqa: E402,F401  (every dependency bench.py needs imports)
EOF

status=0
for impl in xla cudnn; do
  echo
  echo "== llama-1b, attention $impl"
  start=$SECONDS
  timeout -k 10 "$budget" "$python" bench/bench.py --preset llama-1b \
    --workload sft,dpo,generate --attention-impl "$impl" --warmup 1 --steps 3
  code=$?
  echo "-- attention $impl: exit $code after $((SECONDS - start)) s"
  [ "$code" -eq 0 ] || status=1
done
exit "$status"
