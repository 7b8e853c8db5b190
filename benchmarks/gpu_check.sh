#!/usr/bin/env bash
# The GPU check, in one run of a bare GPU machine (one H100 or H200, torch with CUDA, nvcc,
# ninja, compute-sanitizer; no network): build curvkern for sm_90 in place with -lineinfo, run the
# CUDA tests, run the kernel tests under compute-sanitizer, measure probe_reduce's bandwidth
# against the device's own peak, and time ResNets (benchmarks/gpu_timing.py).
#
#   OUT=gpu_out bash benchmarks/gpu_check.sh        # from the repository root
#
# Writes exactly these 8 files to $OUT (default ./gpu_out), the most a lent machine returns:
#   summary.txt     each stage: status (passed / failed / unsupported / skipped), seconds, limit,
#                   why, and each pytest stage's last line; the budget against the time used
#   env.txt         nvidia-smi, nvcc, compute-sanitizer, python, torch, the device's peak
#   build.log       the build          tests.log   the CUDA tests
#   sanitizer.log   the preflight, memcheck, racecheck and synccheck
#   bench.log       the bandwidth and timing stages' output
#   bandwidth.json  probe_reduce at D = 150,528 (benchmarks/probe_reduce_bandwidth.py)
#   timing.json     ResNet-18/50 rows (benchmarks/gpu_timing.py)
# A stage that does not run leaves its file empty (it still exists, so the count is fixed).
#
# Budget: BUDGET_S = 280 s from the start, build included, so that a fix and a rerun fit in the
# 15 minutes of device time. Each stage runs under `timeout` with its cap, and with at most what
# the budget leaves after the later stages' minimums (so an overrunning stage cannot starve them);
# a stage whose share falls below its minimum is skipped. SIGINT first (pytest still writes its
# report), SIGKILL 2 s later. The environment's own timeouts (30 s at most) count in the budget.
# Worst case: the last stage ends by 280 s + 2 s of SIGKILL grace, then a second or two of parsing
# and the summary: under 300 s.
#   stage       cap  minimum  what bounds it
#   environment  -      -     nvidia-smi 5 s, nvcc 5 s, compute-sanitizer 5 s, python 15 s
#   build      100     60     7 .cpp + 5 .cu files, sm_90 only, one job per core
#   tests       60     25     the CUDA cases of tests/ (the >2^31-element ones write 8.6 GB)
#   preflight   25     15     compute-sanitizer over one torch allocation
#   memcheck    30     15     the kernel tests with odd sizes, curvkern's kernels instrumented
#   racecheck   20     10       (same selection)
#   synccheck   15     10       (same selection)
#   bandwidth   20     15     4 sizes + 1 masked, each checked, then 20 timed calls
#   timing      60     30     ResNet-18, and ResNet-50 if its estimate fits (gpu_timing.py)
# The caps sum to 330 s, more than the budget: if every stage runs to its cap the last ones
# are trimmed or skipped. Without a GPU every stage says "no GPU" and the run ends in seconds.
# Exit status: 0 when no stage failed (unsupported and skipped are not failures), else 1.
set -uo pipefail
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
export CURVKERN_REQUIRE_KERNELS=1 # a failed build fails the tests instead of skipping them

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
BUDGET_S=280
START=$(date +%s)
FAILED=0
FILES=(summary.txt env.txt build.log tests.log sanitizer.log bench.log bandwidth.json timing.json)
for f in "${FILES[@]}"; do : >"$OUT/$f"; done
ROWS="$WORK/rows" # one line per stage: name|status|seconds|limit|why|last line
: >"$ROWS"

elapsed() { echo $(($(date +%s) - START)); }
log() { echo "[gpu_check $(elapsed)s] $*"; }
record() { # record NAME STATUS SECONDS LIMIT WHY [LAST_LINE]
  echo "$1|$2|$3|$4|$5|${6:-}" >>"$ROWS"
  log "$1: $2${5:+ ($5)}"
  [[ $2 == failed ]] && FAILED=1
  return 0
}

# Minimums of the stages after each one, for the budget's reserve.
declare -A MIN=([build]=60 [tests]=25 [preflight]=15 [memcheck]=15 [racecheck]=10
  [synccheck]=10 [bandwidth]=15 [timing]=30)
ORDER=(build tests preflight memcheck racecheck synccheck bandwidth timing)
reserve_after() {
  local name=$1 sum=0 seen=0 s
  for s in "${ORDER[@]}"; do
    ((seen)) && sum=$((sum + MIN[$s]))
    [[ $s == "$name" ]] && seen=1
  done
  echo "$sum"
}

