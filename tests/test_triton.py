"""The Triton backend beyond the shared matrix of ``test_backends.py``.

Tiers (the file is cheap to collect; each test says what it needs):
* always: dispatch order of ``backend="auto"`` and the availability/skip reasons (no kernel
  runs, so these are instant);
* ``TRITON_INTERPRET=1`` (``make test`` runs it, CPU tensors): hypothesis fuzzing against
  the reference with few small examples (fp32 and fp16 storage, which the interpreter
  rounds like a GPU; bf16 only where nothing is rounded to it -- thresholds, alignment --
  since the interpreter truncates fp32 -> bf16; bf16 arithmetic results run on a GPU), the
  launch count per op whatever G, autotuning off, and the autotuned launch path itself
  driven with a fake timer (so its restore/reset hooks are checked on CPU);
* ``AIM_TRITON_AOT=1`` (``make test`` runs it, no GPU needed): every kernel compiled to an
  sm_80 / sm_90 cubin by Triton's own compiler: no register spills (``ptxas -v``), vector
  loads on the unmasked bulk path, round-to-nearest bf16 stores, no FMA contraction;
* a CUDA GPU (``cuda`` mark): no host sync inside the ops, and a large multi-block case
  through real autotuning.
"""
from __future__ import annotations

import math
import os
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aim_kernels as ak
import aim_kernels.ops as ops
from aim_kernels.ops import backends as B
from aim_kernels.ops import reference
from tests import cases as C
from tests.test_backends import check_output, check_stats, expected_step, upcast

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

interpreter = pytest.mark.skipif(
    not B.triton_interpreting() or bool(B.unavailable_reason("triton")),
    reason="runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 "
           "(`make test` runs this tier)")


def kernels():
    from aim_kernels.ops import triton_kernels
    return triton_kernels


# --------------------------------------------------------------------------- dispatch (always)

@pytest.fixture
def fake_backends(monkeypatch):
    """Every backend 'built'; the test says which ones are unavailable."""
    modules = {name: types.SimpleNamespace(name=name) for name in B.BACKENDS}
    missing: set[str] = set()
    monkeypatch.setattr(B, "_probe", lambda name: (modules[name], ""))
    monkeypatch.setattr(B, "unavailable_reason",
                        lambda name: f"{name} missing" if name in missing else "")
    return missing


@pytest.mark.parametrize("missing,expected", [
    ((), "cuda"),                       # compiled CUDA first
    (("cuda",), "triton"),              # else Triton
    (("cuda", "triton"), "torch"),      # else the reference
    (("triton",), "cuda"),
])
def test_triton_auto_order_on_cuda_tensors(fake_backends, missing, expected):
    fake_backends.update(missing)
    assert B.resolve("auto", torch.device("cuda"), "op").name == expected


@pytest.mark.parametrize("interpreting", [False, True])
def test_triton_never_auto_on_cpu_tensors(fake_backends, monkeypatch, interpreting):
    monkeypatch.setattr(B, "triton_interpreting", lambda: interpreting)
    assert B.resolve("auto", torch.device("cpu"), "op").name == "cpu"
    fake_backends.add("cpu")
    assert B.resolve("auto", torch.device("cpu"), "op").name == "torch"
    # asked for by name, Triton runs CPU tensors only under the interpreter
    if interpreting:
        assert B.resolve("triton", torch.device("cpu"), "op").name == "triton"
    else:
        with pytest.raises(B.BackendUnavailable, match="cannot run on tensors on device cpu"):
            B.resolve("triton", torch.device("cpu"), "op")


def test_triton_availability_and_skip_reason(monkeypatch):
    import importlib.util
    installed = importlib.util.find_spec("triton") is not None
    usable = installed and (torch.cuda.is_available() or B.triton_interpreting())
    assert ("triton" in ak.available_backends()) == usable
    # without a GPU and without the interpreter: unavailable, and the reason says what to do
    monkeypatch.setattr(B, "triton_interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    why = B.unavailable_reason("triton")
    assert why and ("TRITON_INTERPRET=1" in why or "not installed" in why)
    assert "triton" not in ak.available_backends()
    with pytest.raises(B.BackendUnavailable, match="backend 'triton' is not available"):
        ops.consolidate_(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3),
                         fisher_scale=1.0, decay=1.0, backend="triton")
    # ... and the backend matrix skips its Triton cases with that reason
    from tests.test_backends import backend_marks
    skips = [m for m in backend_marks("triton") if m.name == "skip"]
    assert skips and why in skips[0].kwargs["reason"]


