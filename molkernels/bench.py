"""Benchmarks: `python -m molkernels bench <op>` with op in gram, combine, min_norm, mgda, moco,
backward, all.

Every number is a median over timed repeats after untimed warm-up calls (`measure`, the one timing
helper), measured in the same run as the baselines it is compared with, interleaved with them:

- gram: the read-pass floor (the fastest of a few torch reductions that read each element once:
  x.sum(), x.amax(), dot(x, x); the fastest one measured is the floor and is named in the table),
  torch.mm on a pre-stacked [K, d] tensor (x @ x.T), and torch.cat + mm on a list of blocks; then
  molkernels.gram on the tensor and on the list, for each backend of the device (reference only at
  small sizes). On CUDA also a device-to-device copy, the bandwidth the Gram should reach.
- combine: torch's w @ x, and the floor x.sum(0), which moves the same bytes as the combine (the
  faster of allocating its output and writing into a preallocated one).
- min_norm: time per call for K in 2..64 (batch 1) per kernel backend (not reference: its solver is
  a slow oracle), and torchjd's MGDA weighting (Frank-Wolfe) on the same matrices; on CUDA, whether
  the op synchronises with the host (torch.cuda.set_sync_debug_mode("error")).
- mgda: gram -> min_norm -> combine against torchjd.aggregation.MGDA() on the [K, d] matrix and a
  plain torch implementation (x @ x.T, Frank-Wolfe with host synchronisations, w @ x); the floor is
  a read pass (x.amax()) plus x.sum(0), the two passes' bytes.
- moco: moco_step on 100 parameter tensors against an unfused LibMTL-style step and the two-pass
  floor (torch's own streaming passes over the same bytes).
- backward: mol.backward + MGDA end to end on an MLP against torchjd's autojac.backward +
  jac_to_grad(MGDA()).
- distributed: worlds of 1, 2, 4 spawned ranks (gloo on CPU); an MGDA step on a sharded stack (one
  K×K all_reduce) and on replicated gradients (reduce_scatter path, one all_reduce of the stack, K
  all_reduces): the slowest rank's step time, the collectives and the bytes they move.
- fl_adam: molkernels.federated.batched_adam_step on C = 1000 clients (K column) × D = 1000 (d),
  90% of them active, against a Python loop of per-client torch.optim.Adam steps and an eager
  batched torch step on [C, D] (torch.where for the mask); the one-pass floor is the bytes it
  moves (read p, g, m, v and write p, m, v of the active rows) over the stream bandwidth measured
  in the same run (torch.add(x, y, out=z)).
- fl_round: one round of the federated simulator with C = 1000 clients (K column), D = 1000, local
  Adam batched over all clients against a Python loop of per-client torch.optim.Adam.

The CPU numbers are for the kernels' variant in use (the header's "cpu isa"; MOLKERNELS_CPU_ISA=
baseline|avx2|avx512 forces one), and the header gives the load average at the start. `--busy-cores N`
keeps N cores busy with spinning processes for the whole run, a controlled stand-in for other work:
compare its time/floor ratios with those of a quiet run.

Errors ("rel err") are max |result − exact| / max |exact| against a float64 computation.

GB/s is effective bandwidth: the bytes the operation has to move divided by its time. Targets are
printed with PASS/MISS; a miss is reported, not an error exit.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import functools
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import molkernels

from . import _cli

# fl_round and fl_adam: a full round of molkernels.federated's simulator and the batched Adam step
# alone; their K column is the number of client slots C, their d the model dimension D.
# distributed: spawned worlds of 1, 2, 4 ranks (gloo on CPU), one MGDA step per path.
OPS = ("gram", "combine", "min_norm", "mgda", "moco", "backward", "fl_round", "fl_adam", "distributed")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Defaults that reproduce the targets on a 2-core CPU (and are sensible on a GPU).
DEFAULT_K = {"gram": [8], "combine": [8], "min_norm": [2, 4, 8, 16, 32, 64], "mgda": [8], "moco": [4], "backward": [4],
             "fl_round": [1000], "fl_adam": [1000], "distributed": [4]}
DEFAULT_D = {"gram": [12_500_000], "combine": [12_500_000], "min_norm": [0], "mgda": [5_000_000],
             "moco": [10_000_000], "backward": [1024], "fl_round": [1000], "fl_adam": [1000],
             "distributed": [4_000_000]}
DEFAULT_BLOCKS = 100
REFERENCE_MAX_ELEMENTS = 1 << 22  # the float64 reference backend is benchmarked only up to K·d = 4M
FL_ROUND_LOCAL_STEPS = 5
FL_ADAM_ACTIVE = 0.9  # fraction of clients stepping (the others have left the round)


# ----------------------------------------------------------------------------------------------
# Timing: the one helper every measurement goes through.


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: Dict[str, Callable[[], object]], device: torch.device, *, repeats: int = 10, warmup: int = 2,
            inner: int | str = 1, min_repeat_s: float = 2e-3, may_fail: Sequence[str] = ()
            ) -> Dict[str, Optional[Dict[str, float]]]:
    """Seconds per call of each fn: median and min over `repeats` timed repeats of `inner` calls,
    after `warmup` untimed calls. The functions take turns within each round of repeats, so that
    drift of a shared machine (other tenants, clocks) hits them alike and their ratios stay fair.
    inner="auto" picks, per function, enough calls that a repeat lasts `min_repeat_s` (for calls of
    microseconds). CUDA: CUDA events around each repeat, synchronised after it (the calls within a
    repeat run back to back, unsynchronised); CPU: time.perf_counter. A function named in
    `may_fail` that raises RuntimeError in warm-up (e.g. no kernel for that dtype) maps to None."""
    calls: Dict[str, int] = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            one = float("inf")
            for _ in range(3 if inner == "auto" else 0):  # the fastest of 3 calls sizes a repeat
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                one = min(one, max(time.perf_counter() - start, 1e-7))
            synchronize(device)
        except RuntimeError:
            if name not in may_fail:
                raise
            continue
        calls[name] = max(1, min(10_000, math.ceil(min_repeat_s / one))) if inner == "auto" else int(inner)
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, n in calls.items():
            fn = fns[name]
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(n):
                    fn()
                end.record()
                end.synchronize()
                times[name].append(begin.elapsed_time(end) / 1e3 / n)
            else:
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                times[name].append((time.perf_counter() - start) / n)
    return {name: {"median": statistics.median(times[name]), "min": min(times[name]), "repeats": repeats,
                   "inner": calls[name]} if name in calls else None for name in fns}


def timeit(fn: Callable[[], object], device: torch.device, **kwargs) -> Dict[str, float]:
    """measure() of one function."""
    timing = measure({"fn": fn}, device, **kwargs)["fn"]
    if timing is None:
        fn()  # re-raise the error
    return timing


def sync_free(fn: Callable[[], object], device: torch.device) -> Optional[bool]:
    """On CUDA: True when fn() runs without a host synchronisation (checked with
    torch.cuda.set_sync_debug_mode("error")), False when it synchronises; None on other devices."""
    if device.type != "cuda":
        return None
    synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError:
        return False
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        synchronize(device)


# ----------------------------------------------------------------------------------------------
# Results.


@dataclasses.dataclass
class Row:
    op: str
    impl: str  # what ran: a baseline or molkernels.<op> [backend]
    device: str
    dtype: str
    K: int
    d: int
    blocks: int  # 0 for a [K, d] tensor, else the number of blocks of the list stack
    median_s: float
    min_s: float
    repeats: int
    bytes: int  # bytes the operation must move (0 where bandwidth means nothing)
    flops: int
    vs_floor: Optional[float] = None  # median / the floor's median (1.0 = at the floor)
    speedup: Optional[float] = None  # the baseline's median / this median
    speedup_vs: str = ""
    note: str = ""

    @property
    def gbps(self) -> Optional[float]:
        return self.bytes / self.median_s / 1e9 if self.bytes else None


@dataclasses.dataclass
class Target:
    name: str
    value: float
    threshold: float
    higher_is_better: bool
    unit: str = "×"

    @property
    def passed(self) -> bool:
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold

    def describe(self) -> str:
        sign = "≥" if self.higher_is_better else "≤"
        return f"{self.name}: {_fmt_value(self.value, self.unit)} (target {sign} {_fmt_value(self.threshold, self.unit)})"


def _fmt_value(value: float, unit: str) -> str:
    if unit == "µs":
        return f"{value:.1f} µs"
    if unit == "%":
        return f"{100 * value:.0f}%"
    return f"{value:.2f}×"


@dataclasses.dataclass
class Result:
    rows: List[Row] = dataclasses.field(default_factory=list)
    targets: List[Target] = dataclasses.field(default_factory=list)

    def extend(self, other: "Result") -> None:
        self.rows += other.rows
        self.targets += other.targets


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _row(op, *, impl, K, device, dtype, d, blocks, timing, nbytes, flops, **extra) -> Row:
    return Row(op=op, impl=impl, device=str(device), dtype=_dtype_name(dtype), K=K, d=d,
               blocks=blocks, median_s=timing["median"], min_s=timing["min"], repeats=timing["repeats"],
               bytes=int(nbytes), flops=int(flops), **extra)


def kernel_backends(device: torch.device) -> List[str]:
    """The molkernels backends benchmarked on tensors of `device` (reference is added separately,
    at small sizes only). Triton runs on CPU tensors only in its interpreter: not benchmarked."""
    available = molkernels.backends()
    if device.type == "cuda":
        return [b for b in ("cuda", "triton") if b in available]
    return [b for b in ("cpu",) if b in available]


def backends_for(device: torch.device, elements: int) -> List[str]:
    names = kernel_backends(device)
    if elements <= REFERENCE_MAX_ELEMENTS:
        names.append("reference")
    return names


def split_blocks(K: int, d: int, n: int, dtype, device) -> List[torch.Tensor]:
    """n separately allocated blocks [K, d_j] with Σ d_j = d (like per-parameter gradients)."""
    n = max(1, min(n, d))
    sizes = [d // n + (1 if j < d % n else 0) for j in range(n)]
    return [torch.randn(K, s, dtype=dtype, device=device) for s in sizes]


def exact_gram(blocks: Sequence[torch.Tensor], chunk: int = 1 << 20) -> torch.Tensor:
    """Σ B Bᵀ in float64, chunk by chunk along d (bounded extra memory): what errors are measured against."""
    G = None
    for b in blocks:
        b2 = b.reshape(b.shape[0], -1)
        for s in range(0, b2.shape[1], chunk):
            c = b2[:, s:s + chunk].double()
            G = c @ c.T if G is None else G + c @ c.T
    return G


def rel_err(value: torch.Tensor, exact: torch.Tensor) -> float:
    """max |value − exact| / max |exact|."""
    return float((value.double() - exact).abs().max() / exact.abs().max().clamp(min=1e-300))


# ----------------------------------------------------------------------------------------------
# The benchmarks. Each takes sizes and returns a Result (rows and targets); the functions compared
# in a benchmark are timed together by measure(), interleaved.


def bench_gram(K: int, d: int, *, device, dtype, repeats: int = 10, blocks: int = DEFAULT_BLOCKS,
               with_list: bool = True, targets: bool = True) -> Result:
    # Bytes: gram reads K·d elements once (K·d·itemsize bytes) and writes K² floats; it does
    # K(K+1)·d flops (the upper triangle: K(K+1)/2 dot products of length d, a multiply-add each).
    # torch.mm computes the full K×K (2K²·d flops) but must read the same bytes, so it is reported
    # with the same effective bandwidth. The read-pass floor reads K·d elements and does K·d flops.
    out, item = Result(), torch.tensor([], dtype=dtype).element_size()
    nbytes, flops, mm_flops = K * d * item, K * (K + 1) * d, 2 * K * K * d
    x = torch.randn(K, d, dtype=dtype, device=device)
    flat = x.view(-1)
    fns: Dict[str, Callable[[], object]] = {
        "read pass: x.sum()": lambda: x.sum(),
        "read pass: x.amax()": lambda: x.amax(),
        "read pass: dot(x, x)": lambda: torch.dot(flat, flat),
    }
    floor_names = list(fns)
    if device.type == "cuda":
        y = torch.empty_like(x)
        fns["copy d2d: y.copy_(x)"] = lambda: y.copy_(x)
    fns["torch.mm: x @ x.T"] = lambda: x @ x.T
    tensor_backends = backends_for(device, K * d)
    for backend in tensor_backends:
        fns[f"gram [{backend}] tensor"] = functools.partial(molkernels.gram, x, backend=backend)
    parts: List[torch.Tensor] = []
    if with_list:
        # The same bytes as n separately allocated blocks. torch has to concatenate them first
        # (reading and writing K·d more), molkernels reads the blocks where they are.
        parts = split_blocks(K, d, blocks, dtype, device)

        def cat_mm():
            s = torch.cat(parts, dim=1)
            return s @ s.T

        fns["torch.cat + mm"] = cat_mm
        for backend in tensor_backends:
            fns[f"gram [{backend}] list"] = functools.partial(molkernels.gram, parts, backend=backend)

    timings = measure(fns, device, repeats=repeats, may_fail=floor_names)
    floor_name = min((n for n in floor_names if timings[n]), key=lambda n: timings[n]["median"])
    floor_s = timings[floor_name]["median"]
    size = f"K={K} d={_fmt_d(d)} {_dtype_name(dtype)}"
    row = functools.partial(_row, "gram", K=K, device=device, dtype=dtype, d=d)
    exact = exact_gram([x])

    for name in floor_names:
        if timings[name] is None:
            continue
        r = row(impl=name, blocks=0, timing=timings[name], nbytes=nbytes, flops=K * d)
        r.vs_floor = r.median_s / floor_s
        r.note = "floor (fastest read pass)" if name == floor_name else ""
        out.rows.append(r)
    copy_row = None
    if device.type == "cuda":
        # A device-to-device copy reads and writes K·d elements: 2·K·d·itemsize bytes.
        copy_row = row(impl="copy d2d: y.copy_(x)", blocks=0, timing=timings["copy d2d: y.copy_(x)"],
                       nbytes=2 * nbytes, flops=0, note="reads + writes K·d")
        out.rows.append(copy_row)
    mm = row(impl="torch.mm: x @ x.T", blocks=0, timing=timings["torch.mm: x @ x.T"], nbytes=nbytes, flops=mm_flops,
             note=f"rel err {rel_err(x @ x.T, exact):.1e}")
    mm.vs_floor = mm.median_s / floor_s
    out.rows.append(mm)
    for backend in tensor_backends:
        fn = fns[f"gram [{backend}] tensor"]
        r = row(impl=f"molkernels.gram [{backend}]", blocks=0, timing=timings[f"gram [{backend}] tensor"],
                nbytes=nbytes, flops=flops, speedup_vs="torch.mm", note=f"rel err {rel_err(fn(), exact):.1e}")
        r.vs_floor, r.speedup = r.median_s / floor_s, mm.median_s / r.median_s
        if sync_free(fn, device) is False:
            r.note += "; SYNCHRONISES"
        out.rows.append(r)
        if targets and backend != "reference":
            if device.type == "cuda":
                out.targets.append(Target(f"gram [{backend}] {size}: GB/s / copy GB/s", r.gbps / copy_row.gbps, 0.9, True, "%"))
            else:
                out.targets.append(Target(f"gram [{backend}] {size}: time / read floor", r.vs_floor, 1.25, False))
                out.targets.append(Target(f"gram [{backend}] {size}: speedup vs torch.mm", r.speedup, 3.0, True))
    if with_list:
        exact_list = exact_gram(parts)
        n = len(parts)
        cat = row(impl="torch.cat + mm", blocks=n, timing=timings["torch.cat + mm"], nbytes=nbytes, flops=mm_flops,
                  note=f"rel err {rel_err(cat_mm(), exact_list):.1e}; cat moves 2·K·d more")
        cat.vs_floor = cat.median_s / floor_s
        out.rows.append(cat)
        for backend in tensor_backends:
            fn = fns[f"gram [{backend}] list"]
            r = row(impl=f"molkernels.gram [{backend}]", blocks=n, timing=timings[f"gram [{backend}] list"],
                    nbytes=nbytes, flops=flops, speedup_vs="torch.cat + mm", note=f"rel err {rel_err(fn(), exact_list):.1e}")
            r.vs_floor, r.speedup = r.median_s / floor_s, cat.median_s / r.median_s
            out.rows.append(r)
            if targets and backend != "reference" and device.type != "cuda":
                out.targets.append(Target(f"gram [{backend}] {size}, {n} blocks: speedup vs cat + mm", r.speedup, 10.0, True))
    return out


def bench_combine(K: int, d: int, *, device, dtype, repeats: int = 10, targets: bool = True) -> Result:
    # Bytes: combine reads K·d elements and writes d: (K+1)·d·itemsize; 2·K·d flops.
    # Floor: x.sum(0) moves the same bytes; the fastest of it allocating its output (as combine
    # does) and writing into a preallocated one.
    out, item = Result(), torch.tensor([], dtype=dtype).element_size()
    nbytes, flops = (K + 1) * d * item, 2 * K * d
    x = torch.randn(K, d, dtype=dtype, device=device)
    w = torch.softmax(torch.randn(K, device=device), 0)
    w_x = w.to(dtype)
    y = torch.empty(d, dtype=dtype, device=device)
    fns: Dict[str, Callable[[], object]] = {
        "floor: x.sum(0)": lambda: x.sum(0),
        "floor: x.sum(0, out=y)": lambda: torch.sum(x, 0, out=y),
        "torch: w @ x": lambda: w_x @ x,
    }
    floor_names = list(fns)[:2]
    backends = backends_for(device, K * d)
    for backend in backends:
        fns[backend] = functools.partial(molkernels.combine, x, w, backend=backend)
    timings = measure(fns, device, repeats=repeats, may_fail=floor_names)
    floor_name = min((n for n in floor_names if timings[n]), key=lambda n: timings[n]["median"])
    floor_s = timings[floor_name]["median"]
    exact = torch.cat([w.double() @ x[:, s:s + (1 << 20)].double() for s in range(0, d, 1 << 20)])
    row = functools.partial(_row, "combine", K=K, device=device, dtype=dtype, d=d, blocks=0, nbytes=nbytes)
    for name in floor_names:
        if timings[name] is not None:
            out.rows.append(row(impl=name, timing=timings[name], flops=K * d, vs_floor=timings[name]["median"] / floor_s,
                                note="floor (fastest)" if name == floor_name else ""))
    base = row(impl="torch: w @ x", timing=timings["torch: w @ x"], flops=flops, note=f"rel err {rel_err(w_x @ x, exact):.1e}")
    base.vs_floor = base.median_s / floor_s
    out.rows.append(base)
    for backend in backends:
        fn = fns[backend]
        r = row(impl=f"molkernels.combine [{backend}]", timing=timings[backend], flops=flops, speedup_vs="torch: w @ x",
                note=f"rel err {rel_err(fn(), exact):.1e}")
        r.vs_floor, r.speedup = r.median_s / floor_s, base.median_s / r.median_s
        if sync_free(fn, device) is False:
            r.note += "; SYNCHRONISES"
        out.rows.append(r)
    return out


def _random_gram(K: int, device, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + K)
    a = torch.randn(K, 2 * K, generator=generator, dtype=torch.float64)
    return (a @ a.T).to(device=device, dtype=dtype)


def bench_min_norm(Ks: Sequence[int], *, device, dtype, repeats: int = 20, targets: bool = True) -> Result:
    # A [K, K] solve: no bandwidth to speak of; the time per call is the number (on CUDA: calls
    # issued back to back, so launch overhead included, synchronisation excluded).
    out = Result()
    gram_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    try:
        from torchjd.aggregation import MGDAWeighting
    except ImportError:
        MGDAWeighting = None
    backends = kernel_backends(device)
    for K in Ks:
        G = _random_gram(K, device, gram_dtype)
        fns: Dict[str, Callable[[], object]] = {}
        if MGDAWeighting is not None:
            fns["torchjd"] = functools.partial(MGDAWeighting(), G)
        for backend in backends:
            fns[backend] = functools.partial(molkernels.min_norm, G, backend=backend)
        timings = measure(fns, device, repeats=repeats, inner="auto")
        row = functools.partial(_row, "min_norm", K=K, device=device, dtype=gram_dtype, d=0, blocks=0, nbytes=0, flops=0)
        base = None
        if MGDAWeighting is not None:
            base = row(impl="torchjd MGDAWeighting (Frank-Wolfe)", timing=timings["torchjd"],
                       note="approximate (eps 1e-3, ≤ 100 iterations)")
            out.rows.append(base)
        for backend in backends:
            r = row(impl=f"molkernels.min_norm [{backend}]", timing=timings[backend])
            if base is not None:
                r.speedup, r.speedup_vs = base.median_s / r.median_s, "torchjd"
            free = sync_free(fns[backend], device)
            if free is not None:
                r.note = "no host sync" if free else "SYNCHRONISES"
            out.rows.append(r)
            if targets and device.type == "cuda" and K <= 32:
                out.targets.append(Target(f"min_norm [{backend}] K={K}: time per call", r.median_s * 1e6, 20.0, False, "µs"))
    return out


def frank_wolfe_min_norm(G: torch.Tensor, max_iters: int = 100, eps: float = 1e-3) -> torch.Tensor:
    """The min-norm weights as plain-torch MGDA implementations compute them (Sener & Koltun's
    Frank-Wolfe, as in LibMTL): a Python loop with host synchronisations."""
    K = G.shape[0]
    lam = torch.full((K,), 1.0 / K, dtype=G.dtype, device=G.device)
    for _ in range(max_iters):
        Gl = G @ lam
        t = int(torch.argmin(Gl))
        a, b, c = float(Gl[t]), float(lam @ Gl), float(G[t, t])
        gamma = 1.0 if c <= a else 0.0 if b <= a else (b - a) / (b + c - 2 * a)
        lam = (1 - gamma) * lam
        lam[t] += gamma
        if gamma < eps:
            break
    return lam


def bench_mgda(K: int, d: int, *, device, dtype, repeats: int = 10, targets: bool = True) -> Result:
    # Bytes: two passes over the stack (gram, combine) plus the write of d: (2K+1)·d·itemsize.
    # Flops: K(K+1)·d (gram) + 2·K·d (combine); the K×K solve is negligible.
    out, item = Result(), torch.tensor([], dtype=dtype).element_size()
    nbytes, flops = (2 * K + 1) * d * item, K * (K + 1) * d + 2 * K * d
    x = torch.randn(K, d, dtype=dtype, device=device)

    def plain_torch():
        G = (x @ x.T).float()
        return frank_wolfe_min_norm(G).to(x.dtype) @ x

    def path(backend):
        lam = molkernels.min_norm(molkernels.gram(x, backend=backend), backend=backend)
        return molkernels.combine(x, lam, backend=backend)

    # The two-pass floor: a read pass over the stack (the Gram's) and x.sum(0) (the combine's).
    summed = torch.empty(d, dtype=dtype, device=device)
    fns: Dict[str, Callable[[], object]] = {"torch": plain_torch,
                                            "floor": lambda: (x.amax(), torch.sum(x, 0, out=summed))}
    try:
        from torchjd.aggregation import MGDA

        fns["torchjd"] = functools.partial(MGDA(), x)
    except ImportError:
        pass
    backends = kernel_backends(device)  # not reference: its min_norm is a slow oracle (FISTA)
    for backend in backends:
        fns[backend] = functools.partial(path, backend)
    timings = measure(fns, device, repeats=repeats)
    row = functools.partial(_row, "mgda", K=K, device=device, dtype=dtype, d=d, blocks=0, nbytes=nbytes, flops=flops)
    # |d|: the norm of the direction; the exact min-norm solution has the smallest.
    norm = lambda name: f"|d| = {float(fns[name]().double().norm()):.6g}"  # noqa: E731
    floor = row(impl="two-pass floor: x.amax() + x.sum(0)", timing=timings["floor"], note="floor")
    base = row(impl="torch: x @ x.T, Frank-Wolfe, w @ x", timing=timings["torch"], note=norm("torch"))
    base.vs_floor = base.median_s / floor.median_s
    out.rows += [floor, base]
    jd = None
    if "torchjd" in fns:
        jd = row(impl="torchjd.aggregation.MGDA()", timing=timings["torchjd"], note=norm("torchjd"))
        jd.vs_floor = jd.median_s / floor.median_s
        out.rows.append(jd)
    for backend in backends:
        r = row(impl=f"molkernels gram→min_norm→combine [{backend}]", timing=timings[backend], note=norm(backend))
        reference = jd if jd is not None else base
        r.speedup, r.speedup_vs = reference.median_s / r.median_s, "torchjd" if jd is not None else "torch"
        r.vs_floor = r.median_s / floor.median_s
        if sync_free(fns[backend], device) is False:
            r.note += "; SYNCHRONISES"
        out.rows.append(r)
        if targets and jd is not None and backend != "reference":
            out.targets.append(Target(f"MGDA [{backend}] K={K} d={_fmt_d(d)} {_dtype_name(dtype)}: speedup vs torchjd",
                                      r.speedup, 3.0, True))
    return out


def project_simplex_numpy(v):
    """Sort-based simplex projection on the host, as unfused Python implementations do it."""
    import numpy as np

    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    rho = np.nonzero(u > cumulative / np.arange(1, len(v) + 1))[0][-1]
    return np.maximum(v - cumulative[rho] / (rho + 1), 0.0)


def bench_moco(K: int, d: int, *, device, dtype, repeats: int = 10, blocks: int = DEFAULT_BLOCKS,
               targets: bool = True) -> Result:
    # Bytes of the two-pass floor: pass 1 reads G and Y (fp32) and writes Y, pass 2 reads Y and
    # writes d: (K·item + 12K + item)·d, (4K + 1)·4·d for fp32. Flops: 3K·d (tracking) +
    # K(K+1)·d (Gram) + 2K·d (combine).
    out, item = Result(), torch.tensor([], dtype=dtype).element_size()
    nbytes = (K * item + 12 * K + item) * d
    flops = 3 * K * d + K * (K + 1) * d + 2 * K * d
    sizes = [d // blocks + (1 if j < d % blocks else 0) for j in range(blocks)]
    params = [torch.zeros(n, dtype=dtype, device=device) for n in sizes]
    grads = [torch.randn(K, n, dtype=dtype, device=device) for n in sizes]
    beta, gamma, rho = 0.5, 0.1, 0.0
    state = molkernels.MoCoState(params, K)
    y_unfused = torch.zeros(K, d, dtype=torch.float32, device=device)
    lam_unfused = torch.full((K,), 1.0 / K, dtype=torch.float32, device=device)
    for p in params:
        p.grad = torch.zeros_like(p)

    def unfused():
        # LibMTL-style: concatenate, track, Gram, λ step on the host (numpy), combine, copy back.
        nonlocal lam_unfused
        g = torch.cat([b.reshape(K, -1) for b in grads], dim=1).float()
        y_unfused.lerp_(g, beta)
        gram = y_unfused @ y_unfused.T
        step = (lam_unfused - gamma * (gram + rho * torch.eye(K, device=device)) @ lam_unfused).cpu().numpy()
        lam_unfused = torch.from_numpy(project_simplex_numpy(step)).to(device=device, dtype=torch.float32)
        direction = lam_unfused @ y_unfused
        offset = 0
        for p in params:
            p.grad.copy_(direction[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    y_floor, g_floor = torch.zeros(K, d, device=device), torch.randn(K, d, device=device).to(dtype)
    d_floor = torch.empty(d, device=device)

    def floor():
        # Torch's own streaming passes over the same bytes: lerp_ reads G and Y and writes Y; the
        # reduction over K reads Y and writes d.
        y_floor.lerp_(g_floor.float() if dtype != torch.float32 else g_floor, beta)
        torch.sum(y_floor, 0, out=d_floor)

    fns: Dict[str, Callable[[], object]] = {"unfused": unfused, "floor": floor}
    backends = kernel_backends(device)
    for backend in backends:
        fns[backend] = functools.partial(molkernels.moco_step, params, grads, state, beta, gamma, rho,
                                         backend=backend)
    timings = measure(fns, device, repeats=repeats)
    row = functools.partial(_row, "moco", K=K, device=device, dtype=dtype, d=d, blocks=blocks, nbytes=nbytes,
                            flops=flops)
    floor_row = row(impl="floor: torch lerp_ (pass 1) + sum over K (pass 2)", timing=timings["floor"])
    base = row(impl="unfused LibMTL-style step (cat, lerp, mm, numpy λ, combine, copies)",
               timing=timings["unfused"])
    out.rows += [floor_row, base]
    for backend in backends:
        r = row(impl=f"molkernels.moco_step [{backend}]", timing=timings[backend])
        r.vs_floor = r.median_s / floor_row.median_s
        r.speedup, r.speedup_vs = base.median_s / r.median_s, "unfused"
        if sync_free(fns[backend], device) is False:
            r.note = "SYNCHRONISES"
        out.rows.append(r)
        if targets:
            need = 10.0 if device.type == "cuda" else 8.0
            out.targets.append(Target(f"moco_step [{backend}] K={K} D={_fmt_d(d)} in {blocks} tensors: speedup vs "
                                      "unfused", r.speedup, need, True))
            out.targets.append(Target(f"moco_step [{backend}]: time / two-pass floor", r.vs_floor, 1.3, False))
    return out


def bench_backward(K: int, width: int, *, device, dtype, repeats: int = 10) -> Result:
    """mol.backward + MGDA end to end on a real model (a shared MLP trunk 256→width→width with K
    linear heads, batch 128, K regression losses): forward, the K per-objective gradients, the
    aggregation and p.grad, against torchjd's equivalent (autojac.backward + jac_to_grad(MGDA()))."""
    from . import mol

    out = Result()
    generator = torch.Generator().manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(256, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                torch.nn.ReLU())
    heads = torch.nn.Linear(width, K)
    model = torch.nn.Sequential(trunk, heads).to(device=device, dtype=dtype)
    params = list(model.parameters())
    x = torch.randn(128, 256, generator=generator).to(device=device, dtype=dtype)
    y = torch.randn(128, K, generator=generator).to(device=device, dtype=dtype)
    D = sum(p.numel() for p in params)

    def losses():
        return ((model(x) - y) ** 2).mean(0)

    aggregator = mol.MGDA()
    fns: Dict[str, Callable[[], object]] = {"molkernels": lambda: mol.backward(losses(), params, aggregator)}
    try:
        from torchjd.aggregation import MGDA
        from torchjd.autojac import backward as jd_backward, jac_to_grad

        jd_aggregator = MGDA()

        def torchjd_step():
            jd_backward(list(losses()), inputs=params)
            jac_to_grad(params, jd_aggregator)

        fns["torchjd"] = torchjd_step
    except ImportError:
        pass
    timings = measure(fns, device, repeats=repeats)
    # Bytes: the per-objective gradients are written once and read twice (Gram, combine): 3·K·D.
    row = functools.partial(_row, "backward", K=K, device=device, dtype=dtype, d=D, blocks=len(params),
                            nbytes=3 * K * D * torch.tensor([], dtype=dtype).element_size(), flops=0)
    mine = row(impl="mol.backward(losses, params, mol.MGDA()) on an MLP", timing=timings["molkernels"])
    if "torchjd" in timings:
        theirs = row(impl="torchjd autojac.backward + jac_to_grad(MGDA())", timing=timings["torchjd"])
        mine.speedup, mine.speedup_vs = theirs.median_s / mine.median_s, "torchjd"
        out.rows.append(theirs)
    out.rows.append(mine)
    return out


