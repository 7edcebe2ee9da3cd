"""The reference (``aim_kernels.ops.reference`` and ``aim_kernels.ops.*`` with
``backend="torch"``) against the spec oracle (``spec_oracle.py``) of DESIGN.md section 2.

Three layers:
* the case matrix of ``cases.py`` (small sizes), compared with the element-by-element oracle;
* hand-computed examples, one per branch of section 2 (they check the oracle too);
* hypothesis fuzzing of ``kth_largest`` (against ``sorted()``) and of ``fused_step``.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


from tests import cases as C  # noqa: E402
from tests import spec_oracle as oracle  # noqa: E402

import aim_kernels.ops as ops  # noqa: E402
from aim_kernels.ops import reference  # noqa: E402

ENTRIES = ("reference", "ops")
ORACLE_MAX_N = 1100
INF, NAN = math.inf, math.nan
F32 = torch.float32


def call(entry: str, name: str, *args, **kwargs):
    """The op ``name`` through the reference module itself or the validated public op."""
    if entry == "reference":
        return getattr(reference, name)(*args, **kwargs)
    return getattr(ops, name)(*args, backend="torch", **kwargs)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern, to compare NaN payloads / signed zeros / infinities exactly."""
    view = {torch.float32: torch.int32, torch.float64: torch.int64,
            torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype]
    return t.contiguous().view(view)


def assert_stored(actual: torch.Tensor, expected_fp32, what: str):
    """``actual`` (storage dtype) against fp32 oracle values rounded once to that dtype,
    bit for bit: the reference and the oracle do the same fp32 operations in the same
    order, so a double rounding, a lost term or a flipped zero sign shows. Only NaN
    payloads are not compared (any NaN matches any NaN, see same_nonfinite)."""
    expected = oracle.store(expected_fp32, actual.dtype)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    same = (bits(actual) == bits(expected)) | (actual.isnan() & expected.isnan())
    assert bool(same.all()), (
        f"{what}: {int((~same).sum())} of {same.numel()} elements differ in their bits, e.g. "
        f"{actual[~same][:4].tolist()} != {expected[~same][:4].tolist()}")


def same_nonfinite(actual: torch.Tensor, expected: torch.Tensor):
    """Same values, NaN where NaN: the NaN *payload* may change through an fp32 round trip
    (torch turns a bf16 0x7FC0 NaN into 0xFFFF), which no consumer of a gradient can see."""
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def assert_stats(stats: torch.Tensor, expected_rows, dtype, what=""):
    assert stats.dtype == torch.float32
    assert tuple(stats.shape) == (len(expected_rows), 7)
    expected = torch.tensor(expected_rows, dtype=torch.float64).reshape(len(expected_rows), 7)
    got = stats.double()
    for col, name in enumerate(oracle.STAT_COLUMNS):
        e, a = expected[:, col], got[:, col]
        if name in ("masked", "nonfinite"):
            assert torch.equal(a, e), f"{what} stat {name}: {a.tolist()} != {e.tolist()}"
            continue
        # out_sq may be taken from g_out before or after its rounding to storage
        rtol = C.TOL[dtype]["stats_rtol"] if name == "out_sq" else 1e-5
        tol = rtol * e.abs() + 1e-30
        same = (a == e) | (a.isnan() & e.isnan())          # +-inf and NaN sums (edge values)
        assert bool((same | ((a - e).abs() <= tol)).all()), \
            f"{what} stat {name}: got {a.tolist()} expected {e.tolist()}"


def assert_unchanged(before: dict, after: dict, names):
    for name in names:
        assert torch.equal(bits(before[name]) if before[name].is_floating_point() else before[name],
                           bits(after[name]) if after[name].is_floating_point() else after[name]), \
            f"{name} was modified"


# --------------------------------------------------------------------------- matrix: step

STEP_CASES = C.step_cases(max_n=ORACLE_MAX_N)


def check_step(case: C.Case, entry: str):
    t = C.make_tensors(case)
    before = C.clone(t)
    args, kwargs = C.step_args(case, t)
    stats = call(entry, "fused_step", *args, **kwargs)
    g_out, F_out, rows = oracle.fused_step(*C.step_args(case, before)[0], **kwargs)

    assert_stored(t["grad"], g_out, "grad")
    assert_stored(t["fisher"], F_out, "fisher")
    assert_stats(stats, rows, case.dtype)
    # a non-finite g passes through (same value: NaN stays NaN, +-inf stays) and F is
    # untouched there. NaN payload bits are not compared (see same_nonfinite).
    bad = ~torch.isfinite(before["grad"].float())
    same_nonfinite(t["grad"][bad], before["grad"][bad])
    assert torch.equal(bits(t["fisher"])[bad], bits(before["fisher"])[bad])
    assert_unchanged(before, t, ("param", "anchor", "importance", "offsets", "inv_scale",
                                 "thresh", "keep", "lam"))
    return stats


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", STEP_CASES, ids=C.case_id)
def test_fused_step_matrix(case, entry):
    check_step(case, entry)


