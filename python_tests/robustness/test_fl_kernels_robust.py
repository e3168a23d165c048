"""Robustness of the federated kernels' Python layer (molkernels.federated.kernels; issue 14, items
5, 7 and 14): tensors the kernels write that overlap each other or an input are rejected naming
both; a negative step count is named; sparse or nested tensors are named; the in-place updates
bump the version counters on every backend, so autograd sees them as it sees torch.optim's."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from molkernels.federated import batched_adam_step, batched_sgd_step, masked_weighted_mean, reset_client_state
from fl_kernel_args import C, D, adam_args, no_kernel, sgd_args  # noqa: F401
from stacks import backend_params


def copies(args):
    return {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}


def assert_same(args, before):
    for key, value in before.items():
        assert torch.equal(args[key], value), f"{key} changed"


# --------------------------------------------------------------------------------------------------
# Item 5: written tensors overlapping each other or an input


def _aliasing_cases():
    shared = torch.zeros(C, D)
    rows = torch.zeros(C + 1, D)
    return [
        ("exp_avg-is-exp_avg_sq", "adam", dict(exp_avg=shared, exp_avg_sq=shared), r"exp_avg_sq: overlaps exp_avg"),
        ("params-is-grads", "adam", dict(params=shared, grads=shared), r"grads: overlaps params"),
        ("exp_avg-is-params", "adam", dict(params=shared, exp_avg=shared), r"exp_avg: overlaps params"),
        ("shifted-rows", "adam", dict(params=rows[:C], exp_avg_sq=rows[1:]), r"exp_avg_sq: overlaps params"),
        ("grads-in-exp_avg", "adam", dict(exp_avg=shared, grads=shared), r"grads: overlaps exp_avg"),
        ("buffer-is-params", "sgd", dict(params=shared, momentum_buffer=shared), r"momentum_buffer: overlaps params"),
        ("grads-is-buffer", "sgd", dict(grads=shared, momentum_buffer=shared), r"grads: overlaps momentum_buffer"),
        ("sgd-params-is-grads", "sgd", dict(params=shared, grads=shared), r"grads: overlaps params"),
    ]


@pytest.mark.parametrize("op, changes, message", [pytest.param(*c[1:], id=c[0]) for c in _aliasing_cases()])
def test_written_tensors_must_not_overlap(op, changes, message, no_kernel):
    """Before the fix these ran: `exp_avg is exp_avg_sq` mixed the two moments, grads aliasing params
    was read while being written."""
    args = (adam_args if op == "adam" else sgd_args)(**changes)
    before = copies(args)
    with pytest.raises(ValueError, match="^" + message):
        (batched_adam_step if op == "adam" else batched_sgd_step)(**args)
    assert_same(args, before)


def test_inputs_may_share_memory_and_momentum_zero_ignores_the_buffer():
    """Reading one tensor twice is fine, and with momentum = 0 a buffer that is params is not used."""
    params = torch.randn(C, D)
    batched_sgd_step(**sgd_args(params=params, momentum=0.0, momentum_buffer=params))
    shared = torch.ones(C, dtype=torch.bool)
    batched_adam_step(**adam_args(active=shared))


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(st.lists(st.integers(0, 2 * C), min_size=4, max_size=4))
def test_overlap_is_rejected_exactly_when_rows_intersect(offsets):
    """params, exp_avg, exp_avg_sq and grads as C-row windows of one buffer at random row offsets:
    rejected exactly when two windows intersect and one of them is written (grads alone is read)."""
    buffer = torch.rand(3 * C, D)
    names = ("params", "exp_avg", "exp_avg_sq", "grads")
    views = {name: buffer[offset:offset + C] for name, offset in zip(names, offsets)}
    clash = any(abs(offsets[i] - offsets[j]) < C for j in range(4) for i in range(j))  # grads is the only read one
    args = adam_args(**views)
    if clash:
        with pytest.raises(ValueError, match=r"^(exp_avg|exp_avg_sq|grads): overlaps (params|exp_avg)"):
            batched_adam_step(**args)
    else:
        batched_adam_step(**args)


# --------------------------------------------------------------------------------------------------
# Item 14: step counts, layouts


def test_negative_step_count_is_named(no_kernel):
    """A negative count gave a negative (or zero) bias correction: an ascent (or inf) step."""
    args = adam_args(step=torch.tensor([0, -2, 3]))
    before = copies(args)
    with pytest.raises(ValueError, match=r"^step: client 1 has step count -2; counts are >= 0"):
        batched_adam_step(**args)
    assert_same(args, before)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's notes on sparse invariants and nested prototypes
@pytest.mark.parametrize("layout", ["sparse", "nested"])
@pytest.mark.parametrize("name", ["params", "grads", "exp_avg", "exp_avg_sq", "step", "active"])
def test_sparse_and_nested_tensors_are_named(name, layout, no_kernel):
    """Before the fix a sparse tensor failed in is_contiguous() with a message naming no argument."""
    dense = adam_args()[name]
    other = dense.to_sparse() if layout == "sparse" else torch.nested.nested_tensor([dense, dense])
    got = "a torch.sparse_coo one" if layout == "sparse" else "a nested one"
    with pytest.raises(TypeError, match=rf"^{name}: expected a dense \(strided\) tensor, got {got}"):
        batched_adam_step(**adam_args(**{name: other}))


def test_mean_and_reset_name_sparse_tensors():
    with pytest.raises(TypeError, match=r"^x: expected a dense"):
        masked_weighted_mean(torch.zeros(C, D).to_sparse(), torch.ones(C), torch.ones(C, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"^state\[0\]: expected a dense"):
        reset_client_state(torch.ones(C, dtype=torch.bool), torch.zeros(C, D).to_sparse())


# --------------------------------------------------------------------------------------------------
# Item 7: the in-place updates are visible to autograd


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_adam_step_invalidates_older_graphs(be):
    """A graph that saved the client parameters, then a step: backward raises autograd's usual error,
    as after torch.optim.Adam's step (before the fix, cpu and triton left _version unchanged and the
    old graph silently used the new weights). The step runs under no_grad, as torch.optim's does, so
    parameters that require grad are accepted."""
    args = {k: v.to(be.device) if isinstance(v, torch.Tensor) else v for k, v in adam_args().items()}
    args["params"].requires_grad_()
    loss = (args["params"] ** 2).sum()
    versions = {k: v._version for k, v in args.items() if k in ("params", "exp_avg", "exp_avg_sq", "step")}
    batched_adam_step(**args, backend=be.backend)
    for key, version in versions.items():
        assert args[key]._version > version, f"{key}: version counter not bumped"
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_sgd_step_invalidates_older_graphs(be):
    args = {k: v.to(be.device) if isinstance(v, torch.Tensor) else v for k, v in sgd_args().items()}
    args["params"].requires_grad_()
    loss = (args["params"] ** 2).sum()
    params_version, buffer_version = args["params"]._version, args["momentum_buffer"]._version
    batched_sgd_step(**args, backend=be.backend)
    assert args["params"]._version > params_version and args["momentum_buffer"]._version > buffer_version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_reset_client_state_bumps_versions():
    exp_avg, step = torch.rand(C, D), torch.tensor([3, 1, 2])
    versions = exp_avg._version, step._version
    reset_client_state(torch.tensor([True, False, True]), exp_avg, None, step)
    assert exp_avg._version > versions[0] and step._version > versions[1]
    assert torch.equal(step, torch.tensor([0, 1, 0])) and not exp_avg[0].any() and exp_avg[1].all()
