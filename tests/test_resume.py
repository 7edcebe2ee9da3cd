"""Exact resume: stop after k steps, reload model, optimiser and AIM state into fresh
objects, continue; on CPU the result is bitwise that of the uninterrupted run."""
from __future__ import annotations

import torch

import aim_kernels as ak

from .vlm_toy import ToyVLM, toy_groups, toy_loss

CONFIG = dict(groups=toy_groups(mask_ratio=0.3, lam=2.0), beta=0.9, align_every=4)
TASK0, BEFORE_STOP, AFTER_STOP = 6, 3, 5


def _steps(model, opt, seeds, log):
    for seed in seeds:
        opt.zero_grad(set_to_none=False)
        toy_loss(model, seed).backward()
        log.append(ak.masked_step(model).tensor.clone())
        opt.step()


def _fresh(seed):
    model = ToyVLM(seed=seed)
    state = ak.attach(model, ak.AIMConfig(**CONFIG))
    return model, state, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _final(model, state):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: v.clone() for k, v in state.state_dict().items()})


def test_stop_reload_continue_is_bitwise(tmp_path):
    task1 = list(range(100, 100 + BEFORE_STOP + AFTER_STOP))

    model, state, opt = _fresh(0)
    straight = []
    _steps(model, opt, range(TASK0), straight)
    ak.consolidate(model)
    _steps(model, opt, task1, straight)
    ak.consolidate(model)
    want = _final(model, state)

    model, state, opt = _fresh(0)
    resumed = []
    _steps(model, opt, range(TASK0), resumed)
    ak.consolidate(model)
    _steps(model, opt, task1[:BEFORE_STOP], resumed)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    state.save(tmp_path / "aim.safetensors")
    del model, state, opt

    model, state, opt = _fresh(seed=1)          # other weights: everything must come back
    ckpt = torch.load(tmp_path / "ckpt.pt")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    state.load(tmp_path / "aim.safetensors")
    assert state.steps == TASK0 + BEFORE_STOP and state.steps_since_consolidation == BEFORE_STOP
    _steps(model, opt, task1[BEFORE_STOP:], resumed)
    ak.consolidate(model)
    got = _final(model, state)

    assert len(resumed) == len(straight)
    for i, (a, b) in enumerate(zip(resumed, straight)):
        assert torch.equal(a, b), f"stats of step {i} differ"
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            assert torch.equal(g[key], w[key]), f"{key} differs after resume"
    assert state.buckets[0].importance.any() and (state.buckets[0].thresh < float("inf")).any()
