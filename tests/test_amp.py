"""Mixed precision: bf16 autocast, and fp16 with GradScaler, where a step the scaler
skips for inf leaves the AIM state untouched."""
from __future__ import annotations

import pytest
import torch

import aim_kernels as ak
from aim_kernels.integrations import found_inf

from .vlm_toy import ToyVLM, assert_same, snapshot, toy_groups, toy_loss


def _attached(**kw):
    model = ToyVLM(seed=0)
    return model, ak.attach(model, ak.AIMConfig(groups=toy_groups(), **kw))


def _poison(model) -> None:
    """An inf in one gradient, as an fp16 overflow leaves it."""
    next(model.parameters()).grad.view(-1)[3] = float("inf")


def test_gradscaler_skipped_step_leaves_state_untouched():
    model, state = _attached()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(4):
        state.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = toy_loss(model, seed=step)
        scaler.scale(loss).backward()
        if step == 2:
            _poison(model)
        scaler.unscale_(opt)
        flag = found_inf(scaler, opt)
        before = snapshot(model, state)
        stats = ak.masked_step(model, skip=flag)
        if step == 2:
            assert flag.item() > 0 and stats.skipped
            assert_same(before, snapshot(model, state))          # grads and state untouched
            assert all(v == 0 for row in stats.as_dict().values() for v in row.values())
        else:
            assert flag.item() == 0 and not stats.skipped
            assert not torch.equal(before["state:bucket0.fisher"], state.buckets[0].fisher)
        scaler.step(opt)
        scaler.update()
    assert state.steps == 3 and state.steps_since_consolidation == 3   # the skipped one not counted
    assert torch.isfinite(state.buckets[0].fisher).all()


def test_found_inf_before_unscale_is_an_error():
    model, _ = _attached()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(toy_loss(model, 0)).backward()
    with pytest.raises(RuntimeError, match="unscale_"):
        found_inf(scaler, opt)


def test_skip_nonfinite_skips_whole_step_and_counts_nothing():
    model, state = _attached()
    toy_loss(model, 0).backward()
    _poison(model)
    before = snapshot(model, state)
    stats = ak.masked_step(model, skip="nonfinite")
    assert stats.skipped and state.steps == 0
    assert_same(before, snapshot(model, state))


def test_without_skip_nonfinite_is_counted_and_never_reaches_fisher_or_importance():
    model, state = _attached()
    (b,) = state.buckets
    toy_loss(model, 0).backward()
    _poison(model)
    g = b.grad.clone()
    stats = ak.masked_step(model).as_dict()
    assert sum(row["nonfinite"] for row in stats.values()) == 1
    assert b.grad[3].item() == float("inf")                    # passed through unchanged
    assert b.fisher[3].item() == 0.0 and torch.isfinite(b.fisher).all()
    assert (b.fisher[torch.isfinite(g)] > 0).any()
    ak.consolidate(model)
    assert torch.isfinite(b.importance).all() and b.importance[3].item() == 0.0


@pytest.mark.parametrize("skip", ["always", 2, torch.zeros(2)], ids=["str", "int", "shape"])
def test_bad_skip_is_named_before_anything_changes(skip):
    model, state = _attached()
    toy_loss(model, 0).backward()
    before = snapshot(model, state)
    with pytest.raises((TypeError, ValueError), match="skip"):
        ak.masked_step(model, skip=skip)
    assert_same(before, snapshot(model, state))


def test_bf16_autocast_tiny_llava_steps():
    pytest.importorskip("transformers")
    from aim_kernels.continual.tiny import synthetic_batch, tiny_llava
    model = tiny_llava(seed=0, layers=1)
    state = ak.attach(model, ak.preset("aim"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        state.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = synthetic_batch("colour", 8, gen).loss(model)
        loss.backward()
        stats = ak.masked_step(model).as_dict()
        opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(row["nonfinite"] == 0 and row["grad_sq"] > 0 for row in stats.values())
    (b,) = state.buckets
    assert torch.isfinite(b.fisher).all() and (b.fisher > 0).any()
