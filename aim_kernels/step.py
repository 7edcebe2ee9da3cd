"""attach / masked_step / consolidate / detach: the model-level API of DESIGN.md 3.

One step = check every gradient, make sure each bucket's flat grad buffer holds
them, then one ``ops.fused_step`` per bucket. In the common case -- ``p.grad`` is
still the view made at attach -- nothing is copied. A ``.grad`` that user code
replaced (``zero_grad(set_to_none=True)``, say) is copied back into the buffer
and re-pointed at it; explicitly passed grads are copied in and out again.
"""
from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence

import torch

from . import holds, ops, prepared, sharding, zero
from .binding import Binding, unwrap
from .config import AIMConfig
from .groups import assign, resolve_groups
from .state import AIMState, Bucket, Slot, _is_view, bias_correction

_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, AIMState]" = weakref.WeakKeyDictionary()


def attach(model: torch.nn.Module, config: AIMConfig | None = None) -> AIMState:
    """Create the AIM state of ``model``: anchors = current weights, Ω = F = 0."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"attach: `model` must be a torch.nn.Module, got {type(model).__name__}")
    chain = unwrap(model)
    if any(m in _STATES for m in chain):
        raise RuntimeError("attach: this model already has an AIMState; call "
                           "ak.detach(model) first (one state per model)")
    engine, model = model, chain[-1]   # the state belongs to the wrapped model, whatever wraps it
    cfg = config if config is not None else AIMConfig()
    if not isinstance(cfg, AIMConfig):
        raise TypeError(f"attach: `config` must be an AIMConfig, got {type(cfg).__name__}")
    cfg.validate()
    if zero.is_engine(engine):   # DeepSpeed: the adapter knows where grads and weights live
        state = zero.attach(engine, cfg, lambda module: _groups(module, cfg))
        _STATES[model] = state
        return state
    state = AIMState(*_groups(model, cfg), cfg)
    state._binding = Binding(model, state)
    _STATES[model] = state
    holds.track(state)
    return state


def _groups(model: torch.nn.Module, cfg: AIMConfig):
    groups = resolve_groups(model, cfg)
    members = assign(model, groups, user_groups=cfg.groups is not None)
    if not any(members.values()):
        raise ValueError("attach: the model has no trainable parameter to manage")
    return groups, members


def state_of(model: torch.nn.Module, op: str = "state_of") -> AIMState:
    """The state attached to ``model`` or to the model it wraps (torch.compile, DDP)."""
    try:
        chain = unwrap(model)
        for m in chain:
            if m in _STATES:
                return _STATES[m]
    except TypeError:
        pass
    raise RuntimeError(f"{op}: no AIMState is attached to this model; call "
                       "ak.attach(model, config) first")


def _check_model(state: AIMState, op: str) -> None:
    """The model still holds the managed Parameters, and they still live in the buckets."""
    if state._binding is not None:
        state._binding.check(op)
    state.check_homes()


def detach(model: torch.nn.Module) -> AIMState:
    """Forget the model's state (its parameters stay where they are); returns it."""
    state = state_of(model, "detach")
    for m in unwrap(model):
        _STATES.pop(m, None)
    holds.untrack(state)
    if isinstance(state, zero.ZeroState):
        state.remove_hooks()
    return state


class StepStats:
    """Per-group stats of one step, on device; no host sync until read.

    ``skipped`` is True when the step was skipped (``masked_step(..., skip=...)``): the
    stats are then all zero. For a sharded (FSDP2) model the stats are of this
    process's shard; :meth:`as_dict` all-reduces them, so every process must call it.
    ``accumulating`` is True for a DeepSpeed micro-step inside the gradient accumulation
    window (the call did nothing; it acts at the boundary).
    """

    accumulating = False

    def __init__(self, tensor: torch.Tensor, group_names: list[str], *, skipped: bool = False,
                 collectives=None):
        self._tensor = tensor
        self.group_names = list(group_names)
        self.skipped = skipped
        self._collectives = collectives

    @property
    def tensor(self) -> torch.Tensor:
        """fp32 ``[G, 7]``, columns ``ak.ops.STAT_NAMES`` (this process's shard only)."""
        return self._tensor

    def as_dict(self) -> dict[str, dict[str, float]]:
        t = self._tensor.detach()
        if self._collectives is not None:
            t = self._collectives.sum(t.double())
        rows = t.cpu().tolist()
        return {g: dict(zip(ops.STAT_NAMES, row)) for g, row in zip(self.group_names, rows)}

    def __getitem__(self, group: str) -> dict[str, float]:
        return self.as_dict()[group]

    def __repr__(self) -> str:
        return f"StepStats(groups={self.group_names})"


