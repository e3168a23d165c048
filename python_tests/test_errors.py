"""Bad arguments raise ValueError/TypeError naming the argument, before any kernel runs.

Every test runs with the kernels replaced by a function that fails the test, so an error raised
by a kernel (or a kernel that runs at all) cannot make these pass.
"""

import re

import pytest
import torch

import molkernels
from molkernels import _ops


@pytest.fixture(autouse=True)
def no_kernel(monkeypatch):
    def forbidden(name, backend):
        raise AssertionError(f"kernel {name!r} on {backend!r} was reached with a bad argument")

    monkeypatch.setattr(_ops, "op", forbidden)


def x(*shape, dtype=torch.float32, device="cpu"):
    return torch.ones(*shape, dtype=dtype, device=device)


STACK_OPS = {
    "gram": lambda g: molkernels.gram(g),
    "cross_gram_a": lambda g: molkernels.cross_gram(g, x(3, 4)),
    "cross_gram_b": lambda g: molkernels.cross_gram(x(3, 4), g),
    "combine": lambda g: molkernels.combine(g, x(3)),
}
# the argument name each op reports for its stack
STACK_NAME = {"gram": "g", "cross_gram_a": "a", "cross_gram_b": "b", "combine": "g"}


@pytest.mark.parametrize("op", STACK_OPS)
def test_empty_list(op):
    with pytest.raises(ValueError, match=rf"^{STACK_NAME[op]}: .*empty list"):
        STACK_OPS[op]([])


@pytest.mark.parametrize("op", STACK_OPS)
def test_not_a_stack(op):
    with pytest.raises(TypeError, match=rf"^{STACK_NAME[op]}: expected a tensor or a list"):
        STACK_OPS[op](3.0)
    with pytest.raises(TypeError, match=rf"^{STACK_NAME[op]}\[1\]: expected a torch.Tensor"):
        STACK_OPS[op]([x(3, 4), [1.0, 2.0]])


@pytest.mark.parametrize("op", ["gram", "combine"])
def test_k_mismatch_between_blocks(op):
    with pytest.raises(ValueError, match=r"^g\[2\]: K = 2 differs from g\[0\]'s K = 3"):
        STACK_OPS[op]([x(3, 4), x(3, 2, 2), x(2, 5)])


@pytest.mark.parametrize("op", STACK_OPS)
def test_zero_objectives_or_scalar_block(op):
    name = STACK_NAME[op]
    with pytest.raises(ValueError, match=rf"^{name}: expected a leading objective dimension K >= 1"):
        STACK_OPS[op](x(0, 4))
    with pytest.raises(ValueError, match=rf"^{name}\[1\]: expected a leading objective dimension"):
        STACK_OPS[op]([x(3, 4), torch.tensor(1.0)])


@pytest.mark.parametrize("op", STACK_OPS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64], ids=str)
def test_non_float_dtype(op, dtype):
    name = STACK_NAME[op]
    with pytest.raises(TypeError, match=rf"^{name}: expected float16, bfloat16, float32 or float64, got {re.escape(str(dtype))}"):
        STACK_OPS[op](torch.zeros(3, 4, dtype=dtype))
    with pytest.raises(TypeError, match=rf"^{name}\[1\]: expected float16"):
        STACK_OPS[op]([x(3, 4), torch.zeros(3, 4, dtype=dtype)])


@pytest.mark.parametrize("op", ["gram", "combine"])
def test_mixed_dtypes(op):
    with pytest.raises(TypeError, match=r"^g\[1\]: dtype torch.float64 differs from g\[0\]'s torch.float32"):
        STACK_OPS[op]([x(3, 4), x(3, 4, dtype=torch.float64)])


@pytest.mark.parametrize("op", ["gram", "combine"])
def test_mixed_devices(op):
    """Blocks on two devices: the meta device stands in for a second device."""
    with pytest.raises(ValueError, match=r"^g\[1\]: on meta, g\[0\] on cpu"):
        STACK_OPS[op]([x(3, 4), x(3, 4, device="meta")])


