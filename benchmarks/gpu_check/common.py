"""What the stage scripts of `make gpu-check` share: the mode (a real GPU run, or the dry run on CPU
tensors), the device and the sizes, the project's test helpers loaded by path, the stage deadline,
and the CUDA-only pieces (host-sync detection, side streams, graph capture, event timing).

The CUDA-only pieces degrade to plain calls on CPU tensors, so that the dry run executes the same
code as the GPU run everywhere except inside those few wrappers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import tempfile
import time
import zlib
from typing import Callable, Optional

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DRY = os.environ.get("GPU_CHECK_DRY") == "1"
if DRY:
    # Triton reads this when its kernels are defined, so before anything imports molkernels.triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

DEVICE = torch.device("cpu" if DRY else "cuda")
OUT_DIR = os.environ.get("BENCH_OUT", os.path.join(REPO, "bench-out"))
# Files that pass information between the stages; outside OUT_DIR, where only the ≤ 8 results go.
STATE_DIR = os.environ.get("GPU_CHECK_STATE_DIR", os.path.join(tempfile.gettempdir(), "molkernels-gpu-check"))


def load_module(name: str, relative_path: str):
    """A module of the repository by its path (python_tests is not a package), registered under
    `name` so that the modules it imports by that name find it."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relative_path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# The tolerance tables and the checks of the test suite (stacks imports tolerances by name).
tol = load_module("tolerances", "python_tests/tolerances.py")
stacks = load_module("stacks", "python_tests/stacks.py")


def kernel_backends() -> list:
    """The backends whose kernels are under test: cuda and triton on the GPU; in the dry run the
    reference (as the plumbing's own check), cpu, and triton under its interpreter."""
    return ["reference", "cpu", "triton"] if DRY else ["cuda", "triton"]


def unavailable_reason(backend: str) -> Optional[str]:
    from molkernels import _ops

    return _ops.unavailable_reason(backend)


class Sizes:
    """The case matrices: the issue's sizes on the GPU, tiny ones in the dry run."""

    if DRY:
        KS = (1, 3)
        DS = (1, 17)
        LAYOUT_KS = (3,)
        STEP_KS = (3,)
        SIMPLEX_ROWS = (1, 17)
        MIN_NORM_KS = (1, 2, 3)
        MIN_NORM_REFERENCE_KS = (3,)
        FL_SIZES = ((3, 17),)
        LARGE_D = 50_003
        LARGE_CHUNK = 7_001
    else:
        KS = (1, 2, 3, 8, 16, 33, 64)
        DS = (1, 17, 4099, 100003)
        LAYOUT_KS = (3, 33)
        STEP_KS = (3, 33, 40)
        SIMPLEX_ROWS = (1, 4099)
        MIN_NORM_KS = (1, 2, 3, 8, 16, 33, 64)
        # The float64 reference (FISTA, 20000 iterations) costs seconds per K even on the GPU:
        # above K = 8 the KKT conditions alone certify the optimum.
        MIN_NORM_REFERENCE_KS = (3, 8)
        FL_SIZES = ((1, 1), (3, 17), (33, 4099), (70, 100003))
        LARGE_D = 1_200_000_000  # K = 2: K·d = 2.4e9 > 2^31 elements, 9.6 GB in float32
        LARGE_CHUNK = 100_000_000


def interpreted(backend: str) -> bool:
    return backend == "triton" and DEVICE.type == "cpu"


def one_interpreted_case_per(cases: list, key: Callable[[object], object]) -> list:
    """`cases` with only the first interpreted-Triton case of each `key`: the interpreter costs
    ~0.1-1 s per launch, and one case per key exercises each path."""
    seen, kept = set(), []
    for case in cases:
        if interpreted(case.backend):
            if key(case) in seen:
                continue
            seen.add(key(case))
        kept.append(case)
    return kept


# --------------------------------------------------------------------------------------------------
# Deadlines: the shell gives each stage a `timeout` and, a little earlier, this deadline, so that a
# script stops starting new work and writes what it has before it is killed.


def stage_deadline() -> float:
    return float(os.environ.get("GPU_CHECK_STAGE_DEADLINE", "inf"))


def seconds_left() -> float:
    return stage_deadline() - time.time()


# --------------------------------------------------------------------------------------------------
# CUDA-only pieces, plain calls on CPU tensors


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def seed(case_id: str) -> None:
    """Each case draws its own inputs, the same ones every time (a rerun or a retry after a failed
    host-sync check sees the same values)."""
    torch.manual_seed(zlib.crc32(case_id.encode()))


@contextlib.contextmanager
def no_host_sync():
    """torch.cuda.set_sync_debug_mode("error") inside: any host synchronisation raises."""
    if DEVICE.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def is_host_sync_error(error: BaseException) -> bool:
    return "synchronizing" in str(error).lower()


@contextlib.contextmanager
def side_stream():
    """Work inside runs on a new stream that first waits for the current one; the current stream
    waits for it afterwards."""
    if DEVICE.type != "cuda":
        yield
        return
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def capture(fn: Callable[[], object]) -> Callable[[], object]:
    """fn captured into a CUDA graph; the returned callable replays it and returns what fn
    returned at capture (its output tensors, refreshed by each replay). On CPU tensors, fn
    itself: there is no capture, so host-side state changes on every call."""
    if DEVICE.type != "cuda":
        return fn
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


def context_broken() -> bool:
    """A sticky CUDA error (an illegal address, say) poisons the context: every later call fails."""
    if DEVICE.type != "cuda":
        return False
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device=DEVICE).add_(1).item()
        return False
    except Exception:  # any error here means the context cannot run work any more
        return True


def free_device_bytes() -> float:
    if DEVICE.type != "cuda":
        return math.inf
    free, _ = torch.cuda.mem_get_info()
    return float(free)


class Timer:
    """Per-call times in seconds of work queued back to back: CUDA events on the GPU (no
    synchronisation between calls), the host clock on the CPU."""

    def __init__(self):
        self.marks = []

    def mark(self):
        if DEVICE.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list:
        """Seconds between marks 0-1, 2-3, ... (each pair brackets one call)."""
        synchronize()
        pairs = zip(self.marks[0::2], self.marks[1::2])
        if DEVICE.type == "cuda":
            return [start.elapsed_time(end) / 1e3 for start, end in pairs]
        return [end - start for start, end in pairs]


def first_line(error: BaseException, limit: int = 300) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return (text[0] if text else type(error).__name__)[:limit]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def probe_status(name: str) -> str:
    """What a background probe of the build stage wrote (e.g. 'ok 12.3'), or 'not run'."""
    path = os.path.join(STATE_DIR, name)
    if not os.path.exists(path):
        return "not run"
    with open(path, encoding="utf-8") as file:
        return file.read().strip() or "running"
