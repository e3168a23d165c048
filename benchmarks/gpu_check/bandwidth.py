"""Stage 3 of `make gpu-check`: how close each kernel comes to the memory floor.

For every kernel and step: the per-call time (CUDA events around each of 20 back-to-back calls
after a warm-up, the median), the host time to queue one call, the per-call time of one CUDA-graph
replay of 10 calls (kernel time without launch gaps), the bytes the call must move, and the
fraction of a measured device-to-device copy of the same bytes (the copy's time over the call's).
K ∈ {2, 4, 8, 16, 32, 64} × {float32, bfloat16}, with K·d·s ≈ 256 MB, as one tensor, as 100 views
of a flat buffer and as 100 separate blocks; kernel launches per call from torch.profiler (at
K = 8, float32: the count depends on the layout, not on K). min_norm in µs for K = 2…64, and the
FL kernels at (C, D) = (1000, 1000) and (64, 2^20).

Rows go to $BENCH_OUT/bench.csv and, as markdown tables, to $BENCH_OUT/bench.md as they are
measured. --resume skips the rows already in bench.csv (after a sticky CUDA error, exit code 4).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import common
from common import DEVICE, DRY

import torch  # noqa: E402

import molkernels as mk  # noqa: E402
from molkernels.federated import batched_adam_step, batched_sgd_step, masked_weighted_mean  # noqa: E402

REPEATS = 20
WARMUP = 2
GRAPH_CALLS = 10
SLOW_CALL_S = 5e-3  # above this per call, fewer repeats (min_norm at K = 64 may take 100 ms)
CALLS_BUDGET_S = 0.25

if DRY:
    STACK_BYTES = 64_000
    KS = (2, 8)
    DTYPES = (torch.float32,)
    MIN_NORM_KS = (2, 8)
    FL_SHAPES = ((10, 100),)
else:
    STACK_BYTES = 256_000_000
    KS = (2, 4, 8, 16, 32, 64)
    DTYPES = (torch.float32, torch.bfloat16)
    MIN_NORM_KS = (2, 4, 8, 16, 32, 64)
    FL_SHAPES = ((1000, 1000), (64, 2**20))
LAYOUTS = ("tensor", "views", "blocks")
BLOCKS = 100
PROFILED_K = 8

CSV_FIELDS = ("id", "section", "op", "backend", "dtype", "shape", "layout", "blocks", "bytes", "median_us", "host_us",
              "graph_us", "copy_us", "fraction_of_copy", "GBps", "launches", "kernel_us", "note")
MD_COLUMNS = ("op", "backend", "dtype", "shape", "layout", "median_us", "host_us", "graph_us", "fraction_of_copy",
              "GBps", "launches", "note")


@dataclass
class BenchCase:
    """prepare() makes the inputs once; call(inputs) is the timed work; bytes: what it must move."""

    id: str
    section: str
    backend: str
    prepare: Callable[[], object]
    call: Callable[[object], object]
    fields: dict = field(default_factory=dict)
    bytes: Optional[int] = None
    profile: bool = False


def columns_for(K: int, dtype) -> int:
    """d with K·d·s ≈ STACK_BYTES, a multiple of 16·BLOCKS so that every block is 16-B aligned."""
    unit = 16 * BLOCKS
    return max(unit, (STACK_BYTES // (K * dtype.itemsize)) // unit * unit)


def make_stack(layout: str, K: int, d: int, dtype):
    if layout == "tensor":
        return torch.randn(K, d, dtype=dtype, device=DEVICE)
    width = d // BLOCKS
    if layout == "views":
        buffer, views = mk.flat_buffer([(width,)] * BLOCKS, K, dtype=dtype, device=DEVICE)
        buffer.normal_()
        return views
    return [torch.randn(K, width, dtype=dtype, device=DEVICE) for _ in range(BLOCKS)]


def make_params(layout: str, d: int, dtype):
    if layout == "tensor":
        return [torch.randn(d, dtype=dtype, device=DEVICE)]
    return [torch.randn(d // BLOCKS, dtype=dtype, device=DEVICE) for _ in range(BLOCKS)]


def make_step_grads(layout: str, K: int, d: int, dtype):
    """What a step takes: one [K, d] block, one flat [K, D] buffer that the step cuts into
    per-parameter views, or a list of separate blocks."""
    if layout == "blocks":
        return make_stack("blocks", K, d, dtype)
    return torch.randn(K, d, dtype=dtype, device=DEVICE)


def kernel_case(op: str, backend: str, K: int, dtype, layout: str) -> BenchCase:
    d = columns_for(K, dtype)
    s = dtype.itemsize
    y = 4  # the MoCo state (float32)
    moved = {
        "gram": K * d * s,
        "cross_gram": 2 * K * d * s,
        "combine": K * d * s + d * s,
        "mgda_step": 2 * K * d * s + 2 * d * s,  # Gram pass, combine pass, p read and written
        "moco_step": K * d * s + 3 * K * d * y + 2 * d * s,  # g, Y read/written, Y read again, p
        "moco_step_l2": 2 * K * d * s + 3 * K * d * y + 2 * d * s,  # [Y; G] Gram, then Y, G and p
        "modo_step": 3 * K * d * s + 2 * d * s,  # G1 and G2 for the cross-Gram, G3 and p
    }[op]

    def prepare():
        if op in ("gram", "cross_gram", "combine"):
            a = make_stack(layout, K, d, dtype)
            b = make_stack(layout, K, d, dtype) if op == "cross_gram" else None
            return a, b, torch.rand(K, device=DEVICE)
        params = make_params(layout, d, dtype)
        if op == "modo_step":
            return params, [make_step_grads(layout, K, d, dtype) for _ in range(3)], mk.MoDoState(params, K)
        grads = make_step_grads(layout, K, d, dtype)
        return params, grads, (mk.MoCoState(params, K) if op.startswith("moco") else None)

    def call(x):
        if op == "gram":
            return mk.gram(x[0], backend=backend)
        if op == "cross_gram":
            return mk.cross_gram(x[0], x[1], backend=backend)
        if op == "combine":
            return mk.combine(x[0], x[2], backend=backend)
        params, grads, state = x
        if op == "mgda_step":
            return mk.mgda_step(params, grads, lr=1e-3, backend=backend)
        if op == "modo_step":
            return mk.modo_step(params, *grads, state, lr=1e-3, backend=backend)
        return mk.moco_step(params, grads, state, lr=1e-3, normalize="l2" if op == "moco_step_l2" else "none",
                            backend=backend)

    name = common.dtype_name(dtype)
    return BenchCase(f"{op}/{backend}/{name}/K={K}/{layout}", "kernels", backend, prepare, call,
                     fields=dict(op=op, dtype=name, shape=f"K={K},d={d}", layout=layout,
                                 blocks=1 if layout == "tensor" else BLOCKS),
                     bytes=moved, profile=K == PROFILED_K and dtype == torch.float32)


def min_norm_case(backend: str, K: int) -> BenchCase:
    def prepare():
        A = torch.randn(K, K + 3, dtype=torch.float64)
        return (A @ A.T).to(torch.float32).to(DEVICE)

    return BenchCase(f"min_norm/{backend}/K={K}", "min_norm", backend, prepare,
                     lambda G: mk.min_norm(G, backend=backend),
                     fields=dict(op="min_norm", dtype="float32", shape=f"K={K}"), profile=K == PROFILED_K)


def simplex_case(backend: str, K: int, rows: int) -> BenchCase:
    return BenchCase(f"project_simplex/{backend}/K={K}/rows={rows}", "min_norm", backend,
                     lambda: torch.randn(rows, K, device=DEVICE), lambda v: mk.project_simplex(v, backend=backend),
                     fields=dict(op="project_simplex", dtype="float32", shape=f"K={K},rows={rows}"),
                     bytes=2 * rows * K * 4)


def fl_case(kernel: str, backend: str, C: int, D: int, dtype) -> BenchCase:
    s = dtype.itemsize
    moved = {"adam": C * D * (3 * s + 16), "sgd": C * D * (3 * s + 8), "mean": C * D * s + D * s}[kernel]

    def prepare():
        params = torch.randn(C, D, dtype=dtype, device=DEVICE)
        state = [torch.zeros(C, D, device=DEVICE), torch.zeros(C, D, device=DEVICE)]
        return SimpleState(params, torch.randn_like(params), state, torch.zeros(C, dtype=torch.int64, device=DEVICE),
                           torch.ones(C, dtype=torch.bool, device=DEVICE), torch.rand(C, device=DEVICE))

    def call(x):
        if kernel == "adam":
            return batched_adam_step(x.params, x.grads, *x.state, x.step, x.active, lr=1e-3, backend=backend)
        if kernel == "sgd":
            return batched_sgd_step(x.params, x.grads, x.active, lr=1e-3, momentum=0.9, momentum_buffer=x.state[0],
                                    backend=backend)
        return masked_weighted_mean(x.params, x.weights, x.active, backend=backend)

    name = common.dtype_name(dtype)
    op = {"adam": "batched_adam_step", "sgd": "batched_sgd_step", "mean": "masked_weighted_mean"}[kernel]
    return BenchCase(f"{op}/{backend}/{name}/C={C},D={D}", "fl", backend, prepare, call,
                     fields=dict(op=op, dtype=name, shape=f"C={C},D={D}"), bytes=moved, profile=True)


@dataclass
class SimpleState:
    params: torch.Tensor
    grads: torch.Tensor
    state: list
    step: torch.Tensor
    active: torch.Tensor
    weights: torch.Tensor


def build_cases(backends) -> List[BenchCase]:
    """Cheap sections first, then the kernels layout by layout (a deadline cuts the blocks last)."""
    cases = []
    for backend in backends:
        cases += [min_norm_case(backend, K) for K in MIN_NORM_KS]
        cases += [simplex_case(backend, 8, rows) for rows in (1, 1000)]
    for backend in backends:
        cases += [fl_case(kernel, backend, C, D, dtype)
                  for C, D in FL_SHAPES for dtype in DTYPES for kernel in ("adam", "sgd", "mean")]
    ops = ("gram", "cross_gram", "combine", "mgda_step", "moco_step", "moco_step_l2", "modo_step")
    for layout in LAYOUTS:
        for op in ops:
            for K in KS:
                for dtype in DTYPES:
                    for backend in backends:
                        cases.append(kernel_case(op, backend, K, dtype, layout))
    if DRY:
        cases = common.one_interpreted_case_per(cases, lambda case: case.section)
    return cases


# --------------------------------------------------------------------------------------------------
# Measurement


class CopyBaseline:
    """The time of a device-to-device copy that moves `nbytes` (reads and writes half each)."""

    def __init__(self):
        self.seconds = {}

    def __call__(self, nbytes: int) -> float:
        if nbytes not in self.seconds:
            elements = max(1, nbytes // 2 // 4)
            src = torch.randn(elements, device=DEVICE)
            dst = torch.empty_like(src)
            for _ in range(WARMUP):
                dst.copy_(src)
            self.seconds[nbytes] = median_seconds(lambda: dst.copy_(src), REPEATS)
        return self.seconds[nbytes]


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    timer = common.Timer()
    for _ in range(repeats):
        timer.mark()
        fn()
        timer.mark()
    return statistics.median(timer.intervals())


def kernel_launches(fn: Callable[[], object]):
    """(launches, device µs, 'name×count, ...') of one call from torch.profiler: CUDA kernels and
    memsets on the GPU; the molkernels ops dispatched on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        common.synchronize()
    if DEVICE.type == "cuda":
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        events = [e for e in prof.events() if e.name.startswith("molkernels::")]
    names = {}
    for event in events:
        short = event.name.split("(")[0].split("<")[0][-40:]
        names[short] = names.get(short, 0) + 1
    busy_us = sum(e.time_range.elapsed_us() for e in events)
    summary = ", ".join(f"{name}×{count}" for name, count in sorted(names.items(), key=lambda kv: -kv[1])[:4])
    return len(events), busy_us, summary


