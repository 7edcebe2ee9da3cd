"""Every backend ("cpu", "triton", "cuda") against ``aim_kernels.ops.reference``.

The case matrix of ``cases.py`` runs once per backend, through the public ops with
``backend=name``. A backend that is not available here is skipped with the reason
``aim_kernels.ops.backends.unavailable_reason`` gives. Tensors live on "cuda" for the
"cuda" and "triton" backends (those tests are marked ``cuda``), except under
``TRITON_INTERPRET=1``, where Triton runs on CPU tensors (small fp32 cases only).

Comparison rules:
* the "cpu" backend: bit for bit (NaN payloads aside), as it does the reference's
  operations in the reference's order, without contraction;
* fp32 storage: ``assert_close`` with the fp32 tolerance of ``cases.TOL`` (scaled by the
  magnitude of the result, so FMA contraction on a GPU is allowed);
* bf16 / fp16 storage (flash-attention style): the expected value is the reference run
  on fp32 copies of the same inputs; the backend's error against it must be at most twice
  the error of the reference's own bf16/fp16 result against it, plus a small atol;
* exact where the spec is exact: thresholds, alignment, counts, non-finite pass-through,
  ``a = theta`` and ``F = 0`` after consolidation.
"""
from __future__ import annotations

import math


import math

import pytest
import torch


from tests import cases as C  # noqa: E402

import aim_kernels.ops as ops  # noqa: E402
from aim_kernels.ops import backends as B  # noqa: E402
from aim_kernels.ops import reference  # noqa: E402

BACKENDS = ("cpu", "triton", "cuda")
INTERPRET_MAX_N = 300
F32 = torch.float32
COUNT_COLUMNS = (5, 6)      # masked, nonfinite


def device_for(backend: str) -> str:
    if backend == "cpu" or (backend == "triton" and B.triton_interpreting()):
        return "cpu"
    return "cuda"


def params(generator, **limits):
    """``(backend, case)`` parameters: every backend x the cases it can run."""
    out = []
    for backend in BACKENDS:
        kw = dict(limits)
        if backend == "triton" and B.triton_interpreting():
            kw["max_n"] = min(kw.get("max_n") or INTERPRET_MAX_N, INTERPRET_MAX_N)
            kw["dtypes"] = (F32,)
        cases = generator(**kw)
        if backend == "triton" and B.triton_interpreting():
            cases = [c for c in cases if c.dtype == F32 and c.state_dtype == F32]
        marks = backend_marks(backend)
        out += [pytest.param(backend, c, id=f"{backend}-{c.id}", marks=marks) for c in cases]
    return out


def backend_marks(backend: str) -> list:
    """``cuda`` for the GPU ones; an unavailable backend is skipped with its reason (this
    mark comes before the generic no-GPU skip of conftest.py, so its reason is shown)."""
    marks = []
    why = B.unavailable_reason(backend)
    if why:
        marks.append(pytest.mark.skip(reason=f"backend {backend!r} is not available: {why}"))
    if device_for(backend) == "cuda":
        marks.append(pytest.mark.cuda)
    return marks


def require(backend: str) -> str:
    why = B.unavailable_reason(backend)
    if why:
        pytest.skip(f"backend {backend!r} is not available: {why}")
    dev = device_for(backend)
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible to PyTorch)")
    return dev


def to(tensors: dict, device) -> dict:
    """Copies on ``device`` (always copies, even to the device the tensors are on)."""
    return {k: v.to(device, copy=True) for k, v in tensors.items()}


def host(tensors: dict) -> dict:
    if any(v.is_cuda for v in tensors.values()):
        torch.cuda.synchronize()
    return {k: v.cpu() for k, v in tensors.items()}


def upcast(tensors: dict) -> dict:
    """fp32 copies of the floating tensors (exact for bf16/fp16): the fp32 computation."""
    return {k: (v.to(F32, copy=True) if v.is_floating_point() and v.dtype != torch.float64
                else v.clone()) for k, v in tensors.items()}


def _scale(x: torch.Tensor) -> float:
    x = x.float()
    x = x[torch.isfinite(x)]
    return max(1.0, float(x.abs().max())) if x.numel() else 1.0


