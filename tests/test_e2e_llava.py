"""End to end: a tiny LlavaForConditionalGeneration (random weights, from a config),
two tasks of synthetic batches, AdamW, masked_step every step, consolidate between."""
from __future__ import annotations

import math

import pytest
import torch

import aim_kernels as ak

pytest.importorskip("transformers")
from aim_kernels.continual.tiny import synthetic_batch, tiny_llava  # noqa: E402

STEPS = 60


def run_task(model, state, task, steps, seed):
    # A fresh optimiser per task, as in most continual fine-tuning recipes.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(steps):
        batch = synthetic_batch(task, 16, gen)
        state.zero_grad()
        batch.loss(model).backward()
        history.append(ak.masked_step(model).as_dict())
        optimizer.step()
    return history


@pytest.mark.slow
def test_two_tasks_with_aim_masks_and_stats():
    model = tiny_llava(seed=0, layers=1)
    cfg = ak.preset("aim")
    state = ak.attach(model, cfg)
    assert list(state.groups) == ["vision", "projector", "language"]
    sizes = dict(zip(state.group_names, state.group_numel()))

    first = run_task(model, state, "colour", STEPS, seed=0)
    assert synthetic_batch("colour", 256, torch.Generator().manual_seed(99)).accuracy(model) > 0.9
    for row in first:            # Ω = 0 on the first task: nothing masked, no regulariser
        for group, s in row.items():
            assert s["masked"] == 0 and s["reg_sq"] == 0 and s["penalty"] == 0
            assert s["nonfinite"] == 0 and s["grad_sq"] > 0
            assert s["out_sq"] == pytest.approx(s["grad_sq"], rel=1e-5)
    assert all(first[-1][g]["drift_sq"] > first[0][g]["drift_sq"] for g in sizes)

    ak.consolidate(model)
    (b,) = state.buckets
    assert torch.equal(b.anchor, b.param) and not b.fisher.any()
    assert (b.importance > 0).float().mean() > 0.9
    omega = b.importance.clone()
    masked = torch.zeros_like(omega, dtype=torch.bool)
    for g, name in enumerate(state.group_names):
        lo, hi = b.group_range(g)
        k = math.floor(cfg.role_values[name].mask_ratio * (hi - lo))
        masked[lo:hi] = (omega[lo:hi] >= b.thresh[g]) & (omega[lo:hi] > 0)
        assert int(masked[lo:hi].sum()) == k    # distinct random Ω: no ties at the threshold
    anchor = b.anchor.clone()

    second = run_task(model, state, "position", STEPS, seed=1)
    for row in second:
        for name, s in row.items():
            k = math.floor(cfg.role_values[name].mask_ratio * sizes[name])
            assert s["masked"] == k and s["nonfinite"] == 0
    assert any(row["projector"]["reg_sq"] > 0 for row in second)
    assert second[-1]["language"]["penalty"] > 0

    # keep = 0 and a fresh optimiser: a masked element's gradient is its regulariser
    # alone, which is zero at the anchor, so masked elements never leave it.
    assert torch.equal(b.param[masked], anchor[masked])
    assert (b.param[~masked] != anchor[~masked]).float().mean() > 0.5


@pytest.mark.slow
def test_naive_and_aim_share_the_path_and_aim_forgets_less_of_the_projector():
    drift = {}
    for method in ("naive", "aim"):
        model = tiny_llava(seed=0, layers=1)
        state = ak.attach(model, ak.preset(method))
        run_task(model, state, "colour", STEPS // 2, seed=0)
        ak.consolidate(model)
        history = run_task(model, state, "position", STEPS // 2, seed=1)
        drift[method] = history[-1]["projector"]["drift_sq"]
    assert drift["aim"] < drift["naive"]