def measure(case: BenchCase, copy: CopyBaseline) -> dict:
    row = {"id": case.id, "section": case.section, "backend": case.backend, **case.fields}
    x = case.prepare()
    common.synchronize()
    started = time.perf_counter()
    case.call(x)  # the first call: compiles (if the warm-up missed it) and allocates
    common.synchronize()
    first = time.perf_counter() - started
    for _ in range(WARMUP - 1):
        case.call(x)
    common.synchronize()
    started = time.perf_counter()
    case.call(x)
    common.synchronize()
    one = time.perf_counter() - started
    repeats = REPEATS if one < SLOW_CALL_S else max(3, min(REPEATS, int(CALLS_BUDGET_S / one)))
    queued = time.perf_counter()
    seconds = median_seconds(lambda: case.call(x), repeats)
    row["host_us"] = (time.perf_counter() - queued) / repeats * 1e6  # upper bound when the device is the slow part
    row["median_us"] = seconds * 1e6
    notes = [f"first call {first * 1e3:.0f} ms"] if first > 1.0 else []
    if repeats < REPEATS:
        notes.append(f"{repeats} repeats")
    if repeats == REPEATS:
        try:
            replay = common.capture(lambda: [case.call(x) for _ in range(GRAPH_CALLS)])
            replay()  # the first replay uploads the graph
            row["graph_us"] = median_seconds(replay, 1) / GRAPH_CALLS * 1e6
        except Exception as error:  # a capture failure is a finding, not the end of the stage
            notes.append("graph capture failed: " + common.first_line(error, 120))
            if common.context_broken():
                raise
    if case.bytes:
        row["bytes"] = case.bytes
        row["copy_us"] = copy(case.bytes) * 1e6
        row["fraction_of_copy"] = row["copy_us"] / row["median_us"]
        row["GBps"] = case.bytes / seconds / 1e9
    if case.profile:
        row["launches"], row["kernel_us"], names = kernel_launches(lambda: case.call(x))
        notes.append(names)
    row["note"] = "; ".join(n for n in notes if n)
    return row


