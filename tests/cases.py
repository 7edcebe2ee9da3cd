"""The case matrix shared by every test of the flat ops (reference and backends).

A :class:`Case` is a small, hashable description (group sizes, dtypes, flags, the kind
of data); :func:`make_tensors` turns it into tensors, deterministically from
``case.seed``. The generators (:func:`step_cases`, :func:`threshold_cases`,
:func:`consolidate_cases`, :func:`align_cases`) return lists of cases, optionally
limited in size and dtype, for ``pytest.mark.parametrize(..., ids=case_id)``.

Thresholds of step cases are computed by the spec oracle (not by the code under
test), from the case's per-group ``mask_ratio``.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import random
import zlib
from dataclasses import dataclass

import torch

from tests import spec_oracle

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = (FP32, BF16, FP16)
DTYPE_NAMES = {FP32: "fp32", BF16: "bf16", FP16: "fp16", torch.float64: "fp64"}

# Tolerances for comparing a stored result of a backend that may contract or reorder (a
# GPU) with an expected one computed in fp32 and rounded to the same dtype (the reference
# against the oracle, and the CPU backend against the reference, are compared bit for
# bit, and do not use these): fp32 allows a few ulps of reordering/contraction; bf16 and
# fp16 allow one ulp of the storage type (rtol = 2^-7 / 2^-10, the widest relative
# spacing), because an fp32 difference of one ulp can flip a rounding. ``atol`` is scaled
# by the largest magnitude of the result by the tests. ``stats_rtol`` is for the [G, 7]
# sums of non-negative terms (relative, per entry): fp32 sums of a few thousand terms in
# any order stay well inside 1e-4; for bf16/fp16 it also admits out_sq taken from g_out
# after its rounding to the storage dtype.
TOL = {
    FP32: dict(rtol=1e-5, atol=1e-6, stats_rtol=1e-4),
    BF16: dict(rtol=2.0 ** -7, atol=1e-5, stats_rtol=1e-2),
    FP16: dict(rtol=2.0 ** -10, atol=1e-5, stats_rtol=2e-3),
}

# Value edge cases for hypothesis to place into g, theta, a, Omega and F (``Case.special``):
# signed zeros, fp32 subnormals, 1e+-30, the largest finite fp32 / bf16 / fp16, the
# smallest bf16 / fp16 subnormals, inf and NaN. Omega and F are >= 0 by the spec, so they
# get the non-negative ones; Omega gets no NaN (its k-th largest is undefined).
FP32_MAX = torch.finfo(torch.float32).max
_MAGNITUDES = (0.0, 1.4e-45, 1e-40, 1.1754942e-38, 1e-30, 9.183549615799121e-41, 6e-8, 1.0,
               65504.0, 1e30, 3.3895313892515355e38, FP32_MAX, math.inf)
EXTREMES = {
    "grad": _MAGNITUDES + tuple(-v for v in _MAGNITUDES) + (math.nan,),
    "param": _MAGNITUDES + tuple(-v for v in _MAGNITUDES) + (math.nan,),
    "anchor": _MAGNITUDES + tuple(-v for v in _MAGNITUDES),
    "importance": _MAGNITUDES + (-0.0,),
    "fisher": _MAGNITUDES + (-0.0, math.nan),
}


def special_values(max_count: int = 12):
    """A hypothesis strategy for ``Case.special``: up to ``max_count`` (tensor, position,
    value) triples; the position is taken modulo the length of the tensor."""
    from hypothesis import strategies as st
    one = st.sampled_from(sorted(EXTREMES)).flatmap(
        lambda name: st.tuples(st.just(name), st.integers(0, 1 << 16),
                               st.sampled_from(EXTREMES[name])))
    return st.lists(one, max_size=max_count).map(tuple)


def place_special(tensors: dict, special) -> None:
    """Write the (tensor, position, value) triples of ``special`` in place (fp32 tensors
    on the CPU, before they are rounded to their storage dtype); names not in ``tensors``
    (an op without a gradient, say) are left out."""
    for name, pos, value in special:
        t = tensors.get(name)
        if t is not None and t.numel():
            t[pos % t.numel()] = value


# Group layouts, by name: sizes of the groups (0 = empty group).
SHAPES = {
    "n1": (1,),
    "n7": (7,),
    "n129": (129,),
    "n1023": (1023,),
    "g5_odd": (3, 7, 1, 20, 9),
    "empty_start": (0, 5, 11),
    "empty_middle": (6, 0, 9),
    "empty_end": (8, 13, 0),
    "g5_empties": (0, 4, 0, 17, 0),
    "g5_129": (129, 2, 64, 31, 1),
    # more than one block of a GPU kernel: vectorised implementations only
    "n5000": (5000,),
    "g5_big": (2000, 1, 0, 3001, 517),
}
SMALL_SHAPES = tuple(k for k, v in SHAPES.items() if sum(v) <= 300)
ORACLE_SHAPES = tuple(k for k, v in SHAPES.items() if sum(v) <= 1100)   # element loops

# Per-group mask_ratio and keep for the step (cycled over the groups).
MASKS = {
    "unmasked": dict(ratio=(0.0,), keep=(0.0,)),
    "keep0": dict(ratio=(0.25, 0.5, 0.1, 0.75, 0.3), keep=(0.0,)),
    "keep0.5": dict(ratio=(0.5, 0.25, 0.9, 0.1, 0.6), keep=(0.5,)),
    "mixed": dict(ratio=(0.0, 0.5, 0.9, 0.2, 0.0), keep=(0.5, 0.0, 1.0, 0.25, 0.0)),
}
# How importance (Omega) is drawn.
OMEGA_KINDS = ("random", "ties", "zeros", "tiny")
FLAGS = tuple(itertools.product(("ema", "sum"), ("fisher", "abs"), (True, False)))
BETAS = (0.9, 0.99, 0.5, 0.0, 1.0)


@dataclass(frozen=True)
class Case:
    op: str                       # "step" | "thresholds" | "consolidate" | "align"
    shape: str                    # key of SHAPES
    dtype: torch.dtype = FP32     # grad / param / anchor storage
    state_dtype: torch.dtype = FP32   # importance / fisher storage
    seed: int = 0
    # fused step
    beta: float = 0.9
    accumulate: str = "ema"
    importance_kind: str = "fisher"
    directional: bool = True
    mask: str = "unmasked"        # key of MASKS (also the mask_ratio of threshold cases)
    normalize: bool = True
    nonfinite: bool = False
    omega: str = "random"         # one of OMEGA_KINDS
    ratio_dtype: torch.dtype = FP32   # of mask_ratio
    # consolidation
    merge: str | None = None
    alpha: float = 1.0
    decay: float = 1.0
    fisher_scale: float = 1.0
    # alignment
    align_ratio: float = 0.5
    align_mode: str = "anchor"
    anchor_kind: str = "random"   # "random" | "ties" | "zeros"
    # free-form overrides (hypothesis): group sizes, per-group mask_ratio and keep
    custom_sizes: tuple[int, ...] | None = None
    custom_ratio: tuple[float, ...] | None = None
    custom_keep: tuple[float, ...] | None = None
    # value edge cases placed into the tensors: ((name, position, value), ...)
    special: tuple[tuple[str, int, float], ...] = ()

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.custom_sizes if self.custom_sizes is not None else SHAPES[self.shape]

    @property
    def n(self) -> int:
        return sum(self.sizes)

    @property
    def groups(self) -> int:
        return len(self.sizes)

    @property
    def offsets(self) -> list[int]:
        return [0] + list(itertools.accumulate(self.sizes))

    def replace(self, **kw) -> "Case":
        return dataclasses.replace(self, **kw)

    @property
    def id(self) -> str:
        shape = self.shape if self.custom_sizes is None else "x".join(map(str, self.sizes))
        parts = [self.op, shape, DTYPE_NAMES[self.dtype]]
        if self.state_dtype != FP32:
            parts.append("state" + DTYPE_NAMES[self.state_dtype])
        if self.op == "step":
            parts += [self.accumulate, self.importance_kind,
                      "dir" if self.directional else "nodir", self.mask,
                      "norm" if self.normalize else "nonorm", "omega-" + self.omega,
                      f"b{self.beta}"]
            if self.nonfinite:
                parts.append("nonfinite")
        elif self.op == "thresholds":
            parts += [self.mask, "norm" if self.normalize else "nonorm",
                      "omega-" + self.omega, "ratio" + DTYPE_NAMES[self.ratio_dtype]]
        elif self.op == "consolidate":
            parts += [f"merge-{self.merge}", f"a{self.alpha}", f"decay{self.decay}",
                      f"fs{self.fisher_scale:.4g}"]
        elif self.op == "align":
            parts += [self.align_mode, f"r{self.align_ratio}", "anchor-" + self.anchor_kind]
        if self.special:
            parts.append(f"special{len(self.special)}")
        parts.append(f"s{self.seed}")
        return "-".join(parts)


def case_id(case: Case) -> str:
    return case.id


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def _cycle(seq, count):
    return [seq[i % len(seq)] for i in range(count)]


# --------------------------------------------------------------------------- tensors

def _omega(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "zeros":
        return torch.zeros(n)
    if kind == "ties":   # few distinct values, many zeros: ties at every threshold
        palette = torch.tensor([0.0, 0.25, 1.0, 1.0, 3.0, 3.0])
        return palette[torch.randint(0, len(palette), (n,), generator=gen)]
    omega = torch.rand(n, generator=gen) * 2.0
    omega[torch.rand(n, generator=gen) < 0.15] = 0.0        # exact zeros
    if kind == "tiny":                                       # c_g ~ 1e20
        omega = omega * 1e-20
    return omega


def make_tensors(case: Case, device="cpu") -> dict:
    """All tensors of a case, built on the CPU from ``case.seed`` and moved to ``device``.

    Keys: ``grad param anchor importance fisher offsets`` (length-N vectors and int64
    offsets) and, for step/threshold cases, ``mask_ratio inv_scale thresh keep lam``
    (fp32 [G]; ``inv_scale``/``thresh`` come from the spec oracle).
    """
    gen = torch.Generator().manual_seed(case.seed)
    n, G = case.n, case.groups
    sizes = case.sizes

    grad = torch.randn(n, generator=gen)
    grad[torch.rand(n, generator=gen) < 0.05] = 0.0
    param = torch.randn(n, generator=gen)
    anchor = param + 0.1 * torch.randn(n, generator=gen)
    same = torch.rand(n, generator=gen) < 0.1                # d = 0 exactly
    anchor[same] = param[same]
    fisher = torch.rand(n, generator=gen)
    fisher[torch.rand(n, generator=gen) < 0.15] = 0.0
    omega = _omega(case.omega, n, gen)

    if case.nonfinite and n:
        specials = torch.tensor([float("nan"), float("inf"), float("-inf")])
        pos = torch.randperm(n, generator=gen)[: max(1, min(n, 3 + n // 20))]
        grad[pos] = specials[torch.arange(len(pos)) % 3]

    if case.op == "consolidate":
        both = torch.rand(n, generator=gen) < 0.15            # Omega + alpha*F_hat == 0
        omega[both] = 0.0
        fisher[both] = 0.0
        if n:
            omega[0], fisher[0] = 0.0, 0.0

    if case.op == "align":
        if case.anchor_kind == "ties":
            palette = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 2.0, -2.0])
            anchor = palette[torch.randint(0, len(palette), (n,), generator=gen)]
        elif case.anchor_kind == "zeros":
            anchor = torch.zeros(n)
        else:
            anchor = torch.randn(n, generator=gen)
            anchor[torch.rand(n, generator=gen) < 0.1] = 0.0
        param = torch.randn(n, generator=gen)
        param[torch.rand(n, generator=gen) < 0.1] = 0.0       # sign(theta) = 0
        flip = torch.rand(n, generator=gen) < 0.1             # exact sign flips
        param[flip] = -anchor[flip]

    place_special(dict(grad=grad, param=param, anchor=anchor, importance=omega, fisher=fisher),
                  case.special)

    spec = MASKS[case.mask]
    ratio = torch.tensor(_cycle(case.custom_ratio or spec["ratio"], G), dtype=case.ratio_dtype)
    keep = torch.tensor(_cycle(case.custom_keep or spec["keep"], G), dtype=torch.float32)
    lam = torch.rand(G, generator=gen) * 3.0
    if G > 1:
        lam[G // 2] = 0.0

    dtype, state_dtype = case.dtype, case.state_dtype
    tensors = dict(
        grad=grad.to(dtype), param=param.to(dtype), anchor=anchor.to(dtype),
        importance=omega.to(state_dtype), fisher=fisher.to(state_dtype),
        offsets=torch.tensor(case.offsets, dtype=torch.int64),
        mask_ratio=ratio, keep=keep, lam=lam,
    )
    c, t = spec_oracle.group_thresholds(tensors["importance"], tensors["offsets"], ratio,
                                        normalize=case.normalize)
    tensors["inv_scale"] = torch.tensor([float(v) for v in c], dtype=torch.float32)
    tensors["thresh"] = torch.tensor([float(v) for v in t], dtype=torch.float32)
    assert len(sizes) == G
    return {k: v.to(device) for k, v in tensors.items()}


def step_args(case: Case, t: dict) -> tuple[tuple, dict]:
    """Positional and keyword arguments of ``fused_step`` for a case's tensors."""
    args = (t["grad"], t["param"], t["anchor"], t["importance"], t["fisher"], t["offsets"],
            t["inv_scale"], t["thresh"], t["keep"], t["lam"])
    kwargs = dict(beta=case.beta, accumulate=case.accumulate,
                  importance_kind=case.importance_kind, directional=case.directional)
    return args, kwargs