# --------------------------------------------------------------------------- interpreter tier

def thresholds_against_reference(t: dict, device: str = "cpu", normalize: bool = True):
    """Triton's ``(inv_scale, thresh)`` on ``device`` against the reference's: thresh
    exactly, inv_scale to rtol 1e-5. Returns Triton's thresh (on the host)."""
    c_ref, t_ref = reference.group_thresholds(t["importance"], t["offsets"], t["mask_ratio"],
                                              normalize=normalize)
    d = {k: t[k].to(device) for k in ("importance", "offsets", "mask_ratio")}
    c_got, t_got = ops.group_thresholds(d["importance"], d["offsets"], d["mask_ratio"],
                                        normalize=normalize, backend="triton")
    c_got, t_got = c_got.cpu(), t_got.cpu()
    assert torch.equal(t_got, t_ref), f"thresh is exact: {t_got.tolist()} != {t_ref.tolist()}"
    torch.testing.assert_close(c_got, c_ref, rtol=1e-5, atol=0)
    return t_got


FUZZ = settings(max_examples=8, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
sizes_st = st.lists(st.integers(0, 70), min_size=1, max_size=6)


def _step_against_reference(case):
    t = C.make_tensors(case)
    ref, ref_stats, ref32, ref32_stats = expected_step(case, t)
    got = C.clone(t)
    args, kw = C.step_args(case, got)
    stats = ops.fused_step(*args, **kw, backend="triton")
    check_output("grad", got["grad"], ref["grad"], ref32["grad"])
    check_output("fisher", got["fisher"], ref["fisher"], ref32["fisher"])
    check_stats(stats, ref_stats, ref32_stats, case.dtype)


@interpreter
@FUZZ
@given(sizes=sizes_st, dtype=st.sampled_from([F32, F16]), flags=st.sampled_from(C.FLAGS),
       beta=st.sampled_from([0.0, 1.0, 0.9, 0.37]),
       ratio=st.lists(st.floats(0.0, 0.99), min_size=1, max_size=6),
       keep=st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=1, max_size=6),
       normalize=st.booleans(), nonfinite=st.booleans(), omega=st.sampled_from(C.OMEGA_KINDS),
       seed=st.integers(0, 2 ** 31 - 1))
def test_triton_fused_step_fuzz(sizes, dtype, flags, beta, ratio, keep, normalize, nonfinite,
                                omega, seed):
    acc, kind, directional = flags
    case = C.Case("step", "n1", dtype=dtype, state_dtype=dtype if seed % 2 else F32,
                  beta=beta, accumulate=acc, importance_kind=kind, directional=directional,
                  normalize=normalize, nonfinite=nonfinite, omega=omega, seed=seed,
                  custom_sizes=tuple(sizes), custom_ratio=tuple(ratio), custom_keep=tuple(keep))
    _step_against_reference(case)


@interpreter
@FUZZ
@given(sizes=sizes_st, ratio=st.lists(st.floats(0.0, 0.999), min_size=1, max_size=6),
       ratio_dtype=st.sampled_from([F32, torch.float64]),
       state_dtype=st.sampled_from([F32, F16, BF16]),
       omega=st.sampled_from(C.OMEGA_KINDS), normalize=st.booleans(),
       seed=st.integers(0, 2 ** 31 - 1))
def test_triton_group_thresholds_fuzz(sizes, ratio, ratio_dtype, state_dtype, omega, normalize,
                                      seed):
    case = C.Case("thresholds", "n1", state_dtype=state_dtype, omega=omega, normalize=normalize,
                  ratio_dtype=ratio_dtype, seed=seed, custom_sizes=tuple(sizes),
                  custom_ratio=tuple(ratio))
    thresholds_against_reference(C.make_tensors(case), normalize=normalize)


@interpreter
@FUZZ
@given(sizes=sizes_st, dtype=st.sampled_from([F32, F16, BF16]),
       mode=st.sampled_from(["anchor", "zero"]),
       ratio=st.one_of(st.sampled_from([0.0, 1.0, 0.7, 0.5]), st.floats(0.0, 1.0)),
       kind=st.sampled_from(["random", "ties", "zeros"]), seed=st.integers(0, 2 ** 31 - 1))
