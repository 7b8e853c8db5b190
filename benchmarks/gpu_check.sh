#!/usr/bin/env bash
# The GPU check, in one run on a lent GPU machine (H200, torch with CUDA 13, nvcc, ninja,
# pytest-benchmark; no network): build curvkern for sm_90 against that machine's torch, run the
# test suite (its CUDA cases run when a GPU and the CUDA kernels are there), run the GPU
# benchmarks and summarize them.
#
#   bash benchmarks/gpu_check.sh           # from the repository root
#
# Writes to $OUT (default ./gpu_out), seven files:
#   status.txt   one line per stage: exit status, seconds, time limit
#   env.txt      nvidia-smi, nvcc, python, torch and curvkern as built
#   build.log    the build          tests.log   python3 -m pytest tests
#   bench.log    the benchmarks     bench.json  pytest-benchmark's JSON
#   summary.md   benchmarks/summarize.py on bench.json (also printed last)
# Ends within 8 minutes: every stage runs under `timeout`, with at most what is left of
# GPU_CHECK_BUDGET_S (default 440 s) after keeping the later stages' minimum, plus 10 s for a
# command that overran to exit (4 stages: 480 s at worst). Stages run even when an earlier one
# failed; the exit status is that of the first failed stage.
# GPU_BENCH_ARGS (default "--quick") is passed to the benchmark run.
set -uo pipefail
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
export CURVKERN_REQUIRE_KERNELS=1 # a failed build fails the tests instead of skipping them

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
BUDGET_S="${GPU_CHECK_BUDGET_S:-440}"
read -r -a BENCH_ARGS <<<"${GPU_BENCH_ARGS:---quick}"
START=$(date +%s)
FIRST_FAILURE=0

log() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }

# stage NAME CAP_S RESERVE_S LOG COMMAND...: runs COMMAND for at most CAP_S seconds and at most
# what the budget leaves after RESERVE_S (the later stages' minimum), output appended to
# $OUT/LOG and echoed. SIGINT first, so that pytest still writes its reports.
stage() {
  local name=$1 cap=$2 reserve=$3 logfile=$4
  shift 4
  local left=$((BUDGET_S - ($(date +%s) - START) - reserve))
  local limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    log "$name: skipped, ${left}s left" | tee -a "$OUT/status.txt"
    ((FIRST_FAILURE == 0)) && FIRST_FAILURE=124
    return 124
  fi
  log "$name: start (limit ${limit}s)"
  local t0 rc
  t0=$(date +%s)
  timeout -s INT -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$logfile"
  rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $(($(date +%s) - t0))s limit=${limit}s" >>"$OUT/status.txt"
  log "$name: rc=$rc"
  ((rc != 0 && FIRST_FAILURE == 0)) && FIRST_FAILURE=$rc
  return "$rc"
}

environment() {
  timeout 60 nvidia-smi || echo "nvidia-smi failed"
  timeout 60 nvcc --version || echo "no nvcc on PATH"
  timeout 120 python3 - <<'PY'
import sys
import torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "CUDA", torch.version.cuda)
print("cuda available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
}

# Run by `stage` as `bash -c build` (timeout runs programs, not shell functions).
# shellcheck disable=SC2329
build() {
  export TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1
  if ! python3 -m pip install --no-deps --no-build-isolation --no-index -e .; then
    echo "pip install failed; falling back to python3 setup.py build_ext --inplace"
    python3 setup.py build_ext --inplace || return 1
  fi
  python3 - <<'PY'
import curvkern
print("curvkern", curvkern.__version__, "from", curvkern.__file__)
print("kernels:", curvkern.has_kernels(), "CUDA kernels:", curvkern.has_cuda_kernels(),
      "built with CUDA", curvkern.ops.cuda_version() if curvkern.has_kernels() else None)
raise SystemExit(0 if curvkern.has_cuda_kernels() else "the CUDA kernels did not build or load")
PY
}

: >"$OUT/status.txt"
environment 2>&1 | tee "$OUT/env.txt"
# caps and reserves (s): build 240 (keeps 200 for the rest), tests 120 (keeps 130),
# benchmarks 240 (keeps 15), summary 15.
export -f build
stage build 240 200 build.log bash -c build
timeout 60 python3 -c \
  'import curvkern; print("curvkern CUDA kernels:", curvkern.has_cuda_kernels())' \
  >>"$OUT/env.txt" 2>&1
stage tests 120 130 tests.log python3 -m pytest tests -q -ra -p no:cacheprovider
stage benchmarks 240 15 bench.log python3 -m pytest benchmarks -m gpu -q -ra \
  -p no:cacheprovider "${BENCH_ARGS[@]}" --benchmark-json="$OUT/bench.json"
if [[ -s "$OUT/bench.json" ]]; then
  stage summary 15 0 bench.log python3 benchmarks/summarize.py "$OUT/bench.json" \
    --out "$OUT/summary.md"
else
  log "no bench.json: nothing to summarize" | tee -a "$OUT/status.txt"
fi
log "done; status by stage:"
cat "$OUT/status.txt"
exit "$FIRST_FAILURE"