@pytest.mark.parametrize("case", C.step_cases()[::37] + C.align_cases()[::11]
                         + C.consolidate_cases()[::17], ids=C.case_id)
def test_make_tensors_is_deterministic(case):
    a, b = C.make_tensors(case), C.make_tensors(case)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(bits(a[k]) if a[k].is_floating_point() else a[k],
                           bits(b[k]) if b[k].is_floating_point() else b[k]), k
    assert a["grad"].numel() == case.n and a["offsets"].tolist() == case.offsets
    if case.nonfinite and case.n >= 3:      # nan, +inf and -inf all present
        g = a["grad"].float()
        assert torch.isnan(g).any() and (g == math.inf).any() and (g == -math.inf).any()


def test_step_matrix_covers_section_2_1():
    """Every knob of 2.1 is exercised against the oracle, with every storage dtype."""
    seen = {(c.accumulate, c.importance_kind, c.directional, c.mask, c.omega, c.nonfinite)
            for c in STEP_CASES}
    assert len(seen) == len(C.FLAGS) * len(C.MASKS) * len(C.OMEGA_KINDS) * 2
    assert {c.dtype for c in STEP_CASES} == set(C.DTYPES)
    assert {c.normalize for c in STEP_CASES} == {True, False}
    assert {c.beta for c in STEP_CASES} == set(C.BETAS)
    shapes = {c.shape for c in STEP_CASES}
    assert {"n1", "n7", "n129", "n1023", "empty_start", "empty_middle", "empty_end"} <= shapes
    assert all(c.shape in C.SHAPES for c in C.step_cases())
    assert {"n5000", "g5_big"} <= {c.shape for c in C.step_cases()}


# --------------------------------------------------------------------------- matrix: others

@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", C.threshold_cases(), ids=C.case_id)
def test_group_thresholds_matrix(case, entry):
    t = C.make_tensors(case)
    before = C.clone(t)
    c_ref, t_ref = call(entry, "group_thresholds", t["importance"], t["offsets"],
                        t["mask_ratio"], normalize=case.normalize)
    c_exp, t_exp = oracle.group_thresholds(before["importance"], before["offsets"],
                                           before["mask_ratio"], normalize=case.normalize)
    assert c_ref.dtype == F32 and t_ref.dtype == F32
    assert c_ref.shape == t_ref.shape == (case.groups,)
    t_exp = torch.tensor([float(v) for v in t_exp], dtype=F32)
    assert torch.equal(t_ref, t_exp), f"thresh {t_ref.tolist()} != {t_exp.tolist()}"
    torch.testing.assert_close(c_ref, torch.tensor([float(v) for v in c_exp], dtype=F32),
                               rtol=2e-7, atol=0)
    assert_unchanged(before, t, ("importance", "offsets", "mask_ratio"))


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", C.consolidate_cases(max_n=ORACLE_MAX_N), ids=C.case_id)
def test_consolidate_matrix(case, entry):
    t = C.make_tensors(case)
    before = C.clone(t)
    out = call(entry, "consolidate_", t["param"], t["anchor"], t["importance"], t["fisher"],
               fisher_scale=case.fisher_scale, decay=case.decay, merge=case.merge,
               alpha=case.alpha)
    assert out is None
    theta, a, omega, F = oracle.consolidate(
        before["param"], before["anchor"], before["importance"], before["fisher"],
        fisher_scale=case.fisher_scale, decay=case.decay, merge=case.merge, alpha=case.alpha,
        param_dtype=case.dtype)
    assert_stored(t["param"], theta, "param")
    assert_stored(t["importance"], omega, "importance")
    assert torch.equal(bits(t["anchor"]), bits(t["param"])), "a = theta (as stored)"
    assert not t["fisher"].any(), "F = 0"
    if case.merge is None:
        assert torch.equal(bits(t["param"]), bits(before["param"]))


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", C.align_cases(max_n=ORACLE_MAX_N), ids=C.case_id)
def test_align_matrix(case, entry):
    t = C.make_tensors(case)
    before = C.clone(t)
    out = call(entry, "align_", t["param"], t["anchor"], t["offsets"], case.align_ratio,
               mode=case.align_mode)
    assert out is None
    expected = oracle.store(oracle.align(before["param"], before["anchor"], before["offsets"],
                                         case.align_ratio, mode=case.align_mode), case.dtype)
    assert torch.equal(t["param"], expected), "align is exact"
    assert_unchanged(before, t, ("anchor", "offsets"))


# --------------------------------------------------------------------------- hand examples
# Each builds its own tiny input and states the expected value computed by hand.

