"""The fixed cost of one ``masked_step`` call, and what each managed tensor adds (issue 13).

Two models of 1000 elements in all, over three groups: 10 tensors of 100 elements and
200 tensors of 5, every ``p.grad`` its view (the design's path). The kernel's work is
the same in both, so the difference is the per-tensor cost of the call:
``slope = (t200 - t10) / 190`` and ``fixed = t10 - 10 * slope``, from the minimum of
each (the machine is shared; the minimum is the least disturbed). ``uncached`` is the
same call with the prepared path switched off (every check and the custom-op dispatch at
every step), measured in the same run. ``extra_info`` of the last row holds the figures.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import aim_kernels as ak
from aim_kernels import prepared

ELEMENTS = 1000
_MIN: dict[tuple[str, int], float] = {}


def _attached(tensors: int):
    width = ELEMENTS // tensors
    names = [f"{part}{i}" for i, part in
             enumerate(("vision", "projector", "language")[i * 3 // tensors]
                       for i in range(tensors))]
    model = nn.ModuleDict({n: nn.Linear(width, 1, bias=False) for n in names})
    groups = {g: ak.GroupConfig(rf"^{g}", mask_ratio=0.1, lam=1.0)
              for g in ("vision", "projector", "language")}
    state = ak.attach(model, ak.AIMConfig(groups=groups, backend="auto"))
    gen = torch.Generator().manual_seed(0)
    for b in state.buckets:
        b.grad.copy_(torch.randn(b.numel, generator=gen) * 1e-2)
    ak.consolidate(model)                 # non-trivial Ω, masks and thresholds
    assert len(state.names) == tensors and sum(b.numel for b in state.buckets) == ELEMENTS
    return model


@pytest.mark.parametrize("path", ["cached", "uncached"])
@pytest.mark.parametrize("tensors", [10, 200])
def test_masked_step_call(benchmark, monkeypatch, tensors, path):
    model = _attached(tensors)
    if path == "uncached":
        monkeypatch.setattr(prepared, "eligible", lambda state: False)
    for _ in range(20):
        ak.masked_step(model)
    benchmark.group = f"masked_step call, {ELEMENTS} elements"
    benchmark.pedantic(ak.masked_step, args=(model,), rounds=50, iterations=50,
                       warmup_rounds=5)
    _MIN[(path, tensors)] = benchmark.stats.stats.min
    benchmark.extra_info.update(path=path, tensors=tensors, numel=ELEMENTS)
    if (path, 10) in _MIN and (path, 200) in _MIN:
        slope = (_MIN[(path, 200)] - _MIN[(path, 10)]) / 190
        benchmark.extra_info.update(per_tensor_us=slope * 1e6,
                                    fixed_us=(_MIN[(path, 10)] - 10 * slope) * 1e6,
                                    call_10_tensors_us=_MIN[(path, 10)] * 1e6)
