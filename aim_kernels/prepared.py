"""What an eager ``masked_step`` keeps between steps, so a step's fixed cost is its kernels.

Two things are checked at every step and change only when the user (or ``state.to``,
``consolidate``, ``load``) changes them:

* the views check: every ``p.grad`` is still its view of the bucket's grad buffer, and
  every ``p`` still lives in the bucket. The expected address, shape and dtype of each are
  computed once per bucket buffer; a step compares them (a few C attribute reads per
  tensor, no Python helper calls). Any mismatch -- or anything unusual, a sparse or a
  missing ``.grad`` -- sends the step down the full path, whose checks raise or copy.
* the per-bucket launch: ``ops.fused_step``'s checks (every tensor's dtype, device,
  shape, contiguity, alignment, the offsets' values, the config's scalars) run once and
  yield a :class:`~aim_kernels.ops.native.CpuFusedStepLaunch`. It is reused while the ten
  bucket tensors are the same objects with the same address, shape, strides, dtype and
  device, ``offsets`` has not been written (its version counter), and the config's step
  scalars are unchanged; otherwise the checks run again (and raise on bad input).

Only the compiled CPU backend gets a prepared launch, and only in eager mode with no
dispatch mode active (``torch.compile`` traces ``ops.fused_step``, the custom op).
"""
from __future__ import annotations

import weakref

import torch

from . import ops

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _Prepared:
    """Per state: the views check's expectations and the launches, one of each per bucket."""

    def __init__(self):
        self.views: list = []       # per bucket: (key, rows)
        self.launches: list = []    # per bucket: (tensors, signature, offsets version, cfg, launch)


def _bucket_views(b):
    """``(param, param address, grad address, shape)`` per slot of a re-homed bucket."""
    pbase, gbase, size = b.param.data_ptr(), b.grad.data_ptr(), b.param.element_size()
    return [(s.param, pbase + s.start * size, gbase + s.start * size, s.shape) for s in b.slots]


def _prepared(state) -> _Prepared:
    prep = _CACHE.get(state)
    if prep is None:
        prep = _CACHE[state] = _Prepared()
    return prep


def eligible(state) -> bool:
    """The fast path serves this call: eager, no dispatch mode, every slot re-homed."""
    return (not state._copied and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0)


def views_intact(state) -> bool:
    """Every managed ``p`` is still its view of ``b.param`` and every ``p.grad`` its view
    of ``b.grad`` (what ``state.check_homes`` and ``step._plan`` check, tensor by tensor).
    False sends the caller to those full checks."""
    prep = _prepared(state)
    views = prep.views
    if len(views) != len(state.buckets):
        views[:] = [None] * len(state.buckets)
    try:
        for i, b in enumerate(state.buckets):
            p_flat, g_flat = b.param, b.grad
            dtype, device = p_flat.dtype, p_flat.device
            key = (p_flat, g_flat, p_flat.data_ptr(), g_flat.data_ptr(), dtype, device,
                   g_flat.dtype, g_flat.device, len(b.slots))
            entry = views[i]
            if entry is None or not _same(entry[0], key):
                if g_flat.dtype != dtype or g_flat.device != device:
                    return False
                entry = views[i] = (key, _bucket_views(b))
            for p, pptr, gptr, shape in entry[1]:
                # (the address of an allocation names its device: CPU and CUDA memory share
                # one virtual address space, so an equal address is the bucket's memory)
                if (p.data_ptr() != pptr or p.dtype is not dtype or p.shape != shape
                        or not p.is_contiguous()):
                    return False
                g = p.grad
                if (g is None or g.data_ptr() != gptr or g.dtype is not dtype
                        or g.shape != shape or not g.is_contiguous()):
                    return False
    except RuntimeError:          # a tensor without storage (sparse, a wrapper subclass)
        return False
    return True


def _same(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1] is b[1] and a[2:] == b[2:]


def _signature(t) -> tuple:
    return (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


def launch(state, i: int, b):
    """The prepared ``fused_step`` of bucket ``i`` (checked now if anything changed), or
    None when its backend has no prepared launch (call ``ops.fused_step``)."""
    cfg = state.config
    tensors = (b.grad, b.param, b.anchor, b.importance, b.fisher, b.offsets, b.inv_scale,
               b.thresh, b.keep, b.lam)
    scalars = (cfg.beta, cfg.accumulate, cfg.importance, cfg.directional, cfg.backend)
    launches = _prepared(state).launches
    if len(launches) != len(state.buckets):
        launches[:] = [None] * len(state.buckets)
    entry = launches[i]
    try:
        signature = tuple(_signature(t) for t in tensors)
    except (RuntimeError, AttributeError):   # not tensors / no storage: the full checks say so
        return None
    if (entry is not None and all(map(_is, tensors, entry[0])) and signature == entry[1]
            and b.offsets._version == entry[2] and scalars == entry[3]):
        return entry[4]
    launches[i] = None
    kwargs = dict(beta=cfg.beta, accumulate=cfg.accumulate, importance_kind=cfg.importance,
                  backend=cfg.backend)
    impl, beta = ops.check_fused_step(*tensors, **kwargs)     # raises on bad input
    if getattr(impl, "name", None) != "cpu" or b.device.type != "cpu":
        return None
    from .ops import native
    run = native.CpuFusedStepLaunch(*tensors, beta=beta, accumulate=cfg.accumulate,
                                    importance_kind=cfg.importance,
                                    directional=cfg.directional)
    launches[i] = (tensors, signature, b.offsets._version, scalars, run)
    return run


def _is(a, b) -> bool:
    return a is b
