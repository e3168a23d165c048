"""Determinism: the same input gives bitwise the same output on the same backend and device, and
on the cpu backend whatever the number of OpenMP threads."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import molkernels
from molkernels import _ops
from stacks import backend_params, make_stack, randn


def _inputs(K, d, dtype, device):
    A = randn(3, K, K + 2, dtype=torch.float64)
    return {
        "g": randn(K, d, dtype=dtype, device=device),
        "blocks": make_stack("mixed", K, dtype, device),
        "b": randn(K, d, dtype=dtype, device=device),
        "w": randn(K, device=device),
        "v": randn(257, K, dtype=dtype, device=device),
        "G": (A @ A.transpose(-1, -2)).to(dtype).to(device),
    }


def _run_all(x, backend):
    out = {
        "gram": molkernels.gram(x["g"], backend=backend),
        "gram_blocks": molkernels.gram(x["blocks"], backend=backend),
        "cross_gram": molkernels.cross_gram(x["g"], x["b"], backend=backend),
        "combine": molkernels.combine(x["g"], x["w"], backend=backend),
        "project_simplex": molkernels.project_simplex(x["v"], backend=backend),
    }
    for j, block in enumerate(molkernels.combine(x["blocks"], x["w"], backend=backend)):
        out[f"combine_block{j}"] = block
    if backend != "reference":  # the oracle's min_norm costs seconds; it is plain torch
        out["min_norm"] = molkernels.min_norm(x["G"], backend=backend)
    return out


def _bits(t):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_same_input_same_bits(be, dtype):
    K, d = (5, 3001) if be.interpreted else (7, 100003)
    x = _inputs(K, d, dtype, be.device)
    first = _run_all(x, be.backend)
    second = _run_all(x, be.backend)
    for name in first:
        a, b = first[name], second[name]
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(_bits(a), _bits(b)), f"{name}: two calls on the same input differ"


_THREADS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, molkernels
    torch.manual_seed(7)
    K = 5
    blocks = [torch.randn(K, 40000), torch.randn(K, 3, 5), torch.randn(K, 17).to(torch.float16).float()]
    flat, views = molkernels.flat_buffer([(30000,), (7, 3)], K)
    flat.copy_(torch.randn(K, flat.shape[1]))
    b = [torch.randn_like(x) for x in blocks]
    w = torch.randn(K)
    v = torch.randn(3000, K) * 5
    A = torch.randn(64, K, K + 1, dtype=torch.float64)
    G = A @ A.transpose(-1, -2)
    out = {
        "gram": molkernels.gram(blocks, backend="cpu"),
        "gram_flat": molkernels.gram(views, backend="cpu"),
        "gram_fp16": molkernels.gram(torch.randn(K, 70001).half(), backend="cpu"),
        "gram_fp64": molkernels.gram([x.double() for x in blocks], backend="cpu"),
        "cross_gram": molkernels.cross_gram(blocks, b, backend="cpu"),
        "combine": torch.cat([c.flatten() for c in molkernels.combine(blocks, w, backend="cpu")]),
        "project_simplex": molkernels.project_simplex(v, backend="cpu"),
        "min_norm": molkernels.min_norm(G, backend="cpu"),
    }
    torch.save(out, sys.argv[1])
    print(json.dumps({"openmp_threads": molkernels.build_info()["openmp_threads"]}))
    """
)


@pytest.mark.skipif(_ops._C is None, reason=f"the extension is not built: {_ops._C_ERROR}")
def test_cpu_results_do_not_depend_on_thread_count(tmp_path):
    """Run the cpu kernels in fresh processes with OMP_NUM_THREADS = 1 and 2 (torch's
    set_num_threads does not reach the extension's OpenMP pool) and compare bitwise. The inputs
    span many work items, so a thread-count-dependent reduction order would show."""
    script = tmp_path / "run.py"
    script.write_text(_THREADS_SCRIPT)
    results = {}
    for threads in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        path = tmp_path / f"out{threads}.pt"
        proc = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        reported = json.loads(proc.stdout.strip().splitlines()[-1])["openmp_threads"]
        assert reported == threads, f"OMP_NUM_THREADS={threads} did not reach the extension (it reports {reported})"
        results[threads] = torch.load(path)
    for name, one_thread in results[1].items():
        for threads in (2,):
            other = results[threads][name]
            assert torch.equal(_bits(one_thread), _bits(other)), f"{name}: 1 thread and {threads} threads differ"