def clone(tensors: dict) -> dict:
    return {k: v.clone() for k, v in tensors.items()}


# --------------------------------------------------------------------------- generators

def _limit(cases, max_n, dtypes):
    out = []
    for c in cases:
        if max_n is not None and c.n > max_n:
            continue
        if dtypes is not None and c.dtype not in dtypes:
            continue
        out.append(c)
    return out


def step_cases(max_n: int | None = None, dtypes=None) -> list[Case]:
    """Every combination of the semantic knobs of 2.1 (flags x mask x omega x non-finite),
    each on a shape, dtype, beta and normalize drawn deterministically, plus one case per
    (shape, dtype) pair, plus bf16 state storage on a few cases."""
    rng = random.Random(2024)
    shapes = list(SHAPES)
    cases = []
    for (acc, kind, directional), mask, omega, nonfinite in itertools.product(
            FLAGS, MASKS, OMEGA_KINDS, (False, True)):
        shape = rng.choice(ORACLE_SHAPES)
        cases.append(Case("step", shape, dtype=rng.choice(DTYPES), accumulate=acc,
                          importance_kind=kind, directional=directional, mask=mask,
                          omega=omega, nonfinite=nonfinite, normalize=rng.random() < 0.7,
                          beta=rng.choice(BETAS)))
    for shape, dtype in itertools.product(shapes, DTYPES):
        acc, kind, directional = rng.choice(FLAGS)
        cases.append(Case("step", shape, dtype=dtype, accumulate=acc, importance_kind=kind,
                          directional=directional, mask=rng.choice(list(MASKS)),
                          omega=rng.choice(OMEGA_KINDS), nonfinite=rng.random() < 0.5,
                          normalize=rng.random() < 0.7, beta=rng.choice(BETAS)))
    for shape in ("g5_odd", "empty_middle", "n129"):
        cases.append(Case("step", shape, dtype=BF16, state_dtype=BF16, mask="keep0.5",
                          nonfinite=True))
    cases = [c.replace(seed=_seed(c.id, i)) for i, c in enumerate(cases)]
    return _limit(cases, max_n, dtypes)


