"""Triton backend: the four flat ops of DESIGN.md section 3, one kernel family each.

Organisation (every kernel covers all groups in one launch, whatever G):

* ``fused_step`` -- ``_fused_step_kernel``. A program owns a chunk of ``BLOCK * TILES``
  elements. Each element finds its group by a binary search over ``offsets`` (``STEPS =
  bit_length(G)`` gathers of the small, cached offsets table). When the whole chunk lies
  in one group (the common case) the per-group scalars are loaded once and the 7 stats
  are accumulated in registers over the tiles, then stored to the program's own row of a
  partials buffer (no atomics), and ``_stats_reduce_kernel`` adds blocks of 256 rows with
  one vector atomic per group present (so a dominant group's programs never queue on one
  56-byte row); a chunk that spans groups reduces each tile once per group present in it
  (a loop over the distinct groups of the tile, not over G) and adds one atomic per
  (tile, group, stat). Stats are accumulated in an fp64 ``[G, 7]`` workspace (counts stay
  exact past 2^24 and sums are rounded once, like the reference's fp64 sums) and
  returned as fp32; nothing waits on the host. Elements past ``offsets[G]`` (malformed
  offsets on a GPU tensor, which the host checks by value only on the CPU) are left
  untouched by every kernel.
* ``group_thresholds`` and the magnitude threshold of ``align_`` -- an exact radix
  select over the fp32 bit pattern (sign bit dropped, as in ``reference.kth_largest``):
  four passes of 8 bits. Each pass is one launch of ``_hist_kernel`` (per program, one
  ``tl.histogram`` of ``(group - window) * 256 + digit`` over the elements still matching
  their group's selected prefix, for a window of ``HIST_WINDOW`` groups -- a block inside
  one group is one window -- then one vector atomic of the int64 counters), followed by
  one launch of ``_pick_kernel`` (``[PICK_GROUPS, 256]`` tiles: per group, the bin holding
  the k-th largest, the extended prefix, the remaining k). The first pass also sums the
  groups' values in fp64 for ``inv_scale``. No sort, no copy of the data; extra memory
  is ``4 * G * 256`` int64 counters. ``k = floor(rho * n)`` is taken in fp64 on the device.
* ``consolidate_`` -- ``_consolidate_kernel``, elementwise; ``align_`` -- the select on
  ``|anchor|`` then ``_align_kernel``, elementwise, writing only the reset elements;
  ``align_apply_`` -- that kernel alone, given m_g (a block in one group loads it once).
* The ops are ``torch.library`` custom ops (``aim_kernels_triton::*``, fake impls), so
  ``torch.compile(fullgraph=True)`` keeps each as one node.

All math is fp32 on fp32/bf16/fp16 storage (loads upcast, stores round once); element
indices are int64. Every program whose chunk lies wholly below N runs without masks, so
its loads are vectorised whatever N (only the last program pays for masks). On a GPU the
block sizes are autotuned (``triton.autotune``, with ``restore_value``/``reset_to_zero``
so tuning runs never leave a trace in the in-place outputs; small inputs skip tuning;
large ones are tuned once on a prefix) and FMA contraction is off, so results follow the
reference's separate multiply/add. Under ``TRITON_INTERPRET=1`` (read only through
``backends.triton_interpreting``) the same kernels run on CPU tensors with a fixed small
block and no autotuning.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
import triton
import triton.language as tl

from . import backends as _backends

__all__ = ["fused_step", "group_thresholds", "consolidate_", "align_", "align_apply_"]

NUM_STATS = 7
RADIX_BITS = tl.constexpr(8)
BINS = tl.constexpr(256)
FP32_MAX = tl.constexpr(3.4028234663852886e38)   # the largest finite fp32 (DESIGN 2.1 clamps)
_NBINS = 256                     # the same, for host code
SHIFTS = (24, 16, 8, 0)          # the four 8-bit digits of the (sign-less) fp32 bits

# Fixed launch parameters under the interpreter: small blocks, so the tests' few hundred
# elements still span several programs and chunks that straddle groups (the interpreter's
# cost is per program and per nested call, so not smaller than needed).
INTERPRET_META = {
    "step": dict(BLOCK=64, TILES=2),
    "elementwise": dict(BLOCK=128),
    "hist": dict(BLOCK=128),
}
# Below this many elements autotuning is skipped (first config): timings would be noise.
TUNE_MIN_N = 1 << 20
# Tunings are keyed by ``bit_length(N)`` (the kernels' ``tune_bucket`` argument), capped: all
# inputs past 2^TUNE_CAP_LOG2 elements share one tuning, done on their first 2^TUNE_CAP_LOG2
# elements -- so the copies the autotuner keeps of in-place outputs stay bounded (tuning a
# 7B-element step in place would clone the whole gradient and Fisher buffers).
TUNE_CAP_LOG2 = 24
PICK_WARPS = 4
REDUCE_ROWS = 256                # partial rows per program of the step's stats reduction
PICK_GROUPS = 8                  # groups per program of the pick kernel ([8, 256] tiles)
HIST_WINDOW = 2                  # groups per histogram of the radix pass (2 x 256 bins)
# tl.histogram(..., mask=) exists from Triton 3.4 on; before, excluded lanes are subtracted
HIST_MASK = "mask" in inspect.signature(tl.histogram).parameters


# --------------------------------------------------------------------------- helpers (device)
#
# Every kernel takes the unmasked path for a chunk that lies wholly below N: Triton can
# only prove a mask constant over a vector when N is divisible by 16, so masked loads
# everywhere would make every load scalar for most parameter counts. Only the last
# program's chunk pays for the masks.

@triton.jit
def _group_of(idx, offsets_ptr, G, STEPS: tl.constexpr):
    """``searchsorted(offsets[1:], idx, right=True)``: the group holding element ``idx``
    (scalar or block, int64); ``G`` for an index past the end. ``STEPS >= log2(G+1)``."""
    lo = idx * 0
    hi = lo + G
    for _ in tl.static_range(STEPS):
        active = lo < hi
        mid = (lo + hi) >> 1
        end = tl.load(offsets_ptr + 1 + mid, mask=active, other=0)
        right = end <= idx
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & (end > idx), mid, hi)
    return lo


@triton.jit
def _step_tile(idx, m, c, t, kappa, lam_g, grad_ptr, param_ptr, anchor_ptr, imp_ptr,
               fisher_ptr, beta, one_minus_beta, EMA: tl.constexpr, FISHER: tl.constexpr,
               DIRECTIONAL: tl.constexpr, MASKED: tl.constexpr):
    """DESIGN.md 2.1 on one tile: stores g_out and F, returns the 7 per-element stat terms
    (zero on lanes past N)."""
    if MASKED:
        g_raw = tl.load(grad_ptr + idx, mask=m, other=0.0)
        f_raw = tl.load(fisher_ptr + idx, mask=m, other=0.0)
        theta = tl.load(param_ptr + idx, mask=m, other=0.0).to(tl.float32)
        a = tl.load(anchor_ptr + idx, mask=m, other=0.0).to(tl.float32)
        omega = tl.load(imp_ptr + idx, mask=m, other=0.0).to(tl.float32)
    else:
        g_raw = tl.load(grad_ptr + idx)
        f_raw = tl.load(fisher_ptr + idx)
        theta = tl.load(param_ptr + idx).to(tl.float32)
        a = tl.load(anchor_ptr + idx).to(tl.float32)
        omega = tl.load(imp_ptr + idx).to(tl.float32)
    g = g_raw.to(tl.float32)
    F = f_raw.to(tl.float32)

    finite = tl.abs(g) < float("inf")            # False for +-inf and NaN
    if FISHER:
        u = g * g
    else:
        u = tl.abs(g)
    u = tl.where(u > FP32_MAX, FP32_MAX, u)      # DESIGN 2.1: u and F stay finite
    if EMA:
        F_new = beta * F + one_minus_beta * u
    else:
        F_new = F + u
    F_new = tl.where(F_new > FP32_MAX, FP32_MAX, F_new)
    s = c * omega
    masked = (omega >= t) & (omega > 0.0)
    d = theta - a
    r = lam_g * s * d
    if DIRECTIONAL:
        r = tl.where(g * d < 0.0, r, 0.0)
    g_out = tl.where(masked, kappa, 1.0) * g + r

    # a non-finite g (and the F it must not touch) is written back bit for bit
    g_new = tl.where(finite, g_out.to(g_raw.dtype), g_raw)
    f_new = tl.where(finite, F_new.to(f_raw.dtype), f_raw)
    if MASKED:
        tl.store(grad_ptr + idx, g_new, mask=m)
        tl.store(fisher_ptr + idx, f_new, mask=m)
    else:
        tl.store(grad_ptr + idx, g_new)
        tl.store(fisher_ptr + idx, f_new)

    # lanes past N load zeros (g finite, Omega = 0 so never masked), but 0 times an
    # infinite inv_scale would be NaN: their float terms are zeroed
    ok = finite & m
    grad_sq = tl.where(ok, g * g, 0.0)
    out_sq = tl.where(ok, g_out * g_out, 0.0)
    reg_sq = tl.where(ok, r * r, 0.0)
    drift_sq = tl.where(m, d * d, 0.0)
    penalty = tl.where(m, 0.5 * lam_g * s * d * d, 0.0)
    n_masked = tl.where(masked, 1.0, 0.0)
    n_nonfinite = tl.where(finite, 0.0, 1.0)
    return grad_sq, out_sq, reg_sq, drift_sq, penalty, n_masked, n_nonfinite


@triton.jit
def _add_stats(ws_ptr, g, sel, v0, v1, v2, v3, v4, v5, v6):
    """Adds the selected lanes' stat terms to row ``g`` of the fp64 [G, 7] workspace."""
    row = ws_ptr + g * 7
    tl.atomic_add(row + 0, tl.sum(tl.where(sel, v0, 0.0)).to(tl.float64), sem="relaxed")
    tl.atomic_add(row + 1, tl.sum(tl.where(sel, v1, 0.0)).to(tl.float64), sem="relaxed")
    tl.atomic_add(row + 2, tl.sum(tl.where(sel, v2, 0.0)).to(tl.float64), sem="relaxed")
    tl.atomic_add(row + 3, tl.sum(tl.where(sel, v3, 0.0)).to(tl.float64), sem="relaxed")
    tl.atomic_add(row + 4, tl.sum(tl.where(sel, v4, 0.0)).to(tl.float64), sem="relaxed")
    tl.atomic_add(row + 5, tl.sum(tl.where(sel, v5, 0.0)).to(tl.float64), sem="relaxed")
    tl.atomic_add(row + 6, tl.sum(tl.where(sel, v6, 0.0)).to(tl.float64), sem="relaxed")