def bench_fl_adam(C: int, D: int, *, device, dtype, repeats: int = 10, targets: bool = True) -> Result:
    """One Adam step of C client rows [C, D], FL_ADAM_ACTIVE of them active, with per-client step
    counts (0..99, so per-client bias corrections): batched_adam_step on each kernel backend, a
    Python loop over the active clients of C torch.optim.Adam optimisers (one parameter of D each,
    torch's default implementation), and an eager batched torch step on the [C, D] tensors. All
    start from the same state; the step counts grow by one per call, so each keeps its own copy."""
    from .federated import batched_adam_step

    generator = torch.Generator().manual_seed(0)
    lr, beta1, beta2, eps = 1e-3, 0.9, 0.999, 1e-8
    params0 = torch.randn(C, D, generator=generator).to(device=device, dtype=dtype)
    grads = torch.randn(C, D, generator=generator).to(device=device, dtype=dtype)
    exp_avg0 = (0.1 * torch.randn(C, D, generator=generator)).to(device=device, dtype=dtype)
    exp_avg_sq0 = (0.01 * torch.rand(C, D, generator=generator)).to(device=device, dtype=dtype)
    step0 = torch.randint(0, 100, (C,), generator=generator).to(device)
    active_cpu = torch.rand(C, generator=generator) < FL_ADAM_ACTIVE
    active = active_cpu.to(device)
    n_active = int(active_cpu.sum())

    def fresh_state():
        return [t.clone() for t in (params0, exp_avg0, exp_avg_sq0, step0)]

    fns: Dict[str, Callable[[], object]] = {}
    backends = kernel_backends(device)
    for backend in backends:
        p, m, v, st = fresh_state()
        fns[backend] = functools.partial(batched_adam_step, p, grads, m, v, st, active, lr=lr, backend=backend)

    # (a) C optimisers, each stepping its client's row (views of the same tensors, so no copies).
    p_loop, m_loop, v_loop, step_loop = fresh_state()
    clients, optimizers = [], []
    for c in torch.nonzero(active_cpu).flatten().tolist():
        q = torch.nn.Parameter(p_loop[c])
        q.grad = grads[c]
        optimizer = torch.optim.Adam([q], lr=lr, betas=(beta1, beta2), eps=eps)
        optimizer.state[q] = {"step": step_loop[c].to("cpu", torch.float32), "exp_avg": m_loop[c],
                              "exp_avg_sq": v_loop[c]}
        clients.append(q)
        optimizers.append(optimizer)

    def loop():
        for optimizer in optimizers:
            optimizer.step()

    # (b) the same math on [C, D] with torch ops: new values for every row, kept where active.
    p_eager, m_eager, v_eager, step_eager = fresh_state()
    rows = active.view(C, 1)

    def eager():
        t = (step_eager + active).to(torch.float64)
        step_eager.copy_(t.to(torch.int64))
        step_size = (lr / (1 - beta1 ** t)).to(dtype).view(C, 1)
        bc2_sqrt = (1 - beta2 ** t).sqrt().to(dtype).view(C, 1)
        m = m_eager.lerp(grads, 1 - beta1)
        v = v_eager.mul(beta2).addcmul_(grads, grads, value=1 - beta2)
        update = m.div(v.sqrt().div_(bc2_sqrt).add_(eps)).mul_(step_size)
        torch.where(rows, p_eager - update, p_eager, out=p_eager)
        torch.where(rows, m, m_eager, out=m_eager)
        torch.where(rows, v, v_eager, out=v_eager)

    # Stream bandwidth: torch.add(x, y, out=z) reads 2 and writes 1 tensor of C·D elements.
    x, y, z = (torch.empty(C, D, dtype=dtype, device=device).normal_() for _ in range(3))
    fns.update(loop=loop, eager=eager, stream=lambda: torch.add(x, y, out=z))
    timings = measure(fns, device, repeats=repeats)

    item = torch.tensor([], dtype=dtype).element_size()
    nbytes = 7 * item * n_active * D + 9 * C  # p, g, m, v read, p, m, v written; step and mask
    bandwidth = 3 * item * C * D / timings["stream"]["median"]
    floor_s = nbytes / bandwidth
    row = functools.partial(_row, "fl_adam", K=C, device=device, dtype=dtype, d=D, blocks=0, nbytes=nbytes, flops=0)
    floor_row = Row(op="fl_adam", impl=f"one-pass floor: {_fmt_bytes(nbytes)} at the stream bandwidth "
                    f"{bandwidth / 1e9:.1f} GB/s (torch.add)", device=str(device), dtype=_dtype_name(dtype), K=C,
                    d=D, blocks=0, median_s=floor_s, min_s=floor_s, repeats=repeats, bytes=nbytes, flops=0)
    base = row(impl=f"Python loop: {n_active} torch.optim.Adam steps (one optimiser per client)",
               timing=timings["loop"])
    batched = row(impl="eager batched torch on [C, D] (lerp, addcmul, torch.where)", timing=timings["eager"])
    batched.speedup, batched.speedup_vs = base.median_s / batched.median_s, "loop"
    out = Result(rows=[floor_row, base, batched])
    for backend in backends:
        r = row(impl=f"batched_adam_step [{backend}] ({n_active} of {C} clients active)", timing=timings[backend])
        r.vs_floor = r.median_s / floor_s
        r.speedup, r.speedup_vs = base.median_s / r.median_s, "loop"
        r.note = f"{batched.median_s / r.median_s:.1f}× the eager batched step"
        if sync_free(fns[backend], device) is False:
            r.note += "; SYNCHRONISES"
        out.rows.append(r)
        if targets:
            out.targets.append(Target(f"batched_adam_step [{backend}] C={C} D={_fmt_d(D)}: speedup vs the loop of "
                                      "torch.optim.Adam", r.speedup, 30.0, True))
            out.targets.append(Target(f"batched_adam_step [{backend}]: speedup vs eager batched torch",
                                      batched.median_s / r.median_s, 2.0, True))
    return out


