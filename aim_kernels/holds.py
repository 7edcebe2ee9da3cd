"""Masks hold on the update (DESIGN.md 2.4): masked elements of a ``keep = 0`` group stay
bitwise at their anchors after every optimiser step, whatever the optimiser.

A zero gradient does not freeze an element under Adam/AdamW: momentum from earlier steps
and weight decay move it anyway. So after each optimiser step the anchors are copied back
into those elements. The masked set changes only when Ω or the thresholds do (attach,
consolidation, load), so the indices of the held elements are computed then, with one
host sync, and a step costs one gather + scatter over the held elements of each bucket:
no pass over the others, no host sync.

The trigger is torch's global optimiser step post-hook, so any ``torch.optim.Optimizer``
(AdamW, SGD, fused/foreach, GradScaler's ``scaler.step``, accelerate's wrapper) holds the
masks with no call in the training loop. The hook exists while a state is attached and
acts only on states with a parameter in the optimiser that stepped. An engine that updates
the weights outside a torch optimiser step (DeepSpeed copies them back from its fp32
partitions) calls :meth:`AIMState.hold_masks_` itself after its step.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import sharding


@dataclass
class Hold:
    """The held elements of one bucket. ``index``: int64 positions in the bucket (sorted).
    ``copied``: for an FSDP2 bucket (slots copied, not re-homed), ``(slot, positions in the
    slot's local shard)`` per slot with held elements; None when the bucket is the storage."""
    bucket: object
    index: torch.Tensor
    copied: list | None = None

    @property
    def count(self) -> int:
        return self.index.numel()


def held_mask(state, b) -> torch.Tensor:
    """Bool over bucket ``b``: masked (DESIGN.md 2.1) in a group with ``keep == 0``."""
    mask = torch.zeros(b.numel, dtype=torch.bool, device=b.device)
    for g, cfg in enumerate(state.group_configs.values()):
        lo, hi = b.group_range(g)
        if cfg.keep != 0 or lo == hi:
            continue
        omega = b.importance[lo:hi].float()       # the kernels compare in fp32
        mask[lo:hi] = (omega >= b.thresh[g]) & (omega > 0)
    return mask


@torch.no_grad()
def index(state) -> list[Hold]:
    """The holds of every bucket of ``state`` (one ``nonzero`` per bucket)."""
    holds = []
    for b in state.buckets:
        if b.thresh is None or b.device.type == "meta":     # no thresholds / no data yet
            continue
        idx = torch.nonzero(held_mask(state, b)).flatten()
        if idx.numel() == 0:
            continue
        copied = None
        if any(not s.rehomed for s in b.slots):
            starts = torch.tensor([s.start for s in b.slots] + [b.numel], device=idx.device)
            cut = torch.searchsorted(idx, starts).tolist()
            copied = [(s, idx[cut[i]:cut[i + 1]] - s.start) for i, s in enumerate(b.slots)
                      if cut[i + 1] > cut[i]]
        holds.append(Hold(b, idx, copied))
    return holds


@torch.no_grad()
def apply(holds: list[Hold]) -> None:
    """Copy the anchors into the held elements of the live weights."""
    for h in holds:
        b = h.bucket
        if h.copied is None:
            b.param.index_copy_(0, h.index, b.anchor.index_select(0, h.index))
            continue
        for s, idx in h.copied:
            anchor = s.param_view(b.anchor).view(-1).index_select(0, idx)
            sharding.local(s.param.detach()).view(-1).index_copy_(0, idx, anchor)
            s.param_view(b.param).view(-1).index_copy_(0, idx, anchor)


# ---- the optimiser hook --------------------------------------------------------------
_TRACKED: "weakref.WeakSet" = weakref.WeakSet()
_HANDLE = None
_GENERATION = 0            # bumped at every track/untrack: invalidates the per-optimiser cache
_BY_OPTIMIZER: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def track(state) -> None:
    """Hold ``state``'s masks after every step of an optimiser over its parameters."""
    global _HANDLE, _GENERATION
    _TRACKED.add(state)
    _GENERATION += 1
    if _HANDLE is None:
        _HANDLE = register_optimizer_step_post_hook(_after_step)
    # A state dropped without detach (its model garbage-collected) must not leave the
    # global hook behind either.
    weakref.finalize(state, _remove_hook_if_unused)


def untrack(state) -> None:
    """Stop holding ``state``; the hook itself goes when no state is left."""
    global _GENERATION
    _TRACKED.discard(state)
    _GENERATION += 1
    _remove_hook_if_unused()


def _remove_hook_if_unused() -> None:
    global _HANDLE
    if _HANDLE is not None and not list(_TRACKED):
        _HANDLE.remove()
        _HANDLE = None


def hook_installed() -> bool:
    return _HANDLE is not None


def _states_for(optimizer) -> list:
    """The tracked states with a parameter in ``optimizer``, cached per optimiser until its
    param groups or the tracked states change (a few tuple compares per step)."""
    signature = (_GENERATION,) + tuple((id(g["params"]), len(g["params"]))
                                       for g in optimizer.param_groups)
    cached = _BY_OPTIMIZER.get(optimizer)
    if cached is not None and cached[0] == signature:
        return [s for s in (r() for r in cached[1]) if s is not None]
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    states = [s for s in list(_TRACKED) if not s.param_ids.isdisjoint(ids)]
    _BY_OPTIMIZER[optimizer] = (signature, [weakref.ref(s) for s in states])
    return states


def _after_step(optimizer, args, kwargs) -> None:
    for state in _states_for(optimizer):
        state.hold_masks_()
