"""fused_step throughput per backend, against a same-size copy measured in the same run.

Bytes per element (DESIGN.md 6): read g, θ, a, Ω, F and write g, F: 28 in fp32,
20 with bf16 g/θ/a and fp32 Ω, F. ``extra_info`` carries GB/s and the fraction
of the copy bandwidth; ratios between backends come from the same JSON.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

import aim_kernels as ak
from aim_kernels.ops import reference
from benchmarks.conftest import sync

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAX_LOG2 = int(os.environ.get("AIM_BENCH_MAX_LOG2", 26 if DEVICE == "cuda" else 24))
SIZES = [1 << k for k in range(16, MAX_LOG2 + 1, 2)]
GROUPS = 3
BACKENDS = [b for b in ak.available_backends() if b != "triton" or DEVICE == "cuda"]
DTYPES = [torch.float32, torch.bfloat16]     # bf16: g, θ, a in bf16, Ω and F in fp32


def bytes_per_element(dtype) -> int:
    """Read g, θ, a and write g in ``dtype``; read Ω, read and write F in fp32."""
    return 4 * dtype.itemsize + 3 * 4


def make_inputs(n: int, dtype, seed: int = 0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    def rnd(dt, scale=1.0):
        return (torch.randn(n, generator=gen, device=DEVICE) * scale).to(dt)
    grad, param = rnd(dtype, 1e-2), rnd(dtype)
    anchor = (param.float() + rnd(torch.float32, 1e-3)).to(dtype)
    importance, fisher = rnd(torch.float32).abs(), rnd(torch.float32, 1e-4).abs()
    offsets = torch.tensor([0, n // 5, n // 2, n], dtype=torch.int64, device=DEVICE)
    ratio = torch.tensor([0.1, 0.3, 0.1], dtype=torch.float64, device=DEVICE)
    inv_scale, thresh = ak.ops.group_thresholds(importance, offsets, ratio, backend="torch")
    f32 = dict(dtype=torch.float32, device=DEVICE)
    keep, lam = torch.zeros(GROUPS, **f32), torch.tensor([0.5, 5.0, 0.5], **f32)
    return (grad, param, anchor, importance, fisher, offsets, inv_scale, thresh, keep, lam)


def adamw_bytes_per_element(dtype) -> int:
    """torch's fused AdamW: read θ, g, m, v and write θ, m, v, all in the parameter dtype."""
    return 7 * dtype.itemsize


def record(benchmark, n, dtype, nbytes: int):
    seconds = benchmark.stats.stats.mean
    gbps = n * nbytes / seconds / 1e9
    copy = copy_gbps(n * nbytes)
    benchmark.extra_info.update(n=n, dtype=str(dtype), bytes_per_element=nbytes, gbps=gbps,
                                copy_gbps=copy, copy_fraction=gbps / copy,
                                load=[round(x, 2) for x in os.getloadavg()])


def matches_reference(backend, n, dtype, kwargs) -> bool:
    """The benchmarked backend's result on fresh inputs equals the reference's (fp32: within
    the tolerance of tests/test_backends.py; counts exactly)."""
    mine, ref = make_inputs(n, dtype, seed=1), make_inputs(n, dtype, seed=1)
    got = ak.ops.fused_step(*mine, **kwargs, backend=backend)
    want = reference.fused_step(*ref, **kwargs)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(mine[0].float(), ref[0].float(), **tol)
    torch.testing.assert_close(mine[4], ref[4], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[:, 5:], want[:, 5:])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    return True


_COPY: dict[int, float] = {}


def copy_gbps(nbytes: int) -> float:
    """Device copy bandwidth (read + write bytes / s) for a buffer of ``nbytes / 2``."""
    if nbytes not in _COPY:
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEVICE)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        sync(torch.device(DEVICE))
        reps, t0 = 20, time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        sync(torch.device(DEVICE))
        _COPY[nbytes] = nbytes * reps / (time.perf_counter() - t0) / 1e9
    return _COPY[nbytes]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"2^{n.bit_length() - 1}")
@pytest.mark.parametrize("backend", BACKENDS + ["torch.compile", "adamw"])
def test_fused_step(benchmark, backend, n, dtype):
    """One row per backend, plus torch.optim.AdamW(fused=True) on a parameter of the same
    N and dtype (the step a user runs beside this one): ``vs_fused_adamw`` in the JSON;
    the same ratios measured interleaved are in test_vs_adamw.py."""
    args = make_inputs(n, dtype)
    kwargs = dict(beta=0.99, accumulate="ema", importance_kind="fisher", directional=True)
    if backend == "adamw":
        p = torch.nn.Parameter(torch.randn(n, device=DEVICE).to(dtype))
        p.grad = (torch.randn(n, device=DEVICE) * 1e-2).to(dtype)
        call = torch.optim.AdamW([p], lr=1e-3, fused=True).step
    elif backend == "torch.compile":
        fn = torch.compile(reference.fused_step, dynamic=False)
        call = lambda: fn(*args, **kwargs)   # noqa: E731
    else:
        call = lambda: ak.ops.fused_step(*args, **kwargs, backend=backend)   # noqa: E731
    call()   # warm-up (and compile)
    dev = torch.device(DEVICE)
    if backend not in ("torch", "torch.compile", "adamw"):
        benchmark.extra_info["matches_reference"] = matches_reference(backend, n, dtype, kwargs)

    def run():
        call()
        sync(dev)

    benchmark.group = f"fused_step {dtype} 2^{n.bit_length() - 1}"
    benchmark.pedantic(run, rounds=10 if n >= 1 << 22 else 30, warmup_rounds=1)
    record(benchmark, n, dtype,
           adamw_bytes_per_element(dtype) if backend == "adamw" else bytes_per_element(dtype))


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"2^{n.bit_length() - 1}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_group_thresholds(benchmark, backend, n):
    args = make_inputs(n, torch.float32)
    importance, offsets = args[3], args[5]
    ratio = torch.tensor([0.1, 0.3, 0.1], dtype=torch.float64, device=DEVICE)
    dev = torch.device(DEVICE)

    def run():
        ak.ops.group_thresholds(importance, offsets, ratio, backend=backend)
        sync(dev)

    benchmark.group = f"group_thresholds 2^{n.bit_length() - 1}"
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(n=n)
