"""The model-level API of DESIGN.md 3: attach, masked_step, consolidate, detach, AIMState."""
from __future__ import annotations

import math

import pytest
import torch

import aim_kernels as ak
from aim_kernels import prepared
from aim_kernels.ops import reference
from tests.vlm_toy import ToyVLM, assert_same, backward, snapshot, toy_groups


def attached(seed=0, dtype=torch.float32, **cfg):
    model = ToyVLM(seed, dtype)
    cfg.setdefault("groups", toy_groups())
    return model, ak.attach(model, ak.AIMConfig(**cfg))


def flat_expected(state, step_kwargs):
    """What one fused step should do, from clones of the flat buffers."""
    (b,) = state.buckets
    grad, fisher = b.grad.clone(), b.fisher.clone()
    stats = reference.fused_step(grad, b.param, b.anchor, b.importance, fisher, b.offsets,
                                 b.inv_scale, b.thresh, b.keep, b.lam, **step_kwargs)
    return grad, fisher, stats


def step_kwargs(cfg):
    return dict(beta=cfg.beta, accumulate=cfg.accumulate, importance_kind=cfg.importance,
                directional=cfg.directional)


def train_task(model, seeds, optimizer=None):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in seeds:
        optimizer.zero_grad(set_to_none=False)
        backward(model, seed)
        ak.masked_step(model)
        optimizer.step()
    return optimizer


def test_attach_rehomes_parameters_and_grads_into_one_flat_buffer():
    model, state = attached()
    (b,) = state.buckets
    assert b.key == "cpu|float32"
    for s in b.slots:
        assert s.param.data_ptr() == b.param.data_ptr() + 4 * s.start
        assert s.param.grad.data_ptr() == b.grad.data_ptr() + 4 * s.start
    assert torch.equal(b.anchor, b.param) and not b.importance.any() and not b.fisher.any()
    # grouped contiguously, in group order, model order within a group
    assert state.names == [n for n, _ in model.named_parameters()]
    assert list(state.groups) == ["vision", "projector", "language"]
    assert b.offsets.tolist() == [0, 84, 119, 185]
    # optimisers and autograd keep working on the views
    backward(model, 0)
    assert b.grad.abs().sum() > 0
    assert all(s.param.grad.data_ptr() == b.grad.data_ptr() + 4 * s.start for s in b.slots)


