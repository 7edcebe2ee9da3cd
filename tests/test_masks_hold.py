"""DESIGN.md 2.4 in the README loop: masked elements of a keep = 0 group stay bitwise at
their anchors after every optimizer.step(), whatever the optimiser; plus the checks that
the model still holds the managed parameters, wrappers, and moving / casting a model."""
from __future__ import annotations

import gc

import pytest

import torch
from torch import nn

import aim_kernels as ak
from aim_kernels import holds

from .vlm_toy import ToyVLM, masked_by_spec, snapshot, toy_groups, toy_loss


class SplitVLM(nn.Module):
    """ToyVLM whose language group spans two buckets (an fp32 and a bf16 tensor)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.vision = nn.Linear(6, 6)
        self.projector = nn.Linear(6, 5)
        self.language = nn.Linear(5, 3)
        self.language_bf16 = nn.Parameter(torch.randn(3, 5).to(torch.bfloat16))

    def forward(self, x):
        h = self.projector(torch.tanh(self.vision(x.float())))
        return self.language(h) + h @ self.language_bf16.float().T


def groups(keep_language=0.0):
    g = toy_groups(mask_ratio=0.3, lam=2.0)
    g["language"] = ak.GroupConfig(r"^language", 0.3, keep_language, 2.0)
    return g


def readme_loop(model, state, opt, tasks=2, steps=6, check=None):
    """The README loop: one optimiser across the tasks, masked_step before clipping."""
    for task in range(tasks):
        for i in range(steps):
            opt.zero_grad(set_to_none=False)
            toy_loss(model, 100 * task + i).backward()
            ak.masked_step(model)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if check is not None:
                check(task, i)
        ak.consolidate(model)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.AdamW(p, lr=1e-2),                     # default weight_decay=0.01
    lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
], ids=["adamw", "adam", "sgd-momentum"])
def test_readme_loop_holds_masked_elements_bitwise_after_every_step(make_opt):
    model = SplitVLM()
    state = ak.attach(model, ak.AIMConfig(groups=groups()))
    language = list(state.group_configs).index("language")
    assert sum(1 for b in state.buckets if b.group_range(language)[1] > b.group_range(language)[0]) == 2
    opt = make_opt(model.parameters())
    seen = {"held": 0, "moved": 0}

    def check(task, i):
        if task == 0:
            return
        for b, m in zip(state.buckets, masked_by_spec(state, keep_zero_only=True)):
            assert torch.equal(b.param[m], b.anchor[m]), f"masked elements moved at step {i}"
            seen["held"] += int(m.sum())
            seen["moved"] += int((b.param[~m] != b.anchor[~m]).sum())

    readme_loop(model, state, opt, tasks=3, check=check)
    assert seen["held"] > 0 and seen["moved"] > 0          # not vacuous
    # both buckets of the split group held something
    assert all(m.any() for m in masked_by_spec(state, keep_zero_only=True))


def test_keep_between_zero_and_one_is_not_held():
    """0 < κ < 1 scales the gradient only: under Adam the masked elements still move."""
    model = ToyVLM(seed=0)
    state = ak.attach(model, ak.AIMConfig(groups=toy_groups(mask_ratio=0.3, keep=0.5, lam=0.0)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    readme_loop(model, state, opt, tasks=1)
    assert state.held_count == 0
    b = state.buckets[0]
    masked = (b.importance > 0) & (b.importance >= b.thresh.repeat_interleave(
        torch.diff(b.offsets)))
    anchor = b.anchor.clone()
    readme_loop(model, state, opt, tasks=1)
    assert masked.any() and (b.param[masked] != anchor[masked]).any()


def test_hold_touches_only_the_held_elements_and_goes_at_detach():
    model = ToyVLM(seed=0)
    state = ak.attach(model, ak.AIMConfig(groups=toy_groups(mask_ratio=0.3, lam=0.0)))
    assert holds.hook_installed()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    readme_loop(model, state, opt, tasks=1)
    (m,) = masked_by_spec(state, keep_zero_only=True)
    assert state.held_count == int(m.sum()) > 0
    b = state.buckets[0]
    with torch.no_grad():
        b.param.add_(1.0)                       # every element off its anchor
    state.hold_masks_()
    assert torch.equal(b.param[m], b.anchor[m])
    assert torch.equal(b.param[~m], b.anchor[~m] + 1.0)

    other = ToyVLM(seed=1)                      # another model's optimiser: not held
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with torch.no_grad():
        b.param.add_(1.0)
    other(torch.randn(2, 6)).sum().backward()
    other_opt.step()
    assert not torch.equal(b.param[m], b.anchor[m])

    ak.detach(model)
    gc.collect()          # states of earlier tests' models (e.g. a Trainer's) may still be alive
    assert state not in holds._TRACKED
    assert holds.hook_installed() == bool(list(holds._TRACKED))
    with torch.no_grad():
        b.param.copy_(b.anchor)
    opt.zero_grad(set_to_none=False)
    toy_loss(model, 7).backward()
    opt.step()                                  # detached: nothing restores them
    assert (b.param[m] != b.anchor[m]).any()


def test_hold_survives_save_and_load(tmp_path):
    model = ToyVLM(seed=0)
    state = ak.attach(model, ak.AIMConfig(groups=toy_groups(mask_ratio=0.3, lam=0.0)))
    readme_loop(model, state, torch.optim.SGD(model.parameters(), lr=0.1), tasks=1)
    state.save(tmp_path / "aim.safetensors")
    count = state.held_count
    fresh = ToyVLM(seed=0)
    fresh.load_state_dict(model.state_dict())
    st2 = ak.attach(fresh, ak.AIMConfig(groups=toy_groups(mask_ratio=0.3, lam=0.0)))
    assert st2.held_count == 0
    st2.load(tmp_path / "aim.safetensors")
    assert st2.held_count == count > 0


# ---- a replaced parameter raises (issue 14 item 3) ------------------------------------
def _replace_weight(model):
    model.projector.weight = nn.Parameter(model.projector.weight.detach().clone())


def _assign_state_dict(model):
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)


def _replace_module(model):
    model.language[2] = nn.Linear(7, 3)


@pytest.mark.parametrize("replace, culprit", [
    (_replace_weight, "'projector.weight'"),
    (_assign_state_dict, "'vision.0.weight'"),
    (_replace_module, "'language.2'"),
], ids=["setattr", "assign", "submodule"])
@pytest.mark.parametrize("op", ["masked_step", "consolidate"])
def test_replaced_parameter_raises_naming_it(replace, culprit, op):
    model = ToyVLM(seed=0)
    state = ak.attach(model, ak.AIMConfig(groups=toy_groups()))
    toy_loss(model, 1).backward()
    replace(model)
    before = snapshot(model, state)
    with pytest.raises(RuntimeError, match=culprit):
        getattr(ak, op)(model)
    after = snapshot(model, state)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_load_state_dict_by_copy_is_fine():
    model = ToyVLM(seed=0)
    ak.attach(model, ak.AIMConfig(groups=toy_groups()))
    model.load_state_dict(ToyVLM(seed=3).state_dict())
    toy_loss(model, 1).backward()
    ak.masked_step(model)


# ---- wrappers and moving / casting (issue 14 item 7) -------------------------------------
def test_wrappers_find_the_state():
    model = ToyVLM(seed=0)
    state = ak.attach(model, ak.AIMConfig(groups=toy_groups()))
    compiled = torch.compile(model)
    dp = nn.DataParallel(model)         # on a CPU-only machine a pass-through with `.module`
    for wrapper in (compiled, dp):
        toy_loss(model, 1).backward()
        assert ak.masked_step(wrapper).tensor.shape == (3, 7)
        ak.consolidate(wrapper)
        assert ak.step.state_of(wrapper) is state
    with pytest.raises(RuntimeError, match="already has an AIMState"):
        ak.attach(compiled)
    ak.detach(dp)
    again = ak.attach(compiled, ak.AIMConfig(groups=toy_groups()))    # attaches to the model
    assert ak.step.state_of(model) is again and again.names == state.names


def test_cast_error_advises_state_to_which_keeps_the_state():
    model = ToyVLM(seed=0)
    cfg = ak.AIMConfig(groups=toy_groups(mask_ratio=0.3, lam=2.0), backend="torch")
    state = ak.attach(model, cfg)
    readme_loop(model, state, torch.optim.SGD(model.parameters(), lr=0.1), tasks=1)
    omega, anchor = state.buckets[0].importance.clone(), state.buckets[0].anchor.clone()
    held = state.held_count
    model.half()
    with pytest.raises(RuntimeError, match=r"state\.to\("):
        ak.masked_step(model)
    assert state.to(torch.float16) is state            # re-homes what .half() moved out
    (b,) = state.buckets
    assert b.dtype == torch.float16 and ak.step.state_of(model) is state
    assert torch.equal(b.importance, omega) and torch.equal(b.anchor, anchor.half())
    assert state.held_count == held
    state.to(torch.float32)                              # and the supported way, directly
    (b,) = state.buckets
    assert torch.equal(b.anchor, anchor.half().float())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    (m,) = masked_by_spec(state, keep_zero_only=True)
    for i in range(3):
        opt.zero_grad(set_to_none=False)
        toy_loss(model, 50 + i).backward()
        ak.masked_step(model)
        opt.step()
        assert torch.equal(b.param[m], b.anchor[m])
    assert state.steps == 9 and m.any()


def test_a_state_saved_before_a_cast_loads_after_it(tmp_path):
    model = SplitVLM()                                  # fp32 + bf16 buckets
    state = ak.attach(model, ak.AIMConfig(groups=groups(), backend="torch"))
    readme_loop(model, state, torch.optim.SGD(model.parameters(), lr=0.1), tasks=1)
    state.save(tmp_path / "aim.safetensors")
    want = {s.name: {k: s.param_view(getattr(b, k)).clone() for k in ("anchor", "importance")}
            for b in state.buckets for s in b.slots}
    held = state.held_count
    state.to(torch.bfloat16)                             # one bf16 bucket now
    with torch.no_grad():
        for b in state.buckets:
            b.importance.zero_()
            b.anchor.zero_()
    state.load(tmp_path / "aim.safetensors")
    (b,) = state.buckets
    for s in b.slots:
        assert torch.equal(s.param_view(b.importance), want[s.name]["importance"]), s.name
        assert torch.equal(s.param_view(b.anchor), want[s.name]["anchor"].bfloat16()), s.name
    assert state.held_count == held and state.steps == 6