def check_output(name: str, got: torch.Tensor, ref: torch.Tensor, ref32: torch.Tensor,
                 exact: bool = False):
    """A stored result of the backend against the reference (same dtype) and the
    reference's fp32 computation ``ref32``; with ``exact`` (the CPU backend, which does the
    reference's operations in its order, uncontracted), bit for bit but for NaN payloads."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, name
    if exact:
        as_int = torch.int16 if got.element_size() == 2 else torch.int32
        same = (got.view(as_int) == ref.view(as_int)) | (got.isnan() & ref.isnan())
        assert bool(same.all()), (f"{name}: {int((~same).sum())} elements differ in their bits,"
                                  f" e.g. {got[~same][:4].tolist()} vs {ref[~same][:4].tolist()}")
        return
    fin = torch.isfinite(ref.float())
    assert torch.equal(torch.isfinite(got.float()), fin), f"{name}: non-finite positions differ"
    if (~fin).any():      # non-finite values pass through: same value (NaN payload aside)
        torch.testing.assert_close(got[~fin], ref[~fin], rtol=0, atol=0, equal_nan=True)
    g, r, r32 = got.float()[fin], ref.float()[fin], ref32.float()[fin]
    if g.numel() == 0:
        return
    tol = C.TOL[got.dtype]
    if got.dtype == F32:
        torch.testing.assert_close(g, r, rtol=tol["rtol"], atol=tol["atol"] * _scale(r),
                                   msg=lambda m: f"{name}: {m}")
        return
    back_err = (g - r32).abs().max().item()
    ref_err = (r - r32).abs().max().item()
    atol = tol["atol"] * _scale(r32)
    assert back_err <= 2 * ref_err + atol, (
        f"{name}: backend error {back_err:.3g} > 2 x reference error {ref_err:.3g} + {atol:.3g}")
    # and element by element within one storage ulp of the fp32 value (fp32 math, rounded
    # once when stored, is within half an ulp; a different fp32 contraction adds ~1e-7)
    per_elem = (g - r32).abs() <= tol["rtol"] * r32.abs() + atol
    assert bool(per_elem.all()), (
        f"{name}: {int((~per_elem).sum())} elements further than one {got.dtype} ulp from the "
        f"fp32 result, e.g. {g[~per_elem][:4].tolist()} vs {r32[~per_elem][:4].tolist()}")


def check_stats(got: torch.Tensor, ref: torch.Tensor, ref32: torch.Tensor, dtype):
    assert got.dtype == F32 and got.shape == ref.shape
    for col in COUNT_COLUMNS:
        assert torch.equal(got[:, col], ref[:, col]), f"stat column {col}: counts differ"
    cols = [c for c in range(7) if c not in COUNT_COLUMNS]
    g, r, r32 = got[:, cols].double(), ref[:, cols].double(), ref32[:, cols].double()
    rtol = C.TOL[dtype]["stats_rtol"]
    allowed = 2 * (r - r32).abs() + rtol * r32.abs() + 1e-30
    bad = (g - r32).abs() > allowed
    assert not bad.any(), f"stats differ:\nbackend {got.tolist()}\nreference {ref.tolist()}"


# --------------------------------------------------------------------------- fused_step

def expected_step(case, t: dict):
    """The reference's step on copies of ``t`` in their own dtypes and in fp32:
    ``(tensors, stats, fp32 tensors, fp32 stats)``."""
    ref = C.clone(t)
    args, kw = C.step_args(case, ref)
    ref_stats = reference.fused_step(*args, **kw)
    ref32 = upcast(t)
    args, kw = C.step_args(case, ref32)
    return ref, ref_stats, ref32, reference.fused_step(*args, **kw)


@pytest.mark.parametrize("backend,case", params(C.step_cases))
def test_fused_step(backend, case):
    dev = require(backend)
    t = C.make_tensors(case)

    ref, ref_stats, ref32, ref32_stats = expected_step(case, t)

    got = to(t, dev)
    args, kw = C.step_args(case, got)
    stats = ops.fused_step(*args, **kw, backend=backend)
    assert stats.device == got["grad"].device and stats.shape == (case.groups, 7)
    stats = stats.cpu()
    got = host(got)

    exact = backend == "cpu"
    check_output("grad", got["grad"], ref["grad"], ref32["grad"], exact)
    check_output("fisher", got["fisher"], ref["fisher"], ref32["fisher"], exact)
    check_stats(stats, ref_stats, ref32_stats, case.dtype)
    for name in ("param", "anchor", "importance", "offsets", "inv_scale", "thresh", "keep",
                 "lam"):
        assert torch.equal(got[name], t[name]), f"{name} was modified"


# --------------------------------------------------------------------------- thresholds

@pytest.mark.parametrize("backend,case", params(C.threshold_cases))
def test_group_thresholds(backend, case):
    dev = require(backend)
    t = C.make_tensors(case)
    c_ref, t_ref = reference.group_thresholds(t["importance"], t["offsets"], t["mask_ratio"],
                                              normalize=case.normalize)
    d = to(t, dev)
    c_got, t_got = ops.group_thresholds(d["importance"], d["offsets"], d["mask_ratio"],
                                        normalize=case.normalize, backend=backend)
    assert c_got.dtype == t_got.dtype == F32 and c_got.shape == t_got.shape == (case.groups,)
    assert c_got.device == t_got.device == d["importance"].device
    c_got, t_got = c_got.cpu(), t_got.cpu()
    assert torch.equal(t_got, t_ref), f"thresh is exact: {t_got.tolist()} != {t_ref.tolist()}"
    torch.testing.assert_close(c_got, c_ref, rtol=1e-5, atol=0)
    assert torch.equal(d["importance"].cpu(), t["importance"])


# --------------------------------------------------------------------------- consolidation

@pytest.mark.parametrize("backend,case", params(C.consolidate_cases))
def test_consolidate(backend, case):
    dev = require(backend)
    t = C.make_tensors(case)
    kw = dict(fisher_scale=case.fisher_scale, decay=case.decay, merge=case.merge,
              alpha=case.alpha)
    names = ("param", "anchor", "importance", "fisher")
    ref, ref32 = C.clone(t), upcast(t)
    reference.consolidate_(*(ref[n] for n in names), **kw)
    reference.consolidate_(*(ref32[n] for n in names), **kw)

    got = to(t, dev)
    assert ops.consolidate_(*(got[n] for n in names), **kw, backend=backend) is None
    got = host(got)
    exact = backend == "cpu"
    check_output("param", got["param"], ref["param"], ref32["param"], exact)
    check_output("importance", got["importance"], ref["importance"], ref32["importance"], exact)
    assert torch.equal(got["anchor"], got["param"]), "a = theta (as stored)"
    assert not got["fisher"].any(), "F = 0"
    if case.merge is None:
        assert torch.equal(got["param"], t["param"]), "merge=None leaves theta unchanged"


# --------------------------------------------------------------------------- alignment

@pytest.mark.parametrize("backend,case", params(C.align_cases))
def test_align(backend, case):
    dev = require(backend)
    t = C.make_tensors(case)
    ref = C.clone(t)
    reference.align_(ref["param"], ref["anchor"], ref["offsets"], case.align_ratio,
                     mode=case.align_mode)
    got = to(t, dev)
    assert ops.align_(got["param"], got["anchor"], got["offsets"], case.align_ratio,
                      mode=case.align_mode, backend=backend) is None
    got = host(got)
    assert torch.equal(got["param"], ref["param"]), "alignment is exact"
    assert torch.equal(got["anchor"], t["anchor"]), "anchor was modified"


@pytest.mark.parametrize("backend,case", params(C.align_cases))
def test_align_thresholds_then_apply(backend, case):
    """The split of align_ that a state uses: m_g once (align_thresholds, exact), then
    align_apply_ given it -- together exactly the reference's align_."""
    dev = require(backend)
    t = C.make_tensors(case)
    ref = C.clone(t)
    reference.align_(ref["param"], ref["anchor"], ref["offsets"], case.align_ratio,
                     mode=case.align_mode)
    m_ref = [reference.kth_largest(t["anchor"][lo:hi].float().abs(),
                                   reference.kth_count(case.align_ratio, hi - lo))
             if hi > lo else math.inf
             for lo, hi in zip(t["offsets"][:-1].tolist(), t["offsets"][1:].tolist())]
    got = to(t, dev)
    m_g = ops.align_thresholds(got["anchor"], got["offsets"], case.align_ratio, backend=backend)
    assert m_g.dtype == torch.float32 and m_g.cpu().tolist() == m_ref
    assert ops.align_apply_(got["param"], got["anchor"], got["offsets"], m_g,
                            mode=case.align_mode, backend=backend) is None
    got = host(got)
    assert torch.equal(got["param"], ref["param"]), "alignment is exact"
    assert torch.equal(got["anchor"], t["anchor"]), "anchor was modified"