# --------------------------------------------------------------------------- fused step

@triton.jit
def _step_chunk_one_group(start, N, g, grad_ptr, param_ptr, anchor_ptr, imp_ptr, fisher_ptr,
                          inv_scale_ptr, thresh_ptr, keep_ptr, lam_ptr, part_ptr, pgid_ptr, beta,
                          one_minus_beta, EMA: tl.constexpr, FISHER: tl.constexpr,
                          DIRECTIONAL: tl.constexpr, MASKED: tl.constexpr,
                          BLOCK: tl.constexpr, TILES: tl.constexpr):
    """A chunk inside group ``g``: its scalars once, stats in registers, then its 7 sums
    stored to its own row of the partials (no atomics; ``_stats_reduce_kernel`` adds them)."""
    c = tl.load(inv_scale_ptr + g)
    t = tl.load(thresh_ptr + g)
    kappa = tl.load(keep_ptr + g)
    lam_g = tl.load(lam_ptr + g)
    lanes = tl.arange(0, BLOCK)
    a0 = tl.zeros([BLOCK], dtype=tl.float32)
    a1 = tl.zeros([BLOCK], dtype=tl.float32)
    a2 = tl.zeros([BLOCK], dtype=tl.float32)
    a3 = tl.zeros([BLOCK], dtype=tl.float32)
    a4 = tl.zeros([BLOCK], dtype=tl.float32)
    a5 = tl.zeros([BLOCK], dtype=tl.float32)
    a6 = tl.zeros([BLOCK], dtype=tl.float32)
    for tile in range(TILES):
        idx = start + tile * BLOCK + lanes
        v0, v1, v2, v3, v4, v5, v6 = _step_tile(
            idx, idx < N, c, t, kappa, lam_g, grad_ptr, param_ptr, anchor_ptr, imp_ptr,
            fisher_ptr, beta, one_minus_beta, EMA, FISHER, DIRECTIONAL, MASKED)
        a0 += v0
        a1 += v1
        a2 += v2
        a3 += v3
        a4 += v4
        a5 += v5
        a6 += v6
    cols = tl.arange(0, 8)
    row = tl.where(cols == 0, tl.sum(a0), 0.0) + tl.where(cols == 1, tl.sum(a1), 0.0) + \
        tl.where(cols == 2, tl.sum(a2), 0.0) + tl.where(cols == 3, tl.sum(a3), 0.0) + \
        tl.where(cols == 4, tl.sum(a4), 0.0) + tl.where(cols == 5, tl.sum(a5), 0.0) + \
        tl.where(cols == 6, tl.sum(a6), 0.0)
    pid = tl.program_id(0).to(tl.int64)
    tl.store(part_ptr + pid * 8 + cols, row.to(tl.float64))
    tl.store(pgid_ptr + pid, (g + 1).to(tl.int32))          # 0 (the reset value): no row


