#!/usr/bin/env bash
# `make gpu-preflight-versions`: the build, a CPU smoke test and gpu-preflight once more, in a
# throwaway venv with the GPU machine's versions (Python 3.12, torch 2.11.0+cu130, triton 3.6.0,
# ninja, pytest, setuptools, tqdm; nvcc 13.0), because main's .venv has other ones (Python 3.11,
# torch 2.14, triton 3.8) and the GPU machine has no network to fix a surprise on the day.
#
#   1 venv       Python 3.12 venv under $WORK/venv with torch==2.11.0 (a CUDA 13.0 build, checked),
#                triton==3.6.0 and the GPU machine's other packages; reused when it has them
#   2 copy+build the tracked (and untracked, not ignored) files of the working tree copied to
#                $WORK/src, built there as gpu_check.sh builds (pip install --no-build-isolation
#                --no-deps -e .) with MOLKERNELS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0, so main's
#                build/ and editable install are untouched
#   3 smoke      build_info() shows cuda_compiled, and gram, cross_gram, combine, project_simplex,
#                min_norm and mgda_step agree with molkernels.reference on every CPU backend
#   4 preflight  benchmarks/gpu_preflight.py under triton 3.6 (sm_90 compile of every Triton
#                configuration, ptxas -v of the CUDA kernels), with its own results cache and
#                Triton cache, so that nothing mixes with main's triton 3.8 results
#   5 ctest      the cuda-emulated CTest (no torch), in a cmake build directory of its own
#   6 summary    one line per step, PASS/FAIL, seconds and what failed; exit 1 if any failed
#
# Environment: MAX_JOBS (default 2), PYTHON312 (the interpreter; default python3.12 on PATH, else
# pyenv's newest 3.12.x), GPU_PREFLIGHT_VERSIONS_DIR (default build/gpu-preflight-versions, which
# .gitignore's build/ covers). Not part of `make test`: the first run downloads ~2.6 GB.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

TORCH_VERSION=2.11.0
TORCH_CUDA=13.0
TRITON_VERSION=3.6.0
# The GPU machine's other packages: the build needs ninja and setuptools, the GPU check pytest and tqdm.
# numpy is not among them, so the venv has none: an import of numpy on the GPU path fails here too.
EXTRA_PACKAGES=(ninja setuptools pytest tqdm)

WORK=${GPU_PREFLIGHT_VERSIONS_DIR:-$ROOT/build/gpu-preflight-versions}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
VENV=$WORK/venv
VPY=$VENV/bin/python
SRC=$WORK/src
LOGS=$WORK/logs
# numpy for Triton's CPU interpreter only (the smoke test's triton backend), kept out of the venv
INTERPRETER_NUMPY=$WORK/interpreter-numpy
export MAX_JOBS=${MAX_JOBS:-2}
mkdir -p "$LOGS"

# The interpreter checked to be 3.12: pyenv's shim `python3.12` exists on PATH but fails unless
# 3.12 is selected, so each candidate is run, not just found.
find_python312() {
  local candidate
  for candidate in ${PYTHON312:-} python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3; do
    [ -n "$candidate" ] || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' > /dev/null 2>&1; then
      command -v "$candidate" || echo "$candidate"
      return 0
    fi
  done
  return 1
}

# Prints the venv's versions; exits non-zero unless they are the GPU machine's.
venv_versions_ok() {
  [ -x "$VPY" ] || return 1
  # -W ignore: torch warns at import when numpy is missing, as it is here and on the GPU machine.
  "$VPY" -W ignore - "$TORCH_VERSION" "$TRITON_VERSION" "$TORCH_CUDA" <<'EOF'
import importlib, sys
torch_version, triton_version, cuda = sys.argv[1:]
import torch, triton
for module in ("ninja", "setuptools", "pytest", "tqdm"):
    importlib.import_module(module)
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
sys.exit(not (sys.version_info[:2] == (3, 12) and torch.__version__.split("+")[0] == torch_version
              and cuda == torch.version.cuda and triton.__version__ == triton_version))
EOF
}