# --------------------------------------------------------------------------- views

def _misaligned(t: torch.Tensor, shift: int) -> torch.Tensor:
    """A contiguous view of the same values whose data starts ``shift`` elements into a
    buffer (so its address is not 16-byte aligned for shift = 1)."""
    buf = torch.empty(t.numel() + shift + 3, dtype=t.dtype, device=t.device)
    view = buf[shift:shift + t.numel()]
    view.copy_(t)
    return view


@pytest.mark.parametrize("backend", [pytest.param(b, marks=backend_marks(b), id=b)
                                     for b in BACKENDS])
@pytest.mark.parametrize("dtype", C.DTYPES, ids=lambda d: C.DTYPE_NAMES[d])
def test_fused_step_on_offset_views(backend, dtype):
    """Slices of flat buffers at any element offset (aligned to the element, not to a
    vector) give the reference's result: every backend must take them (a view of a
    bucket is what the model-level API passes), none may refuse them."""
    dev = require(backend)
    if dtype != F32 and backend == "triton" and B.triton_interpreting():
        pytest.skip("the Triton interpreter runs fp32 cases only")
    case = C.Case("step", "g5_129", dtype=dtype, mask="keep0.5", nonfinite=True, seed=21)
    t = C.make_tensors(case)
    ref = C.clone(t)
    args, kw = C.step_args(case, ref)
    ref_stats = reference.fused_step(*args, **kw)

    got = to(t, dev)
    for name in ("grad", "param", "anchor", "importance", "fisher"):
        got[name] = _misaligned(got[name], 1)
    assert got["grad"].storage_offset() == 1
    args, kw = C.step_args(case, got)
    stats = ops.fused_step(*args, **kw, backend=backend)
    stats, got = stats.cpu(), host(got)
    check_output("grad", got["grad"], ref["grad"], ref["grad"] if dtype == F32 else
                 _ref32_grad(case, t), exact=backend == "cpu")
    if backend == "cpu":            # the same operations as the reference: the same bits
        assert torch.equal(got["fisher"].view(torch.int32), ref["fisher"].view(torch.int32))
    else:
        torch.testing.assert_close(got["fisher"], ref["fisher"], rtol=1e-5, atol=1e-6)
    assert torch.equal(stats[:, 5:], ref_stats[:, 5:])


