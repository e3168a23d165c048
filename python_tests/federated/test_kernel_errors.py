"""Bad arguments of the federated kernels raise ValueError/TypeError naming the argument, before any
kernel runs: every test replaces the kernels with a function that fails the test."""

import math

import pytest
import torch

from molkernels.federated import batched_adam_step, batched_sgd_step, masked_weighted_mean, reset_client_state
from fl_kernel_args import C, D, adam_args, no_kernel, sgd_args  # noqa: F401

pytestmark = pytest.mark.usefixtures("no_kernel")


def mean_args(**changes):
    args = dict(x=torch.zeros(C, D), weights=torch.ones(C), active=torch.ones(C, dtype=torch.bool))
    args.update(changes)
    return args


def adam(**changes):
    batched_adam_step(**adam_args(**changes))


def sgd(**changes):
    batched_sgd_step(**sgd_args(**changes))


def mean(**changes):
    masked_weighted_mean(**mean_args(**changes))


STEPS = {"adam": adam, "sgd": sgd}


@pytest.mark.parametrize("op", STEPS)
def test_params_must_be_a_float_client_stack(op):
    with pytest.raises(TypeError, match=r"^params: expected a torch.Tensor"):
        STEPS[op](params=[[0.0]])
    with pytest.raises(TypeError, match=r"^params: expected float16, bfloat16, float32 or float64, got torch.int64"):
        STEPS[op](params=torch.zeros(C, D, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^params: expected a client-stacked \[C, D\] tensor with C >= 1"):
        STEPS[op](params=torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"^params: must be contiguous"):
        STEPS[op](params=torch.zeros(D, C).T)


@pytest.mark.parametrize("op", STEPS)
def test_grads_must_match_params(op):
    with pytest.raises(ValueError, match=r"^grads: has C = 4 clients, params has C = 3"):
        STEPS[op](grads=torch.zeros(4, D))
    with pytest.raises(ValueError, match=r"^grads: shape \(3, 6\) differs from params' \(3, 5\) \(D mismatch\)"):
        STEPS[op](grads=torch.zeros(C, D + 1))
    with pytest.raises(TypeError, match=r"^grads: expected torch.float32, got torch.float64"):
        STEPS[op](grads=torch.zeros(C, D, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^grads: must be contiguous"):
        STEPS[op](grads=torch.zeros(D, C).T)


@pytest.mark.parametrize("name", ["exp_avg", "exp_avg_sq"])
def test_adam_state(name):
    with pytest.raises(ValueError, match=rf"^{name}: has C = 2 clients"):
        adam(**{name: torch.zeros(2, D)})
    with pytest.raises(ValueError, match=rf"^{name}: shape .* \(D mismatch\)"):
        adam(**{name: torch.zeros(C, 1)})
    with pytest.raises(ValueError, match=rf"^{name}: must be contiguous \(it is updated in place\)"):
        adam(**{name: torch.zeros(D, C).T})
    # the state of 16-bit parameters is float32, of float64 parameters float64
    with pytest.raises(TypeError, match=rf"^{name}: expected torch.float32, got torch.bfloat16"):
        adam(params=torch.zeros(C, D, dtype=torch.bfloat16), grads=torch.zeros(C, D, dtype=torch.bfloat16),
             **{name: torch.zeros(C, D, dtype=torch.bfloat16)})
    double = {k: torch.zeros(C, D, dtype=torch.float64) for k in ("params", "grads", "exp_avg", "exp_avg_sq")}
    with pytest.raises(TypeError, match=rf"^{name}: expected torch.float64, got torch.float32"):
        adam(**{**double, name: torch.zeros(C, D)})


def test_adam_step_counts():
    with pytest.raises(TypeError, match=r"^step: expected a torch.int64 tensor \(per-client step counts\), got torch.int32"):
        adam(step=torch.zeros(C, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"^step: expected a torch.int64 tensor .* got torch.float32"):
        adam(step=torch.zeros(C))
    with pytest.raises(ValueError, match=r"^step: expected shape \(3,\), one entry per client, got \(4,\)"):
        adam(step=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^step: must be contiguous"):
        adam(step=torch.zeros(2 * C, dtype=torch.int64)[::2])


@pytest.mark.parametrize("op", ["adam", "sgd", "mean"])
def test_active_mask(op):
    call = {"adam": adam, "sgd": sgd, "mean": mean}[op]
    with pytest.raises(TypeError, match=r"^active: expected a torch.bool tensor .* got torch.int64"):
        call(active=torch.ones(C, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"^active: expected a torch.bool tensor .* got torch.float32"):
        call(active=torch.ones(C))
    with pytest.raises(ValueError, match=r"^active: expected shape \(3,\)"):
        call(active=torch.ones(C + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"^active: expected a torch.Tensor, got list"):
        call(active=[True] * C)


BAD_NUMBERS = [-1e-3, math.inf, math.nan, True, "0.1", None]


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
@pytest.mark.parametrize("name", ["lr", "eps", "weight_decay"])
def test_adam_nonnegative_finite_numbers(name, value):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        adam(**{name: value})


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, math.nan, math.inf], ids=repr)
@pytest.mark.parametrize("name", ["beta1", "beta2"])
def test_betas_in_unit_interval(name, value):
    with pytest.raises(ValueError, match=rf"^{name}: expected a"):
        adam(**{name: value})


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
@pytest.mark.parametrize("name", ["lr", "momentum", "weight_decay"])
def test_sgd_nonnegative_finite_numbers(name, value):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        sgd(**{name: value})


def test_sgd_momentum_needs_a_buffer():
    with pytest.raises(ValueError, match=r"^momentum_buffer: required when momentum > 0"):
        sgd(momentum_buffer=None)
    with pytest.raises(ValueError, match=r"^momentum_buffer: shape .* \(D mismatch\)"):
        sgd(momentum_buffer=torch.zeros(C, D + 2))
    with pytest.raises(TypeError, match=r"^momentum_buffer: expected torch.float32, got torch.float16"):
        sgd(params=torch.zeros(C, D, dtype=torch.float16), grads=torch.zeros(C, D, dtype=torch.float16),
            momentum_buffer=torch.zeros(C, D, dtype=torch.float16))


def test_mean_arguments():
    with pytest.raises(TypeError, match=r"^x: expected float16"):
        mean(x=torch.zeros(C, D, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^x: must be contiguous"):
        mean(x=torch.zeros(D, C).T)
    with pytest.raises(TypeError, match=r"^weights: expected a float tensor, got torch.int64"):
        mean(weights=torch.ones(C, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^weights: expected shape \(3,\), one entry per client, got \(3, 1\)"):
        mean(weights=torch.ones(C, 1))


def test_reset_client_state_arguments():
    with pytest.raises(TypeError, match=r"^joined: expected a torch.bool tensor"):
        reset_client_state(torch.ones(C), torch.zeros(C, D))
    with pytest.raises(ValueError, match=r"^joined: expected a \[C\] mask"):
        reset_client_state(torch.ones(C, 1, dtype=torch.bool), torch.zeros(C, D))
    with pytest.raises(ValueError, match=r"^state\[1\]: expected C = 3 rows"):
        reset_client_state(torch.ones(C, dtype=torch.bool), torch.zeros(C, D), torch.zeros(C + 1))
    with pytest.raises(TypeError, match=r"^state\[0\]: expected a torch.Tensor"):
        reset_client_state(torch.ones(C, dtype=torch.bool), 0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device is visible (needs two devices to mix)")
@pytest.mark.gpu
def test_mixed_devices():
    cuda = torch.zeros(C, D, device="cuda")
    with pytest.raises(ValueError, match=r"^grads: on cuda:0, params on cpu"):
        adam(grads=cuda)
    with pytest.raises(ValueError, match=r"^step: on cuda:0, params on cpu"):
        adam(step=torch.zeros(C, dtype=torch.int64, device="cuda"))
    with pytest.raises(ValueError, match=r"^active: on cuda:0, params on cpu"):
        sgd(active=torch.ones(C, dtype=torch.bool, device="cuda"))
    with pytest.raises(ValueError, match=r"^weights: on cuda:0, x on cpu"):
        mean(weights=torch.ones(C, device="cuda"))
    with pytest.raises(ValueError, match=r"^state\[0\]: on cuda:0, joined on cpu"):
        reset_client_state(torch.ones(C, dtype=torch.bool), cuda)


def test_backend_checked_before_kernels():
    with pytest.raises(ValueError, match=r"^backend: unknown 'gpu'"):
        adam(backend="gpu")
    with pytest.raises(ValueError, match=r"^backend: unknown 'gpu'"):
        mean(backend="gpu")


def test_devices_are_checked_on_meta_tensors_too():
    """A device mismatch is caught from metadata alone (meta tensors need no GPU)."""
    with pytest.raises(ValueError, match=r"^exp_avg: on meta, params on cpu"):
        adam(exp_avg=torch.zeros(C, D, device="meta"))
    with pytest.raises(ValueError, match=r"^active: on meta, params on cpu"):
        adam(active=torch.ones(C, dtype=torch.bool, device="meta"))
