"""Bad arguments to the four public ops (DESIGN.md 3): each raises an exception whose
message names the argument, before anything is touched (every tensor is compared
with a clone taken before the call)."""
from __future__ import annotations

import math

import pytest
import torch

import aim_kernels.ops as ops
from aim_kernels.ops import backends as B

N = 11
SIZES = (4, 0, 7)
G = len(SIZES)
ERRORS = (ValueError, TypeError, ops.BackendUnavailable)


# --------------------------------------------------------------------------- valid inputs

def vec(n=N, dtype=torch.float32, seed=0, positive=False):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=gen)
    return (t.abs() if positive else t).to(dtype)


def offsets():
    return torch.tensor([0, 4, 4, 11], dtype=torch.int64)


def good(op: str) -> dict:
    """Valid arguments of ``op`` as a name -> value dict (keyword-callable)."""
    if op == "fused_step":
        return dict(grad=vec(seed=1), param=vec(seed=2), anchor=vec(seed=3),
                    importance=vec(seed=4, positive=True), fisher=vec(seed=5, positive=True),
                    offsets=offsets(), inv_scale=torch.ones(G), thresh=torch.full((G,), 0.5),
                    keep=torch.full((G,), 0.5), lam=torch.ones(G), beta=0.9, accumulate="ema",
                    importance_kind="fisher", directional=True)
    if op == "group_thresholds":
        return dict(importance=vec(seed=4, positive=True), offsets=offsets(),
                    mask_ratio=torch.full((G,), 0.5), normalize=True)
    if op == "consolidate_":
        return dict(param=vec(seed=2), anchor=vec(seed=3), importance=vec(seed=4, positive=True),
                    fisher=vec(seed=5, positive=True), fisher_scale=1.0, decay=1.0,
                    merge="fisher", alpha=1.0)
    if op == "align_":
        return dict(param=vec(seed=2), anchor=vec(seed=3), offsets=offsets(), align_ratio=0.5,
                    mode="anchor")
    raise KeyError(op)


OPS = ("fused_step", "group_thresholds", "consolidate_", "align_")
VECTORS = {   # length-N tensors; the first one of each op sets N, device and dtype
    "fused_step": ("grad", "param", "anchor", "importance", "fisher"),
    "group_thresholds": ("importance",),
    "consolidate_": ("param", "anchor", "importance", "fisher"),
    "align_": ("param", "anchor"),
}
PER_GROUP = {
    "fused_step": ("inv_scale", "thresh", "keep", "lam"),
    "group_thresholds": ("mask_ratio",),
    "consolidate_": (),
    "align_": (),
}
HAS_OFFSETS = ("fused_step", "group_thresholds", "align_")


def call(op: str, kwargs: dict, backend="torch"):
    return getattr(ops, op)(**kwargs, backend=backend)


def tensors_of(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items()
            if isinstance(v, torch.Tensor) and v.device.type != "meta"}


def snapshot(kwargs: dict) -> dict:
    out = {}
    for k, v in tensors_of(kwargs).items():
        out[k] = v.to_dense().clone() if v.layout != torch.strided else v.clone()
    return out


def assert_rejected(op: str, kwargs: dict, name: str, backend="torch", exc=ERRORS,
                    also=()):
    """The call raises ``exc`` naming ``name`` and leaves every tensor as it was."""
    before = snapshot(kwargs)
    with pytest.raises(exc) as info:
        call(op, kwargs, backend)
    msg = str(info.value)
    assert name in msg, f"message does not name `{name}`: {msg}"
    for word in also:
        assert word in msg, f"message does not say {word!r}: {msg}"
    after = snapshot(kwargs)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, k=k: f"{k} was modified: {m}")
    return msg


def test_good_arguments_run():
    """Sanity: the valid arguments used below are accepted (so each rejection is caused by
    the one bad argument)."""
    for op in OPS:
        call(op, good(op))


# --------------------------------------------------------------------------- tensors

def _noncontig(t):
    buf = torch.zeros(2 * t.numel(), dtype=t.dtype)
    v = buf[::2]
    v.copy_(t)
    assert not v.is_contiguous()
    return v


BAD_TENSOR = {
    "short": lambda t: t[:-1].clone(),
    "long": lambda t: torch.cat([t, t[:1]]),
    "float64": lambda t: t.double(),
    "int32": lambda t: t.to(torch.int32),
    "2d": lambda t: t.reshape(1, -1).clone(),
    "0d": lambda t: t[0].clone(),
    "noncontiguous": _noncontig,
    "sparse": lambda t: t.to_sparse(),
    "meta": lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"),
    "list": lambda t: t.tolist(),
}