def bench_fl_round(C: int, D: int, *, device, dtype, repeats: int = 5, local_steps: int = FL_ROUND_LOCAL_STEPS
                   ) -> Result:
    """One full round of the open-system simulator (Bernoulli churn 0.1/0.1, so about C/2 active
    clients; the quadratic problem with a diagonal basis, σ = 1 and σ = 0; local Adam, E local
    steps; the server average; not the simulator's measurement of x*_t): all clients in one batched
    kernel call per local step, against the same round with the local steps as a Python loop over
    clients, one torch.optim.Adam per client (federated.baseline.PerClientLoopSimulator: same churn,
    gradients and average)."""
    from .federated import FLConfig, OpenFLSimulator
    from .federated.baseline import PerClientLoopSimulator

    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"fl_round: float32 or float64, got {dtype}")
    out = Result()
    # σ = 1: the gradient noise (C·D normal draws per local step) is part of both rounds and costs
    # more than the optimiser; σ = 0 shows the optimiser's share.
    for sigma in (1.0, 0.0):
        config = FLConfig(algorithm="local_adam", clients=C, dim=D, local_steps=local_steps, sigma=sigma,
                          device=str(device), dtype=_dtype_name(dtype), problem_options={"basis": "identity"},
                          track_optimum=False)
        batched, looped = OpenFLSimulator(config), PerClientLoopSimulator(config)
        timings = measure({"loop": looped.round, "batched": batched.round}, device, repeats=repeats, warmup=1)
        active = sum(r["active"] for r in batched.history) / len(batched.history)
        note = f"σ={sigma:g}; {active:.0f} active clients on average"
        row = functools.partial(_row, "fl_round", K=C, device=device, dtype=dtype, d=D, blocks=0, nbytes=0, flops=0)
        base = row(impl=f"Python loop over clients, torch.optim.Adam each (E={local_steps})", timing=timings["loop"],
                   note=note)
        mine = row(impl=f"batched_adam_step over all clients (E={local_steps} calls)", timing=timings["batched"],
                   note=note)
        mine.speedup, mine.speedup_vs = base.median_s / mine.median_s, "loop"
        out.rows += [base, mine]
    return out


