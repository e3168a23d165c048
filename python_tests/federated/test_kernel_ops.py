"""The federated kernels as torch custom ops: torch.library.opcheck (schema with its mutation
annotations, fake implementations, autograd registration, AOT dispatch) on the compiled ops
molkernels::fl_* and on the Triton ones molkernels::triton_fl_* (under the interpreter)."""

import pytest
import torch

from molkernels import _ops
from stacks import randn

needs_c = pytest.mark.skipif(_ops._C is None, reason=f"the extension is not built: {_ops._C_ERROR}")


def _samples(dtype):
    """(op name, args) with mixed active masks; every mutated tensor is an argument the schema marks."""
    C, D = 3, 17
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    active = torch.tensor([True, False, True])
    adam_state = lambda: (randn(C, D, dtype=acc, scale=0.1), randn(C, D, dtype=acc, scale=0.1) ** 2)  # noqa: E731
    return [
        ("fl_adam_step", (randn(C, D, dtype=dtype), randn(C, D, dtype=dtype), *adam_state(),
                          torch.tensor([0, 4, 9]), active, 1e-3, 0.9, 0.999, 1e-8, 0.01)),
        ("fl_adam_step", (randn(C, 2, 3, dtype=dtype), randn(C, 2, 3, dtype=dtype),
                          torch.zeros(C, 2, 3, dtype=acc), torch.zeros(C, 2, 3, dtype=acc),
                          torch.zeros(C, dtype=torch.int64), active, 1e-2, 0.3, 0.99, 1e-6, 0.0)),
        ("fl_sgd_step", (randn(C, D, dtype=dtype), randn(C, D, dtype=dtype), randn(C, D, dtype=acc), active,
                         0.1, 0.9, 0.01)),
        ("fl_sgd_step", (randn(C, D, dtype=dtype), randn(C, D, dtype=dtype), None, active, 0.1, 0.0, 0.0)),
        ("fl_weighted_mean", (randn(C, D, dtype=dtype), torch.rand(C, dtype=acc), active)),
    ]


def _ids(prefix, dtypes):
    return [pytest.param(i, dtype, id=f"{prefix}{name}-{i}-{str(dtype).replace('torch.', '')}")
            for dtype in dtypes for i, (name, _) in enumerate(_samples(torch.float32))]


@needs_c
@pytest.mark.parametrize("index,dtype", _ids("", [torch.float32, torch.float64, torch.bfloat16]))
def test_opcheck_compiled_ops(index, dtype):
    name, args = _samples(dtype)[index]
    torch.library.opcheck(getattr(torch.ops.molkernels, name), args)


@pytest.mark.triton
@pytest.mark.parametrize("index,dtype", _ids("triton_", [torch.float32]))
def test_opcheck_triton_ops(index, dtype):
    reason = _ops.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"backend 'triton' is unavailable: {reason}")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present, so the Triton ops run on CUDA tensors, not on these CPU samples")
    name, args = _samples(dtype)[index]
    torch.library.opcheck(getattr(torch.ops.molkernels, f"triton_{name}"), args)


@needs_c
def test_compiled_fullgraph_round():
    """A local Adam step and the server mean compile as one graph and match eager bit for bit."""
    from molkernels.federated import batched_adam_step, masked_weighted_mean

    def round_(params, grads, exp_avg, exp_avg_sq, step, active, weights):
        batched_adam_step(params, grads, exp_avg, exp_avg_sq, step, active, lr=1e-2, backend="cpu")
        return masked_weighted_mean(params, weights, active, backend="cpu")

    torch._dynamo.reset()
    C, D = 4, 33
    inputs = [randn(C, D), randn(C, D), torch.zeros(C, D), torch.zeros(C, D), torch.tensor([0, 3, 0, 7]),
              torch.tensor([True, True, False, True]), torch.rand(C)]
    eager_inputs = [t.clone() for t in inputs]
    compiled = torch.compile(round_, fullgraph=True, dynamic=False)(*inputs)
    eager = round_(*eager_inputs)
    assert torch.equal(compiled, eager)
    for a, b in zip(inputs, eager_inputs):
        assert torch.equal(a, b)
