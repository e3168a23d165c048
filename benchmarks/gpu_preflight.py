"""Every Triton and CUDA kernel configuration compiled ahead of time for sm_90, without a GPU.

    python benchmarks/gpu_preflight.py [--jobs 2] [--max-k 64] [--no-cuda] [--no-cache] [--cache-dir DIR]

1. Triton: the configurations come from the launchers themselves. Each launcher of
   molkernels.triton runs on CPU tensors for K = 1…max-k and each dtype with the GPU's block choice
   (`interpreted` patched to False), while every @triton.jit kernel is replaced by a recorder of
   what it would be launched with; nothing runs. Each distinct (kernel, argument types, constexprs,
   num_warps) is compiled with `triton.compile` for GPUTarget("cuda", 90, 32), and its cubin's
   resource usage read with cuobjdump (registers, stack frame, shared memory), the spill stores
   with ptxas -v where there is a stack frame. A spill, or a compile over 20 CPU seconds (its
   process and ptxas; wall time depends on the machine's load), fails the preflight.
2. CUDA: `nvcc -arch=sm_90 -Xptxas -v` on csrc/core/*.cu: registers, spill bytes, shared memory and
   the threads per SM those allow (65536 registers, 228 KB shared, at most 2048 threads); a spill
   fails the preflight.
3. Variants: how many Triton specialisations the first mgda_step and moco_step of a model of 100
   odd-shaped parameters request (Triton compiles one per distinct constexprs, argument types,
   pointer alignment and integer arguments' divisibility by 16 or equality to 1).

Results are cached under build/gpu-preflight/ (--cache-dir: another folder, for another Triton version)
keyed by the kernel's source hash (Triton's cache_key, which covers the functions it calls) and the
configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# The kernels must be compiled, not interpreted: TRITON_INTERPRET is read when they are defined.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import molkernels  # noqa: E402
import molkernels.triton  # noqa: E402,F401  (the kernels, compiled: TRITON_INTERPRET is unset)

MODULES = ["gram", "moco", "combine", "min_norm", "simplex", "federated"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
H200_MULTIPROCESSORS = 132
MAX_COMPILE_S = 20.0
SM90_REGISTERS, SM90_SHARED, SM90_THREADS = 65536, 228 * 1024, 2048
# --cache-dir (or MOLKERNELS_PREFLIGHT_CACHE, which the compile processes inherit) moves it: another
# Triton version's results must not be read as this one's (the key holds no Triton version).
CACHE = Path(os.environ.get("MOLKERNELS_PREFLIGHT_CACHE", ROOT / "build" / "gpu-preflight"))
RESULT_FORMAT = "cpu-seconds,stack,spills"  # part of the cache key: results of another format are recomputed

_TL_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
             torch.int64: "i64", torch.int32: "i32", torch.bool: "i1", torch.uint8: "u8", torch.int8: "i8"}


def _module(name):
    return importlib.import_module(f"molkernels.triton.{name}")


class _Recorder:
    """Stands in for a @triton.jit kernel: records each launch's configuration, runs nothing."""

    def __init__(self, module: str, name: str, kernel, launches: list):
        self.module, self.name, self.kernel, self.launches = module, name, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self, args, kwargs))

        return launch


@contextlib.contextmanager
def recorded_launches():
    """Within it, every molkernels.triton launcher picks the GPU's blocks for CPU tensors and
    records its launches into the yielded list instead of running them."""
    launches = []
    saved = []
    for module_name in ["_launch"] + MODULES:
        module = _module(module_name)
        replacements = {"interpreted": lambda device: False,
                        "programs_to_fill": lambda device: 4 * H200_MULTIPROCESSORS}
        for attr, value in vars(module).items():
            if isinstance(value, triton.runtime.JITFunction):
                replacements[attr] = _Recorder(module_name, attr, value, launches)
        for attr, value in replacements.items():
            if hasattr(module, attr):
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, value)
    try:
        yield launches
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


def _constexpr_names(kernel) -> list:
    return [p.name for p in kernel.params if p.is_constexpr]


def configuration(recorder: _Recorder, args, kwargs) -> dict:
    """What `triton.compile` needs for one launch: the signature's types (pointers as aligned, the
    common case), the constexprs and the launch options."""
    kernel = recorder.kernel
    names = kernel.arg_names
    signature, constexprs = {}, {}
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TL_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{recorder.name}: argument {name} of type {type(value)}")
    options = {"num_warps": 4}
    for name, value in kwargs.items():
        if name in names:
            signature[name] = "constexpr"
            constexprs[name] = str(value) if isinstance(value, tl.dtype) else value
        else:
            options[name] = value
    return {"module": recorder.module, "kernel": recorder.name, "signature": signature,
            "constexprs": constexprs, "options": options}


