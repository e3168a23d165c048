"""moco_step and modo_step are safe to capture in a CUDA graph, checked on the CPU.

A CUDA graph records the kernels a step launches, with their arguments fixed at capture time, and
each replay runs exactly those kernels again on the same memory. A step whose step count or decayed
rates are host numbers keeps its capture-time β_t and γ_t in every replay. `RecordedGraph` emulates
this with a TorchDispatchMode: it records every op a step dispatches (the molkernels ops and every
aten op, with the same tensors and the same non-tensor arguments) and replays them in order, writing
each result into the tensor the recorded call returned, as a graph's static memory. Any host read of
a device value while recording (item(), int(), bool() of a tensor) fails the test: under a real
capture it raises, or it would freeze that value.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import molkernels as mk

from stacks import backend_params

aten = torch.ops.aten

#: ops that read a tensor's value on the host: a synchronisation, and a frozen value under capture
HOST_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
#: ops that only allocate (in a CUDA graph, static memory that no kernel fills)
ALLOCATIONS = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default}


class RecordedGraph(TorchDispatchMode):
    """Records the ops dispatched inside `with RecordedGraph() as graph:`; graph.replay() runs them
    again on the recorded tensors with the recorded arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            raise AssertionError(f"{func} reads a device value on the host while the step is captured")
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out

    def replay(self) -> None:
        for func, args, kwargs, out in self.calls:
            if func in ALLOCATIONS:
                continue
            fresh = func(*args, **kwargs)
            for static, value in zip(tree_flatten(out)[0], tree_flatten(fresh)[0]):
                if isinstance(static, torch.Tensor) and static is not value:
                    static.copy_(value)


K = 3
SHAPES = ((5, 4), (7,))
STEPS = 6

#: (step, keyword arguments): each with a rate that changes from step to step
CASES = {
    "moco/decay": ("moco", dict(beta=0.6, gamma=0.3, beta_decay=0.5, gamma_decay=0.25), {}),
    "moco/y_init=first": ("moco", dict(beta=0.4, gamma=0.2), dict(y_init="first")),
    "moco/l2/decay": ("moco", dict(beta=0.6, gamma=0.3, beta_decay=0.75, gamma_decay=0.5, normalize="l2"), {}),
    "modo/decay": ("modo", dict(gamma=0.4, gamma_decay=0.5), {}),
}


def _make_state(step: str, params, state_kwargs):
    return mk.MoCoState(params, K, **state_kwargs) if step == "moco" else mk.MoDoState(params, K)


def _run(step: str, params, grads, state, backend: str, kwargs) -> torch.Tensor:
    if step == "moco":
        return mk.moco_step(params, grads[0], state, lr=0.1, backend=backend, **kwargs)
    return mk.modo_step(params, *grads, state, lr=0.1, backend=backend, **kwargs)


def _inputs(step: str, device="cpu"):
    params = [torch.randn(shape, device=device) for shape in SHAPES]
    stacks = 3 if step == "modo" else 1
    grads = [[[torch.randn(K, *shape, device=device) for shape in SHAPES] for _ in range(stacks)] for _ in range(STEPS)]
    return params, grads


@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("case", CASES)
def test_a_recorded_step_replays_as_eager_steps(be, case):
    step, kwargs, state_kwargs = CASES[case]
    backend = be.backend
    params, grads = _inputs(step, be.device)
    eager_params = [p.clone() for p in params]
    eager_state = _make_state(step, eager_params, state_kwargs)
    eager = [(_run(step, eager_params, grads[t], eager_state, backend, kwargs).clone(),
              [p.clone() for p in eager_params]) for t in range(STEPS)]

    # Gradients go into static tensors, as a graph's inputs do; the recording runs step 0.
    static = [[b.clone() for b in stack] for stack in grads[0]]
    state = _make_state(step, params, state_kwargs)
    with RecordedGraph() as graph:
        lam = _run(step, params, static, state, backend, kwargs)
    replayed = [(lam.clone(), [p.clone() for p in params])]
    for t in range(1, STEPS):
        for static_stack, stack in zip(static, grads[t]):
            for static_block, block in zip(static_stack, stack):
                static_block.copy_(block)
        graph.replay()
        replayed.append((lam.clone(), [p.clone() for p in params]))

    for t, ((lam_r, params_r), (lam_e, params_e)) in enumerate(zip(replayed, eager)):
        assert torch.equal(lam_r, lam_e), f"step {t}: the replayed λ {lam_r.tolist()} differs from eager {lam_e.tolist()}"
        for j, (a, b) in enumerate(zip(params_r, params_e)):
            assert torch.equal(a, b), f"step {t}: params[{j}] differ from the eager step's"
    assert state.step == eager_state.step == STEPS, "the device-side step count did not advance on every replay"
    if step == "moco":
        assert torch.equal(state.y_flat, eager_state.y_flat), "the tracked gradients Y differ"


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_the_device_step_count_checkpoints_and_resumes(be):
    """The device-side count is what state_dict() saves and load_state_dict() restores."""
    step, kwargs, state_kwargs = CASES["moco/decay"]
    backend = be.backend
    params, grads = _inputs(step, be.device)
    state = _make_state(step, params, state_kwargs)
    for t in range(3):
        _run(step, params, grads[t], state, backend, kwargs)
    saved = state.state_dict()
    assert saved["step"] == 3 and isinstance(saved["step"], int)
    resumed = _make_state(step, [p.clone() for p in params], state_kwargs)
    resumed.load_state_dict(saved)
    assert resumed.step == 3
    lam_a = _run(step, params, grads[3], state, backend, kwargs)
    lam_b = _run(step, [p.clone() for p in params], grads[3], resumed, backend, kwargs)
    assert torch.equal(lam_a, lam_b)


def test_the_recorder_catches_a_frozen_host_rate():
    """The emulation is no test unless a host-side rate fails it: a step whose β_t is computed from
    a host counter (as before the fix) replays the capture-time β_t."""
    params, grads = _inputs("moco")
    y = [torch.zeros(K, *shape) for shape in SHAPES]
    static = [b.clone() for b in grads[0][0]]
    host_step = [0]

    def frozen_step(g):
        beta_t = torch.full((), 0.6 / (host_step[0] + 1) ** 0.5, dtype=torch.float64)  # a host number
        host_step[0] += 1
        return mk.reference.track_gram(y, g, beta_t)

    with RecordedGraph() as graph:
        frozen_step(static)
    for block, fresh in zip(static, grads[1][0]):
        block.copy_(fresh)
    y_before = [b.clone() for b in y]
    graph.replay()
    beta_1 = 0.6 / 2 ** 0.5
    expected = [yb - beta_1 * (yb - gb) for yb, gb in zip(y_before, grads[1][0])]
    assert not all(torch.allclose(a, b) for a, b in zip(y, expected)), \
        "the replay took step 1's β_t from a host number: the recorder does not freeze arguments"


def test_the_recorder_rejects_host_reads():
    with pytest.raises(AssertionError, match="reads a device value on the host"):
        with RecordedGraph():
            int(torch.zeros((), dtype=torch.int64) + 1)
