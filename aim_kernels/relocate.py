"""Moving or casting an attached model without losing its state (``AIMState.to``).

``model.to(...)`` replaces each ``p.data``, so the parameters leave the flat buffers.
Here the model is moved, then its managed parameters are re-homed into new buffers (the
bucket layout follows the new devices and dtypes), and the per-element state follows
each parameter: the anchor is cast exactly as the weight was (a masked weight equals its
anchor before, so it does after), Ω and F keep ``state_dtype`` and only change device.
The thresholds are recomputed from the same Ω, which gives the same masks.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def move(state, *args, **kwargs) -> None:
    from .binding import Binding
    from .state import AIMState
    if state.collectives is not None:
        raise NotImplementedError("state.to: an FSDP2-sharded model is moved by FSDP2 "
                                  "(fully_shard(..., mesh=...)); shard it where it will train")
    model = state._binding.model() if state._binding is not None else None
    if model is None:
        raise RuntimeError("state.to: the model this state was attached to no longer exists")
    per_slot = {s.name: {kind: s.param_view(getattr(b, kind)).clone()
                         for kind in ("anchor", "importance", "fisher")}
                for b in state.buckets for s in b.slots}
    slots = {s.name: s for b in state.buckets for s in b.slots}
    model.to(*args, **kwargs)
    members = {g: [(name, slots[name].param) for name in names]
               for g, names in state.groups.items()}
    new = AIMState(state.group_configs, members, state.config)
    for b in new.buckets:
        for s in b.slots:
            for kind, old in per_slot[s.name].items():
                s.param_view(getattr(b, kind)).copy_(old)
    new.steps, new.steps_since_consolidation = state.steps, state.steps_since_consolidation
    new.refresh_thresholds()
    new.reindex_holds()
    new._binding = Binding(model, new)
    # the same object keeps serving: callers and the optimiser hook hold references to it
    vars(state).clear()
    vars(state).update(vars(new))
