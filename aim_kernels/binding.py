"""Which model a state belongs to, and that the model still holds the managed Parameters.

``model.proj.weight = nn.Parameter(...)``, ``load_state_dict(sd, assign=True)`` or a
replaced submodule after attach leave the state working on stale buffers while the live
weights go unprotected. So at attach the path of every managed name is recorded
(parent module, attribute, child), and each step checks it with one dict lookup per
module on the paths and per parameter: far cheaper than ``get_parameter`` per name.

Wrappers (``torch.compile``'s ``_orig_mod``, DDP's and DeepSpeed's ``.module``) are
looked through, so the state of the wrapped model is found from the wrapper.
"""
from __future__ import annotations

import weakref

import torch

from . import sharding


# Wrappers whose `.module` is the model (matched by class name through the MRO, so
# DeepSpeed need not be imported); a user module that merely has a child called `module`
# is not one of them.
_WRAPPERS = {"DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "PipelineEngine"}


def unwrap(model):
    """The modules ``model`` wraps, outermost first (``model`` itself included)."""
    chain = [model]
    for _ in range(16):
        children = getattr(model, "_modules", None) or {}
        inner = children.get("_orig_mod")              # torch.compile's OptimizedModule
        if inner is None and any(c.__name__ in _WRAPPERS for c in type(model).__mro__):
            inner = children.get("module")
        if not isinstance(inner, torch.nn.Module):
            break
        chain.append(inner)
        model = inner
    return chain


class Binding:
    """The recorded paths of a state's managed names in its model (modules held weakly)."""

    def __init__(self, model: torch.nn.Module, state):
        self.model = weakref.ref(model)
        edges: dict[tuple[int, str], tuple] = {}
        self.owners = []
        for b in state.buckets:
            for s in b.slots:
                *path, leaf = s.name.split(".")
                module, prefix = model, ""
                for part in path:
                    child = module._modules[part]
                    edges.setdefault((id(module), part),
                                     (weakref.ref(module), part, child, prefix + part))
                    module, prefix = child, prefix + part + "."
                self.owners.append((module, leaf, s))
        # children are held strongly through owners' parameters anyway; parents weakly so the
        # root model (the key of the state registry) is not kept alive by its own state
        self.edges = [(parent, attr, weakref.ref(child), path)
                      for parent, attr, child, path in edges.values()]
        self.owners = [(weakref.ref(m), attr, s) for m, attr, s in self.owners]

    def check(self, op: str) -> None:
        """Raise, naming it, if a managed parameter (or a module on its path) was replaced."""
        for parent_ref, attr, child_ref, path in self.edges:
            parent = parent_ref()
            if parent is not None and parent._modules.get(attr) is not child_ref():
                raise RuntimeError(
                    f"{op}: submodule {path!r} was replaced after attach, so the parameters "
                    "under it are no longer the ones the AIM state manages; " + _ADVICE)
        for owner_ref, attr, s in self.owners:
            owner = owner_ref()
            if owner is None:
                continue
            live = owner._parameters.get(attr)
            if live is s.param:
                continue
            # FSDP2 registers the unsharded (plain) parameter between unshard and reshard
            if not s.rehomed and live is not None and not sharding.is_sharded(live):
                continue
            raise RuntimeError(
                f"{op}: parameter {s.name!r} was replaced after attach (e.g. by "
                "`module.weight = nn.Parameter(...)` or `load_state_dict(..., assign=True)`), so "
                "the live weights are not the ones the AIM state manages; " + _ADVICE)


_ADVICE = ("load weights with load_state_dict(sd) (it copies into the managed parameters), "
           "or ak.detach(model) and ak.attach(model, config) again (this resets the state; "
           "state.save / state.load carry Ω and the anchors across)")