def vec(values, dtype=F32):
    return torch.tensor(values, dtype=dtype)


def step(entry, g, theta, a, omega, F, offsets, c, t, keep, lam, *, beta=0.5,
         accumulate="ema", importance_kind="fisher", directional=True, dtype=F32):
    grad, fisher = vec(g, dtype), vec(F)
    stats = call(entry, "fused_step", grad, vec(theta, dtype), vec(a, dtype), vec(omega), fisher,
                 torch.tensor(offsets), vec(c), vec(t), vec(keep), vec(lam), beta=beta,
                 accumulate=accumulate, importance_kind=importance_kind,
                 directional=directional)
    return grad, fisher, stats


# One element: g=+-2, theta=1.5, a=1 (d=0.5), Omega=0.5, c=2 (s=1), lam=3 (r=1.5), keep=0.5,
# t=0.5 (masked), F=1, beta=0.5.
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("accumulate,kind,g,F_new", [
    ("ema", "fisher", 2.0, 0.5 * 1 + 0.5 * 4),
    ("ema", "abs", 2.0, 0.5 * 1 + 0.5 * 2),
    ("sum", "fisher", 2.0, 1 + 4.0),
    ("sum", "abs", -2.0, 1 + 2.0),
    ("ema", "abs", -2.0, 1.5),
])
@pytest.mark.parametrize("directional", [True, False])
def test_step_one_element_by_hand(entry, accumulate, kind, g, F_new, directional):
    grad, fisher, stats = step(entry, [g], [1.5], [1.0], [0.5], [1.0], [0, 1], [2.0], [0.5],
                               [0.5], [3.0], accumulate=accumulate, importance_kind=kind,
                               directional=directional)
    r = 1.5 if (not directional or g * 0.5 < 0) else 0.0
    g_out = 0.5 * g + r
    assert fisher.tolist() == [F_new]
    assert grad.tolist() == [g_out]
    assert stats.tolist() == [[g * g, g_out ** 2, r * r, 0.25, 0.5 * 3 * 1 * 0.25, 1.0, 0.0]]


@pytest.mark.parametrize("entry", ENTRIES)
def test_step_beta_edges(entry):
    """beta = 1 leaves F as it is (ema); beta = 0 replaces it by u."""
    _, F1, _ = step(entry, [3.0], [0.0], [0.0], [0.0], [0.25], [0, 1], [1.0], [INF], [0.0],
                    [0.0], beta=1.0)
    _, F0, _ = step(entry, [3.0], [0.0], [0.0], [0.0], [0.25], [0, 1], [1.0], [INF], [0.0],
                    [0.0], beta=0.0)
    assert F1.tolist() == [0.25] and F0.tolist() == [9.0]


@pytest.mark.parametrize("entry", ENTRIES)
def test_directional_zero_product_means_no_regularisation(entry):
    """``not (g*d < 0)`` is true for g*d == 0: r = 0 when g == 0 or d == 0 (directional),
    r = lam*s*d when not directional."""
    g = [0.0, 0.0, 1.0, -1.0, 1.0]
    theta = [2.0, 0.0, 1.0, 3.0, -1.0]      # d = 1, -1, 0, 2, -2
    a = [1.0, 1.0, 1.0, 1.0, 1.0]
    args = (g, theta, a, [1.0] * 5, [0.0] * 5, [0, 5], [1.0], [INF], [0.0], [2.0])
    grad, _, stats = step(entry, *args, directional=True)
    assert grad.tolist() == [0.0, 0.0, 1.0, -1.0 + 4.0, 1.0 - 4.0]
    grad, _, _ = step(entry, *args, directional=False)
    assert grad.tolist() == [2.0, -2.0, 1.0, -1.0 + 4.0, 1.0 - 4.0]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_masking_rule(entry, keep):
    """masked = Omega >= t and Omega > 0: below t, or Omega = 0 with t = 0, is not masked."""
    omega = [0.0, 1.0, 2.0, 3.0, 0.0, 5.0]
    g = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    offsets = [0, 4, 6]
    t = [2.0, 0.0]                          # group 1: t = 0, its Omega = 0 is not masked
    grad, _, stats = step(entry, g, [0.0] * 6, [0.0] * 6, omega, [0.0] * 6, offsets, [1.0, 1.0],
                          t, [keep, keep], [1.0, 1.0])
    assert grad.tolist() == [1.0, 1.0, keep, keep, 1.0, keep]
    assert stats[:, 5].tolist() == [2.0, 1.0]


@pytest.mark.parametrize("entry", ENTRIES)
def test_keep_zero_freezes_masked_but_regulariser_still_applies(entry):
    grad, _, _ = step(entry, [-1.0], [2.0], [1.0], [1.0], [0.0], [0, 1], [1.0], [1.0], [0.0],
                      [0.5])
    assert grad.tolist() == [0.0 * -1.0 + 0.5 * 1.0 * 1.0]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("dtype", C.DTYPES, ids=lambda d: C.DTYPE_NAMES[d])
