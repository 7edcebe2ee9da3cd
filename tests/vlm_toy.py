"""A toy VLM (no transformers) for fast API tests, and state snapshots."""
from __future__ import annotations

import socket

import torch
from torch import nn

import aim_kernels as ak


class ToyVLM(nn.Module):
    """vision -> projector -> language, named so the generic layout recognises it."""

    def __init__(self, seed: int = 0, dtype=torch.float32, layers: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.vision = nn.Sequential(*[nn.Linear(6, 6) for _ in range(layers)])
        self.projector = nn.Linear(6, 5)
        self.language = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        self.to(dtype)

    def forward(self, x):
        return self.language(self.projector(torch.tanh(self.vision(x))))


def toy_loss(model, seed: int, batch: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(batch, 6, generator=gen).to(dtype)
    y = torch.randint(0, 3, (batch,), generator=gen)
    return nn.functional.cross_entropy(model(x).float(), y)


def toy_groups(mask_ratio=0.25, keep=0.0, lam=1.0) -> dict[str, ak.GroupConfig]:
    return {
        "vision": ak.GroupConfig(r"^vision\.", mask_ratio, keep, lam),
        "projector": ak.GroupConfig(r"^projector\.", 2 * mask_ratio, keep, 4 * lam),
        "language": ak.GroupConfig(r"^language\.", mask_ratio, keep, lam),
    }


def backward(model, seed: int) -> None:
    loss = toy_loss(model, seed)
    loss.backward()


def snapshot(model, state=None) -> dict[str, torch.Tensor]:
    """Clones of every parameter, grad and state buffer, and the step counters."""
    snap = {}
    for name, p in model.named_parameters():
        snap[f"param:{name}"] = p.detach().clone()
        if p.grad is not None:
            snap[f"grad:{name}"] = p.grad.detach().clone()
    if state is not None:
        for key, t in state.state_dict().items():
            snap[f"state:{key}"] = t.detach().clone()
    return snap


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} changed"


def trained_toy(seed: int = 0):
    """A ToyVLM after one task of three steps and a consolidation: Ω, masks and anchors set."""
    model = ToyVLM(seed=seed)
    state = ak.attach(model, ak.AIMConfig(groups=toy_groups(mask_ratio=0.3, lam=2.0)))
    for i in range(3):
        toy_loss(model, seed * 10 + i).backward()
        ak.masked_step(model)
        state.zero_grad()
    ak.consolidate(model)
    return model, state


def masked_by_spec(state, keep_zero_only: bool = False) -> list[torch.Tensor]:
    """Per bucket, the masked elements (DESIGN.md 2.1: Ω >= t_g and Ω > 0) from this
    process's Ω and the thresholds; with ``keep_zero_only`` only those of keep = 0 groups
    (the ones DESIGN 2.4 holds at their anchors)."""
    out = []
    for b in state.buckets:
        masked = torch.zeros(b.numel, dtype=torch.bool)
        for g, cfg in enumerate(state.group_configs.values()):
            if keep_zero_only and cfg.keep != 0:
                continue
            lo, hi = b.group_range(g)
            om = b.importance[lo:hi].float()
            masked[lo:hi] = (om >= b.thresh[g]) & (om > 0)
        out.append(masked)
    return out


def free_port() -> int:
    """A TCP port free now on loopback, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def release_deepspeed_shm(rank: int) -> None:
    """Unlink the shared-memory all-reduce buffer DeepSpeed's CPU accelerator made for `rank`.

    DeepSpeed 0.19 creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    (64 MiB) at init_distributed and never unlinks it, so every test run used to leave
    128 MiB of RAM behind until reboot (17 GiB after a day of runs on one machine).
    Call after destroy_process_group; the pages go once no process maps them.
    """
    import os
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_"
            f"{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass
