"""The flat functional ops of DESIGN.md section 3, checked once and dispatched.

All tensors are 1-D, contiguous, on one device; ``offsets`` is int64 ``[G+1]`` and
group g is ``[offsets[g], offsets[g+1])``; per-group tensors are fp32 ``[G]``.
``backend`` is ``"auto" | "torch" | "cpu" | "triton" | "cuda"``.
"""
from __future__ import annotations

import torch

from . import validate as _v
from .backends import BackendUnavailable, available_backends, resolve, unavailable_reason
from .reference import STAT_NAMES

__all__ = ["fused_step", "group_thresholds", "consolidate_", "align_", "align_apply_",
           "align_thresholds", "available_backends",
           "unavailable_reason", "BackendUnavailable", "STAT_NAMES"]


def fused_step(grad, param, anchor, importance, fisher, offsets, inv_scale, thresh,
               keep, lam, *, beta, accumulate="ema", importance_kind="fisher",
               directional=True, backend="auto") -> torch.Tensor:
    """DESIGN.md 2.1, in place on ``grad`` and ``fisher``; returns fp32 stats ``[G, 7]``
    (columns: ``STAT_NAMES``)."""
    impl, beta = check_fused_step(grad, param, anchor, importance, fisher, offsets, inv_scale,
                                  thresh, keep, lam, beta=beta, accumulate=accumulate,
                                  importance_kind=importance_kind, backend=backend)
    return impl.fused_step(grad, param, anchor, importance, fisher, offsets, inv_scale,
                           thresh, keep, lam, beta=beta, accumulate=accumulate,
                           importance_kind=importance_kind, directional=bool(directional))


def check_fused_step(grad, param, anchor, importance, fisher, offsets, inv_scale, thresh,
                     keep, lam, *, beta, accumulate, importance_kind, backend):
    """The checks of :func:`fused_step`, nothing touched: ``(backend module, beta)``."""
    op = "fused_step"
    _v.vector(op, "grad", grad, numel=None, device=None)
    n, device = grad.numel(), grad.device
    for name, t in (("param", param), ("anchor", anchor), ("importance", importance),
                    ("fisher", fisher)):
        _v.vector(op, name, t, numel=n, device=device)
    _v.same_dtype(op, ("grad", "param", "anchor"), (grad, param, anchor))
    _v.same_dtype(op, ("importance", "fisher"), (importance, fisher))
    groups = _v.offsets(op, offsets, n, device)
    for name, t in (("inv_scale", inv_scale), ("thresh", thresh), ("keep", keep), ("lam", lam)):
        _v.per_group(op, name, t, groups, device)
    beta = _v.real(op, "beta", beta, 0.0, 1.0)
    _v.choice(op, "accumulate", accumulate, ("ema", "sum"))
    _v.choice(op, "importance_kind", importance_kind, ("fisher", "abs"))
    return resolve(backend, device, op), beta


def group_thresholds(importance, offsets, mask_ratio, *, normalize=True, backend="auto"):
    """Per group ``(inv_scale c_g, thresh t_g)``, fp32 ``[G]`` each (DESIGN.md 2).

    ``mask_ratio`` may be fp32 or fp64; ``k_g = floor(rho_g * n_g)`` is taken in
    float64 of the value given, so pass fp64 to get ``floor(0.7 * 10) = 7``.
    """
    op = "group_thresholds"
    _v.vector(op, "importance", importance, numel=None, device=None)
    device = importance.device
    groups = _v.offsets(op, offsets, importance.numel(), device, like="importance")
    _v.per_group(op, "mask_ratio", mask_ratio, groups, device,
                 dtypes=(torch.float32, torch.float64))
    if mask_ratio.device.type == "cpu" and groups and not torch.compiler.is_compiling() and not \
            _v.in_unit_interval(mask_ratio):
        raise ValueError(f"{op}: argument `mask_ratio` must lie in [0, 1), got "
                         f"{mask_ratio.tolist()}")
    impl = resolve(backend, device, op)
    return impl.group_thresholds(importance, offsets, mask_ratio, normalize=bool(normalize))