@pytest.mark.parametrize("directional", [True, False])
def test_nonfinite_gradients(entry, dtype, directional):
    """F untouched, g passes through, counted, excluded from grad_sq/out_sq/reg_sq but not
    from drift_sq/penalty/masked."""
    g = [NAN, INF, -INF, 1.0, -2.0]
    theta = [1.0, 0.0, 2.0, 1.0, 3.0]       # d = 1, -1, 1, 0, 2
    a = [0.0, 1.0, 1.0, 1.0, 1.0]
    F = [0.5, 0.25, 0.125, 1.0, 2.0]
    grad, fisher, stats = step(entry, g, theta, a, [1.0] * 5, F, [0, 5], [1.0], [1.0], [0.5],
                               [2.0], beta=0.5, directional=directional, dtype=dtype)
    out = grad.float().tolist()
    assert math.isnan(out[0]) and out[1] == INF and out[2] == -INF
    same_nonfinite(grad[:3], vec(g, dtype)[:3])
    r4 = 2.0 * 2.0                          # g*d = -4 < 0: kept when directional
    assert out[3:] == [0.5 * 1.0, 0.5 * -2.0 + r4]
    assert fisher.tolist() == [0.5, 0.25, 0.125, 0.5 * 1 + 0.5 * 1, 0.5 * 2 + 0.5 * 4]
    row = stats[0].tolist()
    assert row[0] == 1.0 + 4.0                           # grad_sq
    assert row[1] == 0.25 + (-1.0 + r4) ** 2              # out_sq
    assert row[2] == r4 ** 2                              # reg_sq (finite g only)
    assert row[3] == 1 + 1 + 1 + 0 + 4                    # drift_sq (all)
    assert row[4] == pytest.approx(0.5 * 2.0 * 7.0)       # penalty (all)
    assert row[5] == 5.0 and row[6] == 3.0


@pytest.mark.parametrize("entry", ENTRIES)
def test_empty_groups_have_zero_stats(entry):
    g = [1.0, -1.0, 2.0]
    grad, _, stats = step(entry, g, [1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1.0] * 3, [0.0] * 3,
                          [0, 0, 2, 2, 3, 3], [1.0] * 5, [1.0] * 5, [0.5] * 5, [1.0] * 5,
                          directional=False)
    assert stats.shape == (5, 7)
    for empty in (0, 2, 4):
        assert stats[empty].tolist() == [0.0] * 7
    assert grad.tolist() == [0.5 + 1.0, -0.5 + 2.0, 1.0 + 3.0]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("ratio,expected", [(0.0, INF), (0.25, 3.0), (0.5, 3.0), (0.75, 3.0),
                                            (0.99, 3.0)])
def test_threshold_ties(entry, ratio, expected):
    """[3,3,3,1]: the k-th largest counts ties, k = floor(rho*4)."""
    c, t = call(entry, "group_thresholds", vec([3.0, 1.0, 3.0, 3.0]), torch.tensor([0, 4]),
                torch.tensor([ratio], dtype=torch.float64))
    assert t.tolist() == [expected]
    assert c.tolist() == [pytest.approx(4 / 10)]


@pytest.mark.parametrize("entry", ENTRIES)
def test_k_is_float64_floor_of_the_given_ratio(entry):
    """floor(0.7 * 10) = 7 with an fp64 ratio; the fp32 value 0.69999999 gives 6."""
    omega = vec([float(v) for v in range(1, 11)])
    off = torch.tensor([0, 10])
    _, t64 = call(entry, "group_thresholds", omega, off, torch.tensor([0.7], dtype=torch.float64))
    _, t32 = call(entry, "group_thresholds", omega, off, torch.tensor([0.7], dtype=F32))
    assert t64.tolist() == [4.0] and t32.tolist() == [5.0]


@pytest.mark.parametrize("entry", ENTRIES)
def test_inv_scale_rules(entry):
    omega = vec([1.0, 3.0, 0.0, 0.0, 2.0])
    off = torch.tensor([0, 2, 4, 4, 5])       # sum 4 | zero sum | empty | one element
    ratio = torch.tensor([0.5, 0.5, 0.5, 0.5])
    c, t = call(entry, "group_thresholds", omega, off, ratio, normalize=True)
    assert c.tolist() == [2 / 4, 0.0, 0.0, 1 / 2]
    assert t.tolist() == [3.0, 0.0, INF, INF]    # k = 1, 1, 0, floor(0.5) = 0
    c, _ = call(entry, "group_thresholds", omega, off, ratio, normalize=False)
    assert c.tolist() == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("entry", ENTRIES)