def _vector_params():
    out = []
    for op in OPS:
        for i, name in enumerate(VECTORS[op]):
            for kind in BAD_TENSOR:
                # A length or device mismatch on the *first* vector is reported on the next
                # tensor checked against it (offsets for group_thresholds), which is then
                # the odd one out: see test_first_vector_mismatch_names_an_argument.
                if i == 0 and kind in ("short", "long", "meta"):
                    continue
                out.append(pytest.param(op, name, kind, id=f"{op}-{name}-{kind}"))
    return out


@pytest.mark.parametrize("op,name,kind", _vector_params())
def test_bad_vector(op, name, kind):
    kwargs = good(op)
    kwargs[name] = BAD_TENSOR[kind](kwargs[name])
    assert_rejected(op, kwargs, name)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", ["short", "long", "meta"])
def test_first_vector_mismatch_names_an_argument(op, kind):
    """A length/device mismatch on the leading vector raises too, naming the tensor found
    inconsistent with it (a vector, or offsets)."""
    kwargs = good(op)
    first = VECTORS[op][0]
    kwargs[first] = BAD_TENSOR[kind](kwargs[first])
    before = snapshot(kwargs)
    with pytest.raises(ERRORS) as info:
        call(op, kwargs)
    msg = str(info.value)
    assert any(f"`{n}`" in msg for n in VECTORS[op] + ("offsets",)), msg
    for k, v in snapshot(kwargs).items():
        assert torch.equal(v, before[k])


DTYPE_PAIRS = {   # tensors that must share one dtype
    "fused_step": [("param", torch.bfloat16), ("anchor", torch.float16),
                   ("fisher", torch.bfloat16), ("importance", torch.float16)],
    "consolidate_": [("anchor", torch.bfloat16), ("param", torch.float16),
                     ("fisher", torch.float16), ("importance", torch.bfloat16)],
    "align_": [("anchor", torch.bfloat16), ("param", torch.float16)],
}


@pytest.mark.parametrize("op,name,dtype", [pytest.param(op, n, d, id=f"{op}-{n}-{d}")
                                           for op, pairs in DTYPE_PAIRS.items()
                                           for n, d in pairs])
def test_mixed_storage_dtypes(op, name, dtype):
    kwargs = good(op)
    kwargs[name] = kwargs[name].to(dtype)
    assert_rejected(op, kwargs, name)


# --------------------------------------------------------------------------- offsets

BAD_OFFSETS = {
    "not_from_0": lambda: torch.tensor([1, 4, 4, 11]),
    "not_to_N": lambda: torch.tensor([0, 4, 4, 10]),
    "past_N": lambda: torch.tensor([0, 4, 4, 12]),
    "decreasing": lambda: torch.tensor([0, 5, 4, 11]),
    "negative": lambda: torch.tensor([0, -1, 4, 11]),
    "int32": lambda: torch.tensor([0, 4, 4, 11], dtype=torch.int32),
    "float": lambda: torch.tensor([0.0, 4.0, 4.0, 11.0]),
    "2d": lambda: torch.tensor([[0, 4, 4, 11]]),
    "empty": lambda: torch.zeros(0, dtype=torch.int64),
    "noncontiguous": lambda: torch.tensor([0, 9, 4, 9, 4, 9, 11, 9])[::2],
    "sparse": lambda: torch.tensor([0, 4, 4, 11]).to_sparse(),
    "meta": lambda: torch.empty(4, dtype=torch.int64, device="meta"),
    "list": lambda: [0, 4, 4, 11],
}


@pytest.mark.parametrize("op", HAS_OFFSETS)
@pytest.mark.parametrize("kind", list(BAD_OFFSETS))
def test_bad_offsets(op, kind):
    kwargs = good(op)
    kwargs["offsets"] = BAD_OFFSETS[kind]()
    if kind in ("not_from_0", "not_to_N", "past_N", "decreasing", "negative"):
        assert not kwargs["offsets"].is_cuda      # checked by value on the CPU only
    assert_rejected(op, kwargs, "offsets")


# --------------------------------------------------------------------------- per-group

BAD_PER_GROUP = {
    "short": lambda t: t[:-1].clone(),
    "long": lambda t: torch.cat([t, t[:1]]),
    "float16": lambda t: t.half(),
    "bfloat16": lambda t: t.bfloat16(),
    "int64": lambda t: t.long(),
    "2d": lambda t: t.reshape(1, -1).clone(),
    "noncontiguous": _noncontig,
    "meta": lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"),
    "scalar": lambda t: 0.5,
}


@pytest.mark.parametrize("op,name", [(op, n) for op in OPS for n in PER_GROUP[op]])
@pytest.mark.parametrize("kind", list(BAD_PER_GROUP) + ["float64"])
def test_bad_per_group(op, name, kind):
    kwargs = good(op)
    if kind == "float64":
        if name == "mask_ratio":
            kwargs[name] = kwargs[name].double()
            call(op, kwargs)      # fp64 mask_ratio is allowed (exact k = floor(rho * n))
            return
        kwargs[name] = kwargs[name].double()
    else:
        kwargs[name] = BAD_PER_GROUP[kind](kwargs[name])
    assert_rejected(op, kwargs, name)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, math.nan, -math.inf, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_ratio_outside_unit_interval(value, dtype):
    kwargs = good("group_thresholds")
    ratio = torch.full((G,), 0.5, dtype=dtype)
    ratio[1] = value
    kwargs["mask_ratio"] = ratio
    assert_rejected("group_thresholds", kwargs, "mask_ratio")


