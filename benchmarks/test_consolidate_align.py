"""consolidate_ and align_ throughput per backend, next to fused_step's.

Same inputs, sizes, backends (Triton on a GPU only) and copy measurement as
``test_fused_step.py``; ``extra_info`` carries the bytes per element counted as below,
GB/s and the fraction of a same-size device copy measured in the same run.

* consolidate_: read θ, a, Ω, F; write a, Ω, F, and θ when merging -- 4·p + 16 bytes
  (3·p + 16 with ``merge=None``), p = the parameter dtype's size, Ω and F in fp32.
* align_: the radix select reads |a| four times, then θ and a once -- 6·p bytes (the
  writes of the few reset θ are not counted).
"""
from __future__ import annotations

import pytest
import torch

import aim_kernels as ak
from benchmarks.conftest import sync
from benchmarks.test_fused_step import BACKENDS, DEVICE, DTYPES, SIZES, copy_gbps, make_inputs


def consolidate_bytes(dtype, merge) -> int:
    return (4 if merge else 3) * dtype.itemsize + 16


def align_bytes(dtype) -> int:
    return 6 * dtype.itemsize


def _record(benchmark, n, dtype, nbytes):
    seconds = benchmark.stats.stats.mean
    gbps = n * nbytes / seconds / 1e9
    copy = copy_gbps(n * nbytes)
    benchmark.extra_info.update(n=n, dtype=str(dtype), bytes_per_element=nbytes, gbps=gbps,
                                copy_gbps=copy, copy_fraction=gbps / copy)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"2^{n.bit_length() - 1}")
@pytest.mark.parametrize("merge", [None, "fisher"], ids=lambda m: f"merge-{m}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_consolidate(benchmark, backend, merge, n, dtype):
    _, param, anchor, importance, fisher, *_ = make_inputs(n, dtype)
    dev = torch.device(DEVICE)

    def run():
        ak.ops.consolidate_(param, anchor, importance, fisher, fisher_scale=1.0, decay=1.0,
                            merge=merge, alpha=0.5, backend=backend)
        sync(dev)

    run()   # warm-up (compile / tune)
    benchmark.group = f"consolidate_ merge={merge} {dtype} 2^{n.bit_length() - 1}"
    benchmark.pedantic(run, rounds=10 if n >= 1 << 22 else 30, warmup_rounds=1)
    _record(benchmark, n, dtype, consolidate_bytes(dtype, merge))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"2^{n.bit_length() - 1}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_align(benchmark, backend, n, dtype):
    _, param, anchor, _, _, offsets, *_ = make_inputs(n, dtype)
    dev = torch.device(DEVICE)

    def run():
        ak.ops.align_(param, anchor, offsets, 0.5, backend=backend)
        sync(dev)

    run()
    benchmark.group = f"align_ {dtype} 2^{n.bit_length() - 1}"
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    _record(benchmark, n, dtype, align_bytes(dtype))