def test_zero_sum_group_is_not_regularised(entry):
    """normalize with a zero-sum group -> c = 0 -> s = 0 -> r = 0 and penalty 0."""
    c, t = call(entry, "group_thresholds", vec([0.0, 0.0]), torch.tensor([0, 2]), vec([0.5]))
    grad, _, stats = step(entry, [1.0, -1.0], [2.0, 2.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0],
                          [0, 2], c.tolist(), t.tolist(), [0.0], [5.0], directional=False)
    assert grad.tolist() == [1.0, -1.0]
    assert stats[0, 2].item() == 0.0 and stats[0, 4].item() == 0.0 and stats[0, 5].item() == 0


# DESIGN.md 2.1, "everything stored stays finite": the two failures of the review.
FP32_MAX = torch.finfo(F32).max
TINY = 1.401298464324817e-45          # the smallest fp32 subnormal


@pytest.mark.parametrize("entry", ENTRIES + ("oracle",))
def test_inv_scale_is_zero_where_n_over_the_sum_overflows_fp32(entry):
    """Omega summing to ~1e-44 gave c_g = n / sum = inf, and every finite gradient of the
    group came out NaN/inf with ``nonfinite`` = 0. Now c_g = 0 there; a sum just large
    enough for a finite n / sum keeps its c_g."""
    omega = vec([TINY] * 7 + [1e-37] * 2)
    off, ratio = torch.tensor([0, 7, 9]), vec([0.0, 0.0])
    if entry == "oracle":
        c, t = oracle.group_thresholds(omega, off, ratio)
        c = vec([float(v) for v in c])
    else:
        c, t = call(entry, "group_thresholds", omega, off, ratio)
    assert bits(c).tolist() == bits(vec([0.0, 1e37])).tolist(), c
    if entry == "oracle":
        return
    grad, _, stats = step(entry, [1.0] * 9, [2.0] * 9, [0.0] * 9, omega.tolist(), [0.0] * 9,
                          [0, 7, 9], c.tolist(), [INF, INF], [0.0, 0.0], [3.0, 3.0],
                          directional=False)
    assert torch.isfinite(grad).all() and torch.isfinite(stats).all(), (grad, stats)
    assert grad[:7].tolist() == [1.0] * 7                       # c = 0: no regulariser


def _f32(x) -> float:
    return float(torch.tensor(x, dtype=F32))


@pytest.mark.parametrize("entry", ENTRIES + ("oracle",))
@pytest.mark.parametrize("accumulate,kind", [("ema", "fisher"), ("sum", "fisher"),
                                             ("sum", "abs")])
def test_a_huge_gradient_leaves_a_finite_state(entry, accumulate, kind):
    """|g| = 1e20 made u = g*g and F infinite, consolidation made Omega infinite, the next
    task's c_g = n / inf = 0 and s = 0 * inf = NaN poisoned every gradient of the group.
    Now u, F, F_hat and Omega stop at the largest finite fp32."""
    big = 3e38 if kind == "abs" else 1e20     # abs: u = |g| is finite, F + u overflows
    g = [big, -big, 1.0]
    F0 = [FP32_MAX, FP32_MAX, 0.0] if accumulate == "sum" else [0.0, 0.0, 0.0]
    kw = dict(beta=0.9, accumulate=accumulate, importance_kind=kind, directional=False)
    args = ([0.5] * 3, [0.0] * 3, [0.0] * 3)
    if entry == "oracle":
        _, F, _ = oracle.fused_step(vec(g), *map(vec, args), vec(F0), torch.tensor([0, 3]),
                                    vec([1.0]), vec([INF]), vec([1.0]), vec([1.0]), **kw)
        F = vec([float(v) for v in F])
    else:
        _, F, _ = step(entry, g, *args, F0, [0, 3], [1.0], [INF], [1.0], [1.0], **kw)
    if accumulate == "ema":
        # u = g*g is clamped to the largest fp32 *before* the average: F = (1 - beta) * max
        # (with F clamped only, it would be max, from (1 - beta) * inf)
        want = [_f32(_f32(1.0 - 0.9) * FP32_MAX)] * 2 + [_f32(1.0 - 0.9)]
    else:
        want = [FP32_MAX, FP32_MAX, 1.0]
    assert bits(F).tolist() == bits(vec(want)).tolist(), F

    # consolidate (F * 10 and Omega + F_hat overflow: clamped), then the next task's step
    theta, a = vec([0.5] * 3), vec([0.0] * 3)
    omega, fisher = vec([FP32_MAX, 0.0, 0.0]), F.clone()
    if entry == "oracle":
        _, _, omega_out, _ = oracle.consolidate(theta, a, omega, fisher, fisher_scale=10.0,
                                                decay=1.0)
        omega = vec([float(v) for v in omega_out])
    else:
        call(entry, "consolidate_", theta, a, omega, fisher, fisher_scale=10.0, decay=1.0)
    assert torch.isfinite(omega).all() and omega[0] == FP32_MAX, omega
    if entry == "oracle":
        return
    c, t = call(entry, "group_thresholds", omega, torch.tensor([0, 3]), vec([0.5]))
    assert torch.isfinite(c).all() and c[0] > 0, c
    grad, _, stats = step(entry, [1.0, -1.0, 1.0], [1.0] * 3, [0.0] * 3, omega.tolist(),
                          [0.0] * 3, [0, 3], c.tolist(), t.tolist(), [0.5], [1.0],
                          directional=False)
    assert torch.isfinite(grad).all() and torch.isfinite(stats).all(), (grad, stats)
    assert stats[0, 6] == 0


