#!/usr/bin/env bash
# `make gpu-check`: one call on a GPU machine (python3 with torch and triton, nvcc, ninja,
# compute-sanitizer; no network, no venv) that returns every answer within GPU_CHECK_BUDGET_S
# (540 s), in at most 8 files under $BENCH_OUT (./bench-out when unset):
#
#   env.txt  build.txt  correct.json  correct.txt  bench.csv  bench.md  sanitizer.txt  summary.md
#
# Stages, each under its own `timeout` cut from one deadline (a stage's unused time goes to the
# next), each writing its results as it goes, so that a kill keeps what the earlier ones found:
#
#   0 env        versions, nvidia-smi                                              -> env.txt
#   1 build      the extension for this GPU's arch, while background processes     -> build.txt
#                warm the Triton cache with every Triton call of the later stages
#   2 correct    every op × {cuda, triton} × dtype × odd shapes and layouts        -> correct.json,
#                against molkernels.reference (benchmarks/gpu_check/correct.py)       correct.txt
#   3 bandwidth  time, bytes moved, fraction of a device copy, launches per call   -> bench.csv, bench.md
#   4 sanitizer  memcheck, racecheck, synccheck, initcheck on a couple of dozen    -> sanitizer.txt
#                small calls (sanitize_calls.py), each tool under its own timeout
#   5 summary    a line per stage (passed / failed / timed out, seconds) and the   -> summary.md
#                worst cases, appended after every stage
#
# GPU_CHECK_DRY=1 (make gpu-check-dry) runs it all on CPU tensors (reference and cpu backends,
# Triton under its interpreter) with tiny sizes, using .venv/bin/python when it exists; it fails
# when a stage fails, a result file is missing or empty, or more than 8 files are left.
# Exit code: 0 when every stage passed and the files are complete, else 1.
set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.."

DRY=${GPU_CHECK_DRY:-0}
if [ "$DRY" = 1 ]; then
  default_python=python3
  [ -x .venv/bin/python ] && default_python=.venv/bin/python
  PY=${PYTHON:-$default_python}
  BUDGET=${GPU_CHECK_BUDGET_S:-600}  # an upper bound on a loaded 2-core machine; a quiet one needs ~1-2 min
  WARMERS=${GPU_CHECK_WARMERS:-1}
else
  PY=${PYTHON:-python3}
  BUDGET=${GPU_CHECK_BUDGET_S:-540}
  WARMERS=${GPU_CHECK_WARMERS:-4}
fi
export PY BUDGET DRY
export BENCH_OUT=${BENCH_OUT:-bench-out}
SCRIPTS=benchmarks/gpu_check
RESULTS=(env.txt build.txt correct.json correct.txt bench.csv bench.md sanitizer.txt summary.md)
STAGES=(env build correct bandwidth sanitizer summary)
# Each stage's time, in % of BUDGET: its share when the stages before it kept theirs (what they
# leave goes to the next), and the floor kept for it whatever the stages before it took. The build
# is all or nothing, so its floor is most of the budget; the other stages write as they go.
declare -A SHARE=([env]=4 [build]=30 [correct]=30 [bandwidth]=20 [sanitizer]=14 [summary]=2)
declare -A FLOOR=([env]=3 [build]=65 [correct]=11 [bandwidth]=8 [sanitizer]=6 [summary]=2)
# where each stage's console output goes; bandwidth.py writes bench.csv and bench.md itself, so its
# console goes to the state folder and, when the stage fails, its tail to bench.md
declare -A LOG=([env]=env.txt [build]=build.txt [correct]=correct.txt [bandwidth]=STATE [sanitizer]=sanitizer.txt)

now() { date +%s; }

# ---------------------------------------------------------------------------------------------------
# The stages, each run as `bash gpu_check.sh --stage NAME` under timeout. GPU_CHECK_STAGE_DEADLINE
# (epoch seconds) is a little before the timeout, for the Python scripts to stop in good order.

stage_env() {
  echo "# molkernels gpu-check: environment, $(date -u +%FT%TZ)"
  echo "mode: $([ "$DRY" = 1 ] && echo "dry run (CPU tensors)" || echo GPU); budget ${BUDGET} s; python: $PY"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo "${GPU_CHECK_COMMIT:-unknown (no .git; set GPU_CHECK_COMMIT)}")"
  uname -a
  echo "cpus: $(nproc)"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  for tool in nvcc ninja compute-sanitizer ncu; do
    if command -v "$tool" > /dev/null; then
      echo "$tool: $("$tool" --version 2>&1 | grep -v '^$' | tail -n 1)"
    else
      echo "$tool: not found"
    fi
  done
  "$PY" - <<'EOF'
import importlib, os, platform, sys