def consolidate_(param, anchor, importance, fisher, *, fisher_scale, decay, merge=None,
                 alpha=1.0, backend="auto") -> None:
    """DESIGN.md 2.2, elementwise part, in place; ``F_hat = fisher * fisher_scale``."""
    op = "consolidate_"
    _v.vector(op, "param", param, numel=None, device=None)
    n, device = param.numel(), param.device
    for name, t in (("anchor", anchor), ("importance", importance), ("fisher", fisher)):
        _v.vector(op, name, t, numel=n, device=device, like="param")
    _v.same_dtype(op, ("param", "anchor"), (param, anchor))
    _v.same_dtype(op, ("importance", "fisher"), (importance, fisher))
    fisher_scale = _v.real(op, "fisher_scale", fisher_scale, 0.0, lo_open=True)
    decay = _v.real(op, "decay", decay, 0.0)
    _v.choice(op, "merge", merge, (None, "fisher", "linear"))
    alpha = _v.real(op, "alpha", alpha, 0.0)
    impl = resolve(backend, device, op)
    impl.consolidate_(param, anchor, importance, fisher, fisher_scale=fisher_scale,
                      decay=decay, merge=merge, alpha=alpha)


def align_(param, anchor, offsets, align_ratio, *, mode="anchor", backend="auto") -> None:
    """DESIGN.md 2.3, in place on ``param``."""
    op = "align_"
    _v.vector(op, "param", param, numel=None, device=None)
    _v.vector(op, "anchor", anchor, numel=param.numel(), device=param.device, like="param")
    _v.same_dtype(op, ("param", "anchor"), (param, anchor))
    _v.offsets(op, offsets, param.numel(), param.device, like="param")
    align_ratio = _v.real(op, "align_ratio", align_ratio, 0.0, 1.0)
    _v.choice(op, "mode", mode, ("anchor", "zero"))
    impl = resolve(backend, param.device, op)
    impl.align_(param, anchor, offsets, align_ratio, mode=mode)


def align_thresholds(anchor, offsets, align_ratio, *, backend="auto") -> torch.Tensor:
    """Per group ``m_g``, the k-th largest ``|a|`` with ``k = floor(align_ratio * n_g)``
    (``+inf`` for k = 0), fp32 ``[G]`` (DESIGN.md 2.3): what ``align_`` ranks by, as a
    value a state keeps between consolidations. The same exact select as ``group_thresholds``
    (which ranks ``|x|`` too)."""
    op = "align_thresholds"
    _v.vector(op, "anchor", anchor, numel=None, device=None)
    groups = _v.offsets(op, offsets, anchor.numel(), anchor.device, like="anchor")
    align_ratio = _v.real(op, "align_ratio", align_ratio, 0.0, 1.0)
    ratio = torch.full((groups,), align_ratio, dtype=torch.float64, device=anchor.device)
    impl = resolve(backend, anchor.device, op)     # (align_ratio may be 1, a mask_ratio not)
    return impl.group_thresholds(anchor, offsets, ratio, normalize=False)[1]


def align_apply_(param, anchor, offsets, m_g, *, mode="anchor", backend="auto") -> None:
    """DESIGN.md 2.3 given ``m_g`` (fp32 ``[G]``, e.g. from ``align_thresholds``), in place
    on ``param``: no select, one elementwise pass. ``align_`` = ``align_thresholds`` +
    ``align_apply_``."""
    op = "align_apply_"
    _v.vector(op, "param", param, numel=None, device=None)
    _v.vector(op, "anchor", anchor, numel=param.numel(), device=param.device, like="param")
    _v.same_dtype(op, ("param", "anchor"), (param, anchor))
    groups = _v.offsets(op, offsets, param.numel(), param.device, like="param")
    _v.per_group(op, "m_g", m_g, groups, param.device)
    _v.choice(op, "mode", mode, ("anchor", "zero"))
    impl = resolve(backend, param.device, op)
    impl.align_apply_(param, anchor, offsets, m_g, mode=mode)