# consolidation: Omega, a, F, theta by hand
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("merge,alpha,expected", [
    (None, 1.0, [2.0, 5.0, 4.0, 1.0]),
    ("linear", 0.5, [0 + 0.5 * 2, 1 + 0.5 * 4, -1 + 0.5 * 5, 2 + 0.5 * -1]),
    ("linear", 0.0, [0.0, 1.0, -1.0, 2.0]),             # theta = a
    # (Omega*a + alpha*F_hat*theta) / (Omega + alpha*F_hat); element 2: Omega + alpha*F_hat
    # = 0 -> theta; element 3: F_hat = 0 -> a
    ("fisher", 1.0, [(1 * 0 + 1 * 1 * 2) / 2, (0 * 1 + 3 * 5) / 3, 4.0, 2.0]),
    ("fisher", 2.0, [(1 * 0 + 2 * 1 * 2) / 3, 5.0, 4.0, 2.0]),
    ("fisher", 0.0, [0.0, 5.0, 4.0, 2.0]),     # alpha = 0: a where Omega > 0, else theta
])
def test_consolidate_by_hand(entry, merge, alpha, expected):
    theta = vec([2.0, 5.0, 4.0, 1.0])
    anchor = vec([0.0, 1.0, -1.0, 2.0])
    omega = vec([1.0, 0.0, 0.0, 4.0])
    fisher = vec([2.0, 6.0, 0.0, 0.0])         # fisher_scale 0.5 -> F_hat = 1, 3, 0, 0
    call(entry, "consolidate_", theta, anchor, omega, fisher, fisher_scale=0.5, decay=0.5,
         merge=merge, alpha=alpha)
    assert theta.tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(anchor, theta)
    assert omega.tolist() == [0.5 * 1 + 1, 0 + 3, 0.0, 0.5 * 4 + 0]
    assert fisher.tolist() == [0.0] * 4


@pytest.mark.parametrize("entry", ENTRIES)
def test_consolidate_anchor_is_stored_theta(entry):
    """bf16: a = theta as stored, so the drift right after consolidation is exactly 0."""
    theta = vec([1.0, 3.0], torch.bfloat16)
    anchor = vec([0.0, 0.0], torch.bfloat16)
    call(entry, "consolidate_", theta, anchor, vec([1.0, 2.0]), vec([3.0, 5.0]),
         fisher_scale=1.0, decay=1.0, merge="fisher", alpha=1.0)
    assert torch.equal(bits(anchor), bits(theta))
    assert theta.float().tolist() == [0.75, torch.tensor(15 / 7).bfloat16().item()]


# alignment by hand: a = [3,-3,3,1,0,-2], theta = [-1,-1,0,-5,-1,2]
ALIGN_A = [3.0, -3.0, 3.0, 1.0, 0.0, -2.0]
ALIGN_T = [-1.0, -1.0, 0.0, -5.0, -1.0, 2.0]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("dtype", C.DTYPES, ids=lambda d: C.DTYPE_NAMES[d])
@pytest.mark.parametrize("ratio,mode,expected", [
    (0.1, "anchor", ALIGN_T),                               # k = 0: nothing
    (0.0, "zero", ALIGN_T),
    (0.5, "anchor", [3.0, -1.0, 3.0, -5.0, -1.0, 2.0]),     # k = 3, m = 3 (a tie of three)
    (0.2, "anchor", [3.0, -1.0, 3.0, -5.0, -1.0, 2.0]),     # k = 1, m = 3: ties included
    (0.5, "zero", [0.0, -1.0, 0.0, -5.0, -1.0, 2.0]),
    (1.0, "anchor", [3.0, -1.0, 3.0, 1.0, -1.0, -2.0]),     # m = 0: |a| = 0 never resets
    (1.0, "zero", [0.0, -1.0, 0.0, 0.0, -1.0, 0.0]),
    (0.67, "anchor", [3.0, -1.0, 3.0, -5.0, -1.0, -2.0]),   # k = 4, m = 2
])
def test_align_by_hand(entry, dtype, ratio, mode, expected):
    theta, anchor = vec(ALIGN_T, dtype), vec(ALIGN_A, dtype)
    call(entry, "align_", theta, anchor, torch.tensor([0, 6]), ratio, mode=mode)
    assert theta.float().tolist() == expected
    assert anchor.float().tolist() == ALIGN_A