def test_triton_align_fuzz(sizes, dtype, mode, ratio, kind, seed):
    case = C.Case("align", "n1", dtype=dtype, align_mode=mode, align_ratio=ratio,
                  anchor_kind=kind, seed=seed, custom_sizes=tuple(sizes))
    t = C.make_tensors(case)
    ref = C.clone(t)
    reference.align_(ref["param"], ref["anchor"], ref["offsets"], ratio, mode=mode)
    ops.align_(t["param"], t["anchor"], t["offsets"], ratio, mode=mode, backend="triton")
    assert torch.equal(t["param"], ref["param"]), "alignment is exact"


@interpreter
@FUZZ
@given(n=st.integers(0, 300), dtype=st.sampled_from([F32, F16]),
       merge=st.sampled_from([None, "fisher", "linear"]),
       alpha=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
       decay=st.sampled_from([1.0, 0.5, 0.0]), fisher_scale=st.floats(0.01, 100.0),
       seed=st.integers(0, 2 ** 31 - 1))
def test_triton_consolidate_fuzz(n, dtype, merge, alpha, decay, fisher_scale, seed):
    case = C.Case("consolidate", "n1", dtype=dtype, state_dtype=dtype if seed % 2 else F32,
                  merge=merge, alpha=alpha, decay=decay, fisher_scale=fisher_scale, seed=seed,
                  custom_sizes=(n,))
    t = C.make_tensors(case)
    names = ("param", "anchor", "importance", "fisher")
    kw = dict(fisher_scale=fisher_scale, decay=decay, merge=merge, alpha=alpha)
    ref, ref32 = C.clone(t), upcast(t)
    reference.consolidate_(*(ref[k] for k in names), **kw)
    reference.consolidate_(*(ref32[k] for k in names), **kw)
    ops.consolidate_(*(t[k] for k in names), **kw, backend="triton")
    check_output("param", t["param"], ref["param"], ref32["param"])
    check_output("importance", t["importance"], ref["importance"], ref32["importance"])
    assert torch.equal(t["anchor"], t["param"]) and not t["fisher"].any()


@interpreter
def test_triton_autotune_off_under_interpreter(monkeypatch):
    K = kernels()
    assert not K.autotuned()
    monkeypatch.setattr(B, "triton_interpreting", lambda: False)
    assert K.autotuned(), "the helper of backends.py is the one switch"
    monkeypatch.undo()

    class Refuse:
        def __getitem__(self, grid):
            raise AssertionError("the autotuned kernel was launched under the interpreter")
    for name, (plain, tuned, fixed, roles) in list(K._KERNELS.items()):
        monkeypatch.setitem(K._KERNELS, name, (plain, Refuse(), fixed, roles))
    case = C.Case("step", "g5_129", mask="keep0.5", nonfinite=True, seed=1)
    _step_against_reference(case)


@interpreter
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_triton_chunks_of_every_kind(dtype):
    """With the interpreter's chunks of 128 (2 tiles of 64), sizes (50, 100, 0, 3, 300) give
    full chunks across groups, a full chunk inside a group, a partial chunk inside a group;
    g5_129's second chunk is a partial one across groups."""
    for sizes in ((50, 100, 0, 3, 300), (129, 2, 64, 31, 1)):
        case = C.Case("step", "n1", dtype=dtype, mask="mixed", nonfinite=True, seed=7,
                      custom_sizes=sizes)
        _step_against_reference(case)


@interpreter
def test_triton_thresholds_without_histogram_masks(monkeypatch):
    """The path for Triton < 3.4 (no ``mask=`` in ``tl.histogram``): excluded lanes are
    counted in slot 0 and subtracted."""
    monkeypatch.setattr(kernels(), "HIST_MASK", False)
    for shape, omega in (("g5_129", "ties"), ("empty_middle", "random")):
        case = C.Case("thresholds", shape, mask="mixed", omega=omega, seed=5)
        thresholds_against_reference(C.make_tensors(case))


