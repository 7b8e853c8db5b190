#!/usr/bin/env bash
# The GPU check, in one run on a lent GPU machine (H200, 16 cores, torch with CUDA, nvcc, ninja,
# pytest-benchmark; no network): build curvkern for sm_90 against that machine's torch, run the
# CUDA tests, run the kernel tests with odd sizes under compute-sanitizer (memcheck, racecheck,
# synccheck), measure probe_reduce's bandwidth at ImageNet size, run the GPU benchmarks.
#
#   bash benchmarks/gpu_check.sh           # from the repository root
#
# Writes to $OUT (default ./gpu_out):
#   status.txt   one line per stage: exit status, seconds, time limit
#   env.txt      nvidia-smi, nvcc, compute-sanitizer, python, torch and curvkern as built
#   build.log    the build            tests.log      the CUDA tests (pytest -k cuda)
#   memcheck.log, racecheck.log, synccheck.log       compute-sanitizer over the kernel tests
#   probe_reduce_bandwidth.md/.json/.log             B = 1, 8, 128, 512 at D = 150,528
#   bench.log, bench.json   the GPU benchmarks        summary.md   their summary, when there is one
#
# Time budget (issue 15.5: the whole check, build included, within 8 minutes = 480 s on the lent
# machine). BUDGET_S = 440 s counts from the start. Each stage runs under `timeout` with at most
# its cap and at most what the budget leaves after its reserve (the later stages' minimum, so that
# an overrunning stage cannot starve them), then 2 s for an overrunning command to exit:
#   stage        cap  minimum  reserve  what bounds it
#   environment   25     -        -     nvidia-smi, nvcc, compute-sanitizer, python (own timeouts)
#   build        145     -      170     5 .cu + 7 .cpp files, one architecture, 16 parallel jobs
#   tests         75    40      130     the CUDA cases of tests/ (the >2^31-element ones write 8.6 GB)
#   memcheck      55    30      100     kernel tests with odd sizes; only curvkern's kernels checked
#   racecheck     35    20       80       (same selection)
#   synccheck     35    20       60       (same selection)
#   bandwidth     25    20       40     4 sizes + 1 masked, each checked, then 20 timed calls
#   benchmarks    45    30       10     pytest benchmarks -m gpu (GPU_BENCH_ARGS, default --quick)
#   summary       10    10        0     benchmarks/summarize.py, when it exists
# The caps sum to 450 s, so the budget trims the last stages if every earlier one runs to its cap;
# at worst the run ends at 440 s + 8 x 2 s of grace = 456 s <= 480 s. Stages run even when an
# earlier one failed; the exit status is that of the first failed stage.
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
# what the budget leaves after RESERVE_S, output appended to $OUT/LOG and echoed. SIGINT first,
# so that pytest still writes its reports; SIGKILL 2 s later.
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
  timeout -s INT -k 2 "$limit" "$@" 2>&1 | tee -a "$OUT/$logfile"
  rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $(($(date +%s) - t0))s limit=${limit}s" >>"$OUT/status.txt"
  log "$name: rc=$rc"
  ((rc != 0 && FIRST_FAILURE == 0)) && FIRST_FAILURE=$rc
  return "$rc"
}

# compute-sanitizer: on PATH, or in the toolkit.
SANITIZER=$(command -v compute-sanitizer ||
  ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
    2>/dev/null | head -n 1)

environment() {
  timeout 5 nvidia-smi || echo "nvidia-smi failed"
  timeout 5 nvcc --version || echo "no nvcc on PATH"
  if [[ -n "$SANITIZER" ]]; then timeout 5 "$SANITIZER" --version; else echo "no compute-sanitizer"; fi
  timeout 10 python3 - <<'PY'
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
  export TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1 MAX_JOBS=16
  python3 -m pip install --no-deps --no-build-isolation --no-index -e . || return 1
  python3 - <<'PY'
import curvkern
print("curvkern", curvkern.__version__, "from", curvkern.__file__)
print("kernels:", curvkern.has_kernels(), "CUDA kernels:", curvkern.has_cuda_kernels(),
      "built with CUDA", curvkern.ops.cuda_version() if curvkern.has_kernels() else None)
raise SystemExit(0 if curvkern.has_cuda_kernels() else "the CUDA kernels did not build or load")
PY
}

# The kernel tests with odd sizes (D = 4097, 4200, 9000, 150,528, masks with runs of 48, 129,
# 130, ...), on CUDA, without the cases that cannot run under a sanitizer: device-side asserts
# (reported as errors by design), 8.6 GB outputs, graph capture, opcheck's many dispatches.
SANITIZED_TESTS="tests/test_cuda_long_paths.py tests/test_mask_ops.py tests/test_perturb.py \
tests/test_perturb_zo.py tests/test_probe_reduce.py tests/test_rademacher.py"
SANITIZED_SELECTION="cuda and not bad_ids and not over_2_31 and not graph and not 65535 and not opcheck"

# Run by `stage` as `bash -c 'sanitize TOOL'`.
# shellcheck disable=SC2329
sanitize() {
  local tool=$1 tests
  read -r -a tests <<<"$SANITIZED_TESTS"
  if [[ -z "$SANITIZER" ]]; then
    echo "compute-sanitizer not found"
    return 127
  fi
  # Instrument curvkern's kernels only (torch's own are not under test, and slow to check).
  local filter=()
  if "$SANITIZER" --help 2>/dev/null | grep -q -- "--kernel-name"; then
    filter=(--kernel-name kns=curvkern)
  fi
  # No caching allocator: every tensor its own allocation, so memcheck sees its bounds.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
    "${filter[@]}" python3 -m pytest "${tests[@]}" -q -x -p no:cacheprovider \
    -k "$SANITIZED_SELECTION"
}

: >"$OUT/status.txt"
environment 2>&1 | tee "$OUT/env.txt"
export -f build sanitize
export SANITIZER SANITIZED_TESTS SANITIZED_SELECTION
stage build 145 170 build.log bash -c build
timeout 10 python3 -c \
  'import curvkern; print("curvkern CUDA kernels:", curvkern.has_cuda_kernels())' \
  >>"$OUT/env.txt" 2>&1
stage tests 75 130 tests.log python3 -m pytest tests -q -ra -p no:cacheprovider -k cuda
stage memcheck 55 100 memcheck.log bash -c 'sanitize memcheck'
stage racecheck 35 80 racecheck.log bash -c 'sanitize racecheck'
stage synccheck 35 60 synccheck.log bash -c 'sanitize synccheck'
stage bandwidth 25 40 probe_reduce_bandwidth.log python3 -m benchmarks.probe_reduce_bandwidth \
  --out "$OUT/probe_reduce_bandwidth.md"
stage benchmarks 45 10 bench.log python3 -m pytest benchmarks -m gpu -q -ra \
  -p no:cacheprovider "${BENCH_ARGS[@]}" --benchmark-json="$OUT/bench.json"
if [[ -s "$OUT/bench.json" && -f benchmarks/summarize.py ]]; then
  stage summary 10 0 bench.log python3 benchmarks/summarize.py "$OUT/bench.json" \
    --out "$OUT/summary.md"
fi
log "done; status by stage:"
cat "$OUT/status.txt"
exit "$FIRST_FAILURE"
