"""Op registration and backend choice.

The compiled ops `torch.ops.molkernels.*` (CPU and CUDA kernels, schemas in csrc/ops.cpp) get
their fake implementations here, so torch.compile traces through them. The Triton kernels are
registered as custom ops `molkernels::triton_*` with the same fake implementations. Both get the
same autograd behaviour: backward formulas for gram, cross_gram and combine, a backward that raises
for min_norm and project_simplex, and an error for the internal ops when a tensor requires grad.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import List

import torch

from . import reference

BACKENDS = ("reference", "cpu", "triton", "cuda")

try:
    from . import _C  # noqa: F401  (registers torch.ops.molkernels.*)

    _C_ERROR = None
except ImportError as error:  # a source tree that was never built
    _C = None
    _C_ERROR = error

if _C is not None:
    # The CPU kernels' variant (MOLKERNELS_CPU_ISA=baseline|avx2|avx512, else the CPU's best): a
    # variant this CPU lacks is an error here, at import, naming the missing features.
    try:
        _C._cpu_isa()
    except ValueError as error:
        raise RuntimeError(str(error)) from None


def _fake_products(a: List[torch.Tensor], *rest) -> torch.Tensor:
    K = a[0].shape[0]
    dtype = torch.float64 if a[0].dtype == torch.float64 else torch.float32
    return a[0].new_empty((K, K), dtype=dtype)


def _fake_combine(g: List[torch.Tensor], weights: torch.Tensor) -> List[torch.Tensor]:
    return [b.new_empty(b.shape[1:]) for b in g]


def _fake_project_simplex(v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(v, memory_format=torch.contiguous_format)


def _fake_min_norm(gram: torch.Tensor) -> torch.Tensor:
    return gram.new_empty(gram.shape[:-1])


def _fake_joint_gram(y: List[torch.Tensor], g: List[torch.Tensor]) -> torch.Tensor:
    K = g[0].shape[0]
    dtype = torch.float64 if g[0].dtype == torch.float64 else torch.float32
    return g[0].new_empty((2 * K, 2 * K), dtype=dtype)


def _fake_track_gram(y: List[torch.Tensor], g: List[torch.Tensor], beta: torch.Tensor) -> torch.Tensor:
    return _fake_products(g)


def _fake_in_place(*args) -> None:
    return None


def _fake_fl_weighted_mean(x: torch.Tensor, weights: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[1:])


_FAKES = {
    "gram": _fake_products,
    "cross_gram": _fake_products,
    "combine": _fake_combine,
    "project_simplex": _fake_project_simplex,
    "min_norm": _fake_min_norm,
    "combine_into": _fake_in_place,
    "moco_track_gram": _fake_track_gram,
    "joint_gram": _fake_joint_gram,
    "moco_track_combine": _fake_in_place,
    "fl_adam_step": _fake_in_place,
    "fl_sgd_step": _fake_in_place,
    "fl_weighted_mean": _fake_fl_weighted_mean,
}

if _C is not None:
    for _name, _fake in _FAKES.items():
        torch.library.register_fake(f"molkernels::{_name}")(_fake)


@functools.lru_cache(maxsize=None)
def _triton_status():
    """(module, None) when the Triton kernels can run here, else (None, reason)."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return None, f"triton is not installed ({error})"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return None, "no CUDA device, and TRITON_INTERPRET=1 (Triton's CPU interpreter) is not set"
    from . import triton as triton_kernels

    return triton_kernels, None


def unavailable_reason(backend: str) -> str | None:
    """None when `backend` can run here, else why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        return None if _C is not None else f"the extension molkernels._C is not built ({_C_ERROR})"
    if backend == "cuda":
        if _C is None:
            return f"the extension molkernels._C is not built ({_C_ERROR})"
        if not _C.build_info()["cuda_compiled"]:
            return "the extension was built without CUDA kernels (no nvcc or a CPU-only torch at build time)"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        return None
    if backend == "triton":
        return _triton_status()[1]
    return f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)} or 'auto'"


def backends() -> List[str]:
    """The backends that can run here."""
    return [b for b in BACKENDS if unavailable_reason(b) is None]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend an op runs on: `auto` (or MOLKERNELS_BACKEND) picks cuda for CUDA tensors
    (Triton when the CUDA kernels are missing) and cpu for CPU tensors."""
    if backend == "auto":
        backend = os.environ.get("MOLKERNELS_BACKEND", "auto")
    if backend == "auto":
        if device.type == "cuda":
            for candidate in ("cuda", "triton"):
                if unavailable_reason(candidate) is None:
                    return candidate
            return "reference"
        return "cpu" if unavailable_reason("cpu") is None else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown {backend!r}; expected one of {', '.join(BACKENDS)} or 'auto'")
    reason = unavailable_reason(backend)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is not available: {reason}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' runs on CPU tensors; the inputs are on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' runs on CUDA tensors; the inputs are on {device}")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); the inputs are on {device}")
    return backend