missing = []
versions = [f"python {platform.python_version()}"]
for name in ("torch", "triton", "pytest", "setuptools", "tqdm"):
    try:
        versions.append(f"{name} {importlib.import_module(name).__version__}")
    except ImportError:
        versions.append(f"{name} MISSING")
        missing.append(name)
import torch

versions.append(f"torch CUDA {torch.version.cuda}")
dry = os.environ["DRY"] == "1"
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    versions.append(f"{props.name} sm_{props.major}{props.minor} {props.multi_processor_count} SMs "
                    f"{props.total_memory / 2**30:.0f} GiB")
elif not dry:
    missing.append("a CUDA device")
print("summary: " + ", ".join(versions))
# tqdm only matters to molkernels.posttrain; the check runs without it
required = [m for m in missing if m != "tqdm"]
if required:
    print("summary: missing " + ", ".join(required))
sys.exit(1 if required else 0)
EOF
}

stage_build() {
  if [ "$DRY" = 1 ]; then
    echo "dry run: the extension make install built in place"
  else
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS MOLKERNELS_FORCE_CUDA=$MOLKERNELS_FORCE_CUDA"
    local started
    started=$(now)
    if ! "$PY" -m pip install --no-build-isolation --no-deps -e .; then
      echo "pip install -e . failed: python setup.py build_ext --inplace instead"
      "$PY" setup.py build_ext --inplace || return 1
    fi
    echo "summary: built in $(( $(now) - started )) s"
  fi
  "$PY" - <<'EOF'
import json, os, sys

sys.path.insert(0, os.getcwd())
import molkernels

info = molkernels.build_info()
print(json.dumps(info))
if "cpu" not in info["backends"]:
    sys.exit("the extension molkernels._C does not load")
if os.environ["DRY"] != "1" and not info.get("cuda_compiled"):
    sys.exit("the extension was built without CUDA kernels")
print(f"summary: backends {', '.join(info['backends'])}; CUDA kernels {info.get('cuda_compiled')}")
EOF
}

# A stage script that stops on a sticky CUDA error (exit code 4) is rerun with --resume, which skips
# what it has recorded, as long as time is left.
run_resumable() {
  local script=$1 rc tries=0
  "$PY" "$script"
  rc=$?
  while [ "$rc" = 4 ] && [ "$tries" -lt 3 ] && [ $(( GPU_CHECK_STAGE_DEADLINE - $(now) )) -gt 15 ]; do
    tries=$((tries + 1))
    echo "sticky CUDA error: a fresh process resumes after the cases recorded so far"
    "$PY" "$script" --resume
    rc=$?
  done
  return "$rc"
}

stage_correct() { run_resumable "$SCRIPTS/correct.py"; }

stage_bandwidth() { run_resumable "$SCRIPTS/bandwidth.py"; }

stage_sanitizer() {
  local filter_text
  filter_text=$("$PY" "$SCRIPTS/sanitize_calls.py" --kernel-filters) || { echo "## kernel filters: failed"; return 1; }
  echo "kernel filters: $filter_text"
  if ! command -v compute-sanitizer > /dev/null; then
    echo "compute-sanitizer: not found$([ "$DRY" = 1 ] && echo " (dry run)"); the calls run without it"
    "$PY" "$SCRIPTS/sanitize_calls.py"
    local rc=$?
    echo "## calls without a sanitizer: $([ $rc = 0 ] && echo "ran (rc 0)" || echo "failed (rc $rc)")"
    return $rc
  fi
  # memcheck first and with the most time; each tool gets its weight's part of the time left
  local filters tools=(memcheck initcheck racecheck synccheck) weights=(4 3 2 2) failed=0 i tool limit started rc
  local status weight_left j
  read -ra filters <<< "$filter_text"
  for i in "${!tools[@]}"; do
    tool=${tools[$i]}
    weight_left=0
    for ((j = i; j < ${#tools[@]}; j++)); do weight_left=$((weight_left + weights[j])); done
    limit=$(( (GPU_CHECK_STAGE_DEADLINE - $(now)) * weights[i] / weight_left ))
    if [ "$limit" -lt 10 ]; then
      echo "## $tool: not run (no time left)"
      failed=1
      continue
    fi
    local options=(--tool "$tool" "${filters[@]}" --error-exitcode 99 --print-limit 25 --show-backtrace device)
    local cache=()
    case $tool in
      memcheck) options+=(--leak-check no --report-api-errors no); cache=(PYTORCH_NO_CUDA_MEMORY_CACHING=1) ;;
      initcheck) cache=(PYTORCH_NO_CUDA_MEMORY_CACHING=1) ;;  # reused pool memory would count as initialised
    esac
    echo "## $tool (limit $limit s): compute-sanitizer ${options[*]}"
    started=$(now)
    env "${cache[@]}" timeout --kill-after=5 "$limit" compute-sanitizer "${options[@]}" "$PY" "$SCRIPTS/sanitize_calls.py"
    rc=$?
    case $rc in
      0) status="clean" ;;
      99) status="ERRORS"; failed=1 ;;
      124|137) status="TIMED OUT"; failed=1 ;;
      *) status="calls failed"; failed=1 ;;
    esac
    echo "## $tool: $status (rc $rc, $(( $(now) - started )) s)"
  done
  if command -v ncu > /dev/null && [ $(( GPU_CHECK_STAGE_DEADLINE - $(now) )) -gt 60 ]; then
    echo "## ncu (one K = 8 float32 CUDA gram, products_kernel): speed of light, memory workload, occupancy"
    timeout --kill-after=5 45 ncu --kernel-name regex:products_kernel --launch-count 1 --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
      "$PY" "$SCRIPTS/sanitize_calls.py" --ncu
    echo "## ncu: done (rc $?)"
  fi
  return $failed
}

