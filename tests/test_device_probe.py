"""The native CUDA backend is probed per device, not only on the current one: a second
GPU of an architecture the build has no code for is not given to ``cuda`` (``auto`` falls
back there), and a call that reaches it anyway fails naming the device. CPU-only: the
module's probe is replaced by a fake that refuses device 1."""
from __future__ import annotations

import pytest
import torch

from aim_kernels.ops import backends as B
from aim_kernels.ops import native

pytestmark = pytest.mark.skipif(native._C is None or not native._C.has_cuda,
                                reason="needs _C built with CUDA (compiled, not run)")


class _FakeC:
    def __init__(self, real):
        self._real = real

    def cuda_driver_version(self):
        return self._real.cuda_runtime_version()

    def cuda_probe(self, device):
        return "" if device == 0 else f"no kernel image for device {device} (sm_70)"

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(native, "_C", _FakeC(native._C))
    monkeypatch.setattr(native, "_DEVICE_PROBLEMS", {})
    monkeypatch.setattr(B, "_probe", lambda name: (object(), ""))


def test_each_device_is_probed_on_its_own(fake):
    assert native.device_problem(0) == ""
    assert "device 1" in native.device_problem(1)
    assert B._runs_on("cuda", torch.device("cuda", 0))
    assert not B._runs_on("cuda", torch.device("cuda", 1))


def test_a_call_on_a_refused_device_names_it(fake):
    with pytest.raises(B.BackendUnavailable, match="cuda:1.*no kernel image"):
        native._stream(torch.device("cuda", 1))
