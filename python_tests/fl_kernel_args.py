"""Shared pieces of the federated kernels' argument tests: valid arguments to corrupt one at a time,
and a fixture that fails the test if any kernel is reached."""

from __future__ import annotations

import pytest
import torch

from molkernels import _ops

C, D = 3, 5


@pytest.fixture
def no_kernel(monkeypatch):
    def forbidden(name, backend):
        raise AssertionError(f"kernel {name!r} on {backend!r} was reached with a bad argument")

    monkeypatch.setattr(_ops, "op", forbidden)


# Random values and nonzero step counts, so that a check which wrote anything before raising is seen.
def adam_args(**changes):
    """Valid arguments of batched_adam_step, with some replaced."""
    args = dict(params=torch.randn(C, D), grads=torch.randn(C, D), exp_avg=torch.rand(C, D),
                exp_avg_sq=torch.rand(C, D), step=torch.tensor([0, 4, 1]), active=torch.ones(C, dtype=torch.bool),
                lr=1e-2)
    args.update(changes)
    return args


def sgd_args(**changes):
    """Valid arguments of batched_sgd_step, with some replaced."""
    args = dict(params=torch.randn(C, D), grads=torch.randn(C, D), active=torch.ones(C, dtype=torch.bool), lr=0.1,
                momentum=0.9, momentum_buffer=torch.randn(C, D))
    args.update(changes)
    return args
