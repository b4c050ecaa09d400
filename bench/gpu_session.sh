#!/usr/bin/env bash
# Everything worth running on a lent GPU machine, in one call, within a few minutes:
# install in place (no network needed: torch, triton, pytest and setuptools come with
# the machine), the GPU-marked tests and the Triton compile check, then the benchmarks.
# Results land in $OUT (default bench/out-gpu): device.txt, *.log, *.md and *.csv.
#
#   OUT=/some/dir bash bench/gpu_session.sh [quick]
#
# "quick" runs one benchmark shape per suite. Each step has its own time limit, so that
# one slow step cannot eat the session's device time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out-gpu}
PY=${PYTHON:-python3}
QUICK=${1:-}
mkdir -p "$OUT"

step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, note the exit status
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}

{ nvidia-smi -L; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } \
  >"$OUT/device.txt" 2>&1
step install 300 $PY -m pip install --no-deps --no-build-isolation -e .
step gpu-tests 300 $PY -m pytest -q -m gpu tests
step triton-compile 120 $PY tests/compile_triton_kernels.py 90 80
quick_flag=${QUICK:+--quick}
step token_logprobs 400 $PY -m fastpo.bench.token_logprobs --device cuda --out "$OUT" $quick_flag
step losses 200 $PY -m fastpo.bench.losses --device cuda --out "$OUT" $quick_flag
step linear_logprobs 300 $PY -m fastpo.bench.linear_logprobs --device cuda --out "$OUT" $quick_flag
