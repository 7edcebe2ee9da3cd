"""The compiled backends ("cpu", and "cuda" on a GPU) beyond the shared case matrix:

* hypothesis fuzzing against ``ops/reference.py`` over sizes, group layouts (empty groups
  included), dtypes, flags, special values and storage offsets (views of larger buffers,
  so the vector/scalar split of the kernels is exercised at every alignment);
* the checks ``native.py`` runs before a pointer crosses, and their messages;
* ``torch.library`` registration: ``opcheck`` and ``torch.compile(fullgraph=True)`` of a
  training step calling the ops;
* the build: no libtorch linked, CUDA code for sm_80..sm_90, fallback when the driver is
  too old for the CUDA the module was built for;
* CUDA: the same fuzzing on the GPU, non-default streams and CUDA graph capture (``cuda``).

On the CPU the kernels follow the reference operation by operation (no contraction), so
outputs are compared bit for bit; on a GPU within the tolerances of test_backends.py.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aim_kernels as ak
from aim_kernels.ops import reference
from aim_kernels.ops import backends as B
from tests import cases as C
from tests.test_backends import check_output, check_stats, upcast

native = pytest.importorskip("aim_kernels.ops.native")
if native.unavailable_reason("cpu"):
    pytest.skip(f"native module not built: {native.unavailable_reason('cpu')}",
                allow_module_level=True)
_C = native._C

F32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = (F32, BF16, FP16)
# Deterministic in CI (the same examples every run); AIM_FUZZ_EXAMPLES=2000 AIM_FUZZ_RANDOM=1
# for a longer, randomised hunt.
FUZZ = settings(max_examples=int(os.environ.get("AIM_FUZZ_EXAMPLES", 60)), deadline=None,
                derandomize=os.environ.get("AIM_FUZZ_RANDOM", "0") in ("", "0"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CUDA_OK = torch.cuda.is_available() and not B.unavailable_reason("cuda")
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda] + (
               [] if CUDA_OK or not torch.cuda.is_available() else
               [pytest.mark.skip(reason=f"cuda backend: {B.unavailable_reason('cuda')}")]))]


# --------------------------------------------------------------------------- inputs

def placed(values: torch.Tensor, dtype, offset: int, device) -> torch.Tensor:
    """``values`` as ``dtype`` in a contiguous view starting ``offset`` elements into a
    larger buffer (offset 0 = a fresh, aligned tensor)."""
    buf = torch.full((values.numel() + offset + 5,), float("nan"), dtype=dtype, device=device)
    view = buf[offset:offset + values.numel()]
    view.copy_(values.to(dtype))
    return view


@st.composite
def layouts(draw, max_groups=6, max_size=300):
    sizes = draw(st.lists(st.one_of(st.just(0), st.integers(1, 8), st.integers(9, max_size)),
                          min_size=1, max_size=max_groups))
    return sizes


def omega_values(kind: str, n: int, gen) -> torch.Tensor:
    if kind == "ties":
        palette = torch.tensor([0.0, -0.0, 0.25, 1.0, 1.0, 3.0])
        return palette[torch.randint(0, len(palette), (n,), generator=gen)]
    if kind == "zeros":
        return torch.zeros(n)
    omega = torch.rand(n, generator=gen) * 2
    omega[torch.rand(n, generator=gen) < 0.2] = 0.0
    if kind == "tiny":
        omega = omega * 1e-30       # subnormal sums: c ~ 1e30
    if kind == "huge":
        omega = omega * 1e30
    return omega


def step_inputs(sizes, dtype, state_dtype, seed, nonfinite, offsets_of, device, ratio_seq,
                special=()):
    n, G = sum(sizes), len(sizes)
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, generator=gen)
    grad[torch.rand(n, generator=gen) < 0.05] = 0.0
    if nonfinite and n:
        pos = torch.randperm(n, generator=gen)[: max(1, n // 10)]
        grad[pos] = torch.tensor([float("nan"), float("inf"), float("-inf")])[
            torch.arange(len(pos)) % 3]
    param = torch.randn(n, generator=gen)
    anchor = param + 0.1 * torch.randn(n, generator=gen)
    same = torch.rand(n, generator=gen) < 0.1
    anchor[same] = param[same]
    fisher = torch.rand(n, generator=gen)
    omega = omega_values(["random", "ties", "zeros", "tiny", "huge"][seed % 5], n, gen)
    C.place_special(dict(grad=grad, param=param, anchor=anchor, importance=omega, fisher=fisher),
                    special)
    offsets = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0).tolist()), dtype=torch.int64)
    ratio = torch.tensor([ratio_seq[i % len(ratio_seq)] for i in range(G)], dtype=torch.float64)
    c, t = reference.group_thresholds(omega.to(state_dtype), offsets, ratio, normalize=True)
    keep = torch.rand(G, generator=gen) * (torch.rand(G, generator=gen) < 0.5)
    lam = torch.rand(G, generator=gen) * 3
    host = dict(grad=grad.to(dtype), param=param.to(dtype), anchor=anchor.to(dtype),
                importance=omega.to(state_dtype), fisher=fisher.to(state_dtype))
    dev = {k: placed(v, v.dtype, offsets_of[k], device) for k, v in host.items()}
    small = dict(offsets=offsets, inv_scale=c, thresh=t, keep=keep.float(), lam=lam.float())
    host.update(small)
    dev.update({k: v.to(device) for k, v in small.items()})
    return host, dev


ARRAYS = ("grad", "param", "anchor", "importance", "fisher")

# The CPU sums each stat in fp32 partials of at most 16 terms, then in double
# (csrc/ops_cpu.cpp): it may differ from the reference's double sum by 15 * 2^-24 of the
# sum of |terms| of the group, plus one fp32 rounding of each result.
STATS_ABS_RTOL = 1e-6


def abs_term_sums(host: dict, kw: dict) -> torch.Tensor:
    """Per group and stat, the sum of |terms| (fp32 [G, 7]): the stats of the reference
    run with |Ω|, |c| and |λ|, which turns every penalty term into its magnitude (the
    other four sums have non-negative terms already)."""
    t = {k: v.clone() for k, v in host.items()}
    t["importance"] = t["importance"].abs()
    return reference.fused_step(*(t[k] for k in ARRAYS), t["offsets"], t["inv_scale"].abs(),
                                t["thresh"], t["keep"], t["lam"].abs(), **kw)


def check_cpu_stats(got: torch.Tensor, want: torch.Tensor, abs_sums: torch.Tensor):
    """Counts exactly; each sum within STATS_ABS_RTOL of its sum of |terms| plus an fp32
    rounding, inf and NaN where the reference has them."""
    got, want = got.cpu(), want.cpu()
    assert torch.equal(got[:, 5:], want[:, 5:]), f"counts {got[:, 5:]} != {want[:, 5:]}"
    g, w, a = got[:, :5].double(), want[:, :5].double(), abs_sums[:, :5].double()
    finite = w.isfinite()
    assert torch.equal(g.isfinite(), finite) and torch.equal(g.isnan(), w.isnan()), (got, want)
    assert torch.equal(g[w.isinf()], w[w.isinf()]), (got, want)
    allowed = STATS_ABS_RTOL * a + 2.0 ** -23 * w.abs() + 1e-45
    bad = finite & ((g - w).abs() > allowed)
    assert not bad.any(), f"stats differ:\nbackend {got.tolist()}\nreference {want.tolist()}"


def same_bits(got: torch.Tensor, want: torch.Tensor, name: str):
    """Equal bit patterns (so +0 and -0 differ), except that any NaN matches any NaN: a
    NaN's payload is not part of the spec (arithmetic may produce another one)."""
    got, want = got.cpu(), want.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, name
    as_int = torch.int16 if got.itemsize == 2 else torch.int32
    bad = ~((got.view(as_int) == want.view(as_int)) | (got.isnan() & want.isnan()))
    assert not bad.any(), (f"{name}: {int(bad.sum())} elements differ in their bits, e.g. "
                           f"{got[bad][:4].tolist()} vs {want[bad][:4].tolist()}")


