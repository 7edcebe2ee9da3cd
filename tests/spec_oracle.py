"""An independent, element-by-element reading of DESIGN.md section 2.

This module is the test oracle for ``aim_kernels.ops.reference`` (and through it for
every backend). It is written from the text of the spec, not from the reference:

* every element is visited by a plain Python loop, one group after another;
* every arithmetic operation is done on ``numpy.float32`` scalars, so each one is
  rounded to fp32 exactly as the spec's "all arithmetic in fp32" asks;
* scalar parameters (``beta``, ``1 - beta``, ``fisher_scale``, ``decay``, ``alpha``) are
  real numbers whose fp32 value is used;
* thresholds are the exact k-th largest through Python's ``sorted()``;
* sums of per-element fp32 terms (the stats) are exact (``math.fsum``) and the count
  ``k = floor(ratio * n)`` is taken in float64, as the spec says.

Inputs are torch tensors (any storage dtype, read as their exact fp32 values) or
sequences of floats. Results are plain lists of fp32 values *before* they are rounded
to a storage dtype; use :func:`store` for the one rounding that storing does.

Keep inputs small (a few hundred to a thousand elements): this is slow on purpose.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

f32 = np.float32
INF = math.inf
FP32_MAX = f32(np.finfo(np.float32).max)      # 3.4028235e38, the largest finite fp32
STAT_COLUMNS = ("grad_sq", "out_sq", "reg_sq", "drift_sq", "penalty", "masked", "nonfinite")


# --------------------------------------------------------------------------- helpers

def values(x) -> list[float]:
    """The exact values of a 1-D tensor (upcast to fp32, exact for bf16/fp16) or sequence."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype != torch.float64:
            x = x.float()
        return [float(v) for v in x.tolist()]
    return [float(v) for v in x]


def ints(x) -> list[int]:
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.detach().cpu().tolist()]
    return [int(v) for v in x]


def store(fp32_values: Sequence, dtype: torch.dtype) -> torch.Tensor:
    """Round a list of fp32 results once to the storage ``dtype`` (IEEE round to nearest even)."""
    t = torch.tensor([float(v) for v in fp32_values], dtype=torch.float32)
    return t.to(dtype)


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)        # sign(0) = sign(-0) = 0


def kth_count(ratio: float, n: int) -> int:
    """k = floor(ratio * n), with the product in float64 (Python float)."""
    return math.floor(float(ratio) * n)


def kth_largest(vals: Sequence[float], k: int) -> float:
    """The k-th largest (1-based, ties counted), +inf if k == 0; via ``sorted()``."""
    if k == 0:
        return INF
    return sorted((float(v) for v in vals), reverse=True)[k - 1]


def _at_most_fp32_max(x):
    """DESIGN.md 2.1: u, F, F_hat and Omega are clamped to the largest finite fp32."""
    return FP32_MAX if x > FP32_MAX else x


def _bounds(offsets) -> list[tuple[int, int]]:
    o = ints(offsets)
    return [(o[g], o[g + 1]) for g in range(len(o) - 1)]


# --------------------------------------------------------------------------- section 2

def group_thresholds(importance, offsets, mask_ratio, *, normalize=True):
    """Section 2: per group ``(c_g, t_g)`` as lists of fp32 values.

    ``mask_ratio`` values are taken as given (an fp32 tensor gives the fp32 value of rho).
    """
    omega = values(importance)
    ratios = values(mask_ratio)
    inv_scale, thresh = [], []
    for g, (lo, hi) in enumerate(_bounds(offsets)):
        n = hi - lo
        group = omega[lo:hi]
        total = math.fsum(group)
        if not normalize:
            c = f32(1.0)
        elif total > 0:
            with np.errstate(over="ignore"):
                c = f32(n / total)
            if not math.isfinite(float(c)):     # n / sum not finite in fp32: c = 0
                c = f32(0.0)
        else:
            c = f32(0.0)
        k = kth_count(ratios[g], n)
        inv_scale.append(c)
        thresh.append(f32(kth_largest(group, k)))
    return inv_scale, thresh


# --------------------------------------------------------------------------- section 2.1

