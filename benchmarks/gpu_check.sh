#!/usr/bin/env bash
# `make gpu-check`: on a GPU machine with its own python3 and torch and no network. Builds the
# extension in place for the visible GPU, runs the test suite on the GPU (again under
# compute-sanitizer when it is installed), runs the GPU benchmarks, and writes the tables to
# $BENCH_OUT (default ./bench-out). Budget: under 8 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${BENCH_OUT:-bench-out}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16}
export MOLKERNELS_FORCE_CUDA=1
unset TRITON_INTERPRET

start=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - start )) s)"; }

stamp "build"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
$PY -c "import molkernels, json; print(json.dumps(molkernels.build_info()))" | tee "$OUT/build_info.json"

stamp "GPU tests"
set +e
$PY -m pytest -q -m gpu python_tests -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.txt" | tail -25
tests_rc=${PIPESTATUS[0]}
set -e

if command -v compute-sanitizer > /dev/null; then
  stamp "compute-sanitizer memcheck"
  compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest -q -x -m "gpu and not slow" python_tests \
    -p no:cacheprovider > "$OUT/sanitizer.txt" 2>&1 && echo "sanitizer: clean" || { echo "sanitizer: errors"; tail -40 "$OUT/sanitizer.txt"; tests_rc=1; }
else
  echo "compute-sanitizer not installed: skipped" | tee "$OUT/sanitizer.txt"
fi

stamp "benchmarks"
$PY -m molkernels bench all --device cuda --csv "$OUT/bench.csv" --markdown "$OUT/results.md" 2>&1 | tee "$OUT/bench.txt"

stamp "done"
exit "$tests_rc"