# --------------------------------------------------------------------------- fused_step

@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(sizes=layouts(), dtype=st.sampled_from(DTYPES), state_dtype=st.sampled_from(DTYPES),
       accumulate=st.sampled_from(("ema", "sum")), kind=st.sampled_from(("fisher", "abs")),
       directional=st.booleans(), beta=st.sampled_from((0.0, 0.5, 0.9, 0.99, 1.0)),
       nonfinite=st.booleans(), seed=st.integers(0, 2**16),
       offs=st.fixed_dictionaries({k: st.integers(0, 9) for k in ARRAYS}),
       ratios=st.lists(st.sampled_from((0.0, 0.1, 0.5, 0.75, 0.999)), min_size=1, max_size=3),
       special=C.special_values())
def test_fused_step_fuzz(device, sizes, dtype, state_dtype, accumulate, kind, directional, beta,
                         nonfinite, seed, offs, ratios, special):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    host, dev = step_inputs(sizes, dtype, state_dtype, seed, nonfinite, offs, device, ratios,
                            special)
    kw = dict(beta=beta, accumulate=accumulate, importance_kind=kind, directional=directional)
    ref = {k: v.clone() for k, v in host.items()}
    ref_stats = reference.fused_step(*(ref[k] for k in ARRAYS), ref["offsets"], ref["inv_scale"],
                                     ref["thresh"], ref["keep"], ref["lam"], **kw)
    before = {k: dev[k].clone() for k in ("param", "anchor", "importance")}
    stats = native.fused_step(*(dev[k] for k in ARRAYS), dev["offsets"], dev["inv_scale"],
                              dev["thresh"], dev["keep"], dev["lam"], **kw)
    assert stats.shape == (len(sizes), 7) and stats.dtype == F32
    for k, v in before.items():
        same_bits(dev[k], v, f"{k} (read-only)")
    if device == "cpu":
        same_bits(dev["grad"], ref["grad"], "grad")
        same_bits(dev["fisher"], ref["fisher"], "fisher")
        check_cpu_stats(stats, ref_stats, abs_term_sums(host, kw))
    else:
        r32 = upcast(host)
        r32_stats = reference.fused_step(*(r32[k] for k in ARRAYS), r32["offsets"],
                                         r32["inv_scale"], r32["thresh"], r32["keep"],
                                         r32["lam"], **kw)
        check_output("grad", dev["grad"].cpu(), ref["grad"], r32["grad"])
        check_output("fisher", dev["fisher"].cpu(), ref["fisher"], r32["fisher"])
        check_stats(stats.cpu(), ref_stats, r32_stats, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_step_large_groups_cross_tiles(device):
    """Groups that span many tiles/blocks and a group boundary inside a vector pack."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    sizes = [70_001, 3, 0, 131_075, 1]
    host, dev = step_inputs(sizes, F32, F32, 5, True, dict.fromkeys(ARRAYS, 1), device, (0.5, 0.1))
    kw = dict(beta=0.9, accumulate="ema", importance_kind="fisher", directional=True)
    abs_sums = abs_term_sums(host, kw)
    ref_stats = reference.fused_step(*(host[k] for k in ARRAYS), host["offsets"],
                                     host["inv_scale"], host["thresh"], host["keep"], host["lam"],
                                     **kw)
    stats = native.fused_step(*(dev[k] for k in ARRAYS), dev["offsets"], dev["inv_scale"],
                              dev["thresh"], dev["keep"], dev["lam"], **kw).cpu()
    if device == "cpu":
        same_bits(dev["grad"], host["grad"], "grad")
        same_bits(dev["fisher"], host["fisher"], "fisher")
    else:
        torch.testing.assert_close(dev["grad"].cpu(), host["grad"], rtol=1e-5, atol=1e-6,
                                   equal_nan=True)
        torch.testing.assert_close(dev["fisher"].cpu(), host["fisher"], rtol=1e-5, atol=1e-6)
    assert torch.equal(stats[:, 5:], ref_stats[:, 5:])
    torch.testing.assert_close(stats, ref_stats, rtol=1e-4, atol=0)
    if device == "cpu":
        check_cpu_stats(stats, ref_stats, abs_sums)


def test_cpu_stats_when_fp32_partials_overflow():
    """Penalty terms near the fp32 maximum, of both signs (negative λ and Ω): a sum of a
    few of them overflows fp32 while the double sum the reference takes stays finite, so
    the CPU's fp32 partials must give way to double there (and an inf term stays inf)."""
    n = 4096
    big = torch.full((n,), 3.0e38)
    host = dict(grad=torch.full((n,), 1e-3), param=torch.ones(n), anchor=torch.zeros(n),
                importance=torch.where(torch.arange(n) % 2 == 0, big, -big),
                fisher=torch.zeros(n))
    host["importance"][-1] = float("inf")    # the last group: an inf term, sum inf
    host.update(offsets=torch.tensor([0, n // 2, n]), inv_scale=torch.ones(2),
                thresh=torch.full((2,), float("inf")), keep=torch.zeros(2),
                lam=torch.tensor([2.0, 2.0]))
    host["importance"][n // 2:-1] = big[n // 2:-1]   # group 1: all +, finite terms, sum inf
    kw = dict(beta=0.9, accumulate="ema", importance_kind="fisher", directional=False)
    ref = {k: v.clone() for k, v in host.items()}
    want = reference.fused_step(*(ref[k] for k in ARRAYS), ref["offsets"], ref["inv_scale"],
                                ref["thresh"], ref["keep"], ref["lam"], **kw)
    assert want[0, 4].isfinite() and want[1, 4] == float("inf")
    got = native.fused_step(*(host[k] for k in ARRAYS), host["offsets"], host["inv_scale"],
                            host["thresh"], host["keep"], host["lam"], **kw)
    check_cpu_stats(got, want, abs_term_sums(ref, kw))


# --------------------------------------------------------------------------- thresholds

@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(sizes=layouts(max_size=2000), state_dtype=st.sampled_from(DTYPES),
       kind=st.sampled_from(("random", "ties", "zeros", "tiny", "huge")),
       ratios=st.lists(st.floats(0.0, 0.999), min_size=1, max_size=6),
       ratio_dtype=st.sampled_from((torch.float32, torch.float64)), normalize=st.booleans(),
       seed=st.integers(0, 2**16), offset=st.integers(0, 5),
       special=C.special_values().map(lambda v: tuple(x for x in v if x[0] == "importance")))
def test_group_thresholds_fuzz(device, sizes, state_dtype, kind, ratios, ratio_dtype, normalize,
                               seed, offset, special):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator().manual_seed(seed)
    omega = omega_values(kind, sum(sizes), gen)
    C.place_special(dict(importance=omega), special)
    omega = omega.to(state_dtype)
    offsets = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int64)
    ratio = torch.tensor([ratios[i % len(ratios)] for i in range(len(sizes))], dtype=ratio_dtype)
    c_ref, t_ref = reference.group_thresholds(omega, offsets, ratio, normalize=normalize)
    c, t = native.group_thresholds(placed(omega, state_dtype, offset, device),
                                   offsets.to(device), ratio.to(device), normalize=normalize)
    assert torch.equal(t.cpu(), t_ref), f"{t.tolist()} != {t_ref.tolist()}"
    assert torch.isfinite(c).all(), c                  # DESIGN 2: c_g = 0 where n/sum overflows
    if device == "cpu":                                # the same fp64 sum and division
        same_bits(c, c_ref, "inv_scale")
    else:
        torch.testing.assert_close(c.cpu(), c_ref, rtol=1e-5, atol=0)


def test_threshold_k_edges():
    """k = 0 -> +inf; k = n - 1 of n; all-zero group -> c = 0; normalize=False -> 1;
    fp32 ratio 0.7 floors its own (fp32) value."""
    omega = torch.tensor([0.0, 1.0, 2.0, 2.0, 3.0, 0.0, 0.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    offsets = torch.tensor([0, 5, 7, 7, 13])
    for rdt in (torch.float32, torch.float64):
        ratio = torch.tensor([0.0, 0.5, 0.3, 0.7], dtype=rdt)
        for normalize in (True, False):
            c_ref, t_ref = reference.group_thresholds(omega, offsets, ratio, normalize=normalize)
            c, t = native.group_thresholds(omega, offsets, ratio, normalize=normalize)
            assert torch.equal(t, t_ref) and torch.equal(c, c_ref)
            if normalize:
                assert math.isinf(t[0]) and math.isinf(t[2]), t     # k = 0, empty group
                assert c[1] == 0 and c[2] == 0, c                    # sum 0 -> c = 0
                assert t[3] == 2.0 if rdt == torch.float64 else True  # floor(0.7 * 6) = 4th largest
            else:
                assert torch.equal(c, torch.ones(4))


# --------------------------------------------------------------------------- consolidate / align

@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(n=st.integers(0, 700), dtype=st.sampled_from(DTYPES), state_dtype=st.sampled_from(DTYPES),
       merge=st.sampled_from((None, "fisher", "linear")), alpha=st.sampled_from((0.0, 0.5, 1.0, 2.0)),
       decay=st.sampled_from((1.0, 0.5)), fisher_scale=st.sampled_from((1.0, 0.25, 10.0, 1e30)),
       seed=st.integers(0, 2**16), offs=st.lists(st.integers(0, 9), min_size=4, max_size=4),
       special=C.special_values())
def test_consolidate_fuzz(device, n, dtype, state_dtype, merge, alpha, decay, fisher_scale, seed,
                          offs, special):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator().manual_seed(seed)
    omega = torch.rand(n, generator=gen)
    fisher = torch.rand(n, generator=gen)
    both = torch.rand(n, generator=gen) < 0.2
    omega[both], fisher[both] = 0.0, 0.0
    param, anchor = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    C.place_special(dict(param=param, anchor=anchor, importance=omega, fisher=fisher), special)
    host = dict(param=param.to(dtype), anchor=anchor.to(dtype),
                importance=omega.to(state_dtype), fisher=fisher.to(state_dtype))
    names = tuple(host)
    dev = {k: placed(host[k], host[k].dtype, o, device) for k, o in zip(names, offs)}
    kw = dict(fisher_scale=fisher_scale, decay=decay, merge=merge, alpha=alpha)
    reference.consolidate_(*(host[k] for k in names), **kw)
    native.consolidate_(*(dev[k] for k in names), **kw)
    if device == "cpu":
        for k in names:
            same_bits(dev[k], host[k], k)
    else:
        for k in ("param", "importance"):
            torch.testing.assert_close(dev[k].cpu(), host[k], rtol=C.TOL[host[k].dtype]["rtol"],
                                       atol=1e-6, equal_nan=True)
        same_bits(dev["anchor"], dev["param"], "anchor = param")
        assert not dev["fisher"].any()


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(sizes=layouts(max_size=500), dtype=st.sampled_from(DTYPES),
       ratio=st.sampled_from((0.0, 0.3, 0.5, 0.999, 1.0)), mode=st.sampled_from(("anchor", "zero")),
       ties=st.booleans(), seed=st.integers(0, 2**16), offs=st.tuples(st.integers(0, 9),
                                                                     st.integers(0, 9)))
def test_align_fuzz(device, sizes, dtype, ratio, mode, ties, seed, offs):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    if ties:
        palette = torch.tensor([-2.0, -1.0, 0.0, -0.0, 1.0, 2.0, float("nan")])
        anchor = palette[torch.randint(0, len(palette), (n,), generator=gen)]
    else:
        anchor = torch.randn(n, generator=gen)
    param = torch.randn(n, generator=gen)
    param[torch.rand(n, generator=gen) < 0.1] = 0.0
    flip = torch.rand(n, generator=gen) < 0.2
    param[flip] = -anchor[flip]
    offsets = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int64)
    p_ref, a_ref = param.to(dtype), anchor.to(dtype)
    reference.align_(p_ref, a_ref, offsets, ratio, mode=mode)
    p, a = placed(param, dtype, offs[0], device), placed(anchor, dtype, offs[1], device)
    native.align_(p, a, offsets.to(device), ratio, mode=mode)
    same_bits(p, p_ref, "param")
    same_bits(a, anchor.to(dtype), "anchor")


# --------------------------------------------------------------------------- checks

def _step_tensors(n=10, dtype=F32):
    host, _ = step_inputs([4, n - 4], dtype, F32, 1, False, dict.fromkeys(ARRAYS, 0), "cpu", (0.5,))
    return host


def _call_step(t, **over):
    t = dict(t, **over)
    return native.fused_step(*(t[k] for k in ARRAYS), t["offsets"], t["inv_scale"], t["thresh"],
                             t["keep"], t["lam"], beta=0.9)


@pytest.mark.parametrize("name,bad,exc,msg", [
    ("grad", lambda t: t.reshape(2, 5), ValueError, "must be 1-D"),
    ("param", lambda t: torch.empty(20)[::2], ValueError, "contiguous"),
    ("anchor", lambda t: t[:-1], ValueError, "must have 10 elements"),
    ("anchor", lambda t: t.double(), TypeError, "dtype"),
    ("fisher", lambda t: t.half(), TypeError, "dtype"),
    ("importance", lambda t: t.to_sparse(), ValueError, "dense"),
    ("lam", lambda t: t.double(), TypeError, "dtype"),
    ("offsets", lambda t: t.int(), TypeError, "dtype"),
    ("grad", lambda t: torch.frombuffer(bytearray(44), dtype=torch.float32, offset=1, count=10),
     ValueError, "not aligned"),
    ("fisher", lambda t: torch.frombuffer(bytearray(44), dtype=torch.float32, offset=2, count=10),
     ValueError, "not aligned"),
    ("keep", lambda t: [0.0, 0.0], TypeError, "torch.Tensor"),
])
def test_checks_before_pointers(name, bad, exc, msg):
    """Every tensor is checked before its address is taken; the error names it, and no
    tensor was touched."""
    t = _step_tensors()
    snapshot = {k: v.clone() for k, v in t.items()}
    with pytest.raises(exc, match=f"`{name}`.*{msg}|{msg}.*`{name}`"):
        _call_step(t, **{name: bad(t[name])})
    for k, v in snapshot.items():
        if v.is_floating_point():
            same_bits(t[k], v, k)
        else:
            assert torch.equal(t[k], v), k


def test_checks_other_ops():
    x = torch.rand(8)
    off = torch.tensor([0, 8])
    with pytest.raises(ValueError, match="`importance`.*contiguous"):
        native.group_thresholds(torch.rand(16)[::2], off, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="`mask_ratio`.*1 elements"):
        native.group_thresholds(x, off, torch.tensor([0.5, 0.5]))
    with pytest.raises(TypeError, match="`fisher`.*dtype"):
        native.consolidate_(x.clone(), x.clone(), x.clone(), x.double(), fisher_scale=1.0,
                            decay=1.0)
    with pytest.raises(ValueError, match="`merge`"):
        native.consolidate_(x.clone(), x.clone(), x.clone(), x.clone(), fisher_scale=1.0,
                            decay=1.0, merge="mean")
    with pytest.raises(ValueError, match="`anchor`.*elements"):
        native.align_(x.clone(), torch.rand(7), off, 0.5)
    with pytest.raises(ValueError, match="`mode`"):
        native.align_(x.clone(), x.clone(), off, 0.5, mode="flip")


def test_empty_and_no_groups():
    off = torch.tensor([0, 0, 0])
    e = torch.empty(0)
    t = dict(grad=e.clone(), param=e, anchor=e, importance=e, fisher=e.clone(), offsets=off,
             inv_scale=torch.ones(2), thresh=torch.ones(2), keep=torch.ones(2), lam=torch.ones(2))
    assert torch.equal(_call_step(t), torch.zeros(2, 7))
    c, th = native.group_thresholds(e, off, torch.tensor([0.5, 0.5]))
    assert torch.equal(c, torch.zeros(2)) and torch.isinf(th).all()
    native.align_(e.clone(), e, off, 0.5)
    native.consolidate_(e.clone(), e.clone(), e.clone(), e.clone(), fisher_scale=1.0, decay=1.0)


# --------------------------------------------------------------------------- torch.library

def test_opcheck_registrations():
    t = _step_tensors()
    args = tuple(t[k] for k in ARRAYS) + (t["offsets"], t["inv_scale"], t["thresh"], t["keep"],
                                          t["lam"], 0.9, "ema", "fisher", True)
    torch.library.opcheck(torch.ops.aim_kernels.fused_step.default, args)
    torch.library.opcheck(torch.ops.aim_kernels.group_thresholds.default,
                          (t["importance"], t["offsets"], torch.tensor([0.5, 0.2]), True))
    x = torch.rand(10)
    torch.library.opcheck(torch.ops.aim_kernels.consolidate_.default,
                          (x.clone(), x.clone(), x.clone(), x.clone(), 0.5, 1.0, "fisher", 1.0))
    torch.library.opcheck(torch.ops.aim_kernels.align_.default,
                          (torch.randn(10), torch.randn(10), t["offsets"], 0.5, "zero"))


def _train_step(w, grad, anchor, importance, fisher, offsets, inv_scale, thresh, keep, lam,
                fused=native.fused_step):
    """One SGD step with the regulariser: the fused op on the grads, then the update."""
    stats = fused(grad, w, anchor, importance, fisher, offsets, inv_scale, thresh,
                  keep, lam, beta=0.9, accumulate="ema", importance_kind="fisher",
                  directional=True)
    w.sub_(0.1 * grad)
    return stats.sum(0), (w * w).sum()


def _public_cpu_fused_step(*args, **kw):
    return ak.ops.fused_step(*args, **kw, backend="cpu")


@pytest.mark.parametrize("fused", [native.fused_step, _public_cpu_fused_step],
                         ids=["native", "public"])
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_traces_a_training_step(compile_backend, fused):
    """The op itself, and the validated public ``ak.ops.fused_step`` (backend chosen at
    trace time, offsets checked by value in eager mode only), trace without a break."""
    torch._dynamo.reset()
    t = _step_tensors(n=64)
    model = torch.nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        model.weight.copy_(t["param"].view(8, 8))
    model(torch.randn(4, 8)).square().sum().backward()
    grad = model.weight.grad.reshape(-1).clone()
    t["offsets"] = torch.tensor([0, 20, 64])
    eager = {k: v.clone() for k, v in t.items()}
    eager["grad"] = grad.clone()
    eager_w = model.weight.detach().reshape(-1).clone()
    want = _train_step(eager_w, *(eager[k] for k in ("grad", "anchor", "importance", "fisher",
                                                     "offsets", "inv_scale", "thresh", "keep",
                                                     "lam")), fused=fused)
    step = torch.compile(_train_step, fullgraph=True, backend=compile_backend)
    w = model.weight.detach().reshape(-1).clone()
    got = step(w, grad, *(t[k] for k in ("anchor", "importance", "fisher", "offsets", "inv_scale",
                                         "thresh", "keep", "lam")), fused=fused)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)
    assert torch.equal(w, eager_w) and torch.equal(grad, eager["grad"])
    assert torch.equal(t["fisher"], eager["fisher"])


# --------------------------------------------------------------------------- the build

def _needed(path: str) -> list[str]:
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return [line.split("[")[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf not installed")
def test_module_links_no_libtorch_and_no_cuda_runtime():
    needed = _needed(_C.__file__)
    assert not [lib for lib in needed if "torch" in lib or lib.startswith("libc10")], needed
    # static CUDA runtime, driver loaded lazily: imports on a machine without a GPU
    assert not [lib for lib in needed if "cudart" in lib or lib.startswith("libcuda")], needed


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    import pathlib
    path = pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    return str(path) if path.exists() else None


def test_cuda_code_in_the_module_matches_its_arch_list():
    """The architectures the module says it carries are really in it: SASS for each,
    PTX for the newest (by default sm_80, sm_86, sm_89, sm_90 + compute_90)."""
    info = native.built_info()
    if not _C.has_cuda:
        pytest.skip("built without CUDA (no nvcc at build time)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump here")
    archs = info["archs"].split(",")
    elf = subprocess.run([tool, "--list-elf", _C.__file__], capture_output=True, text=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", _C.__file__], capture_output=True, text=True).stdout
    assert sorted(set(re.findall(r"sm_(\d+)\.cubin", elf)), key=int) == sorted(archs, key=int), elf
    assert re.findall(r"sm_(\d+)\.ptx", ptx) == [max(archs, key=int)], ptx


def test_import_needs_no_driver():
    """The module imports, and the driver is asked only when the cuda backend is probed."""
    out = subprocess.run([sys.executable, "-c", "import aim_kernels._C as c; print(c.has_cuda)"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(not _C.has_cuda, reason="built without CUDA")
def test_driver_older_than_build_falls_back_with_warning(monkeypatch):
    built = _C.cuda_runtime_version()
    monkeypatch.setattr(native, "_C", _FakeC(_C, driver=(built // 1000 - 1) * 1000 + 40))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        why = native.unavailable_reason("cuda")
    assert f"built for CUDA {built // 1000}." in why and "driver supports" in why
    assert any("falling back" in str(w.message) for w in caught)
    monkeypatch.setattr(native, "_C", _FakeC(_C, driver=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "no NVIDIA driver" in native.unavailable_reason("cuda")


class _FakeC:
    def __init__(self, real, driver):
        self._real, self._driver = real, driver

    def cuda_driver_version(self):
        return self._driver

    def __getattr__(self, name):
        return getattr(self._real, name)


# --------------------------------------------------------------------------- CUDA only

@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream_and_in_a_graph():
    if not CUDA_OK:
        pytest.skip(f"cuda backend: {B.unavailable_reason('cuda')}")
    sizes = [5000, 0, 300_001, 7]
    host, dev = step_inputs(sizes, BF16, F32, 3, True, dict.fromkeys(ARRAYS, 0), "cuda", (0.5,))
    kw = dict(beta=0.99, accumulate="ema", importance_kind="fisher", directional=True)
    args = lambda d: (*(d[k] for k in ARRAYS), d["offsets"], d["inv_scale"], d["thresh"],  # noqa: E731
                      d["keep"], d["lam"])
    eager = {k: v.clone() for k, v in dev.items()}
    want = native.fused_step(*args(eager), **kw)

    s = torch.cuda.Stream()
    side = {k: v.clone() for k, v in dev.items()}
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = native.fused_step(*args(side), **kw)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert torch.equal(side["grad"], eager["grad"])

    graphed = {k: v.clone() for k, v in dev.items()}
    static = {k: v.clone() for k, v in dev.items()}
    g = torch.cuda.CUDAGraph()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):          # warm-up outside capture
        native.fused_step(*args({k: v.clone() for k, v in dev.items()}), **kw)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = native.fused_step(*args(graphed), **kw)
    for k in graphed:
        graphed[k].copy_(static[k])
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=0)
    assert torch.equal(graphed["grad"], eager["grad"])
    assert torch.equal(graphed["fisher"], eager["fisher"])


@pytest.mark.parametrize("case", [c for c in C.step_cases() if c.n > 100][:24], ids=C.case_id)
def test_cpu_isa_paths_agree_bit_for_bit(case):
    """Every instruction-set build of the CPU ops (baseline x86-64, AVX2, AVX-512) gives
    the same bits (the stats: the same sums in lanes of another width, within rounding)."""
    isas = native.cpu_isas()
    if len(isas) < 2:
        pytest.skip("this CPU (or build) has only the baseline code path")
    outs = {}
    for isa in isas:
        with native.using_cpu_isa(isa):
            t = C.make_tensors(case)
            args, kw = C.step_args(case, t)
            outs[isa] = (native.fused_step(*args, **kw), t["grad"], t["fisher"],
                         native.group_thresholds(t["importance"], t["offsets"], t["mask_ratio"]))
    s0, g0, f0, th0 = outs["default"]
    for isa in isas[1:]:
        s1, g1, f1, th1 = outs[isa]
        same_bits(g1, g0, f"grad ({isa})")
        same_bits(f1, f0, f"fisher ({isa})")
        assert torch.equal(th0[0], th1[0]) and torch.equal(th0[1], th1[1]), isa
        torch.testing.assert_close(s1, s0, rtol=2e-6, atol=0)