def test_one_fused_call_per_bucket_whatever_the_number_of_tensors(monkeypatch):
    model = ToyVLM(layers=20)
    model.language.half()   # a second (device, dtype) bucket
    groups = {"all": ak.GroupConfig(".")}
    state = ak.attach(model, ak.AIMConfig(groups=groups))
    assert len(state.names) == 46 and len(state.buckets) == 2
    calls = []
    real = ak.ops.fused_step
    monkeypatch.setattr(ak.ops, "fused_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_launch = prepared.launch          # the eager CPU path's prepared launches count too

    def counted_launch(*a):
        run = real_launch(*a)
        return None if run is None else (lambda: calls.append(1) or run())

    monkeypatch.setattr(prepared, "launch", counted_launch)
    for p in model.parameters():
        p.grad.normal_()
    ak.masked_step(model)
    assert len(calls) == 2


def test_masked_step_is_the_fused_step_on_the_flat_buffers():
    model, state = attached(normalize=True, directional=True)
    train_task(model, range(3))
    ak.consolidate(model)
    train_task(model, range(3, 5))     # drift away from the new anchors
    backward(model, 99)
    grad, fisher, stats = flat_expected(state, step_kwargs(state.config))
    got = ak.masked_step(model)
    (b,) = state.buckets
    torch.testing.assert_close(b.grad, grad, rtol=0, atol=0)
    torch.testing.assert_close(b.fisher, fisher, rtol=0, atol=0)
    torch.testing.assert_close(got.tensor, stats)
    assert got.as_dict()["projector"]["masked"] == math.floor(0.5 * 35)


def test_keep_zero_freezes_exactly_the_top_importance_elements():
    model, state = attached(groups=toy_groups(mask_ratio=0.25, keep=0.0, lam=0.0))
    train_task(model, range(4))
    ak.consolidate(model)
    (b,) = state.buckets
    omega = b.importance.clone()
    backward(model, 7)
    ak.masked_step(model)
    for g, name in enumerate(state.group_names):
        lo, hi = b.group_range(g)
        k = math.floor(state.group_configs[name].mask_ratio * (hi - lo))
        top = omega[lo:hi].topk(k).indices + lo
        assert (b.grad[top] == 0).all()
        rest = torch.ones(hi - lo, dtype=torch.bool)
        rest[top - lo] = False
        assert (b.grad[lo:hi][rest] != 0).sum() > 0


@pytest.mark.parametrize("accumulate", ["ema", "sum"])
def test_consolidation_bias_correction_uses_the_real_step_count(accumulate):
    model, state = attached(accumulate=accumulate, beta=0.9,
                            groups={"all": ak.GroupConfig(".", 0.0, 0.0, 0.0)})
    fixed = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    for _ in range(7):
        ak.masked_step(model, {n: g.clone() for n, g in fixed.items()})
    ak.consolidate(model)
    (b,) = state.buckets
    # constant g: ema's corrected estimate and sum's mean are both exactly g^2
    torch.testing.assert_close(b.importance, torch.full_like(b.importance, 0.25))
    assert not b.fisher.any() and state.steps_since_consolidation == 0 and state.steps == 7


def test_thresholds_after_consolidation_are_the_exact_kth_largest():
    model, state = attached()
    train_task(model, range(5))
    ak.consolidate(model)
    (b,) = state.buckets
    for g, name in enumerate(state.group_names):
        lo, hi = b.group_range(g)
        omega = b.importance[lo:hi]
        k = math.floor(state.group_configs[name].mask_ratio * (hi - lo))
        assert b.thresh[g].item() == omega.sort(descending=True).values[k - 1].item()
        assert b.inv_scale[g].item() == pytest.approx((hi - lo) / omega.double().sum().item(), rel=1e-6)


def test_a_group_split_over_two_buckets_gets_one_global_threshold():
    model = ToyVLM()
    model.language[2].to(torch.bfloat16)
    model.language[0].to(torch.bfloat16)
    model.forward = lambda x: model.language(model.projector(torch.tanh(model.vision(x))).bfloat16())
    groups = {"vision": ak.GroupConfig(r"^vision"), "rest": ak.GroupConfig(r"^(projector|language)", 0.5)}
    state = ak.attach(model, ak.AIMConfig(groups=groups))
    assert [b.key for b in state.buckets] == ["cpu|float32", "cpu|bfloat16"]
    for b in state.buckets:
        b.fisher.uniform_()
    ak.consolidate(model)
    omega = torch.cat([b.importance[slice(*b.group_range(1))].float() for b in state.buckets])
    k = math.floor(0.5 * omega.numel())
    expected = omega.sort(descending=True).values[k - 1].item()
    assert [b.thresh[1].item() for b in state.buckets] == [expected, expected]
    masked = sum(int(((b.importance[slice(*b.group_range(1))].float() >= expected)).sum())
                 for b in state.buckets)
    assert masked >= k


def test_replaced_grads_are_rehomed_and_give_the_same_step():
    a_model, a_state = attached(seed=3)
    b_model, b_state = attached(seed=3)
    backward(a_model, 1)
    ak.masked_step(a_model)
    for p in b_model.parameters():
        p.grad = None                          # zero_grad(set_to_none=True)
    backward(b_model, 1)                       # autograd makes fresh .grad tensors
    ak.masked_step(b_model)
    assert torch.equal(a_state.buckets[0].grad, b_state.buckets[0].grad)
    assert torch.equal(a_state.buckets[0].fisher, b_state.buckets[0].fisher)
    (b,) = b_state.buckets
    assert all(s.param.grad.data_ptr() == b.grad.data_ptr() + 4 * s.start for s in b.slots)


def test_a_missing_grad_counts_as_zero_and_still_gets_the_regulariser():
    model, state = attached(directional=False, normalize=False,
                            groups={"all": ak.GroupConfig(".", 0.0, 0.0, 2.0)})
    (b,) = state.buckets
    b.importance.fill_(1.0)
    state.refresh_thresholds()
    with torch.no_grad():
        model.projector.weight.add_(0.5)       # drift d = 0.5 on this tensor
    for p in model.parameters():
        p.grad = None
    stats = ak.masked_step(model)
    assert model.projector.weight.grad is not None
    torch.testing.assert_close(model.projector.weight.grad,
                               torch.full_like(model.projector.weight, 2.0 * 0.5))
    assert model.vision[0].weight.grad.abs().sum() == 0   # no drift, no gradient
    assert stats.as_dict()["all"]["grad_sq"] == 0


def test_explicit_grads_sequence_and_dict_are_modified_in_place():
    results = []
    for form in ("attr", "seq", "dict"):
        model, state = attached(seed=5, directional=False)
        train_task(model, range(3))
        ak.consolidate(model)
        train_task(model, range(3, 5))
        grads = [g.clone() for g in torch.autograd.grad(
            __import__("tests.vlm_toy", fromlist=["toy_loss"]).toy_loss(model, 11),
            [p for _, p in model.named_parameters()])]
        if form == "attr":
            for p, g in zip(model.parameters(), grads):
                p.grad.copy_(g)
            ak.masked_step(model)
            out = [p.grad.clone() for p in model.parameters()]
        elif form == "seq":
            ak.masked_step(model, grads)
            out = grads
        else:
            by_name = dict(zip(state.names, grads))
            ak.masked_step(model, by_name)
            out = [by_name[n] for n in state.names]
        results.append(out)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


def test_step_stats_are_lazy_and_name_the_groups():
    model, state = attached()
    backward(model, 0)
    stats = ak.masked_step(model)
    assert isinstance(stats.tensor, torch.Tensor) and stats.tensor.shape == (3, 7)
    assert stats.tensor.dtype == torch.float32
    d = stats.as_dict()
    assert list(d) == ["vision", "projector", "language"]
    assert list(d["vision"]) == list(ak.ops.STAT_NAMES)
    assert d["vision"]["grad_sq"] > 0 and d["vision"]["nonfinite"] == 0


def test_nonfinite_grads_never_reach_fisher_or_importance_and_are_counted():
    model, state = attached()
    backward(model, 0)
    model.projector.weight.grad[0, 0] = float("nan")
    model.projector.weight.grad[1, 1] = float("inf")
    stats = ak.masked_step(model)
    (b,) = state.buckets
    assert torch.isfinite(b.fisher).all()
    assert math.isnan(model.projector.weight.grad[0, 0]) and math.isinf(model.projector.weight.grad[1, 1])
    assert stats.as_dict()["projector"]["nonfinite"] == 2
    ak.consolidate(model)
    assert torch.isfinite(b.importance).all()


def test_align_runs_every_align_every_steps(monkeypatch):
    model, state = attached(align_every=3, groups=toy_groups(0.0, 1.0, 0.0))
    calls = []
    real = ak.ops.align_apply_
    monkeypatch.setattr(ak.ops, "align_apply_",
                        lambda *a, **k: calls.append(state.steps) or real(*a, **k))
    train_task(model, range(7))
    assert calls == [3, 6]


def test_align_resets_sign_conflicts_to_the_anchor():
    model, state = attached(align_every=1, align_ratio=1.0, groups={"all": ak.GroupConfig(".")})
    (b,) = state.buckets
    with torch.no_grad():
        b.param.neg_()                          # every weight now conflicts with its anchor
    ak.masked_step(model, [torch.zeros_like(p) for p in model.parameters()])
    assert torch.equal(b.param, b.anchor)


def test_state_dict_resumes_exactly(tmp_path):
    def run(model, opt, seeds):
        train_task(model, seeds, opt)
        return snapshot(model)

    model, state = attached(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_task(model, range(4), opt)
    ak.consolidate(model)
    train_task(model, range(4, 6), opt)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    state.save(tmp_path / "aim.safetensors")
    expected = run(model, opt, range(6, 10))
    ak.consolidate(model)
    expected_state = snapshot(model, state)

    model2 = ToyVLM(seed=42)                   # different init: everything must come from disk
    state2 = ak.attach(model2, ak.AIMConfig(groups=toy_groups()))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    state2.load(tmp_path / "aim.safetensors")
    assert state2.steps == 6 and state2.steps_since_consolidation == 2
    assert_same(run(model2, opt2, range(6, 10)), expected)
    ak.consolidate(model2)
    assert_same(snapshot(model2, state2), expected_state)


def test_state_dict_is_plain_tensors():
    model, state = attached()
    sd = state.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert {k.split(".")[-1] for k in sd if k.startswith("bucket0")} == {
        "anchor", "importance", "fisher", "inv_scale", "thresh", "align_m"}


def test_detach_then_attach_again():
    model, state = attached()
    assert ak.detach(model) is state
    with pytest.raises(RuntimeError, match="attach"):
        ak.masked_step(model)
    again = ak.attach(model, ak.AIMConfig(groups=toy_groups()))
    backward(model, 0)
    ak.masked_step(model)
    assert again.steps == 1


@pytest.mark.parametrize("name", ak.config.PRESETS)
def test_every_preset_trains_and_does_what_its_row_says(name):
    """Each preset, over two tasks, shows the behaviour of its DESIGN.md 2.5 row: the
    merge rule moves the weights at consolidation (or not), lambda > 0 changes the
    gradients (or they pass bit for bit), rho > 0 masks elements, normalize sets c_g,
    and the importance kind is the one F accumulates."""
    cfg = ak.preset(name)
    assert cfg.groups is None
    model = ToyVLM()
    state = ak.attach(model, cfg)
    assert list(state.groups) == ["vision", "projector", "language"]
    (b,) = state.buckets
    groups = list(state.group_configs.values())
    train_task(model, range(3))

    theta = b.param.clone()
    want = {k: getattr(b, k).clone() for k in ("param", "anchor", "importance", "fisher")}
    n = state.steps_since_consolidation
    scale = 1.0 / (1.0 - cfg.beta ** n) if cfg.accumulate == "ema" else 1.0 / max(n, 1)
    reference.consolidate_(*want.values(), fisher_scale=scale, decay=cfg.decay,
                           merge=cfg.merge, alpha=cfg.merge_alpha)
    ak.consolidate(model)
    torch.testing.assert_close(b.param, want["param"], rtol=1e-6, atol=1e-7)
    assert torch.equal(b.param, theta) == (cfg.merge is None), "the merge rule moves theta"

    total = torch.tensor([float(b.importance[slice(*b.group_range(g))].double().sum())
                          for g in range(len(groups))], dtype=torch.float64)
    sizes = torch.tensor([float(b.group_range(g)[1] - b.group_range(g)[0])
                          for g in range(len(groups))], dtype=torch.float64)
    c = (sizes / total).float() if cfg.normalize else torch.ones(len(groups))
    assert torch.equal(b.inv_scale, c), (b.inv_scale, c)

    train_task(model, [5])                          # drift away from the new anchors
    backward(model, 6)
    g_in, F_in = b.grad.clone(), b.fisher.clone()
    stats = ak.masked_step(model).as_dict()
    u = g_in.abs() if cfg.importance == "abs" else g_in * g_in
    torch.testing.assert_close(b.fisher, cfg.beta * F_in + (1 - cfg.beta) * u, rtol=1e-6,
                               atol=0)
    for g, (group, gc) in enumerate(zip(state.group_names, groups)):
        lo, hi = b.group_range(g)
        k = math.floor(gc.mask_ratio * (hi - lo))
        assert (stats[group]["masked"] > 0) == (k > 0), (group, stats[group])
        assert (stats[group]["penalty"] > 0) == (gc.lam > 0), (group, stats[group])
        touched = not torch.equal(b.grad[lo:hi], g_in[lo:hi])
        assert touched == (gc.lam > 0 or (k > 0 and gc.keep != 1)), group
    assert any(gc.lam > 0 for gc in groups) == (name not in ("naive", "merge"))
    assert any(math.floor(gc.mask_ratio * 35) > 0 for gc in groups) == (name == "aim")


def test_preset_rows_follow_design_2_4():
    assert ak.preset("ewc").normalize is False and ak.preset("ewc").directional is False
    assert ak.preset("mm-ewc").normalize is True and ak.preset("mm-ewc").directional is False
    assert ak.preset("mas").importance == "abs" and ak.preset("mas").normalize is False
    m = ak.preset("merge")
    assert (m.align_every > 0, m.align_ratio, m.merge, m.merge_alpha) == (True, 0.5, "linear", 0.5)
    assert ak.preset("fisher-merge").merge == "fisher"
    aim = ak.preset("aim")
    assert aim.normalize and aim.directional
    rv = aim.role_values
    assert all(v.keep == 0.0 for v in rv.values())
    assert rv["projector"].mask_ratio > rv["language"].mask_ratio > 0
    assert rv["projector"].lam > rv["language"].lam > 0
    for name in ("naive", "merge"):
        assert all(v.lam == 0 and v.mask_ratio == 0 for v in ak.preset(name).role_values.values())
    with pytest.raises(ValueError, match="unknown name"):
        ak.preset("nope")


def test_available_backends_lists_torch_and_says_why_not_for_the_rest():
    assert "torch" in ak.available_backends()
    for name in ("cpu", "triton", "cuda"):
        if name not in ak.available_backends():
            assert ak.ops.unavailable_reason(name)


@pytest.mark.cuda
def test_a_cuda_step_does_not_sync_the_host():
    model = ToyVLM().cuda()
    ak.attach(model, ak.AIMConfig(groups=toy_groups(), backend="auto"))
    x = torch.randn(4, 6, device="cuda")
    model(x).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = ak.masked_step(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.as_dict()["vision"]["grad_sq"] > 0