# ----------------------------------------------------------------------------------------------
# distributed: bytes communicated and step time against the number of ranks.

# (key, what runs on each rank per step). The replicated paths start from each rank's own [K, D]
# gradients; the sharded path from this rank's [K, D/n] shard of already-reduced gradients (FSDP).
DISTRIBUTED_PATHS = (
    ("sharded", "sharded Gram: mgda_step(process_group=) on a [K, D/n] shard (FSDP-style)"),
    ("reduce_scatter", "replicated: reduce_scatter + sharded Gram + all_gather (ReplicatedGradients)"),
    ("all_reduce_stack", "replicated: one all_reduce of the [K, D] stack + local mgda_step"),
    ("per_objective", "replicated: K all_reduces (one per objective) + local mgda_step"),
)
DISTRIBUTED_RANKS = (1, 2, 4)


def _ring_wire_bytes(name: str, tensors: Sequence[torch.Tensor], world: int) -> Tuple[int, int]:
    """(message bytes, bytes each rank sends on a ring) of one collective: all_reduce of S bytes
    sends 2(n−1)/n·S, reduce_scatter of an S-byte input and all_gather into an S-byte output
    (n−1)/n·S."""
    if name == "all_reduce":
        size = tensors[0].numel() * tensors[0].element_size()
        return size, 2 * (world - 1) * size // world
    size = tensors[0].numel() * tensors[0].element_size()  # the output, all_gather's larger tensor
    if name.startswith("reduce_scatter"):
        size = tensors[1].numel() * tensors[1].element_size()  # the input
    return size, (world - 1) * size // world