if [ "${1:-}" = --stage ]; then
  "stage_$2"
  exit $?
fi

# ---------------------------------------------------------------------------------------------------
# The driver

mkdir -p "$BENCH_OUT"
BENCH_OUT=$(cd "$BENCH_OUT" && pwd)
OUT=$BENCH_OUT
for file in "${RESULTS[@]}"; do rm -f "$OUT/$file"; done
STATE=$(mktemp -d)
export GPU_CHECK_STATE_DIR=$STATE
export PYTHONUNBUFFERED=1
unset MOLKERNELS_BACKEND
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  export TRITON_CACHE_DIR=$STATE/triton-cache
else
  unset TRITON_INTERPRET
  export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1)
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${arch:-9.0}}
  # the Makefile exports its own MAX_JOBS (2, for the CPU machine): leave 4 cores to the warm-up
  export MAX_JOBS=${GPU_CHECK_MAX_JOBS:-$(( $(nproc) > 8 ? $(nproc) - 4 : $(nproc) ))}
  export MOLKERNELS_FORCE_CUDA=1
fi

START=$(now)
DEADLINE=$((START + BUDGET))
overall=0
BACKGROUND=()

after() {  # seconds of the stages after stage $1 in table $2 (SHARE or FLOOR)
  local name=$1 later=0 past=0 stage
  local -n table=$2
  for stage in "${STAGES[@]}"; do
    [ "$past" = 1 ] && later=$((later + table[$stage]))
    [ "$stage" = "$name" ] && past=1
  done
  echo $((BUDGET * later / 100))
}

stage_limit() {  # min(max(floor, what the later shares leave), what the later floors leave)
  local name=$1 left nominal floor cap limit
  left=$(( DEADLINE - $(now) ))
  nominal=$(( left - $(after "$name" SHARE) ))
  floor=$(( BUDGET * FLOOR[$name] / 100 ))
  cap=$(( left - $(after "$name" FLOOR) ))
  limit=$(( nominal > floor ? nominal : floor ))
  limit=$(( limit < cap ? limit : cap ))
  echo $(( limit > 5 ? limit : 5 ))
}

summary_line() { echo "$1" >> "$OUT/summary.md"; }

run_stage() {
  local name=$1 log limit started rc status seconds
  log=${LOG[$name]}
  [ "$log" = STATE ] && log=$STATE/$name.log || log=$OUT/$log
  limit=$(stage_limit "$name")
  started=$(now)
  # the scripts stop starting work a little before the timeout, to write what they have
  export GPU_CHECK_STAGE_DEADLINE=$(( started + limit - (limit / 10 > 5 ? limit / 10 : 5) ))
  echo "== stage $name (limit $limit s)"
  timeout --kill-after=10 "$limit" bash "$SELF" --stage "$name" >> "$log" 2>&1
  rc=$?
  seconds=$(( $(now) - started ))
  case $rc in
    0) status="passed" ;;
    124|137) status="TIMED OUT"; overall=1 ;;
    3) status="FAILED (cases failed)"; overall=1 ;;
    4) status="FAILED (stopped by a sticky CUDA error)"; overall=1 ;;
    5) status="INCOMPLETE (stopped at its deadline)"; overall=1 ;;
    *) status="FAILED (exit code $rc)"; overall=1 ;;
  esac
  echo "   $name: $status in $seconds s"
  summary_line "- **$name**: $status in $seconds s (limit $limit s)"
  if [ "$name" = bandwidth ] && [ "$rc" != 0 ]; then
    { echo; echo "## log of the bandwidth stage (last 60 lines)"; echo '```'; tail -n 60 "$log"; echo '```'; } >> "$OUT/bench.md"
  fi
  timeout 60 "$PY" "$SCRIPTS/summary.py" "$name" >> "$OUT/summary.md" 2>&1
  if [ "$name" = correct ]; then
    timeout 60 "$PY" "$SCRIPTS/summary.py" digest >> "$OUT/correct.txt" 2>&1
  fi
  return 0
}

