"""What changes when the managed parameters are FSDP2 shards (DTensors).

Each process keeps the AIM state of the shard it holds, so the per-element work of a
step is local and needs no communication. Only the per-group quantities that
DESIGN.md 2 defines over a whole group are global: ``n_g``, ``sum Omega`` (hence
``c_g``), the k-th largest ``Omega`` (``t_g``) and the k-th largest ``|a|`` of
alignment. They are computed from all-reduced sums and all-reduced radix-select
histograms, so a sharded run takes the same masks as a single-process run.

DDP (replicated parameters) needs none of this: every replica computes the same state.
"""
from __future__ import annotations

import math

import torch

from .ops.reference import inv_scale_of, kth_count, kth_largest

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:          # a torch built without distributed support
    DTensor = Shard = None


def is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this process holds (``t`` itself unless it is a DTensor)."""
    return t.to_local() if is_sharded(t) else t


def process_group(named_params: list[tuple[str, torch.nn.Parameter]]):
    """The process group the managed parameters are sharded over, or None (not sharded).

    All managed parameters must be sharded alike (FSDP2: one ``Shard`` placement on a
    1-D mesh); a mix of plain and sharded tensors would count replicated elements once
    per process in the global thresholds, so it is refused, naming a parameter.
    """
    sharded = [(n, p) for n, p in named_params if is_sharded(p)]
    if not sharded:
        return None
    plain = [n for n, p in named_params if not is_sharded(p)]
    if plain:
        raise ValueError(f"attach: parameter {plain[0]!r} is a plain tensor while "
                         f"{sharded[0][0]!r} is sharded (DTensor); shard the whole model "
                         "(fully_shard on the root too) or none of it")
    mesh = sharded[0][1].device_mesh
    for n, p in sharded:
        if p.device_mesh != mesh or p.device_mesh.ndim != 1 or not isinstance(p.placements[0], Shard):
            raise NotImplementedError(
                f"attach: parameter {n!r} has placements {p.placements} on a {p.device_mesh.ndim}-D "
                "mesh; only FSDP2's one Shard placement on one 1-D mesh is supported")
    return mesh.get_group()


class Collectives:
    """All-reduce sums over a process group, on the device its backend needs."""

    def __init__(self, group):
        import torch.distributed as dist
        self.dist, self.group = dist, group
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.to(self.device, copy=True)
        self.dist.all_reduce(out, group=self.group)
        return out.to(t.device)


def global_thresholds(coll: Collectives, omega: list[list[torch.Tensor]], ratios: list[float],
                      normalize: bool) -> tuple[list[float], list[float]]:
    """``(c_g, t_g)`` of every group over all processes; ``omega[g]`` is the list of the
    group's local pieces (one per bucket). The select runs over the pieces where they lie
    (their histograms add up, then all-reduce): no piece is gathered or copied."""
    local_sums = torch.tensor([[sum(o.numel() for o in pieces),
                                sum(o.double().sum().item() for o in pieces)]
                               for pieces in omega], dtype=torch.float64).reshape(len(omega), 2)
    sums = coll.sum(local_sums).tolist()
    inv_scale, thresh = [], []
    for g, (n, total) in enumerate(sums):
        n = int(n)
        inv_scale.append(inv_scale_of(n, total, normalize))
        k = kth_count(ratios[g], n)
        thresh.append(kth_largest(omega[g], k, hist_reduce=coll.sum) if n else math.inf)
    return inv_scale, thresh


def global_align_thresholds(coll: Collectives, anchors: list[list[torch.Tensor]],
                            ratio: float) -> list[float]:
    """Every group's ``m_g`` (DESIGN.md 2.3) over all of its pieces on all processes."""
    counts = coll.sum(torch.tensor([sum(a.numel() for a in pieces) for pieces in anchors],
                                   dtype=torch.float64)).tolist()
    return [kth_largest(pieces, kth_count(ratio, int(n)), hist_reduce=coll.sum) if n
            else math.inf for pieces, n in zip(anchors, counts)]