def _distributed_worker(rank: int, world: int, init_file: str, out_path: str, K: int, d: int, dtype_name: str,
                        device_type: str, repeats: int) -> None:
    import torch.distributed as dist

    from . import distributed as mkd

    cuda = device_type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)  # the ranks share the machine's cores
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    group = dist.group.WORLD
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(rank)
    grads = torch.randn(K, d, generator=generator).to(device=device, dtype=dtype)  # this rank's batch
    lo, hi = mkd.shard_bounds(d, world, rank)
    shard_grads = grads[:, lo:hi].contiguous()
    shard_params = [torch.zeros(hi - lo, dtype=dtype, device=device)]
    params = [torch.zeros(d, dtype=dtype, device=device)]
    rep = mkd.ReplicatedGradients(params, group, reduce="reduce_scatter")
    stack, rows = grads.clone(), grads.clone()  # reduced in place, so each path has its own

    def per_objective():
        for k in range(K):
            dist.all_reduce(rows[k], group=group)
            rows[k].div_(world)
        return molkernels.mgda_step(params, rows)

    fns = {
        "sharded": lambda: molkernels.mgda_step(shard_params, shard_grads, process_group=group),
        "reduce_scatter": lambda: rep.mgda_step(grads),
        "all_reduce_stack": lambda: molkernels.mgda_step(params, mkd.all_reduce_stack(stack, group)),
        "per_objective": per_objective,
    }
    results = {}
    for key, fn in fns.items():
        with mkd.record_collectives() as recorded:   # one counted step: each collective's bytes
            fn()
        calls = [_ring_wire_bytes(name, tensors, world) for name, tensors in recorded]
        synchronize(device)
        times = []
        for i in range(2 + repeats):
            dist.barrier(group=group)
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
        everyone = [None] * world
        dist.all_gather_object(everyone, times, group=group)
        slowest = [max(t[i] for t in everyone) for i in range(repeats)]  # a step ends with its slowest rank
        results[key] = {"times": slowest, "collectives": len(calls), "message_bytes": sum(c[0] for c in calls),
                        "wire_bytes": sum(c[1] for c in calls)}
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()
    # gloo's worker threads can abort the interpreter's finalisation (SIGABRT, pytorch/pytorch#179291)
    # once everything is done: leave without it.
    sys.stdout.flush()
    os._exit(0)


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def bench_distributed(K: int, d: int, *, device, dtype, repeats: int = 10, ranks: Sequence[int] = DISTRIBUTED_RANKS
                      ) -> Result:
    """Spawns worlds of 1, 2, 4 ranks (gloo on CPU, one thread each; NCCL on CUDA, one GPU each,
    as many as there are) and times one MGDA step per path of DISTRIBUTED_PATHS (the slowest
    rank's time, median over repeats); the note gives the collectives of a step, their message
    bytes and the bytes each rank sends on a ring. Speedups are against the K all_reduces."""
    import tempfile

    import torch.multiprocessing as mp

    out = Result()
    if device.type == "cuda":
        ranks = [n for n in ranks if n <= torch.cuda.device_count()]
    for world in ranks:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "result.pt")
            mp.start_processes(_distributed_worker, args=(world, os.path.join(tmp, "init"), path, K, d,
                                                          _dtype_name(dtype), device.type, repeats),
                               nprocs=world, join=True, start_method="spawn")
            results = torch.load(path)
        rows = {}
        for key, label in DISTRIBUTED_PATHS:
            r = results[key]
            timing = {"median": statistics.median(r["times"]), "min": min(r["times"]), "repeats": len(r["times"])}
            rows[key] = _row("distributed", impl=f"{label} [{world} rank{'s' if world > 1 else ''}]", K=K,
                             device=device, dtype=dtype, d=d, blocks=0, timing=timing, nbytes=0, flops=0,
                             note=f"{r['collectives']} collectives, messages {_fmt_bytes(r['message_bytes'])}, "
                                  f"ring bytes sent per rank {_fmt_bytes(r['wire_bytes'])}")
        for key, row in rows.items():
            if key != "per_objective":
                row.speedup, row.speedup_vs = rows["per_objective"].median_s / row.median_s, "K all_reduces"
        out.rows += list(rows.values())
    return out