def test_combine_weights():
    g = x(3, 4)
    with pytest.raises(ValueError, match=r"^weights: expected shape \(3,\)"):
        molkernels.combine(g, x(4))
    with pytest.raises(ValueError, match=r"^weights: expected shape \(3,\)"):
        molkernels.combine(g, x(3, 1))
    with pytest.raises(ValueError, match=r"^weights: expected shape \(3,\)"):
        molkernels.combine(g, torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"^weights: expected float16"):
        molkernels.combine(g, torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"^weights: expected a torch.Tensor"):
        molkernels.combine(g, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"^weights: on meta"):
        molkernels.combine(g, x(3, device="meta"))


def test_cross_gram_structure():
    with pytest.raises(ValueError, match=r"^b: has 1 blocks, a has 2"):
        molkernels.cross_gram([x(3, 4), x(3, 5)], [x(3, 4)])
    with pytest.raises(ValueError, match=r"^b\[1\]: shape \(3, 6\) differs from a\[1\]'s \(3, 5\)"):
        molkernels.cross_gram([x(3, 4), x(3, 5)], [x(3, 4), x(3, 6)])
    with pytest.raises(ValueError, match=r"^b\[0\]: shape \(3, 5, 1\) differs from a\[0\]'s \(3, 5\)"):
        molkernels.cross_gram([x(3, 5)], [x(3, 5, 1)])
    with pytest.raises(ValueError, match=r"^b\[0\]: shape \(2, 4\) differs"):
        molkernels.cross_gram(x(3, 4), x(2, 4))
    with pytest.raises(TypeError, match=r"^b\[0\]: dtype torch.float16 differs"):
        molkernels.cross_gram(x(3, 4), x(3, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"^b\[0\]: on meta"):
        molkernels.cross_gram(x(3, 4), x(3, 4, device="meta"))


def test_gram_argument_of_min_norm():
    with pytest.raises(ValueError, match=r"^gram: expected a square \[\.\.\., K, K\] tensor"):
        molkernels.min_norm(x(3, 4))
    with pytest.raises(ValueError, match=r"^gram: expected a square"):
        molkernels.min_norm(x(2, 3, 4))
    with pytest.raises(ValueError, match=r"^gram: expected a square .* got shape \(3,\)"):
        molkernels.min_norm(x(3))
    with pytest.raises(ValueError, match=r"^gram: expected a square"):
        molkernels.min_norm(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"^gram: .*K >= 1"):
        molkernels.min_norm(x(0, 0))
    with pytest.raises(TypeError, match=r"^gram: expected float16"):
        molkernels.min_norm(torch.eye(3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"^gram: expected a torch.Tensor"):
        molkernels.min_norm([[1.0, 0.0], [0.0, 1.0]])


def test_v_argument_of_project_simplex():
    with pytest.raises(ValueError, match=r"^v: expected a \[\.\.\., K\] tensor with K >= 1"):
        molkernels.project_simplex(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"^v: expected .* K >= 1"):
        molkernels.project_simplex(x(3, 0))
    with pytest.raises(TypeError, match=r"^v: expected float16"):
        molkernels.project_simplex(torch.ones(3, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"^v: expected a torch.Tensor"):
        molkernels.project_simplex([0.5, 0.5])


ALL_OPS = {
    "gram": lambda backend: molkernels.gram(x(3, 4), backend=backend),
    "cross_gram": lambda backend: molkernels.cross_gram(x(3, 4), x(3, 4), backend=backend),
    "combine": lambda backend: molkernels.combine(x(3, 4), x(3), backend=backend),
    "project_simplex": lambda backend: molkernels.project_simplex(x(3, 4), backend=backend),
    "min_norm": lambda backend: molkernels.min_norm(torch.eye(3), backend=backend),
}


def test_unknown_backend():
    """An unknown backend name is a bad argument: ValueError naming `backend` and the choices
    (DESIGN.md: bad arguments raise ValueError/TypeError naming the argument), for every op."""
    for op, call in ALL_OPS.items():
        with pytest.raises(ValueError, match=r"backend.*'fastest'.*reference, cpu, triton, cuda"):
            call("fastest")


@pytest.mark.parametrize("op", ALL_OPS)
def test_cuda_backend_on_cpu_tensors(op):
    """backend='cuda' with CPU inputs: where the CUDA backend runs, a ValueError about the device;
    where it cannot run, the error says why it is unavailable."""
    reason = _ops.unavailable_reason("cuda")
    if reason is None:
        with pytest.raises(ValueError, match=r"backend='cuda' runs on CUDA tensors; the inputs are on cpu"):
            ALL_OPS[op]("cuda")
    else:
        with pytest.raises(RuntimeError, match=r"backend='cuda' is not available: " + re.escape(reason)):
            ALL_OPS[op]("cuda")


@pytest.mark.parametrize("op", ALL_OPS)
def test_cpu_backend_on_other_device(op):
    with pytest.raises(ValueError, match=r"backend='cpu' runs on CPU tensors; the inputs are on meta"):
        if op == "min_norm":
            molkernels.min_norm(x(3, 3, device="meta"), backend="cpu")
        elif op == "project_simplex":
            molkernels.project_simplex(x(3, device="meta"), backend="cpu")
        elif op == "combine":
            molkernels.combine(x(3, 4, device="meta"), x(3, device="meta"), backend="cpu")
        elif op == "cross_gram":
            molkernels.cross_gram(x(3, 4, device="meta"), x(3, 4, device="meta"), backend="cpu")
        else:
            molkernels.gram(x(3, 4, device="meta"), backend="cpu")


UNAVAILABLE = [b for b in _ops.BACKENDS if _ops.unavailable_reason(b) is not None]


@pytest.mark.skipif(not UNAVAILABLE, reason="every backend is available on this machine")
@pytest.mark.parametrize("op", ALL_OPS)
def test_unavailable_backend_says_why(op):
    backend = UNAVAILABLE[0]
    with pytest.raises(RuntimeError, match=rf"backend='{backend}' is not available: " + re.escape(_ops.unavailable_reason(backend))):
        ALL_OPS[op](backend)


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    if _ops.unavailable_reason("triton") is not None:
        pytest.skip(f"triton is unavailable here: {_ops.unavailable_reason('triton')}")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' runs on CUDA tensors \(or CPU tensors under TRITON_INTERPRET=1\)"):
        molkernels.gram(x(3, 4), backend="triton")


def test_env_backend_is_checked(monkeypatch):
    """MOLKERNELS_BACKEND sets the default and is checked like the argument."""
    monkeypatch.setenv("MOLKERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"'fastest'"):
        molkernels.gram(x(3, 4))


# The compiled ops check their arguments too (TORCH_CHECK_VALUE → ValueError), for callers of
# torch.ops.molkernels.* that bypass the Python layer.
needs_c = pytest.mark.skipif(_ops._C is None, reason=f"the extension is not built: {_ops._C_ERROR}")


@needs_c
def test_compiled_ops_check_arguments():
    ops = torch.ops.molkernels
    # (an empty list cannot reach the kernel: the dispatcher has no tensor to pick a device from)
    with pytest.raises(ValueError, match=r"g\[1\]: expected leading dimension K = 3"):
        ops.gram([x(3, 4), x(2, 4)])
    with pytest.raises(ValueError, match=r"g\[1\]: dtype"):
        ops.gram([x(3, 4), x(3, 4, dtype=torch.float64)])
    with pytest.raises(TypeError, match=r"g: expected a float16, bfloat16, float32 or float64 tensor"):
        ops.gram([torch.ones(3, 4, dtype=torch.int32)])
    with pytest.raises(ValueError, match=r"b: has 1 blocks, a has 2"):
        ops.cross_gram([x(3, 4), x(3, 4)], [x(3, 4)])
    with pytest.raises(ValueError, match=r"b\[0\]: shape"):
        ops.cross_gram([x(3, 4)], [x(3, 5)])
    with pytest.raises(ValueError, match=r"weights: expected shape \[3\]"):
        ops.combine([x(3, 4)], x(4))
    with pytest.raises(ValueError, match=r"gram: expected a square"):
        ops.min_norm(x(3, 4))
    with pytest.raises(ValueError, match=r"v: expected a \[\.\.\., K\] tensor with K >= 1"):
        ops.project_simplex(x(3, 0))
