"""molkernels: fused kernels for multi-objective learning.

    G = molkernels.gram(grads)          # [K, K] Gram of K per-objective gradients, one pass
    lam = molkernels.min_norm(G)        # MGDA weights on the simplex, on the device
    d = molkernels.combine(grads, lam)  # Σ_k λ_k g_k, one more pass

Multi-objective steps in two passes: moco_step (with MoCoState), modo_step (MoDoState), mgda_step;
across ranks with process_group= (molkernels.distributed: one K×K all_reduce per step).

Backends: reference (plain torch), cpu (C++/OpenMP), triton, cuda; see molkernels.backends().
"""

from ._ops import backends
from ._stack import flat_buffer
from .ops import combine, cross_gram, gram, min_norm, project_simplex
from .profiling import disable_nvtx, enable_nvtx
from .steps import MoCoState, MoDoState, mgda_step, moco_step, modo_step
from . import mol  # noqa: E402  (aggregators and mol.backward)
from . import distributed  # noqa: E402  (the sharded Gram across ranks: one K×K all_reduce)

__version__ = "0.1.0"


def build_info() -> dict:
    """What this installation contains: version, CUDA kernels and their archs, OpenMP threads,
    Triton version, and the backends that can run here."""
    from . import _ops

    info = dict(_ops._C.build_info()) if _ops._C is not None else {"version": __version__, "cuda_compiled": False}
    try:
        import triton

        info["triton_version"] = triton.__version__
    except ImportError:
        info["triton_version"] = None
    info["backends"] = backends()
    return info


__all__ = [
    "MoCoState",
    "MoDoState",
    "backends",
    "build_info",
    "combine",
    "cross_gram",
    "disable_nvtx",
    "distributed",
    "enable_nvtx",
    "flat_buffer",
    "gram",
    "mgda_step",
    "min_norm",
    "moco_step",
    "modo_step",
    "mol",
    "project_simplex",
]