def run_op(op: str, *, Ks, ds, device, dtype, repeats, blocks) -> Result:
    result = Result()
    if op == "min_norm":
        result.extend(bench_min_norm(Ks, device=device, dtype=dtype, repeats=max(repeats, 10)))
        return result
    for K in Ks:
        for d in ds:
            if op == "gram":
                result.extend(bench_gram(K, d, device=device, dtype=dtype, repeats=repeats, blocks=blocks))
            elif op == "combine":
                result.extend(bench_combine(K, d, device=device, dtype=dtype, repeats=repeats))
            elif op == "mgda":
                result.extend(bench_mgda(K, d, device=device, dtype=dtype, repeats=repeats))
            elif op == "backward":
                result.extend(bench_backward(K, d, device=device, dtype=dtype, repeats=repeats))
            elif op == "moco":
                result.extend(bench_moco(K, d, device=device, dtype=dtype, repeats=repeats, blocks=blocks))
            elif op == "distributed":
                result.extend(bench_distributed(K, d, device=device, dtype=dtype, repeats=repeats))
            elif op == "fl_adam":
                result.extend(bench_fl_adam(K, d, device=device, dtype=dtype, repeats=repeats))
            elif op == "fl_round":
                result.extend(bench_fl_round(K, d, device=device, dtype=dtype, repeats=min(repeats, 5)))
            else:
                raise ValueError(f"op: unknown {op!r}; expected one of {', '.join(OPS)} or all")
    return result