def specialisation(recorder: _Recorder, args, kwargs) -> tuple:
    """The part of a launch that selects a compiled variant, as Triton keys its cache: the
    constexprs and options, each tensor's dtype and 16-byte alignment, each integer's type,
    divisibility by 16 and equality to 1 (unless the kernel does not specialise on it)."""
    kernel = recorder.kernel
    key = []
    for index, (name, value) in enumerate(zip(kernel.arg_names, args)):
        if isinstance(value, torch.Tensor):
            key.append((value.dtype, value.data_ptr() % 16 == 0))
        elif isinstance(value, int) and not isinstance(value, bool):
            if index in kernel.do_not_specialize:
                key.append(("int", abs(value) < 2**31))
            else:
                key.append(("int", abs(value) < 2**31, value % 16 == 0, value == 1))
        else:
            key.append(type(value).__name__)
    return (recorder.module, recorder.name, tuple(key), tuple(sorted((k, str(v)) for k, v in kwargs.items())))


def _stack(K: int, dtype: torch.dtype, widths) -> list:
    return [torch.zeros((K, w), dtype=dtype) for w in widths]


ALIGNED_WIDTHS = [4096, 64]


def launcher_calls(max_k: int):
    """Every launcher on every K and dtype, over a wide and a narrow block (a narrow block gets the
    narrowest tiles a launcher picks)."""
    triton_ops = importlib.import_module("molkernels.triton")
    widths = [4099, 17, 1]
    for dtype in DTYPES:
        acc = molkernels._stack.accum_dtype(dtype)
        for K in range(1, max_k + 1):
            g = _stack(K, dtype, widths)
            y = _stack(K, acc, widths)
            out = [torch.zeros(w, dtype=dtype) for w in widths]
            weights, scale, beta = torch.ones(K, dtype=acc), torch.ones(K, dtype=acc), torch.tensor(0.5)
            yield lambda: triton_ops.gram(g)
            yield lambda: triton_ops.cross_gram(g, g)
            yield lambda: triton_ops.combine(g, weights)
            yield lambda: triton_ops.combine_into(g, weights, out, 1.0, True)
            yield lambda: triton_ops.moco_track_gram(y, g, beta)
            yield lambda: triton_ops.joint_gram(y, g)
            yield lambda: triton_ops.moco_track_combine(y, g, scale, beta, weights, out, 1.0, False)
            # Rows of a multiple of 16 bytes: the aligned (vectorised) variants.
            g16, y16 = _stack(K, dtype, ALIGNED_WIDTHS), _stack(K, acc, ALIGNED_WIDTHS)
            out16 = [torch.zeros(w, dtype=dtype) for w in ALIGNED_WIDTHS]
            yield lambda: triton_ops.gram(g16)
            yield lambda: triton_ops.cross_gram(g16, g16)
            yield lambda: triton_ops.moco_track_gram(y16, g16, beta)
            yield lambda: triton_ops.joint_gram(y16, g16)
            yield lambda: triton_ops.combine_into(g16, weights, out16, 1.0, True)
            yield lambda: triton_ops.moco_track_combine(y16, g16, scale, beta, weights, out16, 1.0, False)
            yield lambda: triton_ops.project_simplex(torch.zeros(3, K, dtype=dtype))
            if dtype in (torch.float32, torch.float64):
                yield lambda: triton_ops.min_norm(torch.zeros(K, K, dtype=dtype))
        C, D = 4, 10007
        params = torch.zeros(C, D, dtype=dtype)
        active = torch.ones(C, dtype=torch.bool)
        for weight_decay in (0.0, 0.1):
            yield lambda: triton_ops.fl_adam_step(params, params, params.clone(), params.clone(),
                                                  torch.zeros(C, dtype=torch.int64), active, 1e-3, 0.9, 0.999,
                                                  1e-8, weight_decay)
            for momentum in (None, params.clone()):
                yield lambda: triton_ops.fl_sgd_step(params, params, momentum, active, 0.1, 0.9 if momentum is not None else 0.0,
                                                     weight_decay)
        yield lambda: triton_ops.fl_weighted_mean(params, torch.ones(C, dtype=acc), active)


def configurations(max_k: int) -> list:
    seen, result = set(), []
    with recorded_launches() as launches:
        for call in launcher_calls(max_k):
            call()
        for recorder, args, kwargs in launches:
            config = configuration(recorder, args, kwargs)
            key = json.dumps(config, sort_keys=True)
            if key not in seen:
                seen.add(key)
                result.append(config)
    return result