def fmt(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


class Output:
    """bench.csv and bench.md, appended row by row (a markdown table per section)."""

    def __init__(self, out_dir: str, resume: bool):
        self.csv_path = os.path.join(out_dir, "bench.csv")
        self.done = set()
        if resume and os.path.exists(self.csv_path):
            with open(self.csv_path, newline="", encoding="utf-8") as file:
                self.done = {row["id"] for row in csv.DictReader(file)}
        new_csv = not (resume and os.path.exists(self.csv_path))
        self.csv_file = open(self.csv_path, "w" if new_csv else "a", newline="", encoding="utf-8")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new_csv:
            self.csv.writeheader()
        self.md = open(os.path.join(out_dir, "bench.md"), "a" if resume else "w", encoding="utf-8")
        self.section = None

    def text(self, line: str) -> None:
        self.md.write(line + "\n")
        self.md.flush()

    def row(self, row: dict) -> None:
        self.csv.writerow({k: fmt(v) if isinstance(v, float) else v for k, v in row.items()})
        self.csv_file.flush()
        if row["section"] != self.section:
            self.section = row["section"]
            self.text(f"\n## {self.section}\n\n| " + " | ".join(MD_COLUMNS) + " |\n|" + "---|" * len(MD_COLUMNS))
        self.text("| " + " | ".join(fmt(row.get(c)).replace("|", "/") for c in MD_COLUMNS) + " |")


def describe_device() -> str:
    if DEVICE.type != "cuda":
        return "CPU tensors (dry run: the numbers only show that the script works)"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true", help="skip the rows already in bench.csv")
    args = parser.parse_args(argv)
    backends = ["cpu", "triton"] if DRY else ["cuda", "triton"]
    for backend in list(backends):
        reason = common.unavailable_reason(backend)
        if reason is not None:
            print(f"backend {backend} unavailable: {reason}", flush=True)
            backends.remove(backend)
    out = Output(common.OUT_DIR, args.resume)
    if not args.resume:
        out.text(f"# molkernels bandwidth: {describe_device()}\n\nmedian_us: CUDA events around each of {REPEATS} "
                 f"back-to-back calls (median); host_us: host time to queue one call; graph_us: one CUDA-graph replay "
                 f"of {GRAPH_CALLS} calls, per call; fraction_of_copy: a device-to-device copy of the same bytes, "
                 f"its time over the call's; launches: kernels per call (torch.profiler, K = {PROFILED_K} float32).")
    copy = CopyBaseline()
    cases = [c for c in build_cases(backends) if c.id not in out.done]
    print(f"{len(cases)} cases ({', '.join(backends)})", flush=True)
    failures = 0
    for index, case in enumerate(cases):
        if common.seconds_left() <= 0:
            out.text(f"\nstage deadline: {len(cases) - index} cases not measured, from {case.id}")
            return 5
        try:
            common.seed(case.id)
            out.row(measure(case, copy))
        except Exception as error:  # one case's failure must not stop the others
            failures += 1
            print(f"--- {case.id}\n{traceback.format_exc()}", flush=True)
            out.row({"id": case.id, "section": case.section, "backend": case.backend, **case.fields,
                     "note": "error: " + common.first_line(error, 160)})
            if common.context_broken():
                out.text(f"\nsticky CUDA error in {case.id}: stopping")
                return 4
        finally:
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()  # 256 MB stacks of every shape would fragment the pool
    return 3 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
