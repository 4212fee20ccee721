#!/usr/bin/env bash
# The one command a GPU run needs (DESIGN.md section 6):
#
#     bash benchmarks/gpu_check.sh OUTDIR        # OUTDIR defaults to benchmarks/results
#
# On a fresh Linux machine with a CUDA GPU and python3 carrying torch, triton and nvcc (no
# internet), it builds the assignment extension in place for this card, runs the GPU tests, runs
# the three benchmarks on a reduced grid, writes CSVs/PNGs and one log into OUTDIR and prints a
# short summary table last. Every step has its own time limit, and the limits add up to 7 min 15 s
# (8 min 15 s if the CUDA build fails and the build is redone without it), so the run fits a 15-minute
# lease with the machine's start; a failing step is reported and the next one still runs.
#
# Needs only torch, triton, numpy, scipy and transformers (pytest, matplotlib and tqdm are used
# when present: without pytest the GPU tests are reported as not run, without matplotlib no PNGs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:-benchmarks/results}" && cd "${1:-benchmarks/results}" && pwd)
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
: >"$LOG"
STATUS="$OUT/gpu_check_status.txt"
: >"$STATUS"
T0=$(date +%s)

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, record the outcome
  local name=$1 limit=$2
  shift 2
  local t=$(date +%s)
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local verdict=ok
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict=timeout
  [ $rc -ne 0 ] && [ "$verdict" = ok ] && verdict="failed (rc=$rc)"
  printf '%-22s %-16s %4ss\n' "$name" "$verdict" "$(($(date +%s) - t))" | tee -a "$STATUS" "$LOG"
}

{
  echo "gpu_check on $(hostname) at $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} | tee -a "$LOG"

ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
export CROC_CUDA_ARCHS="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
step build 110 "$PY" -m pip install -e . --no-build-isolation --no-deps
if ! "$PY" -c "import croc.kernels, croc.ops.assignment as a; assert a.EXTENSION_HAS_CUDA" >>"$LOG" 2>&1; then
  # keep the kernels testable even if the CUDA part of the extension did not build
  CROC_SKIP_CUDA_BUILD=1 step build-without-cuda 60 "$PY" -m pip install -e . --no-build-isolation --no-deps
fi

if "$PY" -c "import pytest" >/dev/null 2>&1; then
  # the GPU-only tests, then the kernel tests (which run on CUDA tensors when a GPU is there)
  step gpu-tests 110 "$PY" -m pytest -q -p no:cacheprovider -k "not flex_backend" tests/test_attention_gpu.py \
    tests/test_assignment.py tests/test_triton_attention.py
  # backend="flex" forward and backward (the backward cannot run on a CPU): its own step, as
  # compiling FlexAttention's backward takes a while
  step gpu-flex 40 "$PY" -m pytest -q -p no:cacheprovider -k flex_backend tests/test_attention_gpu.py
else
  echo "pytest is not installed: GPU tests not run" | tee -a "$LOG" "$STATUS"
fi

step bench-attention 75 "$PY" benchmarks/attention.py --out "$OUT" --lengths 4096 8192 \
  --head-dims 128 --heads 32/32 --masks croc --warmup 2 --reps 5
# A/B of the kernels' tile schedules (range vs index lists) on the same inputs, causal and Croc layout
step bench-schedule-ab 45 "$PY" benchmarks/attention.py --out "$OUT" --tag _schedule_ab --lengths 8192 \
  --head-dims 128 --heads 32/32 --masks causal croc --providers croc --schedule both --warmup 2 --reps 5
step bench-assignment 25 "$PY" benchmarks/assignment.py --out "$OUT" --device cuda
step bench-train-step 30 "$PY" benchmarks/train_step.py --out "$OUT" --device cuda

echo "=== summary (total $(($(date +%s) - T0))s)" | tee -a "$LOG"
cat "$STATUS"
"$PY" benchmarks/summarize.py "$OUT" | tee -a "$LOG"