def _cache_path(config: dict) -> Path:
    kernel = getattr(_module(config["module"]), config["kernel"])
    key = kernel.cache_key + json.dumps(config, sort_keys=True) + RESULT_FORMAT
    return CACHE / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def _resource_usage(cubin: bytes) -> dict:
    """Registers, and local memory and stack frame bytes per thread, of the cubin's kernel, from
    cuobjdump -res-usage (the stack frame holds spills, if any: see _spill_stores)."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([str(cuobjdump if cuobjdump.exists() else "cuobjdump"), "-res-usage", file.name],
                              check=True, capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", text))
    return {"registers": int(fields.get("REG", 0)), "local_bytes": int(fields.get("LOCAL", 0)),
            "stack_bytes": int(fields.get("STACK", 0))}


def _spill_stores(ptx: str) -> int:
    """Spill store bytes per thread from ptxas -v: a stack frame alone may be a call's, not spills."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)  # Triton targets sm_90a
        log = subprocess.run([str(ptxas if ptxas.exists() else "ptxas"), f"-arch={arch}", "-v", str(source),
                              "-o", str(Path(tmp) / "kernel.cubin")], check=True, capture_output=True, text=True)
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log.stdout + log.stderr))


def compile_configuration(config: dict, use_cache: bool = True) -> dict:
    path = _cache_path(config)
    if use_cache and path.exists():
        return json.loads(path.read_text())
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(_module(config["module"]), config["kernel"])
    constexprs = {name: tl.dtype(value) if isinstance(value, str) else value
                  for name, value in config["constexprs"].items()}
    # Pointers 16-byte aligned, as the launches of separately allocated tensors are.
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, kind in config["signature"].items() if kind.startswith("*")}
    source = ASTSource(kernel, config["signature"], constexprs=constexprs, attrs=attrs)
    # CPU seconds of this process and its ptxas, so that a loaded machine does not fail the limit.
    start = time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=config["options"])
    seconds = time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - start
    result = dict(config, seconds=round(seconds, 2), shared_bytes=int(compiled.metadata.shared),
                  **_resource_usage(compiled.asm["cubin"]))
    result["spill_bytes"] = _spill_stores(compiled.asm["ptx"]) if result["stack_bytes"] else 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def _describe(result: dict) -> str:
    values = ", ".join(f"{k}={v}" for k, v in result["constexprs"].items())
    pointers = ",".join(sorted({kind[1:] for kind in result["signature"].values() if kind.startswith("*")}))
    return f"{values}, num_warps={result['options'].get('num_warps')} [{pointers}]"


def triton_preflight(max_k: int, jobs: int, use_cache: bool) -> list:
    """Failures, after printing one row per configuration."""
    configs = configurations(max_k)
    print(f"Triton: {len(configs)} configurations for K = 1..{max_k}, {len(DTYPES)} dtypes, sm_90 (triton {triton.__version__})")
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(compile_configuration, configs, [use_cache] * len(configs)))
    failures = []
    print(f"{'kernel':<28} {'regs':>4} {'spill B':>7} {'stack B':>7} {'shared B':>8} {'compile CPU s':>13}  constexprs")
    for result in sorted(results, key=lambda r: (r["kernel"], -r["registers"])):
        spilled = result["spill_bytes"]
        print(f"{result['kernel']:<28} {result['registers']:>4} {spilled:>7} {result['stack_bytes']:>7} "
              f"{result['shared_bytes']:>8} {result['seconds']:>13.2f}  {_describe(result)}")
        if spilled > 0:
            failures.append(f"{result['kernel']} ({_describe(result)}): spills {spilled} bytes per thread")
        if result["seconds"] > MAX_COMPILE_S:
            failures.append(f"{result['kernel']} ({_describe(result)}): compiled in {result['seconds']} s")
    worst = max(results, key=lambda r: r["registers"]) if results else None
    slowest = max(results, key=lambda r: r["seconds"]) if results else None
    if worst:
        print(f"most registers: {worst['kernel']} {worst['registers']} ({_describe(worst)}); slowest compile: "
              f"{slowest['kernel']} {slowest['seconds']} s ({_describe(slowest)}); wall {time.perf_counter() - start:.0f} s")
    return failures


_PTXAS_FUNCTION = re.compile(r"Compiling entry function '([^']+)' for 'sm_90'")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def _demangled(names: list) -> dict:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return {n: n for n in names}
    text = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, text))