# The schemas of the Triton custom ops `molkernels::triton_<op>`, the same as the compiled ops'.
_TRITON_SCHEMAS = {
    "gram": "(Tensor[] g) -> Tensor",
    "cross_gram": "(Tensor[] a, Tensor[] b) -> Tensor",
    "combine": "(Tensor[] g, Tensor weights) -> Tensor[]",
    "project_simplex": "(Tensor v) -> Tensor",
    "min_norm": "(Tensor gram) -> Tensor",
    "combine_into": "(Tensor[] g, Tensor weights, Tensor(a!)[] out, float alpha, bool accumulate) -> ()",
    "moco_track_gram": "(Tensor(a!)[] y, Tensor[] g, Tensor beta) -> Tensor",
    "joint_gram": "(Tensor[] y, Tensor[] g) -> Tensor",
    "moco_track_combine": "(Tensor(a!)[] y, Tensor[] g, Tensor scale, Tensor beta, Tensor weights, "
                          "Tensor(b!)[] out, float alpha, bool accumulate) -> ()",
    "fl_adam_step": "(Tensor(a!) params, Tensor grads, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) step, "
                    "Tensor active, float lr, float beta1, float beta2, float eps, float weight_decay) -> ()",
    "fl_sgd_step": "(Tensor(a!) params, Tensor grads, Tensor(b!)? momentum_buffer, Tensor active, float lr, "
                   "float momentum, float weight_decay) -> ()",
    "fl_weighted_mean": "(Tensor x, Tensor weights, Tensor active) -> Tensor",
}


def _first_tensor_device(args) -> torch.device:
    """The device of the first tensor among the arguments (tensors or lists of tensors); every
    schema above starts with a tensor or a non-empty tensor list, and the ops check that all
    tensors share that device."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
        if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor):
            return arg[0].device
    raise ValueError("a Triton op needs at least one tensor argument")


def _launch_device_guard(device: torch.device):
    """Makes the tensors' GPU current for a Triton launch: Triton compiles for, and launches on, the
    current device and its stream, not the device of the pointers it is given, so tensors on cuda:1
    while cuda:0 is current would fault or run on the wrong GPU (the C++ ops take a CUDAGuard). CPU
    tensors (the interpreter) need no guard."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _triton_kernel(name: str):
    """The implementation of `molkernels::triton_<name>`: imports triton on its first call, so
    that importing molkernels does not, and torch.compile sees only the registered op."""

    def run(*args):
        kernels, reason = _triton_status()
        if kernels is None:
            raise RuntimeError(f"backend='triton' is not available: {reason}")
        with _launch_device_guard(_first_tensor_device(args)):
            return getattr(kernels, name)(*args)

    return run


for _name, _schema in _TRITON_SCHEMAS.items():
    _qualname = f"molkernels::triton_{_name}"
    torch.library.define(_qualname, _schema)
    torch.library.impl(_qualname, ("CPU", "CUDA"))(_triton_kernel(_name))
    torch.library.register_fake(_qualname)(_FAKES[_name])


# --------------------------------------------------------------------------------------------------
# Autograd
#
# gram, cross_gram and combine have backward formulas (torch.library.register_autograd, for the
# compiled and the Triton ops alike). They are plain torch products, not molkernels ops: one GEMM
# (GEMV for ∂w) per block reads each block once, where the combine-shaped form (K combines with the
# rows of a K×K matrix) would read the stack K times; and torch's products are themselves
# differentiable and traceable, so double backward and torch.compile go through them. They compute
# in the accumulation dtype (float32, float64 for float64 data), as the forward kernels do, and
# return each gradient in its input's dtype (bf16 for a bf16 block whose Gram is float32).