def _ref32_grad(case, t):
    r = upcast(t)
    args, kw = C.step_args(case, r)
    reference.fused_step(*args, **kw)
    return r["grad"]


# --------------------------------------------------------------------------- stays finite
# DESIGN.md 2.1: u, F, F_hat and Omega are clamped to the largest finite fp32, and c_g = 0
# where n / sum(Omega) is not finite in fp32. The two failures of the review, per backend.

FP32_MAX = torch.finfo(F32).max
TINY = 1.401298464324817e-45          # the smallest fp32 subnormal
ALL_BACKENDS = [pytest.param(b, marks=backend_marks(b), id=b) for b in BACKENDS]


def _vec(values, dev):
    return torch.tensor(values, dtype=F32, device=dev)


def _step(backend, dev, g, theta, a, omega, F, c, t, lam, **kw):
    grad, fisher = _vec(g, dev), _vec(F, dev)
    n = len(g)
    kw = dict(dict(beta=0.9, accumulate="ema", importance_kind="fisher", directional=False),
              **kw)
    stats = ops.fused_step(grad, _vec(theta, dev), _vec(a, dev), _vec(omega, dev), fisher,
                           torch.tensor([0, n], device=dev), _vec(c, dev), _vec(t, dev),
                           _vec([0.0], dev), _vec(lam, dev), **kw, backend=backend)
    return grad.cpu(), fisher.cpu(), stats.cpu()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inv_scale_is_zero_where_n_over_the_sum_overflows(backend):
    """Omega summing to ~1e-44: c_g was n / sum = inf and every finite gradient of the
    group came out NaN/inf, uncounted. Now c_g = 0; a finite n / sum (1e37) stays."""
    dev = require(backend)
    omega = [TINY] * 7 + [1e-37] * 2
    c, _ = ops.group_thresholds(_vec(omega, dev), torch.tensor([0, 7, 9], device=dev),
                                _vec([0.0, 0.0], dev), backend=backend)
    c = c.cpu()
    assert torch.equal(c.view(torch.int32), _vec([0.0, 1e37], "cpu").view(torch.int32)), c
    grad, _, stats = _step(backend, dev, [1.0] * 7, [2.0] * 7, [0.0] * 7, omega[:7],
                           [0.0] * 7, c[:1].tolist(), [math.inf], [3.0])
    assert grad.tolist() == [1.0] * 7 and torch.isfinite(stats).all(), (grad, stats)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("accumulate", ["ema", "sum"])
