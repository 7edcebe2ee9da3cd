"""Host-side offset arithmetic past 2^31 elements (int32 overflow is the classic bug).

Parameters on the meta device have shapes but no storage, so a model of ~4.3e9
elements costs nothing; the test checks the layout AIMState computes for it.
"""
from __future__ import annotations

import torch
from torch import nn

import aim_kernels as ak
from aim_kernels.state import AIMState

BIG = 1 << 16


class Huge(nn.Module):
    def __init__(self):
        super().__init__()
        with torch.device("meta"):
            self.vision = nn.Linear(BIG, BIG // 2, bias=False)        # 2^31 elements
            self.projector = nn.Linear(BIG, BIG // 2 + 3)             # 2^31 + 3*2^16 + ...
            self.language = nn.Linear(7, 5)


def test_offsets_past_2_31_are_exact(monkeypatch):
    monkeypatch.setattr(AIMState, "refresh_thresholds", lambda self: None)   # no data on meta
    monkeypatch.setattr(AIMState, "reindex_holds", lambda self: None)        # (thresholds: none)
    model = Huge()
    groups = {name: ak.GroupConfig(rf"^{name}\.") for name in ("vision", "projector", "language")}
    state = ak.attach(model, ak.AIMConfig(groups=groups))
    (b,) = state.buckets
    sizes = [sum(p.numel() for p in m.parameters())
             for m in (model.vision, model.projector, model.language)]
    expected = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    assert b.offsets_host == expected and expected[-1] > 2 ** 32
    assert b.offsets.dtype == torch.int64 and b.param.numel() == expected[-1]
    assert state.group_numel() == sizes
    starts = [s.start for s in b.slots]
    assert starts == [0, sizes[0], sizes[0] + BIG * (BIG // 2 + 3), expected[2],
                      expected[2] + 35]
    assert all(isinstance(v, int) for v in b.offsets_host + starts)
    # a meta view's data_ptr is its byte offset: the re-homed views sit past 2^34 bytes
    for s in b.slots:
        assert s.param.data_ptr() - b.param.data_ptr() == 4 * s.start
    assert model.language.bias.data_ptr() > 2 ** 34
