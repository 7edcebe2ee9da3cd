"""What a model-level step costs on each of its gradient paths (DESIGN.md 5).

* ``views``    -- every ``p.grad`` is still its view of the flat grad buffer (the
                  design's path: ``state.zero_grad()`` or ``zero_grad(set_to_none=False)``);
                  one fused call, nothing copied;
* ``replaced`` -- user code replaced every ``.grad`` (``zero_grad(set_to_none=True)``, the
                  HF Trainer): each is copied into the buffer and re-pointed at it;
* ``explicit`` -- grads passed as a sequence: copied in and the results copied back.

Each is timed against the flat ``fused_step`` on the same buffers, measured in the same
run (``extra_info["vs_flat_op"]``). A model of many tensors, as a real one has.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import aim_kernels as ak
from benchmarks.conftest import sync

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LOG2 = int(os.environ.get("AIM_BENCH_MODEL_LOG2", 24 if DEVICE.type == "cuda" else 22))
TENSORS = 96          # weight + bias per layer, 48 layers over three groups
_FLAT: dict[str, float] = {}


def _model() -> nn.Module:
    width = int((2 ** LOG2 / (TENSORS // 2)) ** 0.5)
    parts = {name: nn.Sequential(*[nn.Linear(width, width) for _ in range(TENSORS // 6)])
             for name in ("vision", "projector", "language")}
    return nn.ModuleDict(parts).to(DEVICE)


def _attached():
    model = _model()
    groups = {g: ak.GroupConfig(rf"^{g}\.", mask_ratio=0.1, lam=1.0)
              for g in ("vision", "projector", "language")}
    state = ak.attach(model, ak.AIMConfig(groups=groups))
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for b in state.buckets:
        b.grad.copy_(torch.randn(b.numel, generator=gen, device=DEVICE) * 1e-2)
    ak.consolidate(model)                     # non-trivial Ω, masks and thresholds
    return model, state


def _record(benchmark, state, path):
    numel = sum(b.numel for b in state.buckets)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(path=path, numel=numel, tensors=len(state.names),
                                device=str(DEVICE))
    if path != "flat op":
        benchmark.extra_info["vs_flat_op"] = mean / _FLAT["mean"]


def test_flat_fused_step(benchmark):
    model, state = _attached()
    (b,) = state.buckets
    cfg = state.config

    def run():
        ak.ops.fused_step(b.grad, b.param, b.anchor, b.importance, b.fisher, b.offsets,
                          b.inv_scale, b.thresh, b.keep, b.lam, beta=cfg.beta)
        sync(DEVICE)

    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    _FLAT["mean"] = benchmark.stats.stats.mean
    _record(benchmark, state, "flat op")


@pytest.mark.parametrize("path", ["views", "replaced", "explicit"])
def test_masked_step(benchmark, path):
    if "mean" not in _FLAT:
        pytest.skip("runs after test_flat_fused_step (same session)")
    model, state = _attached()
    params = [p for _, p in model.named_parameters()]
    fresh = [p.grad.clone() for p in params]

    def setup():
        if path == "replaced":
            for p, g in zip(params, fresh):
                p.grad = g
        return (), {}

    def run():
        ak.masked_step(model, grads=fresh if path == "explicit" else None)
        sync(DEVICE)

    benchmark.pedantic(run, setup=setup, rounds=10, warmup_rounds=2)
    _record(benchmark, state, path)