@pytest.mark.parametrize("value", [0.0, 0.999, 0.5])
def test_mask_ratio_inside_unit_interval_is_accepted(value):
    kwargs = good("group_thresholds")
    kwargs["mask_ratio"] = torch.full((G,), value)
    call("group_thresholds", kwargs)


# --------------------------------------------------------------------------- scalars

BAD_SCALARS = [
    ("fused_step", "beta", -0.1), ("fused_step", "beta", 1.01), ("fused_step", "beta", math.nan),
    ("fused_step", "beta", None), ("fused_step", "beta", "high"), ("fused_step", "beta", [0.9]),
    ("fused_step", "accumulate", "mean"), ("fused_step", "accumulate", None),
    ("fused_step", "accumulate", "EMA"),
    ("fused_step", "importance_kind", "grad"), ("fused_step", "importance_kind", None),
    ("consolidate_", "merge", "avg"), ("consolidate_", "merge", "none"),
    ("consolidate_", "merge", "Fisher"), ("consolidate_", "merge", 0),
    ("consolidate_", "fisher_scale", 0.0), ("consolidate_", "fisher_scale", -1.0),
    ("consolidate_", "fisher_scale", math.nan), ("consolidate_", "fisher_scale", None),
    ("consolidate_", "decay", -0.5), ("consolidate_", "decay", math.nan),
    ("consolidate_", "decay", None),
    ("consolidate_", "alpha", -1.0), ("consolidate_", "alpha", math.nan),
    ("consolidate_", "alpha", None),
    ("align_", "align_ratio", -0.1), ("align_", "align_ratio", 1.5),
    ("align_", "align_ratio", math.nan), ("align_", "align_ratio", None),
    ("align_", "mode", "flip"), ("align_", "mode", None), ("align_", "mode", "Anchor"),
]


@pytest.mark.parametrize("op,name,value", [pytest.param(*p, id=f"{p[0]}-{p[1]}-{p[2]!r}")
                                           for p in BAD_SCALARS])
def test_bad_scalar(op, name, value):
    kwargs = good(op)
    kwargs[name] = value
    assert_rejected(op, kwargs, name)


@pytest.mark.parametrize("op,name,value", [
    ("fused_step", "beta", 0.0), ("fused_step", "beta", 1.0), ("fused_step", "accumulate", "sum"),
    ("fused_step", "importance_kind", "abs"), ("fused_step", "directional", False),
    ("consolidate_", "merge", None), ("consolidate_", "merge", "linear"),
    ("consolidate_", "decay", 0.0), ("consolidate_", "alpha", 0.0),
    ("align_", "align_ratio", 0.0), ("align_", "align_ratio", 1.0), ("align_", "mode", "zero"),
])
def test_edge_scalars_are_accepted(op, name, value):
    kwargs = good(op)
    kwargs[name] = value
    call(op, kwargs)


# --------------------------------------------------------------------------- backends

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ["gpu", "Torch", "", None, "triton-interpret"])
def test_unknown_backend(op, backend):
    assert_rejected(op, good(op), "backend", backend=backend, exc=(ValueError, TypeError))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_unavailable_backend_says_why(op, backend):
    """Asking for a backend that cannot serve CPU tensors raises BackendUnavailable that
    names the backend and says why (not built, no GPU, wrong device)."""
    why = B.unavailable_reason(backend)
    if why:
        msg = assert_rejected(op, good(op), backend, backend=backend,
                              exc=ops.BackendUnavailable, also=("backend",))
        assert why in msg, f"reason {why!r} missing from {msg!r}"
    elif backend == "cuda" or (backend == "triton" and not B.triton_interpreting()):
        assert_rejected(op, good(op), backend, backend=backend, exc=ops.BackendUnavailable,
                        also=("device",))
    else:
        pytest.skip(f"backend {backend!r} is available and runs on CPU tensors")


def test_backend_unavailable_is_a_runtime_error():
    assert issubclass(ops.BackendUnavailable, RuntimeError)
    assert "torch" in ops.available_backends()


@pytest.mark.parametrize("op", OPS)
def test_bad_argument_is_reported_before_bad_backend(op):
    """Argument checks come first: a bad tensor is named even with an unknown backend."""
    kwargs = good(op)
    first = VECTORS[op][0]
    kwargs[first] = kwargs[first].double()
    assert_rejected(op, kwargs, first, backend="gpu")