def _rows(block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """block [K, *shape] as a [K, n] matrix in dtype."""
    return block.reshape(block.shape[0], -1).to(dtype)


def _left_multiply(matrix: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """matrix [K, K] @ block [K, *shape], computed in matrix's dtype, shaped and typed like block."""
    return (matrix @ _rows(block, matrix.dtype)).reshape(block.shape).to(block.dtype)


def _setup_gram(ctx, inputs, output):
    (g,) = inputs
    ctx.save_for_backward(*g)


def _gram_backward(ctx, grad):
    # G = Σ_j B_j B_jᵀ, so ∂L/∂B_j = (Ḡ + Ḡᵀ) B_j.
    (needs_g,) = ctx.needs_input_grad
    symmetric = grad + grad.T
    return [_left_multiply(symmetric, b) if need else None for b, need in zip(ctx.saved_tensors, needs_g)],


def _setup_cross_gram(ctx, inputs, output):
    a, b = inputs
    ctx.num_blocks = len(a)
    ctx.save_for_backward(*a, *b)


def _cross_gram_backward(ctx, grad):
    # C = Σ_j A_j B_jᵀ, so ∂L/∂A_j = C̄ B_j and ∂L/∂B_j = C̄ᵀ A_j.
    needs_a, needs_b = ctx.needs_input_grad
    a, b = ctx.saved_tensors[:ctx.num_blocks], ctx.saved_tensors[ctx.num_blocks:]
    return ([_left_multiply(grad, y) if need else None for y, need in zip(b, needs_a)],
            [_left_multiply(grad.T, x) if need else None for x, need in zip(a, needs_b)])


def _setup_combine(ctx, inputs, output):
    g, weights = inputs
    ctx.save_for_backward(weights, *g)


def _combine_backward(ctx, grads):
    # c_j = Σ_k w_k g_{k,j}, so ∂L/∂g_{k,j} = w_k c̄_j and ∂L/∂w_k = Σ_j <g_{k,j}, c̄_j>.
    needs_g, needs_w = ctx.needs_input_grad
    weights, *blocks = ctx.saved_tensors
    dtype = _out_dtype(blocks[0].dtype)
    w = weights.to(dtype)
    grad_g = [torch.outer(w, c.reshape(-1).to(dtype)).reshape(b.shape).to(b.dtype) if need else None
              for b, c, need in zip(blocks, grads, needs_g)]
    grad_w = None
    if needs_w:
        grad_w = sum(_rows(b, dtype) @ c.reshape(-1).to(dtype) for b, c in zip(blocks, grads)).to(weights.dtype)
    return grad_g, grad_w


#: the ops without gradients, and the name of their input
_NOT_DIFFERENTIABLE = {"project_simplex": "v", "min_norm": "gram"}


def _not_differentiable_message(name: str) -> str:
    argument = _NOT_DIFFERENTIABLE[name]
    return (f"{name} is not differentiable: detach its input ({name}({argument}.detach())) or call it under "
            f"torch.no_grad(); molkernels computes no gradient of {name}")


def _raise_not_differentiable(name: str):
    """A backward formula that raises: an error on backward, where returning no gradient would
    silently cut the graph."""

    def backward(ctx, grad):
        raise RuntimeError(_not_differentiable_message(name))

    return backward


class _NotDifferentiableReference(torch.autograd.Function):
    """A reference implementation of project_simplex or min_norm run without recording its graph
    (min_norm's would be thousands of FISTA iterations), with the kernels' raising backward."""

    @staticmethod
    def forward(ctx, name, compute, x):
        ctx.name = name
        return compute(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(_not_differentiable_message(ctx.name))


#: the internal ops: the steps' fused passes and the federated kernels, which mutate their
#: arguments or serve steps that take no part in autograd. They refuse tensors that require grad.
_INTERNAL_OPS = ("combine_into", "moco_track_gram", "joint_gram", "moco_track_combine", "fl_adam_step", "fl_sgd_step",
                 "fl_weighted_mean")


def _overload(name: str):
    """The op torch.ops.molkernels.<name>."""
    return getattr(torch.ops.molkernels, name).default


def _argument_names(op) -> List[str]:
    return [argument.name for argument in op._schema.arguments]


def _check_no_grad(name: str, argument_names: List[str], args) -> None:
    """RuntimeError naming internal op `name` and the argument, when grad mode is on and a tensor
    argument requires grad: the op records no graph, so its results would silently lack gradients
    (and writing into a tensor that requires grad would leave its graph stale)."""
    if not torch.is_grad_enabled():
        return
    for argument, value in zip(argument_names, args):
        labelled = [(f"{argument}[{j}]", t) for j, t in enumerate(value)] if isinstance(value, (list, tuple)) \
            else [(argument, value)]
        for label, tensor in labelled:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                raise RuntimeError(f"{name}: {label} requires grad, and {name} (an internal pass of the steps or "
                                   f"the federated kernels) records no autograd graph: pass detached tensors or "
                                   f"call it under torch.no_grad()")


def _refusing_grad(name: str, argument_names: List[str], run):
    """run, after _check_no_grad."""

    def checked(*args):
        _check_no_grad(name, argument_names, args)
        return run(*args)

    return checked


def _redispatch_below_autograd(op):
    """The op's kernel below the Autograd key: how torch registers a non-differentiable op at the
    Autograd key (see torch.testing._internal.optests.autograd_registration)."""

    def run(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return run


_BACKWARD_FORMULAS = {
    "gram": (_gram_backward, _setup_gram),
    "cross_gram": (_cross_gram_backward, _setup_cross_gram),
    "combine": (_combine_backward, _setup_combine),
    **{name: (_raise_not_differentiable(name), None) for name in _NOT_DIFFERENTIABLE},
}


def _register_autograd(prefix: str) -> None:
    """The autograd behaviour of molkernels::<prefix><op> for every op."""
    for name, (backward, setup_context) in _BACKWARD_FORMULAS.items():
        torch.library.register_autograd(f"molkernels::{prefix}{name}", backward, setup_context=setup_context)
    for name in _INTERNAL_OPS:
        op = _overload(f"{prefix}{name}")
        torch.library.impl(f"molkernels::{prefix}{name}", "Autograd")(
            _refusing_grad(name, _argument_names(op), _redispatch_below_autograd(op)))


if _C is not None:
    _register_autograd("")
_register_autograd("triton_")


def _reference_op(name: str):
    """The reference implementations, returning the dtypes the kernels return. Their plain torch ops
    give gram, cross_gram and combine the same gradients as the kernels' formulas; min_norm and
    project_simplex raise on backward and the internal ops refuse inputs that require grad, as the
    kernels do."""

    def gram(g):
        # Upcast each block once: autograd then sums the gradients of both factors of B Bᵀ in
        # float64 and rounds to the block's dtype once, as the kernels' formula does.
        return reference.gram([b.to(torch.float64) for b in g]).to(_out_dtype(g[0].dtype))

    def cross_gram(a, b):
        return reference.cross_gram(a, b).to(_out_dtype(a[0].dtype))

    def combine(g, weights):
        return [x.to(b.dtype) for x, b in zip(reference.combine(g, weights), g)]

    def project_simplex(v):
        return _NotDifferentiableReference.apply("project_simplex", lambda x: reference.project_simplex(x).to(x.dtype), v)

    def min_norm(gram_matrix):
        return _NotDifferentiableReference.apply("min_norm", lambda x: reference.min_norm(x).to(x.dtype), gram_matrix)

    def moco_track_gram(y, g, beta):
        return reference.track_gram(y, g, beta).to(_out_dtype(g[0].dtype))

    def joint_gram(y, g):
        return reference.joint_gram(y, g).to(_out_dtype(g[0].dtype))

    def fl_weighted_mean(x, weights, active):
        return reference.masked_weighted_mean(x, weights, active).to(x.dtype)

    implementations = {**locals(), "combine_into": reference.combine_into, "moco_track_combine": reference.track_combine,
                       "fl_adam_step": reference.batched_adam_step, "fl_sgd_step": reference.batched_sgd_step}
    if name in _INTERNAL_OPS:
        # the Triton ops are always defined, with the compiled ops' schemas
        return _refusing_grad(name, _argument_names(_overload(f"triton_{name}")), implementations[name])
    return implementations[name]


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def op(name: str, backend: str):
    """The callable that runs op `name` on a resolved backend."""
    if backend == "reference":
        return _reference_op(name)
    if backend == "triton":
        return getattr(torch.ops.molkernels, f"triton_{name}")
    return getattr(torch.ops.molkernels, name)