@triton.jit
def _step_chunk_mixed(start, N, G, offsets_ptr, grad_ptr, param_ptr, anchor_ptr, imp_ptr,
                      fisher_ptr, inv_scale_ptr, thresh_ptr, keep_ptr, lam_ptr, ws_ptr, beta,
                      one_minus_beta, EMA: tl.constexpr, FISHER: tl.constexpr,
                      DIRECTIONAL: tl.constexpr, MASKED: tl.constexpr, STEPS: tl.constexpr,
                      BLOCK: tl.constexpr, TILES: tl.constexpr):
    """A chunk across groups: per tile, one reduction and 7 atomics per group present."""
    lanes = tl.arange(0, BLOCK)
    for tile in range(TILES):
        idx = start + tile * BLOCK + lanes
        gid = tl.where(idx < N, _group_of(idx, offsets_ptr, G, STEPS), G)
        m = gid < G              # (also False past offsets[G], for malformed offsets)
        c = tl.load(inv_scale_ptr + gid, mask=m, other=0.0)
        t = tl.load(thresh_ptr + gid, mask=m, other=0.0)
        kappa = tl.load(keep_ptr + gid, mask=m, other=0.0)
        lam_g = tl.load(lam_ptr + gid, mask=m, other=0.0)
        v0, v1, v2, v3, v4, v5, v6 = _step_tile(
            idx, m, c, t, kappa, lam_g, grad_ptr, param_ptr, anchor_ptr, imp_ptr,
            fisher_ptr, beta, one_minus_beta, EMA, FISHER, DIRECTIONAL, MASKED)
        g = tl.min(gid)
        while g < G:
            _add_stats(ws_ptr, g, gid == g, v0, v1, v2, v3, v4, v5, v6)
            g = tl.min(tl.where(gid > g, gid, G))


