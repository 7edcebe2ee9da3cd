"""The CUDA kernels on a GPU (``cuda`` mark: skipped without one; ``make gpu-check``
runs them): what the pre-GPU review asked to see on the device.

* the caller's current device is the same after an op on another GPU (2 GPUs);
* fp32 results equal the CPU backend bit for bit (-fmad=false);
* malformed offsets (offsets[G] < n, not checked by value for GPU tensors) leave the
  elements past offsets[G] untouched;
* every dtype pair captures into a CUDA graph at its first launch (the probe loaded them);
* the select scratch is left zeroed and is never shared across G;
* a dominant group and G = 1000 give the CPU backend's thresholds.
"""
from __future__ import annotations

import pytest
import torch

import aim_kernels as ak
from aim_kernels import ops
from aim_kernels.ops import native

pytestmark = pytest.mark.cuda
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _step_args(n, dtype, state_dtype, dev, offsets):
    g = torch.Generator().manual_seed(n)
    t = [torch.randn(n, generator=g).to(dtype).to(dev) for _ in range(3)]
    s = [torch.rand(n, generator=g).to(state_dtype).to(dev) for _ in range(2)]
    G = len(offsets) - 1
    per = [torch.rand(G, generator=g).to(dev) for _ in range(4)]
    return t + s + [torch.tensor(offsets, device=dev)] + per


def test_an_op_on_another_gpu_leaves_the_current_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.cuda.set_device(0)
    args = _step_args(4096, torch.float32, torch.float32, "cuda:1", [0, 1000, 4096])
    ops.fused_step(*args, beta=0.9, backend="cuda")
    ops.group_thresholds(args[3], args[5], torch.full((2,), 0.3, device="cuda:1"),
                         backend="cuda")
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    assert torch.empty(1, device="cuda").device.index == 0


def test_fp32_equals_the_cpu_backend_bit_for_bit():
    offsets = [0, 3, 70000, 70001, 200000]
    gpu = _step_args(200000, torch.float32, torch.float32, "cuda", offsets)
    cpu = [a.cpu() for a in gpu]
    s_gpu = ops.fused_step(*gpu, beta=0.9, backend="cuda")
    s_cpu = ops.fused_step(*cpu, beta=0.9, backend="cpu")
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[4].cpu(), cpu[4])
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-5, atol=0)


def test_malformed_offsets_leave_the_rest_untouched():
    n, cover = 50000, 30000
    args = _step_args(n, torch.float32, torch.float32, "cuda", [0, 10000, cover])
    before = [a.clone() for a in args[:5]]
    native.fused_step(*args, beta=0.9)
    m_g = torch.zeros(2, device="cuda")                  # would reset everything it reaches
    param = -args[2].sign()
    native.align_apply_(param, args[2], args[5], m_g)
    torch.cuda.synchronize()
    assert torch.equal(args[0][cover:], before[0][cover:])
    assert torch.equal(args[4][cover:], before[4][cover:])
    assert torch.equal(param[cover:], -before[2][cover:].sign())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("state_dtype", DTYPES)
def test_first_launch_of_every_dtype_pair_inside_a_graph(dtype, state_dtype):
    assert not ak.ops.unavailable_reason("cuda")        # the probe ran (loads every kernel)
    args = _step_args(10000, dtype, state_dtype, "cuda", [0, 4000, 10000])
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        stats = native.fused_step(*args, beta=0.9)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(stats).all()


def test_select_scratch_stays_zero_and_per_g():
    g = torch.Generator().manual_seed(0)
    for G in (1000, 3, 1000, 7):
        n = 300000
        omega = torch.rand(n, generator=g)
        cuts = [n * i // G for i in range(G + 1)]
        off = torch.tensor(cuts)
        ratio = torch.full((G,), 0.3, dtype=torch.float64)
        c, t = ops.group_thresholds(omega.cuda(), off.cuda(), ratio.cuda(), backend="cuda")
        c_ref, t_ref = ops.group_thresholds(omega, off, ratio, backend="cpu")
        assert torch.equal(t.cpu(), t_ref), G
        torch.testing.assert_close(c.cpu(), c_ref, rtol=1e-6, atol=0)
    for (_, _, groups), buf in native._CUDA_SCRATCH.items():
        hist = buf[: groups * 2048 * 8]
        assert not hist.any(), f"G={groups}: histogram bins left set"


@pytest.mark.parametrize("layout", ["dominant", "G1000"])
def test_thresholds_of_large_skewed_groups(layout):
    n = 1 << 25
    omega = torch.rand(n, device="cuda")
    omega[: n // 3] = 0
    cuts = [0, n * 97 // 100, n * 99 // 100, n] if layout == "dominant" else \
        [n * i // 1000 for i in range(1001)]
    off = torch.tensor(cuts, device="cuda")
    ratio = torch.full((len(cuts) - 1,), 0.4, dtype=torch.float64, device="cuda")
    c, t = ops.group_thresholds(omega, off, ratio, backend="cuda")
    c_ref, t_ref = ops.group_thresholds(omega.cpu(), off.cpu(), ratio.cpu(), backend="cpu")
    assert torch.equal(t.cpu(), t_ref)
    torch.testing.assert_close(c.cpu(), c_ref, rtol=1e-6, atol=0)
    m_g = ops.align_thresholds(omega, off, 0.5, backend="cuda")
    assert torch.equal(m_g.cpu(), ops.align_thresholds(omega.cpu(), off.cpu(), 0.5,
                                                       backend="cpu"))
