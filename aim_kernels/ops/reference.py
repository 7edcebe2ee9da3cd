"""The arithmetic of DESIGN.md section 2 in plain PyTorch: the ground truth.

Every other backend is tested against this file, and this file is a line-by-line
reading of the spec. It runs on any device, is vectorised over elements and loops
in Python over groups only. All math is fp32 whatever the storage dtype; results
are rounded once, when stored.

Arguments are assumed valid: ``aim_kernels.ops`` checks them before dispatching.
"""
from __future__ import annotations

import math

import torch

__all__ = ["fused_step", "group_thresholds", "consolidate_", "align_", "align_apply_",
           "kth_largest", "group_index", "FP32_MAX", "inv_scale_of"]

STAT_NAMES = ("grad_sq", "out_sq", "reg_sq", "drift_sq", "penalty", "masked", "nonfinite")

# Elements per chunk of the radix select. Its temporaries are O(chunk), so the
# memory of a threshold does not grow with the group (see `kth_largest`).
SELECT_CHUNK = 1 << 22

# DESIGN.md 2.1: u, F, F_hat and Omega never exceed the largest finite fp32, so a huge
# gradient cannot leave an infinite importance behind (0 * inf = NaN in the next task).
FP32_MAX = torch.finfo(torch.float32).max


def _clamp(x: torch.Tensor) -> torch.Tensor:
    """``x`` with values above FP32_MAX (+inf) set to FP32_MAX; NaN stays NaN."""
    return torch.where(x > FP32_MAX, torch.full_like(x, FP32_MAX), x)


def inv_scale_of(n: int, total: float, normalize: bool) -> float:
    """DESIGN.md 2: ``c_g`` from a group's element count and its Omega sum (float64):
    ``1`` without normalize, ``0`` if the sum is not > 0 or ``n / sum`` overflows fp32
    (importance too small to normalise is no importance)."""
    if not normalize:
        return 1.0
    if not total > 0:
        return 0.0
    c = float(torch.tensor(n / total, dtype=torch.float32))
    return c if math.isfinite(c) else 0.0


def _group_bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    bounds = offsets.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def group_index(offsets: torch.Tensor, n: int) -> torch.Tensor:
    """The group of every element, from the group ends (no host sync)."""
    return torch.searchsorted(offsets[1:], torch.arange(n, device=offsets.device), right=True)


def fused_step(grad, param, anchor, importance, fisher, offsets, inv_scale, thresh,
               keep, lam, *, beta, accumulate="ema", importance_kind="fisher",
               directional=True) -> torch.Tensor:
    """DESIGN.md 2.1: in place on ``grad`` and ``fisher``; returns fp32 stats ``[G, 7]``.

    Vectorised over all elements at once, with per-element group scalars gathered
    through ``group_index``, so a step never waits on the host. Stats are summed
    in float64 and rounded to fp32 once.
    """
    num_groups = offsets.numel() - 1
    gid = group_index(offsets, grad.numel())
    c, t, kappa, lam_g = inv_scale[gid], thresh[gid], keep[gid], lam[gid]
    g = grad.float()
    theta = param.float()
    a = anchor.float()
    omega = importance.float()
    F = fisher.float()

    finite = torch.isfinite(g)
    u = _clamp(g * g if importance_kind == "fisher" else g.abs())
    if accumulate == "ema":
        F_new = beta * F + (1.0 - beta) * u
    else:
        F_new = F + u
    F_new = torch.where(finite, _clamp(F_new), F)       # F is never touched by a non-finite g

    s = c * omega
    masked = (omega >= t) & (omega > 0)
    d = theta - a
    r = lam_g * s * d
    if directional:
        r = torch.where(g * d < 0, r, torch.zeros_like(r))
    g_out = torch.where(masked, kappa, torch.ones_like(kappa)) * g + r
    g_out = torch.where(finite, g_out, g)       # a non-finite g passes through unchanged

    zero = torch.zeros_like(g)
    columns = (
        torch.where(finite, g * g, zero),             # grad_sq
        torch.where(finite, g_out * g_out, zero),     # out_sq
        torch.where(finite, r * r, zero),             # reg_sq
        d * d,                                        # drift_sq
        0.5 * lam_g * s * d * d,                      # penalty
        masked,                                       # masked
        ~finite,                                      # nonfinite
    )
    stats = torch.zeros(num_groups, len(STAT_NAMES), dtype=torch.float64, device=grad.device)
    for col, values in enumerate(columns):
        stats[:, col].index_add_(0, gid, values.double())

    # A non-finite g is written back bit for bit (a round trip through fp32 could
    # change a NaN's payload or sign), so GradScaler and the optimiser see it as it was.
    grad.copy_(torch.where(finite, g_out.to(grad.dtype), grad))
    fisher.copy_(F_new)
    return stats.float()


def kth_count(ratio: float, n: int) -> int:
    """``k = floor(ratio * n)``, in float64 (the ratio's own value, widened exactly)."""
    return int(math.floor(float(ratio) * n))


