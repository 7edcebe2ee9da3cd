"""``masked_step`` under a DeepSpeed ZeRO-2 engine against ``engine.step()`` (issue 11).

One process (``DS_ACCELERATOR=cpu``, gloo), a 9-layer MLP of 256-wide linear layers in
the three roles (18 tensors, 592k elements), torch AdamW. Each round's backward (and the
previous round's ``engine.step()``) is set-up, outside the timing. ``masked_step`` reads
the gradient fragments of ZeRO-2's flat partition, runs the fused step and writes them
back; each copy is one ``torch._foreach_copy_``, over runs of consecutive fragments
(``merged``: the fp32 masters of this model are one run; ZeRO-2's reduced gradients lie
in its flat buffer in backward order, so they stay 18 pieces) -- ``per-parameter``
switches the merging off, one piece per tensor, to show what it saves.
``engine.step()`` is timed on the same engine with the state attached (its optimizer
step, the mask hold and the copy of the fp32 partition to the model's weights).
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import aim_kernels as ak

deepspeed = pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")

WIDTH, BATCH = 256, 32
_MIN: dict[str, float] = {}


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.vision = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(4)])
        self.projector = nn.Linear(WIDTH, WIDTH)
        self.language = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(4)])
        for p in self.parameters():
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)

    def forward(self, x):
        return self.language(torch.tanh(self.projector(torch.tanh(self.vision(x)))))


@pytest.fixture(scope="module")
def engine():
    import socket
    if os.environ.get("DS_ACCELERATOR", "cpu") != "cpu":
        pytest.skip("this benchmark runs DeepSpeed on the CPU accelerator")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    saved = dict(os.environ)
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    model = _Net()
    cfg = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
           "zero_force_ds_cpu_optimizer": False, "gradient_clipping": 1.0,
           "steps_per_print": 10 ** 9}
    eng, _, _, _ = deepspeed.initialize(
        model=model, config=cfg, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    groups = {g: ak.GroupConfig(rf"^{g}\.", mask_ratio=0.1, lam=1.0)
              for g in ("vision", "projector", "language")}
    state = ak.attach(eng, ak.AIMConfig(groups=groups))
    for _ in range(3):
        _backward(eng)
        ak.masked_step(eng)
        eng.step()
    ak.consolidate(eng)                 # non-trivial Omega, masks and thresholds
    yield eng, state
    ak.detach(eng)
    torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


_GEN = torch.Generator().manual_seed(1)


def _backward(eng) -> None:
    x = torch.randn(BATCH, WIDTH, generator=_GEN)
    eng.backward(eng(x).pow(2).mean())


@pytest.mark.parametrize("copies", ["merged", "per-parameter"])
def test_masked_step_under_zero2(benchmark, engine, monkeypatch, copies):
    from aim_kernels import zero
    eng, state = engine
    if copies == "per-parameter":
        monkeypatch.setattr(zero, "_runs", lambda slots, tensors: [
            (s.start, s.numel, t) for s, t in zip(slots, tensors)])
        state.forget_views()
    pending = []

    def setup():
        if pending:
            eng.step()
        _backward(eng)
        pending.append(True)

    benchmark.group = "DeepSpeed ZeRO-2, 1 process, 592k elements"
    benchmark.pedantic(ak.masked_step, args=(eng,), setup=setup, rounds=40, warmup_rounds=3)
    eng.step()
    _MIN[f"masked_step {copies}"] = benchmark.stats.stats.min
    benchmark.extra_info.update(
        copies=copies, numel=sum(b.numel for b in state.buckets), tensors=len(state.names),
        copies_per_buffer=sum(len(state._master_runs(b)) for b in state.buckets))
    state.forget_views()


def test_engine_step_under_zero2(benchmark, engine):
    eng, _ = engine

    def setup():
        _backward(eng)
        ak.masked_step(eng)

    benchmark.group = "DeepSpeed ZeRO-2, 1 process, 592k elements"
    benchmark.pedantic(eng.step, setup=setup, rounds=40, warmup_rounds=3)
    _MIN["engine.step"] = benchmark.stats.stats.min
    if "masked_step merged" in _MIN:
        benchmark.extra_info.update(
            masked_step_over_engine_step=_MIN["masked_step merged"] / _MIN["engine.step"])