@pytest.mark.parametrize("entry", ENTRIES)
def test_align_per_group(entry):
    """m_g is per group: the small anchors of group 1 are its own top-k."""
    theta = vec([-1.0, 1.0, -1.0, 1.0])
    anchor = vec([10.0, 10.0, 0.5, 0.25])
    call(entry, "align_", theta, anchor, torch.tensor([0, 0, 2, 4, 4]), 0.5, mode="anchor")
    assert theta.tolist() == [10.0, 1.0, 0.5, 1.0]


# --------------------------------------------------------------------------- in-place semantics

@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("dtype", C.DTYPES, ids=lambda d: C.DTYPE_NAMES[d])
def test_in_place_semantics(entry, dtype):
    case = C.Case("step", "g5_odd", dtype=dtype, mask="keep0.5", directional=False, seed=3)
    t = C.make_tensors(case)
    before = C.clone(t)
    ptrs = {k: v.data_ptr() for k, v in t.items()}
    args, kwargs = C.step_args(case, t)
    stats = call(entry, "fused_step", *args, **kwargs)
    assert isinstance(stats, torch.Tensor)
    assert stats.shape == (case.groups, 7) and stats.dtype == F32
    assert stats.device == t["grad"].device and stats.is_contiguous()
    assert all(t[k].data_ptr() == p for k, p in ptrs.items())
    assert t["grad"].dtype == dtype and t["fisher"].dtype == F32
    assert not torch.equal(t["grad"], before["grad"]) and not torch.equal(t["fisher"],
                                                                          before["fisher"])
    assert_unchanged(before, t, ("param", "anchor", "importance"))

    c = C.Case("consolidate", "g5_odd", dtype=dtype, merge="linear", alpha=0.5, seed=4)
    t = C.make_tensors(c)
    ptrs = {k: v.data_ptr() for k, v in t.items()}
    call(entry, "consolidate_", t["param"], t["anchor"], t["importance"], t["fisher"],
         fisher_scale=1.0, decay=1.0, merge="linear", alpha=0.5)
    assert all(t[k].data_ptr() == p for k, p in ptrs.items())

    c = C.Case("align", "g5_odd", dtype=dtype, seed=5)
    t = C.make_tensors(c)
    before = C.clone(t)
    ptr = t["param"].data_ptr()
    call(entry, "align_", t["param"], t["anchor"], t["offsets"], 1.0)
    assert t["param"].data_ptr() == ptr and not torch.equal(t["param"], before["param"])
    assert_unchanged(before, t, ("anchor",))


@pytest.mark.parametrize("entry", ENTRIES)
def test_step_on_views_of_a_flat_buffer(entry):
    """The model-level API hands in slices of flat buffers: only the slice is written."""
    case = C.Case("step", "n7", seed=9, directional=False)
    t = C.make_tensors(case)
    big_g, big_f = torch.full((20,), 7.0), torch.full((20,), 7.0)
    big_g[5:12], big_f[5:12] = t["grad"], t["fisher"]
    expected = C.clone(t)
    args, kwargs = C.step_args(case, expected)
    call(entry, "fused_step", *args, **kwargs)
    args, kwargs = C.step_args(case, dict(t, grad=big_g[5:12], fisher=big_f[5:12]))
    call(entry, "fused_step", *args, **kwargs)
    assert torch.equal(big_g[5:12], expected["grad"]) and torch.equal(big_f[5:12],
                                                                     expected["fisher"])
    assert (big_g[:5] == 7).all() and (big_g[12:] == 7).all() and (big_f[12:] == 7).all()


# --------------------------------------------------------------------------- hypothesis