# run_stage NAME CAP LOGFILE COMMAND...: the command under its share of the budget, its output
# appended to $OUT/LOGFILE and kept in $WORK/NAME.out. Sets RC, SECONDS_USED, LIMIT, SKIPPED.
run_stage() {
  local name=$1 cap=$2 logfile=$3
  shift 3
  local left=$((BUDGET_S - $(elapsed) - $(reserve_after "$name")))
  LIMIT=$((cap < left ? cap : left))
  SKIPPED=""
  if ((LIMIT < MIN[$name])); then
    SKIPPED="budget: ${LIMIT}s left for it, its minimum is ${MIN[$name]}s"
    RC=124 SECONDS_USED=0
    return
  fi
  log "$name: start (limit ${LIMIT}s)"
  echo "===== $name (limit ${LIMIT}s)" >>"$OUT/$logfile"
  local t0
  t0=$(date +%s)
  timeout -s INT -k 2 "$LIMIT" "$@" >"$WORK/$name.out" 2>&1
  RC=$?
  SECONDS_USED=$(($(date +%s) - t0))
  cat "$WORK/$name.out" >>"$OUT/$logfile"
}

# The last line pytest printed ("N passed, M skipped in Ss"), from a stage's output.
pytest_line() {
  grep -E '[0-9]+ (passed|failed|skipped|error|deselected)|no tests ran' "$WORK/$1.out" |
    tail -n 1 | sed -E 's/=+ ?//g; s/ ?=+$//'
}

# CUDA cases that ran (not skipped) in a junit file: those with a `cuda` device parameter, and
# those of tests/test_cuda_long_paths.py that are not CPU cases (a `cpu` parameter, or "cpu" in
# the name: that file tests the CPU kernels' long paths too). Prints "cuda cases: R ran, S skipped, F failed" and
# fails when none ran or any failed: a pass with every CUDA case skipped is not a pass.
cuda_cases() {
  python3 - "$1" <<'PY'
import re
import sys
import xml.etree.ElementTree as ET

try:
    cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
except (OSError, ET.ParseError) as exc:
    print(f"cuda cases: no junit report ({exc})")
    sys.exit(1)
cuda_param = re.compile(r"\[(?:.*-)?cuda(?:-|\])")
cpu_param = re.compile(r"\[(?:.*-)?cpu(?:-|\])")
ran = skipped = failed = 0
for case in cases:
    name, module = case.get("name", ""), case.get("classname", "")
    long_path = "test_cuda_long_paths" in module and not cpu_param.search(name)
    if not (cuda_param.search(name) or (long_path and "cpu" not in name)):
        continue
    if case.find("skipped") is not None:
        skipped += 1
    elif case.find("failure") is not None or case.find("error") is not None:
        failed += 1
    else:
        ran += 1
print(f"cuda cases: {ran + failed} ran, {skipped} skipped, {failed} failed")
sys.exit(0 if ran + failed > 0 and failed == 0 else 1)
PY
}

# compute-sanitizer: on PATH, or in the toolkit.
SANITIZER=$(command -v compute-sanitizer)
for candidate in /usr/local/cuda/bin/compute-sanitizer \
  /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [[ -z "$SANITIZER" && -x $candidate ]] && SANITIZER=$candidate
done

