"""Stage 4's target program: a couple of dozen small calls, every op and step and the FL kernels
once per kernel backend, with K ∈ {3, 33}, d ∈ {17, 1000}, odd blocks (a view at an odd offset, a
non-contiguous block, an empty one) and all four dtypes spread over the calls. compute-sanitizer
runs it once per tool (memcheck, racecheck, synccheck, initcheck); the test suite would take
far longer under it.

    python sanitize_calls.py                   the calls (exit 1 if one raised)
    python sanitize_calls.py --kernel-filters  compute-sanitizer's --kernel-name options selecting
                                               the molkernels C++ kernels and the Triton kernels
    python sanitize_calls.py --ncu             one K = 8 float32 gram call on the cuda backend (for ncu)
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import time
import traceback

import common
from common import DEVICE, REPO

import torch  # noqa: E402

import molkernels as mk  # noqa: E402
from molkernels.federated import batched_adam_step, batched_sgd_step, masked_weighted_mean  # noqa: E402

#: the mangled-name prefix of everything in the C++ namespace mk (csrc/core), anonymous namespaces too
CPP_KERNELS = "_ZN2mk"


def triton_kernel_names() -> list:
    """The @triton.jit functions of molkernels/triton that are launched (named *_kernel); Triton
    names the GPU function after the Python one."""
    names = []
    for path in sorted(glob.glob(os.path.join(REPO, "molkernels", "triton", "*.py"))):
        with open(path, encoding="utf-8") as file:
            source = file.read()
        names += re.findall(r"@triton\.jit[^\n]*\n(?:@[^\n]*\n)*def (\w+_kernel)\(", source)
    return names


def kernel_filters() -> str:
    return f"--kernel-name kns={CPP_KERNELS} --kernel-name regex=({'|'.join(triton_kernel_names())})"


def stack(K: int, dtype):
    """Odd blocks: [K, 17]; a [K, 1000] view at column 1 of a flat buffer (misaligned, strided
    rows); a non-contiguous [K, 5, 3] transpose; an empty [K, 0]."""
    flat = torch.randn(K, 1 + 1000 + 4, device=DEVICE).to(dtype)
    transposed = torch.randn(K, 3, 5, device=DEVICE).to(dtype).transpose(1, 2)
    return [torch.randn(K, 17, device=DEVICE).to(dtype), flat[:, 1:1001], transposed,
            torch.empty(K, 0, dtype=dtype, device=DEVICE)]


def gram_matrix(K: int, dtype) -> torch.Tensor:
    A = torch.randn(K, K + 2, dtype=torch.float64)
    return (A @ A.T).to(dtype).to(DEVICE)


def params_like(K: int):
    params = [torch.randn(17, device=DEVICE), torch.randn(10, 100, device=DEVICE)]
    grads = [torch.randn(K, *p.shape, device=DEVICE) for p in params]
    return params, grads


def fl_state(C: int, D: int, dtype):
    params = torch.randn(C, D, device=DEVICE).to(dtype)
    return (params, torch.randn_like(params), torch.zeros(C, D, device=DEVICE), torch.zeros(C, D, device=DEVICE),
            torch.zeros(C, dtype=torch.int64, device=DEVICE), torch.rand(C, device=DEVICE) < 0.7)


def calls(backend: str):
    """(name, thunk) pairs: each builds its inputs and runs one op or step."""
    b = dict(backend=backend)

    def moco(K, normalize):
        params, grads = params_like(K)
        state = mk.MoCoState(params, K)
        losses = torch.rand(K, device=DEVICE) + 0.5
        mk.moco_step(params, grads, state, lr=0.1, normalize=normalize, losses=losses, **b)

    def modo(K):
        params, grads = params_like(K)
        mk.modo_step(params, grads, params_like(K)[1], params_like(K)[1], mk.MoDoState(params, K), lr=0.1, **b)

    def adam(C, D, dtype):
        params, grads, m, v, step, active = fl_state(C, D, dtype)
        batched_adam_step(params, grads, m, v, step, active, lr=1e-3, **b)

    def sgd(C, D):
        params, grads, buffer, _, _, active = fl_state(C, D, torch.float32)
        batched_sgd_step(params, grads, active, lr=1e-3, momentum=0.9, momentum_buffer=buffer, **b)

    def mean(C, D):
        x = torch.randn(C, D, dtype=torch.float64, device=DEVICE)
        masked_weighted_mean(x, torch.rand(C, device=DEVICE), torch.rand(C, device=DEVICE) < 0.7, **b)

    return [
        ("gram K=33 bfloat16", lambda: mk.gram(stack(33, torch.bfloat16), **b)),
        ("cross_gram K=3 float32", lambda: mk.cross_gram(stack(3, torch.float32), stack(3, torch.float32), **b)),
        ("combine K=33 float16", lambda: mk.combine(stack(33, torch.float16), torch.rand(33, device=DEVICE), **b)),
        ("min_norm K=33 float64", lambda: mk.min_norm(gram_matrix(33, torch.float64), **b)),
        ("min_norm K=3 float32 batched", lambda: mk.min_norm(torch.stack([gram_matrix(3, torch.float32)
                                                                          for _ in range(4)]), **b)),
        ("project_simplex K=33", lambda: mk.project_simplex(torch.randn(17, 33, device=DEVICE), **b)),
        ("mgda_step K=3", lambda: mk.mgda_step(*params_like(3), lr=0.1, **b)),
        ("moco_step K=33", lambda: moco(33, "none")),
        ("moco_step K=3 l2", lambda: moco(3, "l2")),
        ("modo_step K=3", lambda: modo(3)),
        ("batched_adam_step C=33 D=1000 bfloat16", lambda: adam(33, 1000, torch.bfloat16)),
        ("batched_sgd_step C=3 D=17", lambda: sgd(3, 17)),
        ("masked_weighted_mean C=33 D=1000 float64", lambda: mean(33, 1000)),
    ]


def run_calls(backends) -> int:
    failures = 0
    for backend in backends:
        reason = common.unavailable_reason(backend)
        if reason is not None:
            print(f"backend {backend} unavailable: {reason}", flush=True)
            failures += 1
            continue
        for name, thunk in calls(backend):
            started = time.perf_counter()
            try:
                thunk()
                common.synchronize()
                print(f"ok    {backend:7s} {name} ({(time.perf_counter() - started) * 1e3:.0f} ms)", flush=True)
            except Exception:  # report every call; the sanitizer reports the kernels' own errors
                failures += 1
                print(f"ERROR {backend:7s} {name}\n{traceback.format_exc()}", flush=True)
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-filters", action="store_true")
    parser.add_argument("--ncu", action="store_true")
    args = parser.parse_args(argv)
    if args.kernel_filters:
        print(kernel_filters())
        return 0
    if args.ncu:
        g = torch.randn(8, 10_000_000, device=DEVICE)
        mk.gram(g, backend="cuda")
        common.synchronize()
        return 0
    backends = ["cpu", "triton"] if common.DRY else ["cuda", "triton"]
    return run_calls(backends)


if __name__ == "__main__":
    sys.exit(main())
