"""The ops as torch custom ops: torch.library.opcheck (schema, fake implementations, autograd
registration, AOT dispatch) on torch.ops.molkernels.*, torch.compile(fullgraph=True) through the
public functions, and molkernels.build_info()."""

import os
import subprocess
import sys

import pytest
import torch

import molkernels
from molkernels import _ops
from stacks import make_stack, randn

needs_c = pytest.mark.skipif(_ops._C is None, reason=f"the extension is not built: {_ops._C_ERROR}")


def _op_samples(dtype):
    """(op name, args) pairs covering tensor stacks, lists of odd blocks, views of a flat buffer and
    batched Grams."""
    K = 3
    flat = make_stack("flat", K, dtype, "cpu")
    mixed_a = make_stack("mixed", K, dtype, "cpu")
    mixed_b = make_stack("mixed", K, dtype, "cpu")
    A = randn(2, K, 5, dtype=torch.float64)
    gram = (A @ A.transpose(-1, -2)).to(dtype)
    return [
        ("gram", ([randn(K, 17, dtype=dtype)],)),
        ("gram", (flat,)),
        ("cross_gram", (mixed_a, mixed_b)),
        ("combine", ([randn(K, 17, dtype=dtype)], randn(K, dtype=dtype))),
        ("combine", (mixed_a, randn(K, dtype=torch.float64))),
        ("project_simplex", (randn(4, K, dtype=dtype),)),
        ("project_simplex", (randn(2, 3, 7, dtype=dtype),)),
        ("min_norm", (gram,)),
        ("min_norm", (gram[0],)),
    ]


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _params(prefix, dtypes=DTYPES):
    return [
        pytest.param(name, i, dtype, id=f"{prefix}{name}-{i}-{str(dtype).replace('torch.', '')}")
        for dtype in dtypes
        for i, (name, _) in enumerate(_op_samples(torch.float32))
    ]


@needs_c
@pytest.mark.parametrize("name,index,dtype", _params(""))
def test_opcheck_compiled_ops(name, index, dtype):
    sample_name, args = _op_samples(dtype)[index]
    assert sample_name == name
    torch.library.opcheck(getattr(torch.ops.molkernels, name), args)


def _triton_ops_or_skip():
    reason = _ops.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"backend 'triton' is unavailable: {reason}")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present, so the Triton ops run on CUDA tensors, not on these CPU samples")
    return torch.ops.molkernels


@pytest.mark.triton
# (two dtypes: opcheck tests the registration, and each call runs interpreted, ~0.5 s)
@pytest.mark.parametrize("name,index,dtype", _params("triton_", [torch.float32, torch.bfloat16]))
def test_opcheck_triton_ops(name, index, dtype):
    """The Triton kernels' custom ops molkernels::triton_* (on CPU tensors, under the interpreter)."""
    ops = _triton_ops_or_skip()
    sample_name, args = _op_samples(dtype)[index]
    assert sample_name == name
    torch.library.opcheck(getattr(ops, name), args)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fake_tensors_give_the_real_metadata(dtype):
    """Under FakeTensorMode each op returns what the kernel returns: shapes, dtypes (the Gram in
    fp32 for 16-bit input), one combine output per block."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name, args in _op_samples(dtype):
        real = getattr(torch.ops.molkernels, name)(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = [[mode.from_tensor(t) for t in a] if isinstance(a, list) else mode.from_tensor(a) for a in args]
            fake = getattr(torch.ops.molkernels, name)(*fake_args)
        reals = real if isinstance(real, (list, tuple)) else [real]
        fakes = fake if isinstance(fake, (list, tuple)) else [fake]
        assert len(reals) == len(fakes)
        for r, f in zip(reals, fakes):
            assert (r.shape, r.dtype, r.device) == (f.shape, f.dtype, f.device), name


def _step(grads, backend):
    G = molkernels.gram(grads, backend=backend)
    lam = molkernels.min_norm(G, backend=backend)
    return molkernels.combine(grads, lam.to(torch.float32), backend=backend), G, lam


@needs_c
@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_compile_fullgraph(backend):
    """An MGDA step (gram → min_norm → combine) compiles as one graph and matches eager."""
    torch._dynamo.reset()
    grads = make_stack("mixed", 4, torch.float32, "cpu")
    compiled = torch.compile(_step, fullgraph=True, dynamic=False)
    out, G, lam = compiled(grads, backend)
    out_eager, G_eager, lam_eager = _step(grads, backend)
    assert torch.equal(G, G_eager)
    assert torch.equal(lam, lam_eager)
    for a, b in zip(out, out_eager):
        assert torch.equal(a, b)


@pytest.mark.triton
def test_compile_fullgraph_triton():
    """The same through the Triton backend's custom ops, after an eager call has registered them."""
    _triton_ops_or_skip()
    torch._dynamo.reset()
    grads = make_stack("flat", 3, torch.float32, "cpu")
    out_eager, G_eager, lam_eager = _step(grads, "triton")
    compiled = torch.compile(_step, fullgraph=True, dynamic=False)
    out, G, lam = compiled(grads, "triton")
    assert torch.equal(G, G_eager) and torch.equal(lam, lam_eager)
    for a, b in zip(out, out_eager):
        assert torch.equal(a, b)


@needs_c
def test_compile_project_simplex_and_cross_gram():
    torch._dynamo.reset()

    def f(a, b, v):
        return molkernels.cross_gram(a, b), molkernels.project_simplex(v)

    a, b = randn(3, 40), randn(3, 40)
    v = randn(5, 3)
    C, x = torch.compile(f, fullgraph=True)(a, b, v)
    C_eager, x_eager = f(a, b, v)
    assert torch.equal(C, C_eager) and torch.equal(x, x_eager)


def test_build_info():
    info = molkernels.build_info()
    assert info["version"] == molkernels.__version__
    assert isinstance(info["cuda_compiled"], bool)
    assert info["backends"] == molkernels.backends()
    assert "reference" in info["backends"]
    assert ("cpu" in info["backends"]) == (_ops._C is not None)
    if _ops._C is not None:
        assert isinstance(info["openmp"], bool)
        assert info["openmp_threads"] >= 1
        if info["cuda_compiled"]:
            assert info["cuda_archs"]
    try:
        import triton
    except ImportError:
        assert info["triton_version"] is None
    else:
        assert info["triton_version"] == triton.__version__


def test_backends_are_the_available_ones():
    available = molkernels.backends()
    for backend in _ops.BACKENDS:
        assert (backend in available) == (_ops.unavailable_reason(backend) is None)
    assert ("cuda" in available) <= torch.cuda.is_available()


def test_import_torch_does_not_import_triton():
    """conftest.py sets TRITON_INTERPRET after importing torch; that works only while importing
    torch (and molkernels) leaves triton unimported."""
    code = "import sys, torch, molkernels; sys.exit('triton' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"triton was imported by `import torch, molkernels`\n{result.stderr}"