def kth_largest(values, k: int, chunk: int = SELECT_CHUNK, hist_reduce=None) -> float:
    """The exact k-th largest of a 1-D tensor of non-negative floats, ties included.

    ``+inf`` when ``k == 0``. A radix select over the fp32 bit pattern, which for
    non-negative floats orders exactly like the values (the sign bit is dropped, so
    -0.0 counts as 0): four passes of 8 bits, each a 256-bin histogram of the
    elements that still share the selected prefix. The data is never sorted or
    copied whole; it is read in chunks of ``chunk`` elements, so the extra memory is
    a few chunk-sized temporaries (about 25 bytes per chunk element, counting the
    int32 and bool temporaries alive at once: ~100 MB at the default 2^22) plus 256 counters,
    whatever the group size. A group of 1e9 fp32 elements thus needs ~100 MB, where
    a sorted copy with indices (``torch.sort``) needs 12 GB and ``torch.topk`` with
    k = n/2 needs 6 GB.

    ``values`` may also be a list of tensors, the pieces of one group (on any devices,
    of any float dtypes): the histograms of the pieces add up, so nothing is gathered.
    ``hist_reduce``, when given, combines each pass's histogram over the shards of a
    group held by other processes (an all-reduce sum), so ``values`` is this
    process's shard and ``k`` counts over the whole group.
    """
    if k <= 0:
        return math.inf
    pieces = list(values) if isinstance(values, (list, tuple)) else [values]
    n = sum(p.numel() for p in pieces)
    if k > n and hist_reduce is None:
        raise ValueError(f"k={k} exceeds the {n} elements")
    home = pieces[0].device if pieces else torch.device("cpu")
    prefix, remaining = 0, k
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(256, dtype=torch.int64, device=home)
        for piece in pieces:
            for lo in range(0, piece.numel(), chunk):
                bits = piece[lo:lo + chunk].float().view(torch.int32) & 0x7FFFFFFF
                if shift < 24:   # keep only elements whose higher digits equal the prefix
                    bits = bits[(bits >> (shift + 8)) == (prefix >> (shift + 8))]
                hist += torch.bincount((bits >> shift) & 0xFF, minlength=256).to(home)
        if hist_reduce is not None:
            hist = hist_reduce(hist)
        counts = hist.tolist()
        digit, above = 255, 0
        while above + counts[digit] < remaining:   # walk down from the largest digit
            above += counts[digit]
            digit -= 1
        prefix |= digit << shift
        remaining -= above
    return torch.tensor(prefix, dtype=torch.int32).view(torch.float32).item()


def group_thresholds(importance, offsets, mask_ratio, *, normalize=True):
    """DESIGN.md 2: per group, ``inv_scale c_g`` and ``thresh t_g``, both fp32 ``[G]``.

    ``k_g = floor(rho_g * n_g)`` is computed in float64 from the value of
    ``mask_ratio`` as given (fp32 or fp64).
    """
    num_groups = offsets.numel() - 1
    inv_scale = torch.zeros(num_groups, dtype=torch.float64)
    thresh = torch.full((num_groups,), math.inf, dtype=torch.float64)
    ratios = mask_ratio.tolist()
    for gi, (lo, hi) in enumerate(_group_bounds(offsets)):
        n = hi - lo
        omega = importance[lo:hi]
        total = omega.double().sum().item() if n else 0.0
        inv_scale[gi] = inv_scale_of(n, total, normalize)
        thresh[gi] = kth_largest(omega, kth_count(ratios[gi], n)) if n else math.inf
    device = importance.device
    return inv_scale.float().to(device), thresh.float().to(device)


def consolidate_(param, anchor, importance, fisher, *, fisher_scale, decay,
                 merge=None, alpha=1.0) -> None:
    """DESIGN.md 2.2, elementwise part. ``fisher_scale`` is the bias correction
    factor: ``F_hat = F * fisher_scale`` (``1/(1-beta**n)`` for ema, ``1/max(n,1)`` for sum)."""
    theta = param.float()
    a = anchor.float()
    omega = importance.float()
    F_hat = _clamp(fisher.float() * fisher_scale)
    if merge == "fisher":
        denom = omega + alpha * F_hat
        merged = (omega * a + alpha * F_hat * theta) / denom
        theta = torch.where(denom > 0, merged, theta)
    elif merge == "linear":
        theta = a + alpha * (theta - a)
    param.copy_(theta)
    importance.copy_(_clamp(decay * omega + F_hat))
    anchor.copy_(param)      # a = theta as stored, so the drift right after is exactly 0
    fisher.zero_()


def align_(param, anchor, offsets, align_ratio, *, mode="anchor") -> None:
    """DESIGN.md 2.3: reset the weights whose sign conflicts with the top-|a| anchors."""
    for lo, hi in _group_bounds(offsets):
        if lo == hi:
            continue
        m = kth_largest(anchor[lo:hi].float().abs(), kth_count(align_ratio, hi - lo))
        align_group_(param[lo:hi], anchor[lo:hi], m, mode)


def align_apply_(param, anchor, offsets, m_g, *, mode="anchor") -> None:
    """DESIGN.md 2.3 given every group's ``m_g`` (fp32 ``[G]``, kept in the state)."""
    for (lo, hi), m in zip(_group_bounds(offsets), m_g.tolist()):
        if lo != hi:
            align_group_(param[lo:hi], anchor[lo:hi], m, mode)


def align_group_(theta: torch.Tensor, anchor: torch.Tensor, m: float, mode: str) -> None:
    """DESIGN.md 2.3 on the elements of one group, given its ``m_g``."""
    a = anchor.float()
    mag = a.abs()
    conflict = (mag >= m) & (mag > 0) & (torch.sign(theta.float()) != torch.sign(a))
    replacement = anchor if mode == "anchor" else torch.zeros_like(theta)
    theta.copy_(torch.where(conflict, replacement.to(theta.dtype), theta))