def test_a_huge_gradient_leaves_a_finite_state(backend, accumulate):
    """|g| = 1e20: F was inf, Omega inf after consolidation, and in the next task
    c_g = n / inf = 0, s = 0 * inf = NaN in every gradient of the group. Now u, F, F_hat
    and Omega stop at the largest finite fp32 and the next task trains."""
    dev = require(backend)
    F0 = [FP32_MAX, FP32_MAX, 0.0] if accumulate == "sum" else [0.0] * 3
    _, F, _ = _step(backend, dev, [1e20, -1e20, 1.0], [0.5] * 3, [0.0] * 3, [0.0] * 3, F0,
                    [1.0], [math.inf], [1.0], accumulate=accumulate)
    ref_F = torch.tensor(F0)
    reference.fused_step(torch.tensor([1e20, -1e20, 1.0]), torch.full((3,), 0.5),
                         torch.zeros(3), torch.zeros(3), ref_F, torch.tensor([0, 3]),
                         torch.ones(1), torch.full((1,), math.inf), torch.zeros(1),
                         torch.ones(1), beta=0.9, accumulate=accumulate, directional=False)
    assert torch.equal(F.view(torch.int32), ref_F.view(torch.int32)), (F, ref_F)
    assert torch.isfinite(F).all() and F[0] == (FP32_MAX if accumulate == "sum" else
                                                float(torch.tensor(1 - 0.9) * FP32_MAX))

    # F_hat = F * 10 overflows for ema: Omega stops at the largest fp32
    param, anchor = _vec([0.5] * 3, dev), _vec([0.0] * 3, dev)
    omega, fisher = _vec([0.0] * 3, dev), F.to(dev)
    ops.consolidate_(param, anchor, omega, fisher, fisher_scale=10.0, decay=1.0,
                     backend=backend)
    assert torch.isfinite(omega).all() and omega[0] == FP32_MAX, omega
    c, t = ops.group_thresholds(omega, torch.tensor([0, 3], device=dev), _vec([0.5], dev),
                                backend=backend)
    assert torch.isfinite(c).all() and c[0] > 0, c
    grad, _, stats = _step(backend, dev, [1.0, -1.0, 1.0], [1.0] * 3, [0.0] * 3,
                           omega.cpu().tolist(), [0.0] * 3, c.cpu().tolist(),
                           t.cpu().tolist(), [1.0])
    assert torch.isfinite(grad).all() and torch.isfinite(stats).all(), (grad, stats)
    assert stats[0, 6] == 0