FUZZ = settings(max_examples=int(os.environ.get("AIM_FUZZ_EXAMPLES", 60)), deadline=None,
                derandomize=os.environ.get("AIM_FUZZ_RANDOM", "0") in ("", "0"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

nonneg_f32 = st.one_of(
    st.floats(min_value=0.0, width=32, allow_nan=False, allow_infinity=True,
              allow_subnormal=True),
    st.floats(min_value=0.0, max_value=2.0 ** -126, width=32, allow_subnormal=True),  # denormals
    st.sampled_from([0.0, -0.0, 1.0, 2.0, 1e-45, 1.4e-45, 1e-38, 1.1754942e-38,
                     3.4028235e38, INF, 0.5, 3.0]),
)


@FUZZ
@given(data=st.data(), chunk=st.integers(1, 9))
def test_kth_largest_fuzz(data, chunk):
    vals = data.draw(st.lists(nonneg_f32, min_size=1, max_size=60))
    if data.draw(st.booleans()):                            # many duplicates
        vals = vals + data.draw(st.lists(st.sampled_from(vals), max_size=30))
    k = data.draw(st.integers(0, len(vals)))
    t = torch.tensor(vals, dtype=F32)
    expected = oracle.kth_largest(t.tolist(), k)
    got = reference.kth_largest(t, k, chunk=chunk)
    assert got == expected, (vals, k, chunk)
    assert reference.kth_largest(t, k) == expected


def test_kth_largest_simple():
    t = vec([3.0, 3.0, 3.0, 1.0])
    assert [reference.kth_largest(t, k, chunk=3) for k in range(5)] == [INF, 3.0, 3.0, 3.0, 1.0]


@FUZZ
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5),
    dtype=st.sampled_from(C.DTYPES),
    flags=st.sampled_from(C.FLAGS),
    beta=st.one_of(st.sampled_from([0.0, 1.0, 0.9, 0.999]), st.floats(0.0, 1.0)),
    ratio=st.lists(st.floats(0.0, 0.99), min_size=1, max_size=5),
    keep=st.lists(st.sampled_from([0.0, 0.5, 1.0, 0.125]), min_size=1, max_size=5),
    normalize=st.booleans(),
    nonfinite=st.booleans(),
    omega=st.sampled_from(C.OMEGA_KINDS),
    seed=st.integers(0, 2 ** 31 - 1),
    entry=st.sampled_from(ENTRIES),
    special=C.special_values(),
)
def test_fused_step_fuzz(sizes, dtype, flags, beta, ratio, keep, normalize, nonfinite, omega,
                         seed, entry, special):
    acc, kind, directional = flags
    case = C.Case("step", "n1", dtype=dtype, beta=beta, accumulate=acc, importance_kind=kind,
                  directional=directional, normalize=normalize, nonfinite=nonfinite,
                  omega=omega, seed=seed, custom_sizes=tuple(sizes), custom_ratio=tuple(ratio),
                  custom_keep=tuple(keep), special=special)
    check_step(case, entry)


@FUZZ
@given(
    n=st.integers(0, 40),
    dtype=st.sampled_from(C.DTYPES),
    merge=st.sampled_from((None, "fisher", "linear")),
    alpha=st.sampled_from((0.0, 0.5, 1.0, 2.0)),
    decay=st.sampled_from((1.0, 0.5, 0.0)),
    fisher_scale=st.sampled_from((1.0, 0.25, 10.0, 1e30)),
    seed=st.integers(0, 2 ** 31 - 1),
    entry=st.sampled_from(ENTRIES),
    special=C.special_values(),
)
def test_consolidate_fuzz(n, dtype, merge, alpha, decay, fisher_scale, seed, entry, special):
    """Consolidation with value edge cases against the oracle, bit for bit."""
    case = C.Case("consolidate", "n1", dtype=dtype, merge=merge, alpha=alpha, decay=decay,
                  fisher_scale=fisher_scale, seed=seed, custom_sizes=(n,), special=special)
    t = C.make_tensors(case)
    before = C.clone(t)
    call(entry, "consolidate_", t["param"], t["anchor"], t["importance"], t["fisher"],
         fisher_scale=fisher_scale, decay=decay, merge=merge, alpha=alpha)
    theta, _, omega, _ = oracle.consolidate(
        before["param"], before["anchor"], before["importance"], before["fisher"],
        fisher_scale=fisher_scale, decay=decay, merge=merge, alpha=alpha, param_dtype=dtype)
    assert_stored(t["param"], theta, "param")
    assert_stored(t["importance"], omega, "importance")
    assert torch.equal(bits(t["anchor"]), bits(t["param"])) and not t["fisher"].any()
    assert not (t["importance"].float() == INF).any(), "Omega is clamped to the largest fp32"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_nonfinite_grads_pass_through_bit_for_bit(dtype):
    bits_dtype = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    grad = torch.tensor([1.0, NAN, INF, -INF, -NAN, 2.0], dtype=dtype)
    before = grad.clone().view(bits_dtype)
    n = grad.numel()
    param, anchor = torch.ones(n, dtype=dtype), torch.zeros(n, dtype=dtype)
    importance, fisher = torch.ones(n), torch.zeros(n)
    one = torch.ones(1)
    ops.fused_step(grad, param, anchor, importance, fisher, torch.tensor([0, n]), one,
                   torch.full((1,), INF), torch.zeros(1), one, beta=0.9, backend="torch")
    assert torch.equal(grad.view(bits_dtype)[1:5], before[1:5])
    assert torch.equal(fisher[1:5], torch.zeros(4))
