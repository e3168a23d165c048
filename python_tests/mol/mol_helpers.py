"""Shared pieces of the molkernels.mol tests: aggregator factories, stacks, comparisons, a recorder of host reads."""

from __future__ import annotations

import pytest
import torch

import molkernels.mol as mol


@pytest.fixture(autouse=False)
def one_thread():
    """One intra-op thread for the test. On a 2-core machine shared with other work, every OpenMP
    region of the tiny K×K kernels waits for a descheduled thread (tens of ms per call); the
    arithmetic does not depend on the thread count (molkernels' kernels are deterministic)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# name -> factory of a fresh aggregator (same configuration, same seed, fresh state)
GRAM_FACTORIES = {
    "Mean": lambda K: mol.Mean(),
    "Linear": lambda K: mol.Linear(torch.linspace(0.5, 1.5, K)),
    "MGDA": lambda K: mol.MGDA(),
    "UPGrad": lambda K: mol.UPGrad(),
    "DualProj": lambda K: mol.DualProj(),
    "PCGrad": lambda K: mol.PCGrad(seed=7),
    "CAGrad": lambda K: mol.CAGrad(0.4),
    "IMTLG": lambda K: mol.IMTLG(),
    "AlignedMTL": lambda K: mol.AlignedMTL(),
    "NashMTL": lambda K: mol.NashMTL(),
}
FACTORIES = dict(GRAM_FACTORIES, MoCo=lambda K: mol.MoCo(beta=0.6, gamma=0.2, rho=0.01))


def rel_err(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """‖a − b‖ / max(‖b‖, scale), in float64."""
    a = a.detach().double().cpu().reshape(-1)
    b = b.detach().double().cpu().reshape(-1)
    return ((a - b).norm() / max(b.norm().item(), scale)).item()


def flatten(direction) -> torch.Tensor:
    if isinstance(direction, torch.Tensor):
        return direction.reshape(-1)
    return torch.cat([d.reshape(-1) for d in direction])


def split(J: torch.Tensor, shapes):
    """The [K, D] matrix J as a list of blocks [K, *shape_j] (copies, so each block is separate)."""
    out, offset = [], 0
    for shape in shapes:
        n = int(torch.Size(shape).numel())
        out.append(J[:, offset:offset + n].reshape(J.shape[0], *shape).clone())
        offset += n
    assert offset == J.shape[1]
    return out


def random_matrix(K: int, d: int, dtype=torch.float64, kind: str = "random", generator=None) -> torch.Tensor:
    """K gradients in R^d: 'random' (generic), 'duplicate' (g_K = g_1), 'opposite' (g_K = −g_1),
    'scaled' (norms spread over 4 orders of magnitude)."""
    J = torch.randn(K, d, dtype=torch.float64, generator=generator)
    if kind == "duplicate":
        J[-1] = J[0]
    elif kind == "opposite":
        J[-1] = -J[0]
    elif kind == "scaled":
        J = J * torch.logspace(-2, 2, K, dtype=torch.float64)[:, None]
    return J.to(dtype)


class NoScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every read of a tensor value by the host (aten._local_scalar_dense: .item(),
    bool(t), int(t), indexing with a 0-dim tensor converted to an int). On CUDA each one is a
    host synchronisation, so none may happen while the weights are computed."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))
