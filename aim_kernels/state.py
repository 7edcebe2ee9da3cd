"""AIMState: the flat state buffers, their offsets, anchors and state_dict.

At attach the managed parameters are re-homed into one flat buffer per
(device, dtype) -- a *bucket* -- grouped contiguously in group order: ``p.data``
becomes a view of the bucket's ``param`` buffer and ``p.grad`` a view of its
``grad`` buffer, into which autograd accumulates in place. Then one step is one
fused launch per bucket, whatever the number of parameter tensors.

Every bucket carries all G groups (a group absent from it is an empty range), so
a group index means the same thing everywhere. Anchors are stored in the
parameter dtype (a snapshot of a bf16 weight is exact in bf16); importance and
fisher in ``config.state_dtype``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch

from . import checkpoint, holds, ops, relocate, sharding
from .config import AIMConfig, GroupConfig
from .ops.reference import inv_scale_of, kth_count, kth_largest

_STATE_DICT_VERSION = 2
# Version 1 had no m_g (bucket<i>.align_m): it is recomputed from the anchors on load,
# which is exact, since m_g depends on the anchors only.
_READABLE_VERSIONS = (1, 2)


@dataclass
class Slot:
    """Where one managed parameter lives in its bucket.

    A plain parameter is *re-homed*: its data and grad become views of the bucket.
    An FSDP2 shard (DTensor) is not -- FSDP2 owns that storage and all-gathers from
    it -- so its local shard is copied in before a step and back after a write.
    """
    name: str
    param: torch.nn.Parameter
    group: int
    start: int
    numel: int
    shape: torch.Size            # of the local tensor (the shard, for a DTensor)
    rehomed: bool = True

    def param_view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.start:self.start + self.numel].view(self.shape)


@dataclass
class Bucket:
    """All managed parameters of one (device, dtype), and their state."""
    device: torch.device
    dtype: torch.dtype
    slots: list[Slot]
    offsets_host: list[int]          # [G+1], python ints: host-side arithmetic is int64-safe
    param: torch.Tensor
    grad: torch.Tensor
    anchor: torch.Tensor
    importance: torch.Tensor
    fisher: torch.Tensor
    offsets: torch.Tensor            # int64 [G+1] on device
    keep: torch.Tensor               # fp32 [G]
    lam: torch.Tensor                # fp32 [G]
    mask_ratio: torch.Tensor         # fp64 [G]: k = floor(rho * n) as the user wrote rho
    inv_scale: torch.Tensor = field(default=None)   # fp32 [G], global per group
    thresh: torch.Tensor = field(default=None)      # fp32 [G], global per group
    align_m: torch.Tensor = field(default=None)     # fp32 [G], m_g of 2.3, global per group

    @property
    def key(self) -> str:
        return f"{self.device}|{str(self.dtype).removeprefix('torch.')}"

    @property
    def numel(self) -> int:
        return self.offsets_host[-1]

    def group_range(self, g: int) -> tuple[int, int]:
        return self.offsets_host[g], self.offsets_host[g + 1]


def _flat_layout(slots_by_group: list[list[tuple[str, torch.nn.Parameter]]]):
    """Split the grouped parameters into buckets: ``{(device, dtype): [[(name, p)] per group]}``."""
    buckets: dict[tuple, list[list]] = {}
    for g, members in enumerate(slots_by_group):
        for name, p in members:
            per_group = buckets.setdefault((p.device, p.dtype), [[] for _ in slots_by_group])
            per_group[g].append((name, p))
    return buckets


class AIMState:
    """The per-model state of DESIGN.md section 2; made by :func:`aim_kernels.attach`."""

    def __init__(self, groups: dict[str, GroupConfig],
                 members: dict[str, list[tuple[str, torch.nn.Parameter]]], config: AIMConfig):
        self.config = config
        self.group_configs = groups
        self.group_names = list(groups)
        self.groups = {g: [name for name, _ in members[g]] for g in groups}
        self.names = [name for g in groups for name in self.groups[g]]
        self.steps = 0                  # masked_step calls since attach (skipped ones aside)
        self.steps_since_consolidation = 0
        self.buckets: list[Bucket] = []
        group = sharding.process_group([m for g in groups for m in members[g]])
        self.collectives = None if group is None else sharding.Collectives(group)
        with torch.no_grad():
            for (device, dtype), per_group in _flat_layout([members[g] for g in groups]).items():
                self.buckets.append(self._make_bucket(device, dtype, per_group))
        self._slot_by_name = {s.name: s for b in self.buckets for s in b.slots}
        self._copied = [(b, s) for b in self.buckets for s in b.slots if not s.rehomed]
        self._fingerprint = config.fingerprint(groups) + self._model_fingerprint()
        self.param_ids = frozenset(id(s.param) for s in self._slot_by_name.values())
        self._holds: list[holds.Hold] = []
        self._binding = None            # set by attach: the model's names -> these Parameters
        self.refresh_thresholds()
        self.reindex_holds()

    # ---- construction --------------------------------------------------------------
    def _make_bucket(self, device, dtype, per_group) -> Bucket:
        slots, offsets, cursor = [], [0], 0
        for g, members in enumerate(per_group):
            for name, p in members:
                shard = sharding.local(p)
                slots.append(Slot(name, p, g, cursor, shard.numel(), shard.shape,
                                  rehomed=not sharding.is_sharded(p)))
                cursor += shard.numel()
            offsets.append(cursor)
        param = torch.empty(cursor, dtype=dtype, device=device)
        grad = torch.zeros(cursor, dtype=dtype, device=device)
        for s in slots:
            param[s.start:s.start + s.numel].copy_(sharding.local(s.param.detach()).reshape(-1))
            if not s.rehomed:
                continue
            old_grad = s.param.grad
            s.param.data = s.param_view(param)        # re-home: optimisers keep working
            if old_grad is not None:
                grad[s.start:s.start + s.numel].copy_(old_grad.reshape(-1))
            s.param.grad = s.param_view(grad)
        cfgs = list(self.group_configs.values())
        f32 = dict(dtype=torch.float32, device=device)
        return Bucket(
            device=device, dtype=dtype, slots=slots, offsets_host=offsets,
            param=param, grad=grad, anchor=param.clone(),
            importance=torch.zeros(cursor, dtype=self.config.state_dtype, device=device),
            fisher=torch.zeros(cursor, dtype=self.config.state_dtype, device=device),
            offsets=torch.tensor(offsets, dtype=torch.int64, device=device),
            keep=torch.tensor([c.keep for c in cfgs], **f32),
            lam=torch.tensor([c.lam for c in cfgs], **f32),
            mask_ratio=torch.tensor([c.mask_ratio for c in cfgs], dtype=torch.float64, device=device),
        )

    def _model_fingerprint(self) -> bytes:
        desc = [(s.name, list(s.param.shape), str(b.dtype), self.group_names[s.group])
                for b in self.buckets for s in b.slots]
        return hashlib.sha256(json.dumps(desc).encode()).digest()

    # ---- derived per-group values ------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def group_numel(self) -> list[int]:
        counts = [0] * self.num_groups
        for b in self.buckets:
            for g in range(self.num_groups):
                lo, hi = b.group_range(g)
                counts[g] += hi - lo
        return counts

    def refresh_thresholds(self) -> None:
        """Recompute ``t_g`` and ``c_g`` from the current importance (DESIGN.md 2), and
        ``m_g`` from the anchors (2.3: they change only at attach and consolidation, which
        is when this runs, so ``align_`` never selects again between them).

        One ``group_thresholds`` call per bucket. A group spread over several buckets
        (mixed dtypes or devices) needs its k-th largest over all of them: for those
        groups the radix select runs over the pieces where they lie and adds their
        histograms (as the sharded path does over processes); nothing is gathered.
        """
        if self.collectives is not None:
            return self._refresh_sharded_thresholds()
        cfg = self.config
        for b in self.buckets:
            b.inv_scale, b.thresh = ops.group_thresholds(
                b.importance, b.offsets, b.mask_ratio, normalize=cfg.normalize,
                backend=cfg.backend)
            b.align_m = (ops.align_thresholds(b.anchor, b.offsets, cfg.align_ratio,
                                              backend=cfg.backend) if cfg.align_every
                         else torch.full((self.num_groups,), math.inf, device=b.device))
        for g in range(self.num_groups):
            holders = [b for b in self.buckets if b.group_range(g)[0] != b.group_range(g)[1]]
            if len(holders) < 2:
                continue
            omega = [b.importance[slice(*b.group_range(g))] for b in holders]
            n = sum(o.numel() for o in omega)
            total = sum(o.double().sum().item() for o in omega)
            c = inv_scale_of(n, total, cfg.normalize)
            t = kth_largest(omega, kth_count(holders[0].mask_ratio[g].item(), n))
            m = (kth_largest([b.anchor[slice(*b.group_range(g))] for b in holders],
                             kth_count(cfg.align_ratio, n)) if cfg.align_every else math.inf)
            for b in self.buckets:
                b.inv_scale[g], b.thresh[g], b.align_m[g] = c, t, m

    def group_pieces(self, kind: str) -> list[list[torch.Tensor]]:
        """Per group, the slices of buffer ``kind`` ("param", "anchor", ...) of every bucket."""
        return [[getattr(b, kind)[slice(*b.group_range(g))] for b in self.buckets]
                for g in range(self.num_groups)]

    def _refresh_sharded_thresholds(self) -> None:
        ratios = [c.mask_ratio for c in self.group_configs.values()]
        inv_scale, thresh = sharding.global_thresholds(
            self.collectives, self.group_pieces("importance"), ratios, self.config.normalize)
        align_m = (sharding.global_align_thresholds(self.collectives, self.group_pieces("anchor"),
                                                    self.config.align_ratio)
                   if self.config.align_every else [math.inf] * self.num_groups)
        for b in self.buckets:
            b.inv_scale = torch.tensor(inv_scale, dtype=torch.float32, device=b.device)
            b.thresh = torch.tensor(thresh, dtype=torch.float32, device=b.device)
            b.align_m = torch.tensor(align_m, dtype=torch.float32, device=b.device)

    # ---- masks hold on the update (DESIGN.md 2.4) -----------------------------------
    def reindex_holds(self) -> None:
        """Recompute which elements :meth:`hold_masks_` restores: the masked elements of
        every ``keep == 0`` group. Call after Ω or the thresholds change (attach,
        consolidation and load do); one host sync per bucket."""
        self._holds = holds.index(self)

    def hold_masks_(self) -> None:
        """Copy the anchors into the masked elements of ``keep == 0`` groups (bitwise).

        Runs by itself after every step of a torch optimiser over the managed parameters
        (a global optimiser step post-hook, installed at attach, removed at detach). An
        engine that writes the weights outside a torch optimiser step calls it after its
        step. Costs one gather + scatter over the held elements; no host sync."""
        holds.apply(self._holds)

    @property
    def held_count(self) -> int:
        """How many elements :meth:`hold_masks_` restores (on this process)."""
        return sum(h.count for h in self._holds)

    # ---- moving / casting the model --------------------------------------------------
    def to(self, *args, **kwargs) -> "AIMState":
        """``model.to(*args, **kwargs)`` for the attached model, keeping this state.

        ``model.to`` / ``.half()`` after attach take the parameters out of the flat
        buffers (the next step raises); this moves or casts the model and re-homes the
        parameters into new buffers with the anchors cast like the weights and Ω, F,
        the step counts and the masks carried over. Returns ``self``."""
        relocate.move(self, *args, **kwargs)
        return self

    # ---- shards that are copied, not re-homed ---------------------------------------
    def pull_params(self) -> None:
        """Copy the weights of the copied (sharded) slots into the buckets."""
        for b, s in self._copied:
            s.param_view(b.param).copy_(sharding.local(s.param.detach()))

    def push_params(self) -> None:
        """Copy the buckets' weights back into the copied (sharded) slots."""
        for b, s in self._copied:
            sharding.local(s.param.detach()).copy_(s.param_view(b.param))

    # ---- state_dict -----------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor needed to resume exactly; all plain tensors (safetensors-friendly).

        Bucket buffers are returned by reference, as ``nn.Module.state_dict`` does.
        """
        sd = {
            "meta.version": torch.tensor([_STATE_DICT_VERSION], dtype=torch.int64),
            "meta.fingerprint": torch.frombuffer(bytearray(self._fingerprint), dtype=torch.uint8),
            "meta.steps": torch.tensor([self.steps, self.steps_since_consolidation], dtype=torch.int64),
        }
        for i, b in enumerate(self.buckets):
            for kind in ("anchor", "importance", "fisher", "inv_scale", "thresh", "align_m"):
                sd[f"bucket{i}.{kind}"] = getattr(b, kind).detach()
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Restore a :meth:`state_dict`; checks everything before copying anything."""
        expected = self.state_dict()
        version = int(sd["meta.version"][0]) if "meta.version" in sd else None
        if version not in _READABLE_VERSIONS:
            raise ValueError(f"load_state_dict: state_dict version {version}, this library "
                             f"reads versions {_READABLE_VERSIONS}")
        old_m = version == 1           # no m_g saved: recomputed from the loaded anchors
        if old_m:
            expected = {k: v for k, v in expected.items() if not k.endswith(".align_m")}
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        if missing or unexpected:
            raise ValueError(f"load_state_dict: keys differ (missing {missing}, unexpected "
                             f"{unexpected}); was it saved from another model?")
        fp = bytes(sd["meta.fingerprint"].cpu().tolist())
        half = len(fp) // 2
        if fp[half:] != self._fingerprint[half:]:
            raise ValueError("load_state_dict: the state_dict was saved from another model "
                             "(managed parameter names, shapes, dtypes or groups differ)")
        if fp[:half] != self._fingerprint[:half]:
            raise ValueError("load_state_dict: the state_dict was saved with another AIMConfig "
                             "(groups, beta, accumulate, importance, normalize, directional, "
                             "merge, align or state_dtype differ)")
        for key, ref in expected.items():
            if key.startswith("meta."):
                continue
            t = sd[key]
            if not isinstance(t, torch.Tensor) or t.shape != ref.shape or t.dtype != ref.dtype:
                got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"load_state_dict: {key!r} must be {tuple(ref.shape)} "
                                 f"{ref.dtype}, got {got}")
        with torch.no_grad():
            for key, ref in expected.items():
                if not key.startswith("meta."):
                    ref.copy_(sd[key])
        self.steps, self.steps_since_consolidation = (int(v) for v in sd["meta.steps"].tolist())
        if old_m:
            self._refresh_align_thresholds()
        self.reindex_holds()

    def _refresh_align_thresholds(self) -> None:
        """m_g only (the other thresholds as they were): for a version-1 state_dict."""
        saved = [(b.inv_scale.clone(), b.thresh.clone()) for b in self.buckets]
        self.refresh_thresholds()
        for b, (c, t) in zip(self.buckets, saved):
            b.inv_scale.copy_(c)
            b.thresh.copy_(t)

    def save(self, path) -> None:
        """Write the state_dict to a safetensors file, atomically: a temporary file in the
        same folder, flushed and fsynced, then renamed over ``path``. A crash, a kill or a
        full disk leaves the previous file whole."""
        checkpoint.save(self, path)

    def load(self, path) -> None:
        """Read a state saved by :meth:`save` (onto this state's devices). The file's
        format, managed names, fingerprint, keys, shapes and dtypes are checked before
        anything is read into the state."""
        checkpoint.load(self, path)

    # ---- grads ------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Zero the flat grad buffers and point every ``p.grad`` back at them."""
        for b in self.buckets:
            b.grad.zero_()
            for s in b.slots:
                if not s.rehomed:
                    s.param.grad = None
                elif not _is_view(s.param.grad, s, b.grad):
                    s.param.grad = s.param_view(b.grad)

    def check_homes(self) -> None:
        """Raise, naming the parameter, if one no longer lives in its bucket."""
        for b in self.buckets:
            for s in b.slots:
                if s.rehomed and not _is_view(s.param, s, b.param):
                    raise RuntimeError(
                        f"parameter {s.name!r} no longer lives in the AIM flat buffer (was the "
                        "model moved, cast, or its .data replaced after attach?). To move or "
                        "cast an attached model and keep its state (Ω, anchors, masks), use "
                        "state.to(...) instead of model.to(...)/.half(); to start over, "
                        "ak.detach(model) then ak.attach(model, config)")

    def __repr__(self) -> str:
        sizes = self.group_numel()
        groups = ", ".join(f"{g}: {len(self.groups[g])} tensors / {n:,} elements"
                           for g, n in zip(self.group_names, sizes))
        return (f"AIMState({groups}; buckets: {[b.key for b in self.buckets]}; "
                f"steps={self.steps})")


def _is_view(t, slot: Slot, flat: torch.Tensor) -> bool:
    """Is ``t`` exactly the slot's view of ``flat``?"""
    if t is None or t.device != flat.device or t.dtype != flat.dtype or t.shape != slot.shape:
        return False
    expected = flat.data_ptr() + slot.start * flat.element_size()
    return t.data_ptr() == expected and (t.numel() <= 1 or t.is_contiguous())


def bias_correction(config: AIMConfig, steps: int) -> float:
    """The ``fisher_scale`` of DESIGN.md 2.2 after ``steps`` steps."""
    if config.accumulate == "ema":
        return 1.0 / (1.0 - config.beta ** steps) if steps > 0 else 1.0
    return 1.0 / max(steps, 1)


__all__ = ["AIMState", "Bucket", "Slot", "bias_correction"]