def _check_grad(t, slot: Slot, where: str) -> torch.Tensor:
    """The local gradient tensor, after checking it against the parameter."""
    p = slot.param
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"masked_step: {where} for parameter {slot.name!r} must be a tensor, "
                        f"got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"masked_step: {where} for parameter {slot.name!r} is {t.layout}; "
                         "sparse gradients are not supported (use dense embeddings)")
    if t.shape != p.shape:
        raise ValueError(f"masked_step: {where} for parameter {slot.name!r} has shape "
                         f"{tuple(t.shape)}, the parameter {tuple(p.shape)}")
    if t.dtype != p.dtype:
        raise TypeError(f"masked_step: {where} for parameter {slot.name!r} has dtype {t.dtype}, "
                        f"the parameter {p.dtype}")
    if t.device != p.device:
        raise ValueError(f"masked_step: {where} for parameter {slot.name!r} is on {t.device}, "
                         f"the parameter on {p.device}")
    if sharding.is_sharded(p) != sharding.is_sharded(t):
        raise TypeError(f"masked_step: {where} for parameter {slot.name!r} must be "
                        f"{'a DTensor like' if sharding.is_sharded(p) else 'a plain tensor like'} "
                        "the parameter")
    return sharding.local(t)


def _explicit_grads(state: AIMState, grads) -> dict[str, torch.Tensor]:
    if isinstance(grads, Mapping):
        unknown = [k for k in grads if k not in state._slot_by_name]
        if unknown:
            raise ValueError(f"masked_step: grads has key {unknown[0]!r}, which is not a managed "
                             "parameter (see state.names)")
        missing = [n for n in state.names if n not in grads]
        if missing:
            raise ValueError(f"masked_step: grads lacks managed parameter {missing[0]!r} "
                             f"({len(missing)} missing)")
        return dict(grads)
    if isinstance(grads, Sequence) and not isinstance(grads, (str, bytes)):
        if len(grads) != len(state.names):
            raise ValueError(f"masked_step: grads has {len(grads)} entries; the state manages "
                             f"{len(state.names)} parameters (aligned with state.names)")
        return dict(zip(state.names, grads))
    raise TypeError("masked_step: grads must be None, a sequence aligned with state.names, "
                    f"or a {{name: tensor}} dict, got {type(grads).__name__}")


def _plan(state: AIMState, grads):
    """Check every gradient; nothing is touched. Returns the copies to make, per bucket:
    ``(slot, local source or None for a zero gradient, copy the result back?)``."""
    explicit = None if grads is None else _explicit_grads(state, grads)
    plan: list[tuple[Bucket, list[tuple[Slot, torch.Tensor | None, bool]]]] = []
    for b in state.buckets:
        todo = []
        for s in b.slots:
            if explicit is None:
                t = s.param.grad
                if t is None:   # documented: a missing .grad counts as a zero gradient
                    todo.append((s, None, False))
                    continue
                t = _check_grad(t, s, ".grad")
            else:
                t = _check_grad(explicit[s.name], s, "grads entry")
            if not _is_view(t, s, b.grad):
                todo.append((s, t, explicit is not None or not s.rehomed))
        plan.append((b, todo))
    return plan


def _should_skip(skip) -> bool | None:
    """``skip``: a bool, a tensor (non-zero = skip; read with one host sync, as GradScaler
    does), or "nonfinite" (skip when any managed gradient is non-finite)."""
    if isinstance(skip, str):
        if skip != "nonfinite":
            raise ValueError(f"masked_step: skip must be a bool, a tensor or 'nonfinite', "
                             f"got {skip!r}")
        return None   # decided after the gradients are in the buckets
    if isinstance(skip, torch.Tensor):
        if skip.numel() != 1:
            raise ValueError(f"masked_step: skip tensor must hold one value, got shape "
                             f"{tuple(skip.shape)}")
        return bool(skip.item())
    if not isinstance(skip, bool):
        raise TypeError(f"masked_step: skip must be a bool, a tensor or 'nonfinite', "
                        f"got {type(skip).__name__}")
    return skip


