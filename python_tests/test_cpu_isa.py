"""The CPU kernels' instruction-set variants: every vectorised op under every variant this machine
runs, against the float64 reference (K = 1, 3, 33, 64; d = 1, 17, 100003), bitwise determinism
within a variant (repeats and thread counts), MOLKERNELS_CPU_ISA, the error for a variant the CPU
lacks, and build_info()["cpu_isa"]."""

import os
import subprocess
import sys

import pytest
import torch

import molkernels
import tolerances as tol
from molkernels import _ops, reference
from stacks import check_combine, check_products, randn

pytestmark = pytest.mark.skipif(_ops._C is None, reason="the extension is not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPPORTED = tuple(molkernels.build_info().get("cpu_isas", ())) if _ops._C is not None else ()
ALL_X86 = ("baseline", "avx2", "avx512")
SHAPES = [(K, d) for K in (1, 3, 33, 64) for d in (1, 17, 100003)]
ops = torch.ops.molkernels


@pytest.fixture(params=SUPPORTED)
def isa(request):
    """Switches the CPU kernels to one variant for the test, and back after."""
    before = _ops._C._cpu_isa()
    _ops._C._set_cpu_isa(request.param)
    assert molkernels.build_info()["cpu_isa"] == request.param
    yield request.param
    _ops._C._set_cpu_isa(before)


SHAPE_IDS = [f"K{K}-d{d}" for K, d in SHAPES]


def _twice_equal(fn, what):
    """fn() twice and with one thread: bitwise the same outputs (a tuple of tensors)."""
    first = fn()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = fn()
    finally:
        torch.set_num_threads(threads)
    again = fn()
    for a, b, c in zip(first, again, single):
        assert torch.equal(a, b), f"{what}: two runs differ"
        assert torch.equal(a, c), f"{what}: 1 thread and {threads} threads differ"
    return first


@pytest.mark.parametrize("K,d", SHAPES, ids=SHAPE_IDS)
def test_gram_cross_gram_combine(isa, K, d):
    g = randn(K, d)
    h = randn(K, d)
    blocks = [randn(K, 5, 3), randn(K, d)]
    w = randn(K)
    G, C, B, c, cb = _twice_equal(lambda: (molkernels.gram(g, backend="cpu"),
                                           molkernels.cross_gram(g, h, backend="cpu"),
                                           molkernels.gram(blocks, backend="cpu"),
                                           molkernels.combine(g, w, backend="cpu"),
                                           *molkernels.combine(blocks, w, backend="cpu")[1:]), isa)
    check_products(G, g, None, tol.GRAM)
    assert torch.equal(G, G.T)
    check_products(C, g, h, tol.CROSS_GRAM if hasattr(tol, "CROSS_GRAM") else tol.GRAM)
    check_products(B, blocks, None, tol.GRAM)
    check_combine(c, g, w)
    check_combine(molkernels.combine(blocks, w, backend="cpu"), blocks, w)


@pytest.mark.parametrize("dtype", tol.DTYPES, ids=str)
@pytest.mark.parametrize("K,d", [(3, 100003), (33, 17)], ids=["K3-d100003", "K33-d17"])
def test_dtypes(isa, K, d, dtype):
    g = randn(K, d, dtype=dtype)
    w = randn(K)
    G, c = _twice_equal(lambda: (molkernels.gram(g, backend="cpu"), molkernels.combine(g, w, backend="cpu")), isa)
    check_products(G, g, None, tol.GRAM)
    check_combine(c, g, w)


@pytest.mark.parametrize("K,d", SHAPES, ids=SHAPE_IDS)
def test_moco_passes(isa, K, d):
    """The fused passes of MoCo's steps: tracking fused with the Gram, the joint Gram of [y; g], and
    the tracking fused with the combination, against reference.py's float64 versions."""
    g = [randn(K, d)]
    y0 = [randn(K, d)]
    out0 = randn(d)

    def run():
        y = [t.clone() for t in y0]
        G = ops.moco_track_gram(y, g, torch.tensor(0.3))
        J = ops.joint_gram(y, g)
        out = [out0.clone()]
        ops.moco_track_combine(y, g, torch.linspace(0.5, 1.5, K), torch.tensor(0.2), torch.linspace(-1, 1, K), out,
                               -0.1, True)
        return G, J, y[0], out[0]

    G, J, y_after, out = _twice_equal(run, isa)
    y_ref = [t.double() for t in y0]
    G_ref = reference.track_gram(y_ref, g, 0.3)
    J_ref = reference.joint_gram(y_ref, g)
    o_ref = [out0.double()]
    reference.track_combine(y_ref, g, torch.linspace(0.5, 1.5, K), 0.2, torch.linspace(-1, 1, K), o_ref, -0.1, True)
    scale = max(1.0, float(d))
    torch.testing.assert_close(G.double(), G_ref, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(J.double(), J_ref, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(y_after.double(), y_ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.double(), o_ref[0], rtol=1e-5, atol=1e-5 * K)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("C,D", [(1, 1), (3, 17), (33, 100003)])
def test_fl_kernels(isa, C, D, dtype):
    """Batched Adam and SGD against the reference (torch.optim's operations: Adam's moments and SGD
    bitwise where torch's CPU kernels fuse the same multiply-adds, params to 1e-6), the masked mean
    against float64, bitwise deterministic under every variant."""
    from molkernels import federated

    active = torch.arange(C) % 3 != 1
    p0, grads = randn(C, D, dtype=dtype), randn(C, D, dtype=dtype)
    sdt = tol.accum_dtype(dtype)
    weights = torch.rand(C, dtype=sdt) + 0.5

    def run():
        p, m, v, step = p0.clone(), torch.zeros(C, D, dtype=sdt), torch.zeros(C, D, dtype=sdt), torch.zeros(C, dtype=torch.int64)
        for _ in range(2):
            federated.batched_adam_step(p, grads, m, v, step, active, lr=1e-2, backend="cpu")
        q, buf = p0.clone(), torch.zeros(C, D, dtype=sdt)
        federated.batched_sgd_step(q, grads, active, lr=0.1, momentum=0.9, momentum_buffer=buf, weight_decay=0.01,
                                   backend="cpu")
        return p, m, v, step, q, buf, federated.masked_weighted_mean(p0, weights, active, backend="cpu")

    p, m, v, step, q, buf, mean = _twice_equal(run, isa)
    rp, rm, rv, rstep = p0.clone(), torch.zeros(C, D, dtype=sdt), torch.zeros(C, D, dtype=sdt), torch.zeros(C, dtype=torch.int64)
    for _ in range(2):
        reference.batched_adam_step(rp, grads, rm, rv, rstep, active, 1e-2, 0.9, 0.999, 1e-8, 0.0)
    rq, rbuf = p0.clone(), torch.zeros(C, D, dtype=sdt)
    reference.batched_sgd_step(rq, grads, rbuf, active, 0.1, 0.9, 0.01)
    assert torch.equal(step, rstep)
    exact = dtype != torch.bfloat16 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    if exact:
        assert torch.equal(m, rm) and torch.equal(v, rv), "Adam's moments differ from torch's"
        assert torch.equal(q, rq) and torch.equal(buf, rbuf), "SGD differs from torch's"
    rtol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    for got, want in ((p, rp), (m, rm), (v, rv), (q, rq), (buf, rbuf)):
        torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=rtol * float(want.abs().max()))
    expected = reference.masked_weighted_mean(p0, weights, active)
    torch.testing.assert_close(mean.double(), expected, rtol=4 * tol.UNIT_ROUNDOFF[dtype], atol=1e-6)


def test_variants_listed():
    info = molkernels.build_info()
    assert info["cpu_isa"] in info["cpu_isas"]
    assert info["cpu_isas"][0] in ("baseline", "neon")
    if os.environ.get("MOLKERNELS_CPU_ISA", "auto") == "auto":
        assert info["cpu_isa"] == info["cpu_isas"][-1], "the fastest supported variant is the default"
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        flags = open("/proc/cpuinfo").read().split("\nflags", 1)[1].split("\n", 1)[0].split()
        has_avx2 = "avx2" in flags and "fma" in flags
        has_avx512 = has_avx2 and all(f in flags for f in ("avx512f", "avx512bw", "avx512vl"))
        assert ("avx2" in info["cpu_isas"]) == has_avx2
        assert ("avx512" in info["cpu_isas"]) == has_avx512


def _python(code, isa):
    env = dict(os.environ, MOLKERNELS_CPU_ISA=isa, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ALL_X86)
def test_environment_variable(name):
    """MOLKERNELS_CPU_ISA forces a variant; one the CPU lacks fails at import, naming the features."""
    run = _python("import molkernels; print(molkernels.build_info()['cpu_isa'])", name)
    if name in SUPPORTED:
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == name
    else:
        assert run.returncode != 0
        missing = {"avx2": "avx2", "avx512": "avx512f"}[name]
        assert f"MOLKERNELS_CPU_ISA={name}: this CPU lacks" in run.stderr and missing in run.stderr, run.stderr


def test_unknown_and_missing_variants():
    before = _ops._C._cpu_isa()
    with pytest.raises(ValueError, match="unknown CPU variant"):
        _ops._C._set_cpu_isa("sse9")
    for name in ALL_X86:
        if name not in SUPPORTED and os.uname().machine == "x86_64":
            with pytest.raises(ValueError, match="this CPU lacks .*" + {"avx2": "avx2", "avx512": "avx512f"}[name]):
                _ops._C._set_cpu_isa(name)
    assert _ops._C._cpu_isa() == before, "a failed switch leaves the variant unchanged"
    _ops._C._set_cpu_isa("auto")
    assert _ops._C._cpu_isa() == SUPPORTED[-1]
    _ops._C._set_cpu_isa(before)
    run = _python("import molkernels", "sse9")
    assert run.returncode != 0 and "MOLKERNELS_CPU_ISA=sse9: unknown CPU variant" in run.stderr, run.stderr


def test_baseline_runs_the_cpu_suite_subset():
    """Under MOLKERNELS_CPU_ISA=baseline a fresh process imports and computes correctly (the portable
    build's promise: the default flags import and run on any x86-64)."""
    code = ("import torch, molkernels; from molkernels import reference; g = torch.randn(8, 100003); "
            "G = molkernels.gram(g, backend='cpu'); assert molkernels.build_info()['cpu_isa'] == 'baseline'; "
            "assert (G.double() - reference.gram(g)).abs().max() < 1e-3 * g.norm(dim=1).max() ** 2; print('ok')")
    run = _python(code, "baseline")
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