@interpreter
def test_triton_model_level_two_tasks_match_torch():
    """attach / masked_step (with alignment every 2 steps) / consolidate (Fisher merge)
    through AIMConfig(backend="triton"), against the same run with backend="torch"."""
    from tests.vlm_toy import ToyVLM, backward, snapshot, toy_groups
    runs = {}
    for backend in ("torch", "triton"):
        model = ToyVLM(0)
        state = ak.attach(model, ak.AIMConfig(groups=toy_groups(0.25, 0.0, 1.0), backend=backend,
                                              align_every=2, merge="fisher", merge_alpha=0.5))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        stats = []
        for task in range(2):
            for seed in range(3):
                opt.zero_grad(set_to_none=False)
                backward(model, 10 * task + seed)
                stats.append(ak.masked_step(model).as_dict())
                opt.step()
            ak.consolidate(model)
        runs[backend] = snapshot(model, state), stats
        ak.detach(model)
    (want, want_stats), (got, got_stats) = runs["torch"], runs["triton"]
    assert got.keys() == want.keys()
    for key in want:
        if want[key].is_floating_point():
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert torch.equal(got[key], want[key]), key
    for g, w in zip(got_stats, want_stats):
        for group in w:
            assert g[group]["masked"] == w[group]["masked"]
            for name, value in w[group].items():
                assert math.isclose(g[group][name], value, rel_tol=1e-4, abs_tol=1e-12), name


@interpreter
@pytest.mark.parametrize("num_groups", [1, 40])
def test_triton_launches_per_call_do_not_grow_with_groups(monkeypatch, num_groups):
    """fused_step / consolidate_: one kernel; thresholds: 4 radix passes x (histogram, pick);
    align_: the same select plus one kernel -- for any number of groups."""
    K = kernels()
    launches = []
    real_launch, real_pick = K._launch, K._launch_pick
    monkeypatch.setattr(K, "_launch", lambda name, *a, **k: (launches.append(name),
                                                             real_launch(name, *a, **k)))
    monkeypatch.setattr(K, "_launch_pick", lambda *a, **k: (launches.append("pick"),
                                                            real_pick(*a, **k)))
    sizes = tuple((7 * g) % 5 for g in range(num_groups)) if num_groups > 1 else (90,)
    case = C.Case("step", "n1", mask="keep0.5", custom_sizes=sizes, seed=3)
    _step_against_reference(case)
    assert launches == ["step"]
    launches.clear()
    t = C.make_tensors(case)
    ops.group_thresholds(t["importance"], t["offsets"], t["mask_ratio"], backend="triton")
    assert launches == ["hist", "pick"] * 4
    launches.clear()
    ops.align_(t["param"], t["anchor"], t["offsets"], 0.5, backend="triton")
    assert launches == ["hist", "pick"] * 4 + ["align"]
    launches.clear()
    ops.consolidate_(t["param"], t["anchor"], t["importance"], t["fisher"], fisher_scale=2.0,
                     decay=1.0, merge="linear", alpha=0.5, backend="triton")
    assert launches == ["consolidate"]