@torch.no_grad()
def masked_step(model: torch.nn.Module, grads=None, *, skip=False) -> StepStats:
    """DESIGN.md 2.1 on every managed gradient, in place; one fused call per bucket.

    Call after backward (and unscale), before clipping and ``optimizer.step()``: clipping
    then bounds the whole gradient, regulariser included. ``grads``:
    None (each managed parameter's ``.grad``; a ``.grad`` of None counts as a zero
    gradient and is set to one), a sequence aligned with ``state.names``, or a
    ``{name: tensor}`` dict. ``skip``: True (or a non-zero tensor, e.g. GradScaler's
    found-inf) leaves the state, the step count and the gradients untouched, for a step
    the optimiser will not take; "nonfinite" skips when any gradient is non-finite.
    Returns lazy :class:`StepStats`.
    """
    state = state_of(model, "masked_step")
    if isinstance(state, zero.ZeroState):    # DeepSpeed: gradients live in the ZeRO partitions
        return state.masked_step(grads, skip)
    eager = prepared.eligible(state)
    if eager and grads is None and state._binding is not None:
        state._binding.check("masked_step")
    if eager and grads is None and prepared.views_intact(state):
        plan = [(b, ()) for b in state.buckets]     # the checks' cached verdict: no copies
    else:
        _check_model(state, "masked_step")
        plan = _plan(state, grads)
    skipping = _should_skip(skip)
    if skipping:
        return _skipped(state)
    for b, todo in plan:
        for s, src, _ in todo:
            dst = b.grad[s.start:s.start + s.numel]
            if src is None:
                dst.zero_()
            else:
                dst.copy_(src.reshape(-1))
            if grads is None and s.rehomed:
                s.param.grad = s.param_view(b.grad)
    if skipping is None and _any_nonfinite(state):
        return _skipped(state)
    state.pull_params()
    cfg = state.config
    total = None
    for i, (b, todo) in enumerate(plan):
        run = prepared.launch(state, i, b) if eager else None
        stats = run() if run is not None else ops.fused_step(
            b.grad, b.param, b.anchor, b.importance, b.fisher, b.offsets, b.inv_scale,
            b.thresh, b.keep, b.lam, beta=cfg.beta, accumulate=cfg.accumulate,
            importance_kind=cfg.importance, directional=cfg.directional, backend=cfg.backend)
        for s, src, scatter in todo:
            if scatter:
                src.copy_(b.grad[s.start:s.start + s.numel].view(src.shape))
        total = stats if total is None else total + stats.to(total.device, non_blocking=True)
    state.steps += 1
    state.steps_since_consolidation += 1
    if cfg.align_every and state.steps % cfg.align_every == 0:
        _align(state)
    return StepStats(total, state.group_names, collectives=state.collectives)


def _any_nonfinite(state: AIMState) -> bool:
    """Any non-finite managed gradient, on any process of a sharded model (one sync)."""
    flag = torch.zeros(1, dtype=torch.float64)
    for b in state.buckets:
        flag += (~torch.isfinite(b.grad)).any().double().cpu()
    if state.collectives is not None:
        flag = state.collectives.sum(flag)
    return bool(flag.item())


def _skipped(state: AIMState) -> StepStats:
    device = state.buckets[0].device if state.buckets else torch.device("cpu")
    zeros = torch.zeros(state.num_groups, len(ops.STAT_NAMES), device=device)
    return StepStats(zeros, state.group_names, skipped=True, collectives=state.collectives)


def _align(state: AIMState) -> None:
    """DESIGN.md 2.3 with the m_g the state keeps (computed at attach and consolidation,
    one per group over all of its buckets and processes): one elementwise pass per bucket."""
    cfg = state.config
    for b in state.buckets:
        ops.align_apply_(b.param, b.anchor, b.offsets, b.align_m, mode=cfg.align_mode,
                         backend=cfg.backend)
    state.push_params()               # sharded slots get their reset weights back


@torch.no_grad()
def consolidate(model: torch.nn.Module) -> None:
    """End of a task (DESIGN.md 2.2): merge, Ω += F_hat, anchors = θ, F = 0, new t_g, c_g."""
    state = state_of(model, "consolidate")
    _check_model(state, "consolidate")
    state.pull_params()
    cfg = state.config
    scale = bias_correction(cfg, state.steps_since_consolidation)
    for b in state.buckets:
        ops.consolidate_(b.param, b.anchor, b.importance, b.fisher, fisher_scale=scale,
                         decay=cfg.decay, merge=cfg.merge, alpha=cfg.merge_alpha,
                         backend=cfg.backend)
    state.push_params()
    state.steps_since_consolidation = 0
    state.refresh_thresholds()
    state.reindex_holds()