def fused_step(grad, param, anchor, importance, fisher, offsets, inv_scale, thresh, keep,
               lam, *, beta, accumulate="ema", importance_kind="fisher", directional=True):
    """Section 2.1, element by element.

    Returns ``(g_out, F_out, stats)``: g_out and F_out are lists of fp32 values (not yet
    rounded to the storage dtype), stats is a list of G rows of 7 Python floats (exact
    sums of the fp32 per-element terms; the counts are integers).
    """
    g_in, theta_in, a_in = values(grad), values(param), values(anchor)
    omega_in, F_in = values(importance), values(fisher)
    cs, ts, kappas, lams = values(inv_scale), values(thresh), values(keep), values(lam)
    beta32 = f32(beta)
    one_minus_beta = f32(1.0 - float(beta))
    zero, one, half = f32(0.0), f32(1.0), f32(0.5)

    g_out = [f32(v) for v in g_in]
    F_out = [f32(v) for v in F_in]
    stats = []
    with np.errstate(all="ignore"):
        for gi, (lo, hi) in enumerate(_bounds(offsets)):
            c, t, kappa, lam_g = f32(cs[gi]), f32(ts[gi]), f32(kappas[gi]), f32(lams[gi])
            terms = {name: [] for name in STAT_COLUMNS}
            for i in range(lo, hi):
                g, theta, a = f32(g_in[i]), f32(theta_in[i]), f32(a_in[i])
                omega, F = f32(omega_in[i]), f32(F_in[i])

                finite = math.isfinite(float(g))
                if finite:
                    u = _at_most_fp32_max(g * g if importance_kind == "fisher" else abs(g))
                    if accumulate == "ema":
                        F_out[i] = _at_most_fp32_max(beta32 * F + one_minus_beta * u)
                    else:
                        F_out[i] = _at_most_fp32_max(F + u)
                s = c * omega
                masked = bool(omega >= t) and bool(omega > 0)
                d = theta - a
                r = lam_g * s * d
                if directional and not bool(g * d < 0):
                    r = zero
                if finite:
                    out = (kappa if masked else one) * g + r
                else:
                    out = g                   # passes through unchanged
                g_out[i] = out

                if finite:
                    terms["grad_sq"].append(float(g * g))
                    terms["out_sq"].append(float(out * out))
                    terms["reg_sq"].append(float(r * r))
                terms["drift_sq"].append(float(d * d))
                # 1/2 lam s d^2 read left to right, as written: the order matters only
                # when d*d overflows (lam = 0 then gives 0 here, NaN with (d*d) first)
                terms["penalty"].append(float(half * lam_g * s * d * d))
                terms["masked"].append(1.0 if masked else 0.0)
                terms["nonfinite"].append(0.0 if finite else 1.0)
            stats.append([math.fsum(terms[name]) for name in STAT_COLUMNS])
    return g_out, F_out, stats


# --------------------------------------------------------------------------- section 2.2

def consolidate(param, anchor, importance, fisher, *, fisher_scale, decay, merge=None,
                alpha=1.0, param_dtype=None):
    """Section 2.2, elementwise part: ``F_hat = F * fisher_scale``.

    Returns ``(theta, a, omega, F)`` as lists of fp32 values. ``a = theta`` is the value of
    theta *as stored*: pass ``param_dtype`` (the storage dtype of param and anchor) so the
    oracle rounds theta before copying it into a; results for theta and a are then already
    representable in that dtype.
    """
    theta_in, a_in = values(param), values(anchor)
    omega_in, F_in = values(importance), values(fisher)
    scale, decay32, alpha32 = f32(fisher_scale), f32(decay), f32(alpha)
    theta_out, omega_out = [], []
    with np.errstate(all="ignore"):
        for theta, a, omega, F in zip(theta_in, a_in, omega_in, F_in):
            theta, a, omega, F = f32(theta), f32(a), f32(omega), f32(F)
            F_hat = _at_most_fp32_max(F * scale)
            if merge == "fisher":
                denom = omega + alpha32 * F_hat
                if denom > 0:
                    theta = (omega * a + alpha32 * F_hat * theta) / denom
            elif merge == "linear":
                theta = a + alpha32 * (theta - a)
            elif merge is not None:
                raise ValueError(f"unknown merge {merge!r}")
            theta_out.append(theta)
            omega_out.append(_at_most_fp32_max(decay32 * omega + F_hat))
    if param_dtype is not None:
        stored = values(store(theta_out, param_dtype))
        theta_out = [f32(v) for v in stored]
    anchor_out = list(theta_out)
    fisher_out = [f32(0.0)] * len(F_in)
    return theta_out, anchor_out, omega_out, fisher_out


# --------------------------------------------------------------------------- section 2.3

def align(param, anchor, offsets, align_ratio, *, mode="anchor"):
    """Section 2.3: returns theta as a list of values (each either theta, a or 0)."""
    theta_in, a_in = values(param), values(anchor)
    out = list(theta_in)
    for lo, hi in _bounds(offsets):
        mags = [abs(a) for a in a_in[lo:hi]]
        m = kth_largest(mags, kth_count(align_ratio, hi - lo))
        for i in range(lo, hi):
            theta, a = theta_in[i], a_in[i]
            if abs(a) >= m and abs(a) > 0 and _sign(theta) != _sign(a):
                if mode == "anchor":
                    out[i] = a
                elif mode == "zero":
                    out[i] = 0.0
                else:
                    raise ValueError(f"unknown mode {mode!r}")
    return out