step_venv() {
  if venv_versions_ok 2> /dev/null; then
    echo "reusing $VENV"
    return 0
  fi
  local python
  if ! python=$(find_python312); then
    echo "no Python 3.12: neither \$PYTHON312, python3.12 on PATH nor ${PYENV_ROOT:-$HOME/.pyenv}/versions/3.12.* runs"
    return 1
  fi
  echo "Python 3.12: $python"
  [ -x "$VPY" ] || "$python" -m venv "$VENV"
  "$VPY" -m pip install -q "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" "${EXTRA_PACKAGES[@]}"
  # nvcc 13.0 against a torch built with CUDA 12.x would fail torch's version check at build time,
  # so another build of torch is no stand-in for the GPU machine's: say so and stop.
  venv_versions_ok && return 0
  echo "torch $TORCH_VERSION from the package index is a CUDA $("$VPY" -W ignore -c 'import torch; print(torch.version.cuda)')" \
    "build, not CUDA $TORCH_CUDA as on the GPU machine: its build cannot be checked here"
  return 1
}

step_build() {
  # A fresh copy each run: what is tracked or would be carried to the GPU machine (untracked files
  # git does not ignore), as it is in the working tree now; files deleted in the tree are left out.
  rm -rf "$SRC"
  mkdir -p "$SRC"
  git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' file; do [ -e "$file" ] && printf '%s\0' "$file"; done \
    | tar --null -T - -cf - | tar -xf - -C "$SRC"
  echo "copied $(find "$SRC" -type f | wc -l) files to $SRC"
  # The venv's bin first: ninja, and the python that torch.utils.cpp_extension calls.
  (cd "$SRC" && PATH="$VENV/bin:$PATH" MOLKERNELS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \
    "$VPY" -m pip install --no-build-isolation --no-deps -e .)
}

# The smoke test: BACKENDS (comma-separated) against molkernels.reference in float64.
smoke_test() {
  (cd "$SRC" && "$VPY" - "$1" <<'EOF'
import json, os, sys
import torch
import molkernels
from molkernels import reference

info = molkernels.build_info()
print(json.dumps(info))
assert info.get("cuda_compiled") is True, "build_info() says the CUDA kernels were not compiled"
assert molkernels.__file__.startswith(os.getcwd()), f"molkernels imported from {molkernels.__file__}, not the copy"
torch.manual_seed(0)
K, widths = 5, (1000, 17, 3)
blocks = [torch.randn(K, w) for w in widths]
other = [torch.randn(K, w) for w in widths]
flat = torch.randn(K, 2053)
weights = torch.rand(K)


def close(name, got, expected, scale):
    error = (got.double() - expected.double()).abs().max().item()
    assert error <= 1e-5 * scale, f"{name}: max error {error:.3g} > {1e-5 * scale:.3g}"


for backend in sys.argv[1].split(","):
    norms = sum((b.double() ** 2).sum() for b in blocks).item()
    close("gram", molkernels.gram(blocks, backend=backend), reference.gram(blocks), norms)
    close("gram [K, d]", molkernels.gram(flat, backend=backend), reference.gram(flat), (flat.double() ** 2).sum().item())
    close("cross_gram", molkernels.cross_gram(blocks, other, backend=backend), reference.cross_gram(blocks, other),
          norms + sum((b.double() ** 2).sum() for b in other).item())
    for got, expected, block in zip(molkernels.combine(blocks, weights, backend=backend),
                                    reference.combine(blocks, weights), blocks):
        close("combine", got, expected, block.abs().sum().item())
    v = torch.randn(7, K)
    close("project_simplex", molkernels.project_simplex(v, backend=backend), reference.project_simplex(v), 10.0)
    G = reference.gram(flat).float()
    lam = molkernels.min_norm(G, backend=backend)
    best = reference.min_norm_objective(G, reference.min_norm(G)).item()
    got = reference.min_norm_objective(G, lam).item()
    assert abs(lam.sum().item() - 1) < 1e-5 and lam.min().item() >= 0, f"min_norm: λ = {lam} is off the simplex"
    assert got <= best * (1 + 1e-5) + 1e-6 * G.diagonal().max().item(), f"min_norm: objective {got} > {best}"
    params = [torch.zeros(w) for w in widths]
    lam = molkernels.mgda_step(params, blocks, backend=backend)
    G = reference.gram(blocks)
    best = reference.min_norm_objective(G, reference.min_norm(G)).item()
    assert reference.min_norm_objective(G, lam).item() <= best * (1 + 1e-5), "mgda_step: λ is not the min-norm point"
    for p, expected, block in zip(params, reference.combine(blocks, lam), blocks):
        close("mgda_step", p.grad, expected, block.abs().sum().item())
    print(f"{backend}: gram, cross_gram, combine, project_simplex, min_norm, mgda_step agree with the reference")
EOF
  )
}