# ---- environment
{
  echo "gpu_check: budget ${BUDGET_S}s from $(date -u +%FT%TZ)"
  timeout 5 nvidia-smi || echo "nvidia-smi: not available"
  timeout 5 nvcc --version || echo "nvcc: not on PATH"
  if [[ -n "$SANITIZER" ]]; then
    timeout 5 "$SANITIZER" --version || echo "compute-sanitizer: --version failed"
  else
    echo "compute-sanitizer: not found"
  fi
  timeout 15 python3 - <<'PY'
import sys

import torch

print("python", sys.version.split()[0])
print("torch", torch.__version__, "CUDA", torch.version.cuda)
if torch.cuda.is_available():
    from benchmarks.gpu_peak import current_device_peak

    name, tbps = current_device_peak()
    props = torch.cuda.get_device_properties(0)
    print("device:", name, f"{props.multi_processor_count} SMs", f"{props.total_memory >> 20} MiB")
    print("peak bandwidth:", f"{tbps} TB/s (datasheet)" if tbps else "not in benchmarks/gpu_peak.py")
    print("GPU: yes")
else:
    print("GPU: no")
PY
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
GPU=no
grep -qx "GPU: yes" "$OUT/env.txt" && GPU=yes
DEVICE=$(grep -m1 '^device:' "$OUT/env.txt" | cut -c9-)

# ---- build: in place, sm_90 only, ninja, -lineinfo for the sanitizer's reports. It runs
# without a GPU too (the CUDA kernels compile anywhere nvcc is); ninja rebuilds only what changed.
# shellcheck disable=SC2016
run_stage build 100 build.log env TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1 CURVKERN_LINEINFO=1 \
  MAX_JOBS="$(nproc)" bash -c 'python3 setup.py build_ext --inplace && python3 -c "
import curvkern
print(\"curvkern\", curvkern.__version__, \"CUDA kernels:\", curvkern.has_cuda_kernels())
raise SystemExit(0 if curvkern.has_cuda_kernels() else \"the CUDA kernels did not build or load\")"'
if [[ -n $SKIPPED ]]; then
  record build skipped 0 "$LIMIT" "$SKIPPED"
elif ((RC == 0)); then
  record build passed "$SECONDS_USED" "$LIMIT" "" "$(tail -n 1 "$WORK/build.out")"
else
  record build failed "$SECONDS_USED" "$LIMIT" "rc=$RC$( ((RC == 124)) && echo ', timed out')" \
    "$(tail -n 1 "$WORK/build.out")"
fi
BUILT=$RC

if [[ $GPU == no ]]; then
  for s in "${ORDER[@]:1}"; do record "$s" skipped 0 0 "no GPU"; done
else

  # pytest_stage NAME CAP LOGFILE [ENV=VALUE...] -- PYTEST ARGS: a pytest stage judged by its
  # return code and by its CUDA cases (cuda_cases).
  pytest_stage() {
    local name=$1 cap=$2 logfile=$3
    shift 3
    local prefix=()
    while [[ $1 != -- ]]; do
      prefix+=("$1")
      shift
    done
    shift
    if ((BUILT != 0)); then
      record "$name" skipped 0 0 "the build failed"
      return
    fi
    run_stage "$name" "$cap" "$logfile" "${prefix[@]}" python3 -m pytest -q -ra \
      -p no:cacheprovider --junitxml="$WORK/$name.xml" "$@"
    if [[ -n $SKIPPED ]]; then
      record "$name" skipped 0 "$LIMIT" "$SKIPPED"
      return
    fi
    local counts crc
    counts=$(cuda_cases "$WORK/$name.xml")
    crc=$?
    echo "$counts" >>"$OUT/$logfile"
    local last
    last="$(pytest_line "$name"); $counts"
    if [[ $name != tests ]]; then
      last="$last; $(grep -m1 'ERROR SUMMARY' "$WORK/$name.out" | sed 's/^=* *//')"
    fi
    if ((RC == 0 && crc == 0)); then
      record "$name" passed "$SECONDS_USED" "$LIMIT" "" "$last"
    elif ((RC == 124 || RC == 137)); then
      record "$name" failed "$SECONDS_USED" "$LIMIT" "timed out at its ${LIMIT}s limit" "$last"
    elif ((RC == 0)); then
      record "$name" failed "$SECONDS_USED" "$LIMIT" "no CUDA case ran" "$last"
    else
      record "$name" failed "$SECONDS_USED" "$LIMIT" "rc=$RC" "$last"
    fi
  }

  # ---- the CUDA tests
  pytest_stage tests 60 tests.log -- tests -k cuda

  # ---- compute-sanitizer. Some sandboxed runtimes refuse the device ("Device not supported",
  # then error 999 at the first allocation): the preflight tells, and the stages are then
  # "unsupported", not failed.
  SANITIZER_OK=no
  if [[ -z "$SANITIZER" ]]; then
    record preflight unsupported 0 0 "compute-sanitizer not found"
  elif ((BUILT != 0)); then
    record preflight skipped 0 0 "the build failed"
  else
    run_stage preflight 25 sanitizer.log "$SANITIZER" --tool memcheck --error-exitcode 1 \
      python3 -c 'import torch; torch.zeros(1, device="cuda"); torch.cuda.synchronize(); print("ok")'
    if [[ -n $SKIPPED ]]; then
      record preflight skipped 0 "$LIMIT" "$SKIPPED"
    elif grep -qiE 'device not supported|error 999|cudaErrorUnknown|unknown error' \
      "$WORK/preflight.out"; then
      record preflight unsupported "$SECONDS_USED" "$LIMIT" \
        "the sanitizer refused this device" "$(grep -m1 -iE 'not supported|999|unknown' \
          "$WORK/preflight.out")"
    elif ((RC == 0)); then
      SANITIZER_OK=yes
      record preflight passed "$SECONDS_USED" "$LIMIT" ""
    else
      record preflight failed "$SECONDS_USED" "$LIMIT" "rc=$RC" "$(tail -n 1 "$WORK/preflight.out")"
    fi
  fi

  # The kernel tests with odd sizes (D = 4097, 9000, 150,528, masks with runs of 48, 129, 130,
  # ...) without the cases that cannot run under a sanitizer: device-side asserts (reported as
  # errors by design), 8.6 GB outputs, graph capture, opcheck's many dispatches.
  SANITIZED=(tests/test_cuda_long_paths.py tests/test_mask_ops.py tests/test_perturb.py
    tests/test_perturb_zo.py tests/test_probe_reduce.py tests/test_rademacher.py)
  SELECTION="cuda and not bad_ids and not over_2_31 and not graph and not 65535 and not opcheck"
  FILTER=()
  if [[ -n "$SANITIZER" ]] && "$SANITIZER" --help 2>/dev/null | grep -q -- "--kernel-name"; then
    FILTER=(--kernel-name kns=curvkern) # curvkern's kernels only: torch's are not under test
  fi
  for tool in memcheck racecheck synccheck; do
    if [[ $SANITIZER_OK != yes ]]; then
      status=$(grep '^preflight|' "$ROWS" | cut -d'|' -f2)
      why="preflight: $(grep '^preflight|' "$ROWS" | cut -d'|' -f5)"
      [[ $status == unsupported ]] || status=skipped
      record "$tool" "$status" 0 0 "$why"
      continue
    fi
    env_vars=()
    # memcheck only: no caching allocator, every tensor its own allocation, so that memcheck
    # sees its bounds. The other tools check shared memory and barriers, which it does not touch.
    [[ $tool == memcheck ]] && env_vars=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    cap=$(case $tool in memcheck) echo 30 ;; racecheck) echo 20 ;; *) echo 15 ;; esac)
    pytest_stage "$tool" "$cap" sanitizer.log "${env_vars[@]}" "$SANITIZER" --tool "$tool" \
      --error-exitcode 1 "${FILTER[@]}" -- "${SANITIZED[@]}" -x -k "$SELECTION"
  done

  # ---- bandwidth against the device's own peak
  if ((BUILT != 0)); then
    record bandwidth skipped 0 0 "the build failed"
  else
    run_stage bandwidth 20 bench.log python3 -m benchmarks.probe_reduce_bandwidth \
      --out "$WORK/bandwidth.md" --json "$OUT/bandwidth.json"
    if [[ -n $SKIPPED ]]; then
      record bandwidth skipped 0 "$LIMIT" "$SKIPPED"
    elif ((RC == 0)); then
      record bandwidth passed "$SECONDS_USED" "$LIMIT" "" \
        "$(grep '^| 512 | none' "$WORK/bandwidth.out" | head -n 1)"
    else
      record bandwidth failed "$SECONDS_USED" "$LIMIT" "rc=$RC" "$(tail -n 1 "$WORK/bandwidth.out")"
    fi
  fi

  # ---- timing: checked rows, then timed (gpu_timing.py exits 3 when it skips, saying why)
  left=$((BUDGET_S - $(elapsed)))
  run_stage timing 60 bench.log python3 -m benchmarks.gpu_timing --out "$OUT/timing.json" \
    --budget-s "$(((left < 60 ? left : 60) - 5))"
  if [[ -n $SKIPPED ]]; then
    record timing skipped 0 "$LIMIT" "$SKIPPED"
  elif ((RC == 0)); then
    record timing passed "$SECONDS_USED" "$LIMIT" "" "$(tail -n 1 "$WORK/timing.out")"
  elif ((RC == 3)); then
    record timing skipped "$SECONDS_USED" "$LIMIT" "$(tail -n 1 "$WORK/timing.out")"
  else
    record timing failed "$SECONDS_USED" "$LIMIT" "rc=$RC" "$(tail -n 1 "$WORK/timing.out")"
  fi
fi

# ---- summary
USED=$(elapsed)
{
  echo "gpu_check on ${DEVICE:-no GPU}: ${USED}s used of a ${BUDGET_S}s budget (at most 300 s)"
  printf '%-10s %-12s %5s %6s  %s\n' stage status secs limit "why / last line"
  while IFS='|' read -r name status secs limit why last; do
    printf '%-10s %-12s %5s %6s  %s\n' "$name" "$status" "${secs}s" "${limit}s" \
      "${why}${why:+${last:+ | }}${last}"
  done <"$ROWS"
  count=$(find "$OUT" -type f | wc -l)
  echo "files in \$OUT: $count of at most 8"
} >"$OUT/summary.txt"
cat "$OUT/summary.txt"
exit "$FAILED"