def threshold_cases(max_n: int | None = None, dtypes=None) -> list[Case]:
    """Importance kinds x mask ratios x normalize x ratio dtype, on every shape."""
    cases = []
    for i, (shape, omega, mask, normalize, rdt) in enumerate(itertools.product(
            SHAPES, OMEGA_KINDS, ("unmasked", "keep0", "keep0.5", "mixed"), (True, False),
            (FP32, torch.float64))):
        if (i % 3) and SHAPES[shape] != (1,):      # keep the matrix small: a third of it
            continue
        cases.append(Case("thresholds", shape, omega=omega, mask=mask, normalize=normalize,
                          ratio_dtype=rdt))
    cases += [Case("thresholds", s, state_dtype=BF16, omega="ties", mask="keep0.5")
              for s in ("g5_odd", "n129")]
    cases = [c.replace(seed=_seed(c.id, i)) for i, c in enumerate(cases)]
    return _limit(cases, max_n, dtypes)      # (dtype is fp32 here: importance only)


def consolidate_cases(max_n: int | None = None, dtypes=None) -> list[Case]:
    """merge None/fisher/linear x alpha x decay x fisher_scale, over shapes and dtypes."""
    rng = random.Random(7)
    shapes = list(SHAPES)
    cases = []
    for merge, alpha, decay, fisher_scale in itertools.product(
            (None, "fisher", "linear"), (1.0, 0.5, 0.0, 2.0), (1.0, 0.5),
            (1.0, 1.0 / (1.0 - 0.9 ** 7), 0.25)):
        cases.append(Case("consolidate", rng.choice(ORACLE_SHAPES), dtype=rng.choice(DTYPES),
                          merge=merge, alpha=alpha, decay=decay, fisher_scale=fisher_scale))
    for shape, dtype in itertools.product(shapes, DTYPES):
        cases.append(Case("consolidate", shape, dtype=dtype,
                          merge=rng.choice((None, "fisher", "linear")),
                          alpha=rng.choice((1.0, 0.5)), decay=rng.choice((1.0, 0.9)),
                          fisher_scale=rng.choice((1.0, 0.1))))
    cases.append(Case("consolidate", "g5_odd", dtype=BF16, state_dtype=BF16, merge="fisher",
                      alpha=0.5, fisher_scale=3.0))
    cases = [c.replace(seed=_seed(c.id, i)) for i, c in enumerate(cases)]
    return _limit(cases, max_n, dtypes)


def align_cases(max_n: int | None = None, dtypes=None) -> list[Case]:
    """mode x align_ratio (0 -> k = 0, 1 -> k = n) x anchor kind, over shapes and dtypes."""
    rng = random.Random(11)
    shapes = list(SHAPES)
    cases = []
    for mode, ratio, kind in itertools.product(("anchor", "zero"), (0.0, 0.3, 0.5, 0.999, 1.0),
                                               ("random", "ties", "zeros")):
        cases.append(Case("align", rng.choice(ORACLE_SHAPES), dtype=rng.choice(DTYPES), align_mode=mode,
                          align_ratio=ratio, anchor_kind=kind))
    for shape, dtype in itertools.product(shapes, DTYPES):
        cases.append(Case("align", shape, dtype=dtype, align_mode=rng.choice(("anchor", "zero")),
                          align_ratio=rng.choice((0.5, 0.3, 0.7)),
                          anchor_kind=rng.choice(("random", "ties"))))
    cases = [c.replace(seed=_seed(c.id, i)) for i, c in enumerate(cases)]
    return _limit(cases, max_n, dtypes)