@triton.jit
def _fused_step_kernel(grad_ptr, param_ptr, anchor_ptr, imp_ptr, fisher_ptr, offsets_ptr,
                       inv_scale_ptr, thresh_ptr, keep_ptr, lam_ptr, ws_ptr, part_ptr, pgid_ptr,
                       N, G,
                       beta, one_minus_beta, tune_bucket,
                       EMA: tl.constexpr, FISHER: tl.constexpr, DIRECTIONAL: tl.constexpr,
                       STEPS: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    # Malformed offsets (offsets[G] < N; checked by value on the host for CPU tensors only)
    # put the elements past offsets[G] in "group G": a chunk wholly there does nothing, one
    # that reaches there takes the masked mixed path, which leaves them untouched. (N is
    # not clamped to offsets[G] instead: a loaded N would hold registers a kernel argument
    # does not, and one config spilled.)
    start = tl.program_id(0).to(tl.int64) * (BLOCK * TILES)
    full = start + BLOCK * TILES <= N
    last = tl.minimum(start + BLOCK * TILES, N) - 1
    g_first = _group_of(start, offsets_ptr, G, STEPS)
    g_last = _group_of(last, offsets_ptr, G, STEPS)
    if g_first == g_last:
        if g_first < G:
            if full:
                _step_chunk_one_group(start, N, g_first, grad_ptr, param_ptr, anchor_ptr,
                                      imp_ptr, fisher_ptr, inv_scale_ptr, thresh_ptr, keep_ptr,
                                      lam_ptr, part_ptr, pgid_ptr, beta, one_minus_beta, EMA, FISHER,
                                      DIRECTIONAL, False, BLOCK, TILES)
            else:
                _step_chunk_one_group(start, N, g_first, grad_ptr, param_ptr, anchor_ptr,
                                      imp_ptr, fisher_ptr, inv_scale_ptr, thresh_ptr, keep_ptr,
                                      lam_ptr, part_ptr, pgid_ptr, beta, one_minus_beta, EMA, FISHER,
                                      DIRECTIONAL, True, BLOCK, TILES)
    else:
        if full and g_last < G:
            _step_chunk_mixed(start, N, G, offsets_ptr, grad_ptr, param_ptr, anchor_ptr,
                              imp_ptr, fisher_ptr, inv_scale_ptr, thresh_ptr, keep_ptr, lam_ptr,
                              ws_ptr, beta, one_minus_beta, EMA, FISHER, DIRECTIONAL, False,
                              STEPS, BLOCK, TILES)
        else:
            _step_chunk_mixed(start, N, G, offsets_ptr, grad_ptr, param_ptr, anchor_ptr,
                              imp_ptr, fisher_ptr, inv_scale_ptr, thresh_ptr, keep_ptr, lam_ptr,
                              ws_ptr, beta, one_minus_beta, EMA, FISHER, DIRECTIONAL, True,
                              STEPS, BLOCK, TILES)


@triton.jit
def _stats_reduce_kernel(part_ptr, pgid_ptr, ws_ptr, P, G, R: tl.constexpr):
    """Adds the partial rows of the one-group chunks into the fp64 [G, 7] stats. Programs
    run in element order, so the rows of one group are contiguous: a block of R rows adds
    once per group present in it -- 7 atomics per R programs, where one atomic row per
    program had every program of a dominant group hit the same 56 bytes."""
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    gid = tl.load(pgid_ptr + rows, mask=rows < P, other=0) - 1       # -1: no row there
    cols = tl.arange(0, 8)
    vals = tl.load(part_ptr + rows[:, None] * 8 + cols[None, :],
                   mask=(gid >= 0)[:, None] & (cols < 7)[None, :], other=0.0)
    g = tl.min(tl.where(gid >= 0, gid, G))
    while g < G:
        total = tl.sum(tl.where((gid == g)[:, None], vals, 0.0), 0)
        tl.atomic_add(ws_ptr + g * 7 + cols, total, mask=cols < 7, sem="relaxed")
        g = tl.min(tl.where(gid > g, gid, G))


# --------------------------------------------------------------------------- radix select

@triton.jit
def _hist_kernel(x_ptr, offsets_ptr, ratio_ptr, hist_ptr, prefix_ptr, rem_ptr, sum_ptr,
                 N, G, tune_bucket, SHIFT: tl.constexpr, FIRST: tl.constexpr,
                 SUM: tl.constexpr, STEPS: tl.constexpr, GW: tl.constexpr,
                 HIST_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """One radix pass: per group, the histogram of digit ``(bits >> SHIFT) & 255`` over
    the elements whose higher digits equal the group's prefix (all of them in the first
    pass, which also sums the values in fp64 when ``SUM``); groups with k = 0 are left
    out. The groups of the block are taken ``GW`` at a time: one ``tl.histogram`` of
    ``(group - window start) * 256 + digit`` and one vector atomic of ``GW * 256`` int64
    counters per (program, window) -- a block inside one group is one window."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    g_first = _group_of(start, offsets_ptr, G, STEPS)
    # malformed offsets (offsets[G] < N): a block wholly past offsets[G] reads nothing, and
    # in a block that reaches there those elements ("group G") are left out like lanes past N
    if g_first < G:
        g_last = _group_of(tl.minimum(start + BLOCK, N) - 1, offsets_ptr, G, STEPS)
        # a block inside one group that has nothing to select (k = 0, or done) reads nothing:
        # with mask_ratio 0 (most presets) three of the four passes cost no data traffic
        if FIRST:
            n_first = tl.load(offsets_ptr + g_first + 1) - tl.load(offsets_ptr + g_first)
            k_first = tl.floor(tl.load(ratio_ptr + g_first).to(tl.float64) * n_first.to(tl.float64))
            live = (g_first != g_last) | (k_first >= 1.0)
            if SUM:
                live = g_first >= 0
        else:
            live = (g_first != g_last) | (tl.load(rem_ptr + g_first) > 0)
        if live:
            idx = start + tl.arange(0, BLOCK)
            m = idx < N
            if start + BLOCK <= N:
                x = tl.load(x_ptr + idx).to(tl.float32)
            else:
                x = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
            bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
            digit = (bits >> SHIFT) & (BINS - 1)
            if g_first == g_last:
                gid = idx * 0 + g_first
            else:
                gid = _group_of(idx, offsets_ptr, G, STEPS)
            m = m & (gid < G)
            gid = tl.where(m, gid, 0)
            if FIRST:        # groups with k = floor(ratio * n) >= 1
                n = tl.load(offsets_ptr + gid + 1) - tl.load(offsets_ptr + gid)
                k = tl.floor(tl.load(ratio_ptr + gid).to(tl.float64) * n.to(tl.float64))
                keep = m & (k >= 1.0)
            else:            # groups still selecting, elements matching their prefix
                rem = tl.load(rem_ptr + gid)
                prefix = tl.load(prefix_ptr + gid).to(tl.int32)
                keep = m & (rem > 0) & ((bits >> (SHIFT + RADIX_BITS))
                                        == (prefix >> (SHIFT + RADIX_BITS)))
            slots = tl.arange(0, GW * BINS)
            cols = tl.arange(0, GW)
            for w in range(g_first, g_last + 1, GW):
                local = gid - w
                inwin = (local >= 0) & (local < GW)
                key = tl.where(inwin, local, 0).to(tl.int32) * BINS + digit
                if HIST_MASK:
                    h = tl.histogram(key, GW * BINS, mask=keep & inwin)
                else:        # (older Triton: excluded lanes counted in slot 0, then subtracted)
                    sel = keep & inwin
                    h = tl.histogram(tl.where(sel, key, 0), GW * BINS)
                    h = h - tl.where(slots == 0, BLOCK - tl.sum(sel.to(tl.int32)), 0)
                tl.atomic_add(hist_ptr + w * BINS + slots, h.to(tl.int64), mask=h > 0,
                              sem="relaxed")
                if SUM:
                    part = tl.where((m & inwin)[:, None] & (local[:, None] == cols[None, :]),
                                    x.to(tl.float64)[:, None], 0.0)
                    tl.atomic_add(sum_ptr + w + cols, tl.sum(part, 0),
                                  mask=(w + cols <= g_last) & (w + cols < G), sem="relaxed")


@triton.jit
def _pick_kernel(hist_ptr, prefix_ptr, rem_ptr, sum_ptr, offsets_ptr, ratio_ptr,
                 inv_scale_ptr, thresh_ptr, G, SHIFT: tl.constexpr, FIRST: tl.constexpr,
                 LAST: tl.constexpr, SUM: tl.constexpr, NORMALIZE: tl.constexpr,
                 GB: tl.constexpr):
    """``GB`` groups per program: the digit of each group's k-th largest from this pass's
    histogram (the largest d with count(digit >= d) >= remaining k), the new prefix and
    k. The first pass computes ``k = floor(ratio * n)`` in fp64 (clamped to [0, n]; 0 for
    a NaN ratio) and writes ``inv_scale`` (when ``SUM``); the last one writes ``thresh``."""
    g = tl.program_id(0).to(tl.int64) * GB + tl.arange(0, GB)
    gm = g < G
    if FIRST:
        n = tl.load(offsets_ptr + g + 1, mask=gm, other=0) - tl.load(offsets_ptr + g, mask=gm,
                                                                      other=0)
        nf = n.to(tl.float64)
        kf = tl.floor(tl.load(ratio_ptr + g, mask=gm, other=0.0).to(tl.float64) * nf)
        kf = tl.where(kf >= 1.0, kf, 0.0)
        kf = tl.where(kf <= nf, kf, nf)
        rem = kf.to(tl.int64)
        prefix = rem * 0
        if SUM:
            total = tl.load(sum_ptr + g, mask=gm, other=0.0)
            if NORMALIZE:
                c = tl.where(total > 0.0, nf / total, 0.0).to(tl.float32)
                c = tl.where(tl.abs(c) < float("inf"), c, 0.0)   # n/sum overflows fp32: 0
            else:
                c = (total * 0.0 + 1.0).to(tl.float32)
            tl.store(inv_scale_ptr + g, c, mask=gm)
    else:
        rem = tl.load(rem_ptr + g, mask=gm, other=0)
        prefix = tl.load(prefix_ptr + g, mask=gm, other=0)
    bins = tl.arange(0, BINS)
    h = tl.load(hist_ptr + g[:, None] * BINS + bins[None, :], mask=gm[:, None], other=0)
    at_or_above = tl.cumsum(h, 1, reverse=True)                     # count of digits >= d
    # non-increasing in d: the digits d with at_or_above >= k are exactly 0..digit
    reached = at_or_above >= rem[:, None]
    digit = tl.sum(reached.to(tl.int64), 1) - 1
    above = tl.sum(tl.where(reached, 0, h), 1)                     # count of digits > digit
    active = rem > 0
    prefix = tl.where(active, prefix | (digit << SHIFT), prefix)
    rem = tl.where(active, rem - above, rem)
    tl.store(prefix_ptr + g, prefix, mask=gm)
    tl.store(rem_ptr + g, rem, mask=gm)
    if LAST:
        value = prefix.to(tl.int32).to(tl.float32, bitcast=True)
        tl.store(thresh_ptr + g, tl.where(active, value, float("inf")), mask=gm)


# --------------------------------------------------------------------------- consolidate, align

@triton.jit
def _consolidate_tile(param_ptr, anchor_ptr, imp_ptr, fisher_ptr, idx, m, fisher_scale, decay,
                      alpha, MERGE: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    if MASKED:
        t_raw = tl.load(param_ptr + idx, mask=m, other=0.0)
        a = tl.load(anchor_ptr + idx, mask=m, other=0.0).to(tl.float32)
        omega_raw = tl.load(imp_ptr + idx, mask=m, other=0.0)
        f_raw = tl.load(fisher_ptr + idx, mask=m, other=0.0)
    else:
        t_raw = tl.load(param_ptr + idx)
        a = tl.load(anchor_ptr + idx).to(tl.float32)
        omega_raw = tl.load(imp_ptr + idx)
        f_raw = tl.load(fisher_ptr + idx)
    omega = omega_raw.to(tl.float32)
    F_hat = f_raw.to(tl.float32) * fisher_scale
    F_hat = tl.where(F_hat > FP32_MAX, FP32_MAX, F_hat)     # DESIGN 2.1: F_hat, Omega finite
    theta = t_raw.to(tl.float32)
    if MERGE == 1:
        denom = omega + alpha * F_hat
        merged = tl.math.div_rn(omega * a + alpha * F_hat * theta, denom)
        new = tl.where(denom > 0.0, merged.to(t_raw.dtype), t_raw)
    elif MERGE == 2:
        new = (a + alpha * (theta - a)).to(t_raw.dtype)
    else:
        new = t_raw                                          # theta unchanged, not rewritten
    omega_new = decay * omega + F_hat
    omega_new = tl.where(omega_new > FP32_MAX, FP32_MAX, omega_new).to(omega_raw.dtype)
    zero = tl.zeros([BLOCK], dtype=f_raw.dtype)
    if MASKED:
        if MERGE != 0:
            tl.store(param_ptr + idx, new, mask=m)
        tl.store(anchor_ptr + idx, new, mask=m)              # a = theta as stored
        tl.store(imp_ptr + idx, omega_new, mask=m)
        tl.store(fisher_ptr + idx, zero, mask=m)
    else:
        if MERGE != 0:
            tl.store(param_ptr + idx, new)
        tl.store(anchor_ptr + idx, new)
        tl.store(imp_ptr + idx, omega_new)
        tl.store(fisher_ptr + idx, zero)


@triton.jit
def _consolidate_kernel(param_ptr, anchor_ptr, imp_ptr, fisher_ptr, N, fisher_scale, decay,
                        alpha, tune_bucket, MERGE: tl.constexpr, BLOCK: tl.constexpr):
    """DESIGN.md 2.2, elementwise. MERGE: 0 none, 1 fisher, 2 linear."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    idx = start + tl.arange(0, BLOCK)
    if start + BLOCK <= N:
        _consolidate_tile(param_ptr, anchor_ptr, imp_ptr, fisher_ptr, idx, idx < N,
                          fisher_scale, decay, alpha, MERGE, False, BLOCK)
    else:
        _consolidate_tile(param_ptr, anchor_ptr, imp_ptr, fisher_ptr, idx, idx < N,
                          fisher_scale, decay, alpha, MERGE, True, BLOCK)


@triton.jit
def _align_tile(param_ptr, anchor_ptr, idx, m, bound, ZERO: tl.constexpr,
                MASKED: tl.constexpr, BLOCK: tl.constexpr):
    if MASKED:
        t_raw = tl.load(param_ptr + idx, mask=m, other=0.0)
        a_raw = tl.load(anchor_ptr + idx, mask=m, other=0.0)
    else:
        t_raw = tl.load(param_ptr + idx)
        a_raw = tl.load(anchor_ptr + idx)
    a = a_raw.to(tl.float32)
    theta = t_raw.to(tl.float32)
    mag = tl.abs(a)
    sign_a = (a > 0.0).to(tl.int32) - (a < 0.0).to(tl.int32)
    sign_t = (theta > 0.0).to(tl.int32) - (theta < 0.0).to(tl.int32)
    conflict = m & (mag >= bound) & (mag > 0.0) & (sign_t != sign_a)
    if ZERO:
        new = tl.zeros([BLOCK], dtype=t_raw.dtype)
    else:
        new = a_raw
    tl.store(param_ptr + idx, new, mask=conflict)            # only the reset elements


@triton.jit
def _align_kernel(param_ptr, anchor_ptr, offsets_ptr, mag_ptr, N, G, tune_bucket,
                  ZERO: tl.constexpr, STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """DESIGN.md 2.3, elementwise, given the per-group k-th largest |a| (``mag_ptr``).
    A block inside one group (the common case) loads its m_g once; only a block across
    a group end searches the group of each element."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    g_first = _group_of(start, offsets_ptr, G, STEPS)
    # malformed offsets (offsets[G] < N): the elements past offsets[G] ("group G") are
    # left untouched, like lanes past N
    if g_first < G:
        idx = start + tl.arange(0, BLOCK)
        m = idx < N
        g_last = _group_of(tl.minimum(start + BLOCK, N) - 1, offsets_ptr, G, STEPS)
        if g_first == g_last:
            bound = tl.zeros([BLOCK], dtype=tl.float32) + tl.load(mag_ptr + g_first)
        else:
            gid = _group_of(idx, offsets_ptr, G, STEPS)
            m = m & (gid < G)
            bound = tl.load(mag_ptr + gid, mask=m, other=float("inf"))
        if start + BLOCK <= N:
            _align_tile(param_ptr, anchor_ptr, idx, m, bound, ZERO, False, BLOCK)
        else:
            _align_tile(param_ptr, anchor_ptr, idx, m, bound, ZERO, True, BLOCK)


# --------------------------------------------------------------------------- launching

def _bench(kernel_call, quantiles):
    """Timing used by the autotuner (module-level so a test can substitute it)."""
    return triton.testing.do_bench(kernel_call, quantiles=quantiles)


def _do_bench(kernel_call, quantiles):
    return _bench(kernel_call, quantiles)


def _prune_small(configs, nargs, **kwargs):
    """Small inputs run the first config untuned (tuning them would time noise)."""
    return configs[:1] if nargs["N"] < TUNE_MIN_N else configs


_AUTOTUNE_ARGS = inspect.signature(triton.autotune).parameters
if "restore_value" not in _AUTOTUNE_ARGS:    # (ImportError: the backend reports why)
    raise ImportError(f"triton {triton.__version__} is too old: its autotuner cannot restore "
                      "in-place outputs (restore_value); install triton>=3.0")


def _tuned(configs, restore=(), reset=()):
    timer = {"do_bench": _do_bench} if "do_bench" in _AUTOTUNE_ARGS else {}
    return triton.autotune(configs=configs, key=["tune_bucket"], restore_value=list(restore),
                           reset_to_zero=list(reset), **timer,
                           prune_configs_by={"early_config_prune": _prune_small})


_C = triton.Config
# Register use read with ptxas from sm_80/sm_90 compiles on a CPU-only machine (no GPU was
# lent; tests/test_triton.py checks every config for spills and vector loads): 4-8 elements
# per thread keep fused_step at 64-128 registers. The first config of each list is the
# untuned choice for inputs below TUNE_MIN_N elements.
_STEP_CONFIGS = [
    _C({"BLOCK": 1024, "TILES": 1}, num_warps=8),
    _C({"BLOCK": 1024, "TILES": 4}, num_warps=8),
    _C({"BLOCK": 2048, "TILES": 1}, num_warps=16),
    _C({"BLOCK": 2048, "TILES": 2}, num_warps=16),
    _C({"BLOCK": 1024, "TILES": 2}, num_warps=8),
    _C({"BLOCK": 1024, "TILES": 1}, num_warps=4),
]
_ELEMENTWISE_CONFIGS = [
    _C({"BLOCK": 1024}, num_warps=8),
    _C({"BLOCK": 2048}, num_warps=16),
    _C({"BLOCK": 1024}, num_warps=4),
    _C({"BLOCK": 2048}, num_warps=8),
]
_HIST_CONFIGS = [
    _C({"BLOCK": 1024}, num_warps=8),
    _C({"BLOCK": 2048}, num_warps=8),
    _C({"BLOCK": 1024}, num_warps=4),
    _C({"BLOCK": 4096}, num_warps=16),
]


class _Roles:
    """Positional arguments of a data kernel, for tuning on a prefix: ``elem`` per-element
    tensors (sliced), ``inplace`` those it writes (restored after), ``scratch`` its atomic
    accumulators (replaced by zeros), ``n`` the index of ``N``."""

    def __init__(self, elem, inplace, scratch, n):
        self.elem, self.inplace, self.scratch, self.n = elem, inplace, scratch, n


_KERNELS = {
    # name: (plain jit function, autotuned wrapper, key of INTERPRET_META, argument roles)
    "step": (_fused_step_kernel,
             _tuned(_STEP_CONFIGS, restore=("grad_ptr", "fisher_ptr"),
                    reset=("ws_ptr", "pgid_ptr"))(_fused_step_kernel),
             "step", _Roles((0, 1, 2, 3, 4), (0, 4), (10, 12), 13)),
    "hist": (_hist_kernel,
             _tuned(_HIST_CONFIGS, reset=("hist_ptr", "sum_ptr"))(_hist_kernel), "hist",
             _Roles((0,), (), (3, 6), 7)),
    "consolidate": (_consolidate_kernel,
                    _tuned(_ELEMENTWISE_CONFIGS,
                           restore=("param_ptr", "anchor_ptr", "imp_ptr", "fisher_ptr"))(
                        _consolidate_kernel), "elementwise",
                    _Roles((0, 1, 2, 3), (0, 1, 2, 3), (), 4)),
    "align": (_align_kernel,
              _tuned(_ELEMENTWISE_CONFIGS, restore=("param_ptr",))(_align_kernel),
              "elementwise", _Roles((0, 1), (0,), (), 4)),
}
_TUNED: set = set()          # (kernel, bucket, dtypes) tuned on a prefix already


def autotuned() -> bool:
    """Whether launches are GPU launches -- autotuned, with GPU compile options -- rather
    than the fixed small blocks of the interpreter. The one place that asks."""
    return not _backends.triton_interpreting()


def _grid(n: int):
    return lambda m: (triton.cdiv(n, m["BLOCK"] * m.get("TILES", 1)),)


def _tune_bucket(n: int) -> int:
    return min(int(n).bit_length(), TUNE_CAP_LOG2 + 1)


def _launch(name: str, n: int, args: tuple, **meta) -> None:
    """Launches kernel ``name`` over ``n`` elements: autotuned on a GPU, fixed blocks
    under the interpreter. The grid is ``cdiv(n, BLOCK * TILES)``."""
    plain, tuned, fixed, roles = _KERNELS[name]
    bucket = _tune_bucket(n)
    if not autotuned():
        with _quiet():
            plain[_grid(n)](*args, bucket, **meta, **INTERPRET_META[fixed])
        return
    cap = 1 << TUNE_CAP_LOG2
    if n > cap:
        key = (name, bucket, tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor)))
        if key not in _TUNED:           # tune on the first 2^TUNE_CAP_LOG2 elements, once
            short = list(args)
            saved = [(args[i], args[i][:cap].clone()) for i in roles.inplace]
            for i in roles.elem:
                short[i] = args[i][:cap]
            for i in roles.scratch:
                short[i] = torch.zeros_like(args[i])
            short[roles.n] = cap
            tuned[_grid(cap)](*short, bucket, **meta, enable_fp_fusion=False)
            for full, before in saved:
                full[:cap].copy_(before)
            _TUNED.add(key)
    tuned[_grid(n)](*args, bucket, **meta, enable_fp_fusion=False)


def _launch_pick(num_groups: int, args: tuple, **meta) -> None:
    gb = min(triton.next_power_of_2(num_groups), PICK_GROUPS)
    grid = (triton.cdiv(num_groups, gb),)
    if autotuned():
        _pick_kernel[grid](*args, num_groups, **meta, GB=gb, num_warps=PICK_WARPS,
                           enable_fp_fusion=False)
    else:
        with _quiet():
            _pick_kernel[grid](*args, num_groups, **meta, GB=gb)


def _quiet():
    """The interpreter computes with numpy, which warns on the IEEE cases the kernels
    mean to handle (inf - inf, 0 / 0 in a discarded ``where`` branch)."""
    import numpy
    return numpy.errstate(all="ignore")


def _steps(num_groups: int) -> int:
    """Binary-search steps over the G group ends: ceil(log2(G + 1)) <= bit_length(G)."""
    return max(1, int(num_groups).bit_length())


def _on_device(t: torch.Tensor):
    """Makes the tensor's GPU the current one (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# --------------------------------------------------------------------------- the ops

def _fused_step_impl(grad, param, anchor, importance, fisher, offsets, inv_scale, thresh, keep,
                     lam, *, beta, accumulate="ema", importance_kind="fisher", directional=True):
    """DESIGN.md 2.1 in one launch (and a small reduction); returns the fp32 ``[G, 7]``
    stats (on the device)."""
    num_groups = offsets.numel() - 1
    with _on_device(grad):
        ws = torch.zeros((num_groups, NUM_STATS), dtype=torch.float64, device=grad.device)
        _step_into(ws, grad, param, anchor, importance, fisher, offsets, inv_scale, thresh, keep,
                   lam, beta=beta, ema=accumulate == "ema", fisher_kind=importance_kind == "fisher",
                   directional=bool(directional))
        return ws.to(torch.float32)


def _step_into(ws, grad, param, anchor, importance, fisher, offsets, inv_scale, thresh, keep, lam,
               *, beta, ema, fisher_kind, directional) -> None:
    """The step's launches, adding its stats into the zeroed fp64 ``ws`` ``[G, 7]``."""
    n, num_groups = grad.numel(), offsets.numel() - 1
    if not n:
        return
    beta = float(beta)
    # one partial row per program of the smallest chunk any config takes
    rows = triton.cdiv(n, _min_step_chunk())
    part = torch.empty((rows, 8), dtype=torch.float64, device=grad.device)
    pgid = torch.zeros(rows, dtype=torch.int32, device=grad.device)
    _launch("step", n, (grad, param, anchor, importance, fisher, offsets, inv_scale, thresh, keep,
                        lam, ws, part, pgid, n, num_groups, beta, 1.0 - beta),
            EMA=ema, FISHER=fisher_kind, DIRECTIONAL=directional, STEPS=_steps(num_groups))
    grid = (triton.cdiv(rows, REDUCE_ROWS),)
    if autotuned():
        _stats_reduce_kernel[grid](part, pgid, ws, rows, num_groups, R=REDUCE_ROWS, num_warps=4)
    else:
        with _quiet():
            _stats_reduce_kernel[grid](part, pgid, ws, rows, num_groups, R=REDUCE_ROWS)


def _min_step_chunk() -> int:
    """Elements per program of the step's smallest chunk (the most programs a launch has)."""
    if not autotuned():
        meta = INTERPRET_META["step"]
        return meta["BLOCK"] * meta["TILES"]
    return min(c.kwargs["BLOCK"] * c.kwargs["TILES"] for c in _STEP_CONFIGS)


def _select(values, offsets, ratio, *, with_sum: bool, normalize: bool = True):
    """Per group, the exact k-th largest of ``|values|`` (fp32 bits), ``k = floor(ratio_g *
    n_g)`` (``+inf`` for k = 0); with ``with_sum``, also ``inv_scale`` from the fp64 sums.
    Returns ``(inv_scale or None, thresh)``, fp32 ``[G]``, on the device, without a host sync.
    """
    n, num_groups = values.numel(), offsets.numel() - 1
    dev = values.device
    # one zeroed int64 workspace: 4 histograms [G, 256], then prefix, remaining k, fp64 sum
    ws = torch.zeros(len(SHIFTS) * num_groups * _NBINS + 3 * num_groups, dtype=torch.int64,
                     device=dev)
    hists = ws[:len(SHIFTS) * num_groups * _NBINS].view(len(SHIFTS), num_groups * _NBINS)
    tail = ws[len(SHIFTS) * num_groups * _NBINS:]
    prefix, rem = tail[:num_groups], tail[num_groups:2 * num_groups]
    sums = tail[2 * num_groups:].view(torch.float64)
    inv_scale = torch.empty(num_groups, dtype=torch.float32, device=dev)
    thresh = torch.empty(num_groups, dtype=torch.float32, device=dev)
    if num_groups == 0:
        return (inv_scale if with_sum else None), thresh
    steps = _steps(num_groups)
    for p, shift in enumerate(SHIFTS):
        first, last = p == 0, p == len(SHIFTS) - 1
        if n:
            _launch("hist", n, (values, offsets, ratio, hists[p], prefix, rem, sums, n,
                                num_groups),
                    SHIFT=shift, FIRST=first, SUM=with_sum and first, STEPS=steps,
                    GW=HIST_WINDOW, HIST_MASK=HIST_MASK)
        _launch_pick(num_groups, (hists[p], prefix, rem, sums, offsets, ratio, inv_scale,
                                  thresh),
                     SHIFT=shift, FIRST=first, LAST=last, SUM=with_sum and first,
                     NORMALIZE=bool(normalize))
    return (inv_scale if with_sum else None), thresh


def _group_thresholds_impl(importance, offsets, mask_ratio, *, normalize=True):
    """DESIGN.md 2: ``(inv_scale, thresh)``, fp32 ``[G]``, by a 4-pass radix select."""
    with _on_device(importance):
        return _select(importance, offsets, mask_ratio, with_sum=True, normalize=normalize)


def _consolidate_impl(param, anchor, importance, fisher, *, fisher_scale, decay, merge=None,
                 alpha=1.0) -> None:
    """DESIGN.md 2.2, elementwise part, in one launch."""
    n = param.numel()
    if not n:
        return
    with _on_device(param):
        _launch("consolidate", n, (param, anchor, importance, fisher, n, float(fisher_scale),
                                   float(decay), float(alpha)),
                MERGE={None: 0, "fisher": 1, "linear": 2}[merge])


def _align_impl(param, anchor, offsets, align_ratio, *, mode="anchor") -> None:
    """DESIGN.md 2.3: select on |anchor| (4 passes), then one elementwise launch."""
    n, num_groups = param.numel(), offsets.numel() - 1
    if not n:
        return
    with _on_device(param):
        # the ratio as an fp64 device tensor: k = floor(ratio * n) in fp64 of the value given
        ratio = torch.full((num_groups,), float(align_ratio), dtype=torch.float64,
                           device=param.device)
        _, bound = _select(anchor, offsets, ratio, with_sum=False)
        _launch("align", n, (param, anchor, offsets, bound, n, num_groups),
                ZERO=mode == "zero", STEPS=_steps(num_groups))


def _align_apply_impl(param, anchor, offsets, m_g, *, mode="anchor") -> None:
    """DESIGN.md 2.3 given ``m_g`` (fp32 ``[G]``): one elementwise launch, no select."""
    n, num_groups = param.numel(), offsets.numel() - 1
    if not n or num_groups <= 0:
        return
    with _on_device(param):
        _launch("align", n, (param, anchor, offsets, m_g, n, num_groups),
                ZERO=mode == "zero", STEPS=_steps(num_groups))



# --------------------------------------------------------------------------- torch.library
#
# The ops are registered as ``aim_kernels_triton::*`` custom ops with their in-place
# arguments and fake implementations, as native.py does for ``_C``: torch.compile then
# keeps each op as one opaque node instead of tracing the launcher (its autotuning state,
# the prefix clones, Triton's launch keywords), so a step with backend="triton" compiles
# with fullgraph=True.

@torch.library.custom_op("aim_kernels_triton::fused_step", mutates_args=("grad", "fisher"))
def _fused_step_op(grad: torch.Tensor, param: torch.Tensor, anchor: torch.Tensor,
                   importance: torch.Tensor, fisher: torch.Tensor, offsets: torch.Tensor,
                   inv_scale: torch.Tensor, thresh: torch.Tensor, keep: torch.Tensor,
                   lam: torch.Tensor, beta: float, accumulate: str, importance_kind: str,
                   directional: bool) -> torch.Tensor:
    return _fused_step_impl(grad, param, anchor, importance, fisher, offsets, inv_scale, thresh,
                            keep, lam, beta=beta, accumulate=accumulate,
                            importance_kind=importance_kind, directional=directional)


@_fused_step_op.register_fake
def _(grad, param, anchor, importance, fisher, offsets, inv_scale, thresh, keep, lam, beta,
      accumulate, importance_kind, directional):
    return grad.new_empty((offsets.shape[0] - 1, NUM_STATS), dtype=torch.float32)


@torch.library.custom_op("aim_kernels_triton::group_thresholds", mutates_args=())
def _group_thresholds_op(importance: torch.Tensor, offsets: torch.Tensor,
                         mask_ratio: torch.Tensor,
                         normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _group_thresholds_impl(importance, offsets, mask_ratio, normalize=normalize)


@_group_thresholds_op.register_fake
def _(importance, offsets, mask_ratio, normalize):
    g = offsets.shape[0] - 1
    return (importance.new_empty((g,), dtype=torch.float32),
            importance.new_empty((g,), dtype=torch.float32))


@torch.library.custom_op("aim_kernels_triton::consolidate_",
                         mutates_args=("param", "anchor", "importance", "fisher"))
def _consolidate_op(param: torch.Tensor, anchor: torch.Tensor, importance: torch.Tensor,
                    fisher: torch.Tensor, fisher_scale: float, decay: float,
                    merge: Optional[str], alpha: float) -> None:
    _consolidate_impl(param, anchor, importance, fisher, fisher_scale=fisher_scale,
                       decay=decay, merge=merge, alpha=alpha)


@_consolidate_op.register_fake
def _(param, anchor, importance, fisher, fisher_scale, decay, merge, alpha):
    return None


@torch.library.custom_op("aim_kernels_triton::align_", mutates_args=("param",))
def _align_op(param: torch.Tensor, anchor: torch.Tensor, offsets: torch.Tensor,
              align_ratio: float, align_mode: str) -> None:
    _align_impl(param, anchor, offsets, align_ratio, mode=align_mode)


@_align_op.register_fake
def _(param, anchor, offsets, align_ratio, align_mode):
    return None


@torch.library.custom_op("aim_kernels_triton::align_apply_", mutates_args=("param",))
def _align_apply_op(param: torch.Tensor, anchor: torch.Tensor, offsets: torch.Tensor,
                    m_g: torch.Tensor, align_mode: str) -> None:
    _align_apply_impl(param, anchor, offsets, m_g, mode=align_mode)


@_align_apply_op.register_fake
def _(param, anchor, offsets, m_g, align_mode):
    return None


def fused_step(grad, param, anchor, importance, fisher, offsets, inv_scale, thresh, keep, lam,
               *, beta, accumulate="ema", importance_kind="fisher", directional=True):
    """DESIGN.md 2.1 in one launch; returns the fp32 ``[G, 7]`` stats (on the device)."""
    return torch.ops.aim_kernels_triton.fused_step(
        grad, param, anchor, importance, fisher, offsets, inv_scale, thresh, keep, lam,
        float(beta), accumulate, importance_kind, bool(directional))


def group_thresholds(importance, offsets, mask_ratio, *, normalize=True):
    """DESIGN.md 2: ``(inv_scale, thresh)``, fp32 ``[G]``, by a 4-pass radix select."""
    return torch.ops.aim_kernels_triton.group_thresholds(importance, offsets, mask_ratio,
                                                         bool(normalize))


def consolidate_(param, anchor, importance, fisher, *, fisher_scale, decay, merge=None,
                 alpha=1.0) -> None:
    """DESIGN.md 2.2, elementwise part, in one launch."""
    torch.ops.aim_kernels_triton.consolidate_(param, anchor, importance, fisher,
                                              float(fisher_scale), float(decay), merge,
                                              float(alpha))


def align_(param, anchor, offsets, align_ratio, *, mode="anchor") -> None:
    """DESIGN.md 2.3: select on |anchor| (4 passes), then one elementwise launch."""
    torch.ops.aim_kernels_triton.align_(param, anchor, offsets, float(align_ratio), mode)


def align_apply_(param, anchor, offsets, m_g, *, mode="anchor") -> None:
    """DESIGN.md 2.3 given ``m_g`` (fp32 ``[G]``): one elementwise launch, no select."""
    torch.ops.aim_kernels_triton.align_apply_(param, anchor, offsets, m_g, mode)