# ----------------------------------------------------------------------------------------------
# Output: a text table, CSV, markdown.


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.2f} µs"


def _cells(row: Row) -> List[str]:
    return [
        row.op,
        row.impl,
        row.dtype,
        str(row.K),
        _fmt_d(row.d) if row.d else "",
        str(row.blocks) if row.blocks else "tensor" if row.d else "",
        fmt_time(row.median_s),
        f"{row.gbps:.1f}" if row.gbps is not None else "",
        f"{row.vs_floor:.2f}×" if row.vs_floor is not None else "",
        f"{row.speedup:.2f}× vs {row.speedup_vs}" if row.speedup is not None else "",
        row.note,
    ]


HEADER = ["op", "impl", "dtype", "K", "d", "stack", "median", "GB/s", "time/floor", "speedup", "note"]


def _fmt_d(d: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if d >= scale and d % (scale / 100) == 0:
            return f"{d / scale:g}{unit}"
    return str(d)


def format_table(rows: Sequence[Row]) -> str:
    table = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_targets(targets: Sequence[Target]) -> str:
    return "\n".join(f"  [{'PASS' if t.passed else 'MISS'}] {t.describe()}" for t in targets)


def write_csv(rows: Sequence[Row], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = [f.name for f in dataclasses.fields(Row)] + ["gbps"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            record = dataclasses.asdict(r)
            record["gbps"] = r.gbps
            writer.writerow(record)


def machine_description(device: torch.device) -> Dict[str, str]:
    """What produced the numbers: processor or GPU, torch, threads, molkernels and its git commit."""
    info: Dict[str, str] = {}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
        info["cuda"] = str(torch.version.cuda)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu"] = f"{cpu}, {os.cpu_count()} logical cores"
    info["torch"] = f"{torch.__version__}, {torch.get_num_threads()} threads"
    info["molkernels"] = f"{molkernels.__version__}, backends {', '.join(molkernels.backends())}"
    build = molkernels.build_info()
    if "cpu_isa" in build:  # the CPU kernels' variant (MOLKERNELS_CPU_ISA forces one)
        info["cpu isa"] = f"{build['cpu_isa']} (this CPU runs: {', '.join(build['cpu_isas'])})"
    commit = git_commit()
    if commit:
        info["git commit"] = commit
    info["python"] = platform.python_version()
    try:  # other work on the machine skews CPU numbers: say how busy it was
        info["load average"] = " ".join(f"{v:.2f}" for v in os.getloadavg()) + " (1, 5, 15 min, at start)"
    except OSError:
        pass
    return info


def git_commit() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(molkernels.__file__)))
    try:
        result = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty", "--abbrev=12"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def device_slug(device: torch.device) -> str:
    """A file-name-safe name of the machine, e.g. `h100-80gb-hbm3` or `cpu-amd-epyc`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    else:
        name = "cpu-" + machine_description(device)["cpu"].split(",")[0].lower()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def write_markdown(result: Result, path: str, *, title: str, device: torch.device,
                   info: Optional[Dict[str, str]] = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {title} ({now})", ""]
    lines += [f"- {key}: {value}" for key, value in (info or machine_description(device)).items()]
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in result.rows]
    if result.targets:
        lines += ["", "| target | measured | threshold | result |", "|---|---|---|---|"]
        for t in result.targets:
            sign = "≥" if t.higher_is_better else "≤"
            lines.append(f"| {t.name} | {_fmt_value(t.value, t.unit)} | {sign} {_fmt_value(t.threshold, t.unit)} | "
                         f"{'PASS' if t.passed else 'MISS'} |")
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n\n")


# ----------------------------------------------------------------------------------------------
# CLI.


def parse_size(text: str) -> int:
    """An argument type: 12.5M, 5e6, 4096, 2^20, 64k -> a positive int (below 2^63, torch's size limit)."""
    text = text.strip()
    power = re.fullmatch(r"2\^(\d+)", text)
    scales = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}
    try:
        if power:
            value = 2.0 ** int(power.group(1))
        elif text[-1:] in scales:
            value = float(text[:-1]) * scales[text[-1]]
        else:
            value = float(text)
    except (ValueError, OverflowError):
        value = math.nan
    if not (1 <= value < 2**63 and value == int(value)):  # also rejects NaN and inf
        raise argparse.ArgumentTypeError(f"a positive integer size below 2^63 (e.g. 4096, 64k, 12.5M, 2^20), "
                                         f"got {text!r}")
    return int(value)


def markdown_path(text: str) -> str:
    """An argument type: `auto` or a file that can be written."""
    return text if text == "auto" else _cli.output_file(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("op", choices=OPS + ("all",), help="which benchmark; all runs every one at default sizes")
    parser.add_argument("--device", default="cpu", type=_cli.device, choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--K", type=_cli.positive_int, nargs="+", default=None,
                        help="number(s) of objectives (default: 8; min_norm: 2 4 8 16 32 64)")
    parser.add_argument("--d", type=parse_size, nargs="+", default=None,
                        help="gradient dimension(s), e.g. 12.5M (default: 12.5M for gram and combine, 5M for mgda)")
    parser.add_argument("--blocks", type=_cli.positive_int, default=DEFAULT_BLOCKS,
                        help="blocks of the list stack (gram)")
    parser.add_argument("--repeats", type=_cli.positive_int, default=10,
                        help="timed repeats per measurement (median reported)")
    parser.add_argument("--threads", type=_cli.positive_int, default=None,
                        help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--busy-cores", type=_cli.int_range(0), default=0, metavar="N",
                        help="keep N cores busy with spinning processes for the whole run: a controlled stand-in "
                             "for other work on the machine (CPU kernels must not stall on a descheduled thread)")
    parser.add_argument("--csv", type=_cli.output_file, default=None,
                        help="CSV path (default: bench-out/<op>-<device>-<dtype>.csv)")
    parser.add_argument("--markdown", type=markdown_path, default=None,
                        help="append a markdown table with the machine description to this file; "
                             "'auto': benchmarks/results/<gpu or cpu>-<date>.md under the current folder")


def check(args: argparse.Namespace) -> None:
    """The default output paths, resolved here (args.csv, args.markdown), writable before anything runs;
    --busy-cores within the machine's cores."""
    cores = os.cpu_count() or 1
    if args.busy_cores >= cores:
        raise ValueError(f"--busy-cores: {args.busy_cores} would leave none of this machine's {cores} cores "
                         f"to the benchmark; at most {cores - 1}")
    if args.csv is None:
        args.csv = os.path.join("bench-out", f"{args.op}-{args.device}-{args.dtype}.csv")
        _cli.check_default_output("--csv", args.csv)
    if args.markdown == "auto":
        args.markdown = os.path.join("benchmarks", "results",
                                     f"{device_slug(torch.device(args.device))}-{datetime.date.today()}.md")
        _cli.check_default_output("--markdown", args.markdown)


def command_line(args: argparse.Namespace) -> str:
    """The bench command that reproduces `args`, for the markdown title."""
    parts = ["python -m molkernels bench", args.op, "--device", args.device, "--dtype", args.dtype]
    if args.K:
        parts += ["--K"] + [str(k) for k in args.K]
    if args.d:
        parts += ["--d"] + [str(d) for d in args.d]
    parts += ["--repeats", str(args.repeats)]
    if args.op in ("gram", "all") and args.blocks != DEFAULT_BLOCKS:
        parts += ["--blocks", str(args.blocks)]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    if args.busy_cores:
        parts += ["--busy-cores", str(args.busy_cores)]
    return " ".join(parts)


@contextlib.contextmanager
def busy_cores(n: int):
    """n processes that spin on a core each until the block ends (killed even if it raises)."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
                for _ in range(n)]
    try:
        yield spinners
    finally:
        for p in spinners:
            p.kill()
        for p in spinners:
            p.wait()


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    ops = OPS if args.op == "all" else (args.op,)
    info = machine_description(device)
    if args.busy_cores:
        info["busy cores"] = f"{args.busy_cores} (spinning processes started by this run, for its whole length)"
    print("molkernels bench " + args.op + ": " + "; ".join(f"{k} {v}" for k, v in info.items()))
    total = Result()
    started = time.perf_counter()
    with busy_cores(args.busy_cores):
        for op in ops:
            op_started = time.perf_counter()
            result = run_op(op, Ks=args.K or DEFAULT_K[op], ds=args.d or DEFAULT_D[op], device=device, dtype=dtype,
                            repeats=args.repeats, blocks=args.blocks)
            print()
            print(format_table(result.rows))
            if result.targets:
                print("targets:")
                print(format_targets(result.targets))
            print(f"({op}: {time.perf_counter() - op_started:.1f} s)")
            total.extend(result)
    write_csv(total.rows, args.csv)
    print(f"\nwrote {args.csv}")
    if args.markdown:
        write_markdown(total, args.markdown, title=f"`{command_line(args)}`", device=device, info=info)
        print(f"appended {args.markdown}")
    missed = [t for t in total.targets if not t.passed]
    print(f"total {time.perf_counter() - started:.1f} s; targets: {len(total.targets) - len(missed)} pass, {len(missed)} miss")
    return 0