@interpreter
@pytest.mark.filterwarnings("ignore::RuntimeWarning")    # numpy, in the interpreter: inf - inf
@pytest.mark.parametrize("cap_log2", [24, 6], ids=["whole", "prefix"])
def test_triton_autotuned_path_with_a_fake_timer(monkeypatch, cap_log2):
    """The GPU launch path (``triton.autotune`` with every config timed, then the winner)
    driven on CPU: tuning runs the in-place kernels several times, so the results prove
    that ``restore_value`` / ``reset_to_zero`` undo every trial run -- and, with a cap
    below the inputs' size ("prefix"), that tuning on the first 2^cap elements leaves no
    trace either."""
    K = kernels()
    monkeypatch.setattr(K, "autotuned", lambda: True)              # -> the GPU launch path
    monkeypatch.setattr(K, "TUNE_MIN_N", 0)                        # tune even tiny inputs
    monkeypatch.setattr(K, "TUNE_CAP_LOG2", cap_log2)
    monkeypatch.setattr(K, "_TUNED", set())
    calls = []

    def fake_bench(kernel_call, quantiles):
        for _ in range(2):
            kernel_call()
        calls.append(1)
        return [float(len(calls) % 3 + 1)] * len(quantiles)
    monkeypatch.setattr(K, "_bench", fake_bench)
    for _, tuned, _, _ in K._KERNELS.values():     # tune afresh (the cache is per N, dtypes)
        monkeypatch.setattr(tuned, "cache", {})
    case = C.Case("step", "g5_129", mask="mixed", nonfinite=True, seed=11)
    _step_against_reference(case)
    assert len(calls) == len(K._STEP_CONFIGS)
    t = C.make_tensors(case)
    thresholds_against_reference(t)
    ref = C.clone(t)
    reference.consolidate_(ref["param"], ref["anchor"], ref["importance"], ref["fisher"],
                           fisher_scale=1.5, decay=0.5, merge="fisher", alpha=0.5)
    ops.consolidate_(t["param"], t["anchor"], t["importance"], t["fisher"], fisher_scale=1.5,
                     decay=0.5, merge="fisher", alpha=0.5, backend="triton")
    for name in ("param", "anchor", "importance", "fisher"):
        torch.testing.assert_close(t[name], ref[name], rtol=1e-5, atol=1e-6)
    a_case = C.Case("align", "g5_129", anchor_kind="ties", align_ratio=0.3, seed=2)
    t = C.make_tensors(a_case)
    ref = C.clone(t)
    reference.align_(ref["param"], ref["anchor"], ref["offsets"], 0.3)
    ops.align_(t["param"], t["anchor"], t["offsets"], 0.3, backend="triton")
    assert torch.equal(t["param"], ref["param"])
    if cap_log2 == 6:       # every kernel was tuned once, on a prefix, for its bucket
        assert {key[:2] for key in K._TUNED} == {("step", 7), ("hist", 7), ("consolidate", 7),
                                                  ("align", 7)}


# --------------------------------------------------------------------------- GPU compile check

AOT = pytest.mark.skipif(
    os.environ.get("AIM_TRITON_AOT", "0") in ("", "0") or B.triton_interpreting(),
    reason="compiles the kernels for sm_80/sm_90 with Triton's compiler (no GPU needed): "
           "set AIM_TRITON_AOT=1 without TRITON_INTERPRET (`make test` does)")