step_smoke() {
  # reference and cpu first, with the venv as the GPU machine has it (no numpy)
  smoke_test reference,cpu
  # Triton on CPU tensors runs under its interpreter, which needs numpy: from a folder of its own
  # on PYTHONPATH, so the venv stays without it. numpy < 2.4: triton 3.6's interpreter takes int()
  # of its 1-element scalar arrays (`range(0, span, BLOCK)` in a kernel), an error from numpy 2.4
  # on ("only 0-dimensional arrays can be converted to Python scalars"; triton 3.8 squeezes first).
  if ! PYTHONPATH=$INTERPRETER_NUMPY "$VPY" -c \
      'import sys, numpy; sys.exit(tuple(map(int, numpy.__version__.split(".")[:2])) >= (2, 4))' 2> /dev/null; then
    rm -rf "$INTERPRETER_NUMPY"
    "$VPY" -m pip install -q --no-warn-conflicts --target "$INTERPRETER_NUMPY" "numpy<2.4"
  fi
  PYTHONPATH=$INTERPRETER_NUMPY TRITON_INTERPRET=1 smoke_test triton
}

step_preflight() {
  # The copy's preflight against the copy's build; results and Triton's own cache under $WORK.
  (cd "$SRC" && PATH="$VENV/bin:$PATH" TRITON_CACHE_DIR=$WORK/triton-cache \
    "$VPY" benchmarks/gpu_preflight.py --jobs "$MAX_JOBS" --cache-dir "$WORK/preflight-cache")
}

step_ctest() {
  cmake -S "$SRC" -B "$WORK/build-core" -DCMAKE_BUILD_TYPE=Release > /dev/null
  cmake --build "$WORK/build-core" -j "$MAX_JOBS" --target cuda_emulated_tests simt_emulation_tests
  ctest --test-dir "$WORK/build-core" -L cuda-emulated --output-on-failure
}

declare -A RESULT SECONDS_TAKEN DETAIL
STEPS=(venv build smoke preflight ctest)
# What each step needs to have passed before it.
declare -A NEEDS=([venv]="" [build]="venv" [smoke]="build" [preflight]="build" [ctest]="build")

for step in "${STEPS[@]}"; do
  missing=""
  for need in ${NEEDS[$step]}; do
    [ "${RESULT[$need]:-}" = PASS ] || missing="$need"
  done
  log=$LOGS/$step.log
  echo
  echo "=== $step ($(date +%T))"
  if [ -n "$missing" ]; then
    RESULT[$step]=FAIL SECONDS_TAKEN[$step]=0 DETAIL[$step]="not run: step $missing failed"
    echo "${DETAIL[$step]}"
    continue
  fi
  started=$(date +%s)
  # Each step in a subshell with -e of its own: the first failing command ends the step, not
  # the script, so that the later steps still run and the summary names every failure.
  set +e
  (set -euo pipefail; "step_$step") 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  SECONDS_TAKEN[$step]=$(( $(date +%s) - started ))
  if [ "$rc" = 0 ]; then
    RESULT[$step]=PASS DETAIL[$step]=""
  else
    # the preflight lists its failures after a header line; otherwise the log's last line
    detail=$(sed -n '/gpu-preflight FAILED:/,$p' "$log" | tail -n +2 | head -n 5 | sed 's/^ *//' | paste -sd ';' -)
    [ -n "$detail" ] || detail=$(grep -v '^\s*$' "$log" | tail -n 1)
    RESULT[$step]=FAIL DETAIL[$step]="exit $rc: $detail (log: $log)"
  fi
done

versions=$(venv_versions_ok 2> /dev/null || true)
echo
echo "=== gpu-preflight-versions summary: ${versions:-venv without the expected packages}; nvcc $(nvcc --version 2> /dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' || echo missing)"
failed=0
for step in "${STEPS[@]}"; do
  printf '%-10s %s %5ss  %s\n' "$step" "${RESULT[$step]}" "${SECONDS_TAKEN[$step]}" "${DETAIL[$step]}"
  [ "${RESULT[$step]}" = PASS ] || failed=1
done
exit "$failed"
