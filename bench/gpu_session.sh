#!/usr/bin/env bash
# Everything worth running on a lent GPU machine, in one call, within a few minutes:
# install in place (no network needed: torch, triton, pytest and setuptools come with
# the machine), the GPU-marked tests and the Triton compile check, then the benchmarks,
# the peers' suite and a default training run on the GPU.
# Results land in $OUT (default bench/out-gpu): device.txt, steps.txt, *.log, *.md, *.csv.
#
#   OUT=/some/dir bash bench/gpu_session.sh [quick]
#
# "quick" runs one benchmark shape per suite. Each step has its own time limit, so that
# one slow step cannot eat the session's device time, and none runs past DEADLINE seconds
# from the start (default: no deadline). STEPS picks and orders the steps (default: all,
# in the order below); DTYPES the benchmarks' dtypes. Wheels in .whl/ (peers such as
# liger-kernel, carried to a machine without a registry) are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out-gpu}
PY=${PYTHON:-python3}
QUICK=${1:-}
DEADLINE=${DEADLINE:-100000}
DTYPES=${DTYPES:-fp32,bf16}
STEPS=${STEPS:-install gpu-tests triton-compile token_logprobs linear_logprobs losses peers engine}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, note the exit status
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  if ((left < 10)); then
    echo "$name: skipped, past the deadline" | tee -a "$OUT/steps.txt"
    return
  fi
  ((limit > left)) && limit=$left
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/steps.txt"
}

{ nvidia-smi -L; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } \
  >"$OUT/device.txt" 2>&1
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastpo-peers .whl/*.whl \
    >>"$OUT/device.txt" 2>&1 && export PYTHONPATH=/tmp/fastpo-peers${PYTHONPATH:+:$PYTHONPATH}
fi
quick_flag=${QUICK:+--quick}
gpu_test_files=$(grep -l "mark.gpu" tests/test_*.py)
for name in $STEPS; do
  case $name in
    install)
      step install 300 $PY -m pip install --no-deps --no-build-isolation -e .
      # without an install-time build, the JIT build would be retried in every benchmark child
      if ! $PY -c "import fastpo.kernels._C" >>"$OUT/install.log" 2>&1; then
        echo "install: no native extension; FASTPO_NATIVE=0 from here" | tee -a "$OUT/steps.txt"
        export FASTPO_NATIVE=0
      fi ;;
    gpu-tests) step gpu-tests 300 $PY -m pytest -v -p no:cacheprovider -m gpu $gpu_test_files ;;
    triton-compile) step triton-compile 120 $PY tests/compile_triton_kernels.py 90 ;;
    token_logprobs | linear_logprobs | losses)
      dtypes_flag=()
      [[ $name != losses ]] && dtypes_flag=(--dtypes "$DTYPES")
      step "$name" 400 $PY -m fastpo.bench.$name --device cuda --out "$OUT" $quick_flag "${dtypes_flag[@]}" ;;
    peers) step peers 400 $PY -m fastpo.bench --device cuda --no-compile --out "$OUT/suite" $quick_flag \
             --only token_logprobs,linear_logprobs,linear_policy_loss ;;
    engine) step engine 300 $PY -c "import sys; from fastpo.engine.cli import main; sys.exit(main(sys.argv[1:]))" \
              grpo device=cuda output_dir="$OUT/grpo-run" ;;
    *) echo "unknown step $name" | tee -a "$OUT/steps.txt" ;;
  esac
done