def cuda_preflight() -> list:
    """Failures, after printing one row per CUDA kernel of csrc/core."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("CUDA: nvcc not found; skipped")
        return []
    rows = []
    for source in sorted((ROOT / "csrc" / "core").glob("*.cu")):
        with tempfile.TemporaryDirectory() as tmp:
            run = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-O3", "-Xptxas", "-v", f"-I{ROOT / 'csrc' / 'core'}",
                                  "-c", str(source), "-o", os.path.join(tmp, "kernels.o")],
                                 capture_output=True, text=True)
        if run.returncode != 0:
            return [f"nvcc failed on {source.name}:\n{run.stderr[-2000:]}"]
        # A warning here is a bug on the GPU (device code calling a host function, a ptxas stack
        # overflow), so it fails the preflight like an error.
        if warnings := [line for line in run.stderr.splitlines() if "warning" in line.lower()]:
            return [f"nvcc warned on {source.name}:\n" + "\n".join(warnings[:20])]
        function, spills = None, (0, 0, 0)
        for line in run.stderr.splitlines():
            if m := _PTXAS_FUNCTION.search(line):
                function, spills = m.group(1), (0, 0, 0)
            elif (m := _PTXAS_SPILLS.search(line)) and function:
                spills = tuple(int(x) for x in m.groups())
            elif (m := _PTXAS_USED.search(line)) and function:
                rows.append((source.name, function, int(m.group(1)), spills, int(m.group(2) or 0)))
                function = None
    names = _demangled([r[1] for r in rows])
    failures = []
    print(f"\nCUDA: {len(rows)} kernels of csrc/core, nvcc -arch=sm_90 -Xptxas -v")
    print(f"{'regs':>4} {'spill st/ld B':>13} {'stack B':>7} {'smem B':>7} {'threads/SM':>10}  kernel")
    for source, function, registers, (stack, stores, loads), smem in sorted(rows, key=lambda r: -r[2]):
        # Registers are allocated per warp in units of 256 (8 per thread).
        warps_by_registers = SM90_REGISTERS // (max(8, -(-registers // 8) * 8) * 32)
        threads = min(SM90_THREADS, warps_by_registers * 32)
        print(f"{registers:>4} {f'{stores}/{loads}':>13} {stack:>7} {smem:>7} {threads:>10}  "
              f"{source}: {names[function][:110]}")
        if stores or loads:
            failures.append(f"{source}: {names[function]} spills {stores} bytes")
        if smem > SM90_SHARED:
            failures.append(f"{source}: {names[function]} needs {smem} bytes of shared memory")
    return failures


def _odd_model(K: int, dtype: torch.dtype, count: int = 100) -> tuple:
    """`count` parameters of odd shapes (weights, biases, norms) and their K gradients each."""
    generator = torch.Generator().manual_seed(0)
    shapes = []
    for i in range(count):
        width = int(torch.randint(3, 700, (1,), generator=generator)) | 1
        shapes.append((width,) if i % 3 == 2 else (width, int(torch.randint(3, 300, (1,), generator=generator)) | 1))
    params = [torch.zeros(shape, dtype=dtype) for shape in shapes]
    grads = [torch.zeros((K,) + shape, dtype=dtype) for shape in shapes]
    return params, grads


def variant_counts(K_values=(4, 33)) -> list:
    """(step, K, dtype, distinct variants, launches) of a first step of the 100-parameter model."""
    rows = []
    # The steps accept CPU tensors for backend='triton' only under the interpreter; the kernels
    # themselves are the compiled ones, replaced by recorders.
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for K in K_values:
                for step in ("mgda_step", "moco_step"):
                    params, grads = _odd_model(K, dtype)
                    with recorded_launches() as launches:
                        if step == "mgda_step":
                            molkernels.mgda_step(params, grads, lr=0.1, backend="triton")
                        else:
                            molkernels.moco_step(params, grads, molkernels.MoCoState(params, K), lr=0.1,
                                                 backend="triton")
                    variants = {specialisation(r, a, k) for r, a, k in launches}
                    rows.append((step, K, str(dtype).replace("torch.", ""), len(variants), len(launches)))
    finally:
        del os.environ["TRITON_INTERPRET"]
    print("\nTriton variants compiled by the first step of a 100-parameter model of odd shapes:")
    for step, K, dtype, variants, n_launches in rows:
        print(f"  {step:<10} K={K:<3} {dtype:<9} {variants:>3} variants, {n_launches} launches")
    return rows


def main(argv=None) -> int:
    global CACHE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--max-k", type=int, default=64)
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc part")
    parser.add_argument("--no-cache", action="store_true", help="recompile every Triton configuration")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"results cache (default {CACHE}; one per Triton version)")
    args = parser.parse_args(argv)
    if args.cache_dir is not None:
        CACHE = args.cache_dir.resolve()
        os.environ["MOLKERNELS_PREFLIGHT_CACHE"] = str(CACHE)  # for compile processes that re-import this module
    failures = triton_preflight(args.max_k, args.jobs, not args.no_cache)
    if not args.no_cuda:
        failures += cuda_preflight()
    variant_counts()
    if failures:
        print("\ngpu-preflight FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\ngpu-preflight passed: no spills, every compile under 20 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