def _compile(fn, signature: dict, constexprs: dict, arch: int, num_warps: int):
    """Compiles like a launch on 16-byte aligned tensors would (pointer arguments marked
    divisible by 16; ``N`` not, as for most parameter counts)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]]
             for k, v in signature.items() if v.startswith("*")}
    src = ASTSource(fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": False})


def _spill_bytes(ptx: str, arch: int) -> int:
    """Spill stores reported by ``ptxas -v`` (the one Triton uses for ``arch``), summed
    over the kernels of ``ptx``. Skips, saying so, only when there is no ptxas to run; a
    ptxas that fails or prints no spill line fails the test (it is not 0 spills)."""
    import re
    import subprocess
    import tempfile
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(arch).path
    except (ImportError, AttributeError, FileNotFoundError, RuntimeError) as exc:
        pytest.skip(f"no ptxas to count register spills with: {type(exc).__name__}: {exc}")
    if not ptxas or not os.path.isfile(ptxas):
        pytest.skip(f"no ptxas to count register spills with: {ptxas!r} is not a file")
    target = re.search(r"\.target (sm_\w+)", ptx).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([ptxas, f"-arch={target}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"ptxas -v failed ({out.returncode}):\n{log[-2000:]}"
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill stores", log)]
    assert spills, f"ptxas -v printed no spill line:\n{log[-2000:]}"
    return sum(spills)


PTR = {F32: "*fp32", BF16: "*bf16", F16: "*fp16"}


@AOT
@pytest.mark.parametrize("arch,dtype,state_dtype", [
    (90, F32, F32), (90, BF16, F32), (90, F16, F16), (90, BF16, BF16),
    (80, F32, F32), (80, BF16, F32)], ids=["90-fp32", "90-bf16", "90-fp16", "90-bf16-state",
                                          "80-fp32", "80-bf16"])
def test_triton_kernels_compile_for_gpu(arch, dtype, state_dtype):
    pytest.importorskip("triton.backends.nvidia.compiler")
    K = kernels()
    p, s = PTR[dtype], PTR[state_dtype]
    step_sig = dict(grad_ptr=p, param_ptr=p, anchor_ptr=p, imp_ptr=s, fisher_ptr=s,
                    offsets_ptr="*i64", inv_scale_ptr="*fp32", thresh_ptr="*fp32",
                    keep_ptr="*fp32", lam_ptr="*fp32", ws_ptr="*fp64", part_ptr="*fp64",
                    pgid_ptr="*i32", N="i64", G="i32",
                    beta="fp32", one_minus_beta="fp32", tune_bucket="i32")
    # every config on one target (their register use is the point), the first elsewhere
    every = (arch, dtype, state_dtype) == (90, BF16, F32)
    jobs = []
    for cfg in (K._STEP_CONFIGS if every else K._STEP_CONFIGS[:1]):
        jobs.append(("step", K._fused_step_kernel, step_sig,
                     dict(EMA=True, FISHER=True, DIRECTIONAL=True, STEPS=2, **cfg.kwargs),
                     cfg.num_warps))
    jobs.append(("step", K._fused_step_kernel, step_sig,
                 dict(EMA=False, FISHER=False, DIRECTIONAL=False, STEPS=1, BLOCK=1024, TILES=1),
                 8))
    jobs.append(("reduce", K._stats_reduce_kernel,
                 dict(part_ptr="*fp64", pgid_ptr="*i32", ws_ptr="*fp64", P="i64", G="i32"),
                 dict(R=K.REDUCE_ROWS), 4))
    for i, cfg in enumerate(K._ELEMENTWISE_CONFIGS if every else K._ELEMENTWISE_CONFIGS[:1]):
        for merge in ((0, 1, 2) if i == 0 else (1,)):
            jobs.append(("consolidate", K._consolidate_kernel,
                         dict(param_ptr=p, anchor_ptr=p, imp_ptr=s, fisher_ptr=s, N="i64",
                              fisher_scale="fp32", decay="fp32", alpha="fp32",
                              tune_bucket="i32"),
                         dict(MERGE=merge, **cfg.kwargs), cfg.num_warps))
        for zero in ((False, True) if i == 0 else (False,)):
            jobs.append(("align", K._align_kernel,
                         dict(param_ptr=p, anchor_ptr=p, offsets_ptr="*i64", mag_ptr="*fp32",
                              N="i64", G="i32", tune_bucket="i32"),
                         dict(ZERO=zero, STEPS=3, **cfg.kwargs), cfg.num_warps))
    hist_sig = dict(x_ptr=s, offsets_ptr="*i64", ratio_ptr="*fp64", hist_ptr="*i64",
                    prefix_ptr="*i64", rem_ptr="*i64", sum_ptr="*fp64", N="i64", G="i32",
                    tune_bucket="i32")
    for i, cfg in enumerate(K._HIST_CONFIGS if every else K._HIST_CONFIGS[:1]):
        for shift, first, hist_mask in ((24, True, K.HIST_MASK), (8, False, K.HIST_MASK),
                                        (16, False, False))[:3 if every else 2]:
            jobs.append(("hist", K._hist_kernel, hist_sig,
                         dict(SHIFT=shift, FIRST=first, SUM=first, STEPS=2,
                              GW=K.HIST_WINDOW, HIST_MASK=hist_mask, **cfg.kwargs),
                         cfg.num_warps))
    for ratio in (("*fp32", "*fp64") if dtype == state_dtype == F32 else ()):   # dtype-free
        for shift, first, last in ((24, True, False), (0, False, True)):
            jobs.append(("pick", K._pick_kernel,
                         dict(hist_ptr="*i64", prefix_ptr="*i64", rem_ptr="*i64",
                              sum_ptr="*fp64", offsets_ptr="*i64", ratio_ptr=ratio,
                              inv_scale_ptr="*fp32", thresh_ptr="*fp32", G="i32"),
                         dict(SHIFT=shift, FIRST=first, LAST=last, SUM=True, NORMALIZE=True,
                              GB=K.PICK_GROUPS),
                         K.PICK_WARPS))
    import re
    for name, fn, sig, consts, warps in jobs:
        compiled = _compile(fn, sig, consts, arch, warps)
        ptx = compiled.asm["ptx"]
        assert compiled.asm["cubin"], name
        assert _spill_bytes(ptx, arch) == 0, f"{name} {consts} {warps} warps: spills"
        if name in ("step", "consolidate", "hist"):     # the unmasked bulk path is vectorised
            assert re.search(r"ld\.global(\.\w+)*\.v[24]\.", ptx), f"{name}: no vector loads"
        if dtype == BF16 and (name == "step" or (name == "consolidate" and consts["MERGE"])):
            assert "cvt.rn.bf16" in ptx, f"{name}: bf16 stores round to nearest even"
        if name == "consolidate" and consts["MERGE"] == 1:
            assert "div.rn.f32" in ptx, "the fisher merge divides exactly (IEEE)"
        if name == "step" or name == "consolidate":
            assert "fma.rn.f32" not in ptx, f"{name}: no FMA contraction"


# --------------------------------------------------------------------------- GPU

@pytest.mark.cuda
def test_triton_ops_do_not_sync_the_host():
    if B.unavailable_reason("triton") or not torch.cuda.is_available():
        pytest.skip("needs Triton and a CUDA GPU")
    case = C.Case("step", "g5_big", dtype=BF16, mask="keep0.5", nonfinite=True, seed=4)
    t = C.make_tensors(case, device="cuda")
    args, kw = C.step_args(case, t)
    ops.fused_step(*args, **kw, backend="triton")           # compile / tune outside the check
    ops.group_thresholds(t["importance"], t["offsets"], t["mask_ratio"], backend="triton")
    ops.align_(t["param"], t["anchor"], t["offsets"], 0.5, backend="triton")
    ops.consolidate_(*(t[k].clone() for k in ("param", "anchor", "importance", "fisher")),
                     fisher_scale=2.0, decay=1.0, merge="fisher", backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.fused_step(*args, **kw, backend="triton")
        # (group_thresholds validates a CPU mask_ratio; on the GPU it is not read back)
        ops.group_thresholds(t["importance"], t["offsets"], t["mask_ratio"], backend="triton")
        ops.align_(t["param"], t["anchor"], t["offsets"], 0.5, backend="triton")
        ops.consolidate_(t["param"], t["anchor"], t["importance"], t["fisher"],
                         fisher_scale=2.0, decay=1.0, merge="fisher", backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_triton_large_multiblock_against_reference(dtype):
    """3M elements over uneven groups (one of them empty): real autotuning, many chunks,
    chunks straddling groups, and thresholds over groups of ~1M elements."""
    if B.unavailable_reason("triton") or not torch.cuda.is_available():
        pytest.skip("needs Triton and a CUDA GPU")
    case = C.Case("step", "n1", dtype=dtype, mask="mixed", nonfinite=True, seed=9,
                  custom_sizes=(1_000_003, 7, 0, 1_500_000, 499_990))
    t = C.make_tensors(case)
    ref, ref_stats, ref32, ref32_stats = expected_step(case, t)
    got = {k: v.cuda() for k, v in t.items()}
    args, kw = C.step_args(case, got)
    stats = ops.fused_step(*args, **kw, backend="triton").cpu()
    check_output("grad", got["grad"].cpu(), ref["grad"], ref32["grad"])
    check_output("fisher", got["fisher"].cpu(), ref["fisher"], ref32["fisher"])
    check_stats(stats, ref_stats, ref32_stats, dtype)
    t_got = thresholds_against_reference(t, device="cuda")
    assert math.isinf(float(t_got[2]))


# --------------------------------------------------------------------------- malformed offsets

@interpreter
def test_triton_malformed_offsets_stay_in_bounds():
    """offsets[G] < n (checked by value on the host for CPU tensors only, so a GPU tensor
    can reach the kernels with it): the elements past offsets[G] are left untouched, and
    nothing past the per-group tables is read or written (row G of the stats workspace,
    a poisoned m_g and inv_scale at index G)."""
    tk = kernels()
    gen = torch.Generator().manual_seed(5)
    n, G, cover = 300, 2, 200
    offsets = torch.tensor([0, 90, cover])
    grad, param, anchor = (torch.randn(n, generator=gen) for _ in range(3))
    importance, fisher = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    table = lambda v: torch.tensor([v, v, float("nan")])[:G]   # noqa: E731 (poison at G)
    inv_scale, thresh, keep, lam = table(1.0), table(0.5), table(0.0), table(2.0)
    guard = 12345.0
    ws = torch.full(((G + 2) * 7,), guard, dtype=torch.float64)
    ws[:G * 7] = 0
    g0, f0 = grad.clone(), fisher.clone()
    tk._step_into(ws[:G * 7].view(G, 7), grad, param, anchor, importance, fisher, offsets,
                  inv_scale, thresh, keep, lam, beta=0.9, ema=True, fisher_kind=True,
                  directional=True)
    assert torch.equal(ws[G * 7:], torch.full(((2) * 7,), guard, dtype=torch.float64)), \
        "stats written past row G-1"
    assert torch.equal(grad[cover:], g0[cover:]) and torch.equal(fisher[cover:], f0[cover:])
    ref_g, ref_f = g0[:cover].clone(), f0[:cover].clone()
    ref_stats = reference.fused_step(ref_g, param[:cover], anchor[:cover], importance[:cover],
                                     ref_f, offsets, inv_scale, thresh, keep, lam, beta=0.9)
    torch.testing.assert_close(grad[:cover], ref_g)
    torch.testing.assert_close(ws[:G * 7].view(G, 7).float(), ref_stats, rtol=1e-5, atol=1e-5)

    # select: the large values past offsets[G] must not count
    big = importance.clone()
    big[cover:] = 100.0
    ratio = torch.tensor([0.3, 0.5], dtype=torch.float64)
    c, t = tk.group_thresholds(big, offsets, ratio)
    c_ref, t_ref = reference.group_thresholds(big[:cover], offsets, ratio)
    assert torch.equal(t, t_ref)
    torch.testing.assert_close(c, c_ref)

    # align: m_g poisoned to 0 at index G would reset every element past offsets[G]
    p = param.clone()
    a = torch.where(p > 0, -1.0, 1.0)             # every element conflicts in sign
    m_full = torch.tensor([0.5, 0.5, 0.0])
    tk.align_apply_(p, a, offsets, m_full[:G])
    assert torch.equal(p[cover:], param[cover:]), "an element past offsets[G] was reset"
    assert torch.equal(p[:cover], a[:cover])


# --------------------------------------------------------------------------- torch.compile

@interpreter
def test_triton_ops_are_registered_custom_ops():
    t = kernels()
    x = torch.rand(40)
    off = torch.tensor([0, 15, 40])
    per = [torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.3]), torch.zeros(2), torch.ones(2)]
    tri = torch.ops.aim_kernels_triton
    torch.library.opcheck(tri.fused_step.default,
                          (torch.randn(40), torch.randn(40), torch.randn(40), x.clone(),
                           x.clone(), off, *per, 0.9, "ema", "fisher", True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(tri.group_thresholds.default,
                          (x, off, torch.tensor([0.5, 0.2], dtype=torch.float64), True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(tri.align_apply_.default,
                          (torch.randn(40), torch.randn(40), off, torch.tensor([0.5, 0.1]),
                           "zero"), test_utils=("test_schema", "test_faketensor"))
    assert t.fused_step.__module__ == t.__name__


def _triton_train_step(w, grad, anchor, importance, fisher, offsets, inv_scale, thresh, keep,
                       lam, m_g):
    stats = ak.ops.fused_step(grad, w, anchor, importance, fisher, offsets, inv_scale, thresh,
                              keep, lam, beta=0.9, backend="triton")
    w.sub_(0.1 * grad)
    ak.ops.align_apply_(w, anchor, offsets, m_g, backend="triton")
    return stats.sum(0), (w * w).sum()


@interpreter
def test_triton_step_compiles_with_fullgraph():
    """torch.compile(fullgraph=True) of a step whose ops run on the Triton backend: the
    custom ops stay one node each (no graph break), results as in eager mode."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(4)
    n = 96
    off = torch.tensor([0, 30, n])
    args = [torch.randn(n, generator=gen) for _ in range(3)] + \
        [torch.rand(n, generator=gen) for _ in range(2)]
    per = [torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.3]), torch.zeros(2), torch.ones(2),
           torch.tensor([0.8, 1.5])]
    w, grad, anchor, imp, fisher = args
    eager = [a.clone() for a in args]
    want = _triton_train_step(eager[0], eager[1], eager[2], eager[3], eager[4], off, *per)
    step = torch.compile(_triton_train_step, fullgraph=True, backend="aot_eager")
    got = step(w, grad, anchor, imp, fisher, off, *per)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)
    assert torch.equal(w, eager[0]) and torch.equal(grad, eager[1])
    assert torch.equal(fisher, eager[4])
