"""Every Triton launch runs with the tensors' GPU current (GPU-NOTES 1.1.1).

Triton launches on the current device and its stream, whatever device its pointers are on, so the
Triton ops make the tensors' device current first, as the C++ ops do with a CUDAGuard. One GPU (or
none) cannot show a wrong current device, so these tests mock it: `torch.cuda.device` becomes a
context manager that switches a mocked `torch.cuda.current_device`, the kernels become recorders of
the device that is current when they run, and the tensors claim to live on cuda:1 while cuda:0 is
current.
"""

import contextlib

import pytest
import torch
from conftest import INTERPRETED

from molkernels import _ops


class _OnSecondGpu(torch.Tensor):
    """A CPU tensor that reports cuda:1 as its device: all the guard reads of a tensor."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def _on_second_gpu(shape):
    return torch.Tensor._make_subclass(_OnSecondGpu, torch.zeros(shape))


class _MockedCurrentDevice:
    """torch.cuda.device and torch.cuda.current_device over a mocked current index, starting at 0;
    `entered` lists the devices the guard was entered with."""

    def __init__(self):
        self.current = 0
        self.entered = []

    def current_device(self):
        return self.current

    @contextlib.contextmanager
    def device(self, device):
        self.entered.append(torch.device(device))
        previous, self.current = self.current, torch.device(device).index
        try:
            yield
        finally:
            self.current = previous


class _RecordingKernels:
    """Stands in for molkernels.triton: each kernel records the current device it ran under."""

    def __init__(self, mocked: _MockedCurrentDevice):
        self.mocked = mocked
        self.ran_on = {}

    def __getattr__(self, name):
        def kernel(*args):
            self.ran_on[name] = self.mocked.current_device()

        return kernel


def _arguments(schema: str):
    """Arguments of the right kinds for a schema: tensors (on cuda:1) and tensor lists, floats, bools."""
    args = []
    for declaration in schema.split("->")[0].strip("() ").split(","):
        kind = declaration.split()[0]
        if kind.startswith("Tensor") and "[]" in kind:
            args.append([_on_second_gpu((2, 3))])
        elif kind.startswith("Tensor"):
            args.append(_on_second_gpu((2, 2)))
        elif kind == "float":
            args.append(0.5)
        else:
            args.append(True)
    return args


@pytest.fixture
def mocked_device(monkeypatch):
    mocked = _MockedCurrentDevice()
    monkeypatch.setattr(torch.cuda, "device", mocked.device)
    monkeypatch.setattr(torch.cuda, "current_device", mocked.current_device)
    return mocked


@pytest.mark.triton
@pytest.mark.parametrize("name", sorted(_ops._TRITON_SCHEMAS))
def test_every_triton_op_runs_with_the_tensors_device_current(name, mocked_device, monkeypatch):
    kernels = _RecordingKernels(mocked_device)
    monkeypatch.setattr(_ops, "_triton_status", lambda: (kernels, None))
    _ops._triton_kernel(name)(*_arguments(_ops._TRITON_SCHEMAS[name]))
    assert mocked_device.entered == [torch.device("cuda", 1)]
    assert kernels.ran_on == {name: 1}, "the kernel ran with cuda:0 current while its tensors are on cuda:1"
    assert mocked_device.current == 0, "the guard did not restore the previous current device"


@pytest.mark.triton
def test_cpu_tensors_under_the_interpreter_take_no_guard(mocked_device):
    reason = _ops.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"backend 'triton' is unavailable: {reason}")
    if not INTERPRETED:
        pytest.skip("a GPU is present, so Triton does not run on CPU tensors")
    g = torch.randn(3, 40, dtype=torch.float64)
    result = torch.ops.molkernels.triton_gram([g])
    assert mocked_device.entered == []
    torch.testing.assert_close(result, g @ g.T)