start_background() {  # name, limit, command...: a process of the build stage that outlives it
  local name=$1 limit=$2
  shift 2
  timeout --kill-after=5 "$limit" "$@" >> "$OUT/build.txt" 2>&1 &
  BACKGROUND+=("$name:$!")
}

stop_background() {  # ends the background processes still running; a summary line for them
  local entry name pid rc finished=0 stopped=0 failed=""
  [ "${#BACKGROUND[@]}" = 0 ] && return
  for entry in "${BACKGROUND[@]}"; do
    name=${entry%%:*}
    pid=${entry##*:}
    if kill -0 "$pid" 2> /dev/null; then
      if [ "${1:-}" = wait ]; then
        wait "$pid"
      else
        kill "$pid" 2> /dev/null
        wait "$pid"
        stopped=$((stopped + 1))
        continue
      fi
    else
      wait "$pid"
    fi
    rc=$?
    if [ "$rc" = 0 ]; then
      finished=$((finished + 1))
    else
      failed="$failed $name(exit code $rc)"
    fi
  done
  BACKGROUND=()
  summary_line "- **warm-up** (the Triton cache, in the background): ${finished} processes finished, ${stopped} stopped before the sanitizer stage${failed:+, failed:$failed}"
  summary_line "  - float64 Triton MoCo at K >= 17 (GPU-NOTES 1.1.3): $(cat "$STATE/moco_fp64" 2>/dev/null || echo 'not run')"
  if [ -n "$failed" ]; then overall=1; fi
}

trap 'for entry in "${BACKGROUND[@]}"; do kill "${entry##*:}" 2> /dev/null; done; rm -rf "$STATE"' EXIT

{
  echo "# molkernels gpu-check $(date -u +%FT%TZ)"
  echo
  echo "mode $([ "$DRY" = 1 ] && echo "dry run" || echo GPU), budget $BUDGET s, results in $OUT"
  echo
} > "$OUT/summary.md"

run_stage env
# The warm-up needs no extension (Triton kernels are Python): it runs alongside the build.
# The probe's own limit: correct.py skips the cases it gates unless it wrote "ok".
PROBE_LIMIT=120
WARM_LIMIT=$(( DEADLINE - $(now) - $(after bandwidth SHARE) ))
start_background probe "$WARM_LIMIT" bash -c 'timeout --foreground "$0" "$@"; rc=$?
  [ "$rc" = 124 ] && echo "timed out after $0 s" > "$GPU_CHECK_STATE_DIR/moco_fp64"; exit "$rc"' \
  "$PROBE_LIMIT" "$PY" "$SCRIPTS/warm_triton.py" --probe moco_fp64
for ((shard = 0; shard < WARMERS; shard++)); do
  start_background "warm-up$((shard + 1))" "$WARM_LIMIT" "$PY" "$SCRIPTS/warm_triton.py" --shard "$shard" --shards "$WARMERS"
done
run_stage build
# The dry run waits for its warm-up (a broken warm-up script must fail it). On the GPU the warm-up
# goes on compiling for the later stages, the bandwidth stage included (its 100-odd Triton variants
# would take minutes there); what still runs then is named in the summary, and ended before the
# sanitizer stage.
[ "$DRY" = 1 ] && stop_background wait
run_stage correct
running=0
for entry in "${BACKGROUND[@]}"; do kill -0 "${entry##*:}" 2> /dev/null && running=$((running + 1)); done
[ "$running" -gt 0 ] && summary_line "- warm-up: $running processes still compiling when the bandwidth stage starts"
run_stage bandwidth
stop_background
run_stage sanitizer

# Stage 5: the files left
count=$(find "$OUT" -mindepth 1 | wc -l)
missing=""
for file in "${RESULTS[@]}"; do [ -s "$OUT/$file" ] || missing="$missing $file"; done
total=$(( $(now) - START ))
too_many=""
[ "$count" -gt 8 ] && too_many=": TOO MANY"
summary_line "- **summary**: $count files in $BENCH_OUT (at most 8$too_many)${missing:+; missing or empty:$missing}; $total s in all"
if [ "$count" -gt 8 ] || [ -n "$missing" ]; then overall=1; fi
echo "gpu-check: $([ "$overall" = 0 ] && echo passed || echo FAILED) in $total s; $BENCH_OUT/summary.md:"
cat "$OUT/summary.md"
exit "$overall"
