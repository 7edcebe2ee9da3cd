"""m_g of DESIGN.md 2.3 is state: computed at attach and at each consolidation, one per
group over every bucket that holds a piece of it, kept in the state_dict; between
consolidations ``align_`` only applies it. A group split over buckets never has its
pieces gathered to compute a threshold."""
from __future__ import annotations

import pytest
import torch

import aim_kernels as ak
from aim_kernels import ops
from aim_kernels.ops import reference
from tests.vlm_toy import ToyVLM, toy_groups


def split_model(seed=0):
    """The language group split over two buckets: fp32 language.0, bf16 language.2."""
    model = ToyVLM(seed)
    model.language[2].to(torch.bfloat16)
    return model


def zeros_step(model):
    ak.masked_step(model, [torch.zeros_like(p) for p in model.parameters()])


def group_anchor_pieces(state, g):
    return [b.anchor[slice(*b.group_range(g))] for b in state.buckets
            if b.group_range(g)[0] != b.group_range(g)[1]]


def test_a_split_group_gets_one_m_g_over_all_its_buckets():
    model = split_model()
    state = ak.attach(model, ak.AIMConfig(groups=toy_groups(), align_every=1, align_ratio=0.5))
    g = state.group_names.index("language")
    pieces = group_anchor_pieces(state, g)
    assert len(pieces) == 2 and {p.dtype for p in pieces} == {torch.float32, torch.bfloat16}
    joined = torch.cat([p.float() for p in pieces])
    m = reference.kth_largest(joined.abs(), reference.kth_count(0.5, joined.numel()))
    # a per-bucket select (the old behaviour) would give other thresholds here
    per_bucket = [reference.kth_largest(p.float().abs(), reference.kth_count(0.5, p.numel()))
                  for p in pieces]
    assert any(pb != m for pb in per_bucket)
    for b in state.buckets:
        assert b.align_m[g].item() == m
    # every weight conflicts in sign: the reset ones are exactly those with |a| >= m_g
    before = [b.param.clone() for b in state.buckets]
    with torch.no_grad():
        for b in state.buckets:
            b.param.neg_()
    zeros_step(model)
    for b, old in zip(state.buckets, before):
        lo, hi = b.group_range(g)
        a = b.anchor[lo:hi].float()
        reset = (a.abs() >= m) & (a != 0)
        assert torch.equal(b.param[lo:hi][reset], b.anchor[lo:hi][reset])
        assert torch.equal(b.param[lo:hi][~reset], (-old[lo:hi])[~reset])


def test_align_selects_nothing_between_consolidations(monkeypatch):
    model, calls = ToyVLM(0), []
    state = ak.attach(model, ak.AIMConfig(groups=toy_groups(), align_every=1, align_ratio=0.5))
    m0 = [b.align_m.clone() for b in state.buckets]
    for name in ("group_thresholds", "align_thresholds", "align_"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        zeros_step(model)
    assert calls == []
    assert all(torch.equal(b.align_m, m) for b, m in zip(state.buckets, m0))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)                   # new anchors at consolidation, so a new m_g
    ak.consolidate(model)
    assert "align_thresholds" in calls
    for b in state.buckets:
        expected = ops.align_thresholds(b.anchor, b.offsets, 0.5, backend="torch")
        assert torch.equal(b.align_m, expected)
        assert not torch.equal(b.align_m, m0[0])


def test_refresh_thresholds_never_gathers_a_split_group(monkeypatch):
    model = split_model()
    state = ak.attach(model, ak.AIMConfig(groups=toy_groups(0.4), align_every=1))
    gen = torch.Generator().manual_seed(3)
    for b in state.buckets:
        b.importance.copy_(torch.rand(b.importance.numel(), generator=gen))
    g = state.group_names.index("language")
    omega = torch.cat([b.importance[slice(*b.group_range(g))] for b in state.buckets])

    def no_cat(*a, **k):
        raise AssertionError("refresh_thresholds gathered a group (torch.cat)")
    monkeypatch.setattr(torch, "cat", no_cat)
    state.refresh_thresholds()
    monkeypatch.undo()
    n = omega.numel()
    c_ref, t_ref = reference.group_thresholds(omega, torch.tensor([0, n]),
                                              torch.tensor([0.4], dtype=torch.float64))
    for b in state.buckets:
        assert b.thresh[g].item() == t_ref[0].item()
        torch.testing.assert_close(b.inv_scale[g], c_ref[0], rtol=1e-6, atol=0)


def test_state_dict_keeps_m_g_and_reads_version_1_by_recomputing():
    model = ToyVLM(0)
    cfg = ak.AIMConfig(groups=toy_groups(), align_every=2, align_ratio=0.5)
    state = ak.attach(model, cfg)
    sd = state.state_dict()
    assert int(sd["meta.version"][0]) == 2
    assert all(torch.equal(sd[f"bucket{i}.align_m"], b.align_m)
               for i, b in enumerate(state.buckets))
    other = ak.attach(ToyVLM(0), cfg)
    with torch.no_grad():
        for b in other.buckets:
            b.align_m.fill_(-1.0)
    v1 = {k: v.clone() for k, v in sd.items() if not k.endswith(".align_m")}
    v1["meta.version"] = torch.tensor([1])
    other.load_state_dict(v1)
    for b, ref in zip(other.buckets, state.buckets):
        assert torch.equal(b.align_m, ref.align_m)
        assert torch.equal(b.thresh, ref.thresh) and torch.equal(b.inv_scale, ref.inv_scale)
    bad = dict(sd, **{"meta.version": torch.tensor([7])})
    with pytest.raises(ValueError, match="version 7"):
        other.load_state_dict(bad)


def test_a_version_1_file_loads_with_m_g_recomputed(tmp_path):
    from safetensors.torch import load_file, save_file
    cfg = ak.AIMConfig(groups=toy_groups(), align_every=2, align_ratio=0.5)
    state = ak.attach(ToyVLM(0), cfg)
    path = tmp_path / "state.safetensors"
    state.save(path)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    v1 = {k: v for k, v in load_file(str(path)).items() if not k.endswith(".align_m")}
    v1["meta.version"] = torch.tensor([1])
    old = tmp_path / "v1.safetensors"
    save_file(v1, str(old), metadata=meta)
    other = ak.attach(ToyVLM(0), cfg)
    with torch.no_grad():
        for b in other.buckets:
            b.align_m.fill_(-1.0)
    other.load(old)
    assert all(torch.equal(b.align_m, ref.align_m) for b, ref in zip(other.buckets, state.buckets))
