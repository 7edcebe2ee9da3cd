"""The compiled backends ("cpu", "cuda"): checks, then raw pointers into ``aim_kernels._C``.

``_C`` links no libtorch: a tensor crosses as its address, its dtype code and its
length, and a CUDA launch gets the caller's current stream as a handle. So this file
checks every tensor before its address is taken (device, dtype, 1-D, contiguity,
length, element alignment) and raises an error naming the argument; it also
allocates every output and scratch buffer, so nothing allocates inside a launch
(a CUDA graph can capture a step).

The ops are registered with ``torch.library`` (``aim_kernels::fused_step`` etc., with
their in-place arguments declared and fake implementations), so ``torch.compile``
traces a training step that calls them without a graph break.
"""
from __future__ import annotations

import contextlib
import warnings
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

try:
    from aim_kernels import _C
    _IMPORT_ERROR = ""
except ImportError as exc:          # not built: pure-Python install
    _C = None
    _IMPORT_ERROR = str(exc)

__all__ = ["unavailable_reason", "backend", "built_info", "fused_step", "group_thresholds",
           "consolidate_", "align_", "align_apply_", "device_problem", "cpu_isas",
           "using_cpu_isa"]

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
FLOATS = tuple(DTYPE_CODES)
MERGE_CODES = {None: 0, "fisher": 1, "linear": 2}


# --------------------------------------------------------------------------- availability

def built_info() -> dict:
    """What the compiled module holds: ``{"built": bool, "cuda": str|None, "archs": str, ...}``."""
    if _C is None:
        return {"built": False, "error": _IMPORT_ERROR}
    info = {"built": True, "path": _C.__file__, "cpu_threads": _C.cpu_threads(),
            "cpu_isa": _C.cpu_isa(), "cpu_isas": cpu_isas(), "cuda": None, "archs": ""}
    if _C.has_cuda:
        v = _C.cuda_runtime_version()
        info.update(cuda=f"{v // 1000}.{v % 1000 // 10}", archs=_C.cuda_archs())
    return info


def cpu_isas() -> list[str]:
    """The CPU code paths this machine and build can run, baseline first
    (of ``"default"``, ``"avx2"``, ``"avx512"``); empty when the module is not built."""
    if _C is None:
        return []
    found = []
    for isa in ("default", "avx2", "avx512"):
        with contextlib.suppress(ValueError), using_cpu_isa(isa):
            found.append(isa)
    return found


@contextlib.contextmanager
def using_cpu_isa(isa: str):
    """Run the CPU ops on one code path for the block (tests compare them bit for bit);
    the previous choice comes back after it. ValueError when this CPU or build lacks it."""
    current = _C.cpu_isa()
    try:
        _C.set_cpu_isa(isa)
        yield
    finally:
        _C.set_cpu_isa(current)


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def cuda_driver_problem(device: int = 0) -> str:
    """Empty when this build's CUDA code can run on ``device``, else why not.

    A module built for a newer CUDA than the driver supports is refused here (then
    ``auto`` falls back to Triton or torch with a warning) rather than failing at
    the first launch: the probe asks the runtime for a kernel's attributes, which
    fails with the reason when the driver is too old or no image fits the device.
    """
    built, driver = _C.cuda_runtime_version(), _C.cuda_driver_version()
    if driver == 0:
        return "no NVIDIA driver was found"
    if driver // 1000 < built // 1000:
        return (f"the module was built for CUDA {_version(built)} but the driver supports "
                f"CUDA {_version(driver)} only (install a wheel for CUDA {driver // 1000}.x "
                f"or update the driver)")
    return _C.cuda_probe(device)


def unavailable_reason(name: str) -> str:
    """Empty when backend ``name`` ("cpu" or "cuda") can run here, else why not."""
    if _C is None:
        return f"aim_kernels._C is not built ({_IMPORT_ERROR}); reinstall with a C++ compiler and CMake"
    if name == "cpu":
        return ""
    if name != "cuda":
        raise ValueError(f"the native module has no backend {name!r}")
    if not _C.has_cuda:
        return "aim_kernels._C was built without CUDA (no nvcc was found when it was built)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to PyTorch"
    why = device_problem(torch.cuda.current_device())
    if why:
        warnings.warn(f"aim_kernels: the native CUDA backend is unavailable ({why}); "
                      "falling back to Triton or torch", RuntimeWarning, stacklevel=2)
    return why


_DEVICE_PROBLEMS: dict[tuple[int, int], str] = {}


def device_problem(index: int) -> str:
    """Empty when this build's CUDA code runs on GPU ``index``, else why not (probed once
    per device and module: a second GPU of an architecture missing from the fatbin is
    refused by the dispatcher, which then falls back, instead of failing at its first
    launch)."""
    key = (id(_C), int(index))
    if key not in _DEVICE_PROBLEMS:
        _DEVICE_PROBLEMS[key] = cuda_driver_problem(index)
    return _DEVICE_PROBLEMS[key]


def backend(name: str):
    """The object ``ops.backends`` dispatches to: the four ops with reference.py's
    signatures (the device of the tensors selects the CPU or the CUDA code). The caller
    (``ops.backends``) has asked ``unavailable_reason`` first."""
    if name not in ("cpu", "cuda"):
        raise ValueError(f"the native module has no backend {name!r}")
    return SimpleNamespace(name=name, fused_step=fused_step, group_thresholds=group_thresholds,
                           consolidate_=consolidate_, align_=align_, align_apply_=align_apply_)


# --------------------------------------------------------------------------- checks

def _check(op: str, name: str, t, *, device: torch.device, dtypes, numel: int | None = None):
    """Raises a ValueError/TypeError naming ``name`` unless ``t`` may cross as a pointer."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: argument `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{op}: argument `{name}` must be a dense tensor, got {t.layout}")
    if t.device != device:
        raise ValueError(f"{op}: argument `{name}` must be on {device}, got {t.device}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: argument `{name}` must have dtype in "
                        f"{[str(d) for d in dtypes]}, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{op}: argument `{name}` must be 1-D, got shape {tuple(t.shape)}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{op}: argument `{name}` must have {numel} elements, got {t.numel()}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: argument `{name}` must be contiguous (stride 1)")
    if t.data_ptr() % t.element_size():
        raise ValueError(f"{op}: argument `{name}` is not aligned to its element size "
                         f"({t.element_size()} bytes): address {t.data_ptr():#x}")
    if t.is_conj() or t.is_neg():
        raise ValueError(f"{op}: argument `{name}` has a lazy conj/neg bit; resolve it first")


def _addr(t: Tensor) -> int:
    return t.data_ptr() if t.numel() else 0


def _stream(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    why = device_problem(index)
    if why:
        from .backends import BackendUnavailable
        raise BackendUnavailable(f"backend 'cuda' cannot run on {device}: {why}")
    return index, torch.cuda.current_stream(index).cuda_stream


def _vectors(op, names, tensors, device, numel, dtypes=FLOATS):
    for name, t in zip(names, tensors):
        _check(op, name, t, device=device, dtypes=dtypes, numel=numel)


# --------------------------------------------------------------------------- implementations

def _fused_step_checks(grad, param, anchor, importance, fisher, offsets, inv_scale, thresh,
                       keep, lam, accumulate, importance_kind) -> int:
    """Every check of a native fused_step before a pointer is taken; returns G."""
    op, device = "fused_step", grad.device
    _check(op, "grad", grad, device=device, dtypes=FLOATS)
    n = grad.numel()
    _vectors(op, ("param", "anchor"), (param, anchor), device, n, (grad.dtype,))
    _check(op, "importance", importance, device=device, dtypes=FLOATS, numel=n)
    _check(op, "fisher", fisher, device=device, dtypes=(importance.dtype,), numel=n)
    _check(op, "offsets", offsets, device=device, dtypes=(torch.int64,))
    groups = offsets.numel() - 1
    if groups < 0:
        raise ValueError(f"{op}: argument `offsets` must hold at least one element")
    _vectors(op, ("inv_scale", "thresh", "keep", "lam"), (inv_scale, thresh, keep, lam), device,
             groups, (torch.float32,))
    if accumulate not in ("ema", "sum") or importance_kind not in ("fisher", "abs"):
        raise ValueError(f"{op}: accumulate={accumulate!r}, importance_kind={importance_kind!r}")
    return groups


def _fused_step_impl(grad, param, anchor, importance, fisher, offsets, inv_scale, thresh, keep,
                     lam, beta, accumulate, importance_kind, directional):
    device = grad.device
    groups = _fused_step_checks(grad, param, anchor, importance, fisher, offsets, inv_scale,
                                thresh, keep, lam, accumulate, importance_kind)
    stats = torch.empty((groups, 7), dtype=torch.float32, device=device)
    if groups == 0:
        return stats
    rows = _C.cpu_threads() if device.type == "cpu" else 1
    scratch = torch.empty(rows * groups * 7, dtype=torch.float64, device=device)
    args = (_addr(grad), _addr(param), _addr(anchor), _addr(importance), _addr(fisher),
            offsets.data_ptr(), inv_scale.data_ptr(), thresh.data_ptr(), keep.data_ptr(),
            lam.data_ptr(), stats.data_ptr(), scratch.data_ptr(), grad.numel(), groups,
            DTYPE_CODES[grad.dtype], DTYPE_CODES[importance.dtype], float(beta),
            accumulate == "ema", importance_kind == "fisher", bool(directional))
    if device.type == "cpu":
        _C.cpu_fused_step(*args)
    else:
        _C.cuda_fused_step(*args, *_stream(device))
    return stats


class CpuFusedStepLaunch:
    """One CPU ``fused_step`` on fixed tensors, checked once here: each call is the kernel
    launch alone (no dispatcher, no checks), for ``masked_step``'s eager path.

    The caller must prove before each call that nothing the checks read has changed
    (``aim_kernels.prepared`` does: the same tensor objects with the same address, shape,
    strides, dtype and device, and ``offsets`` unwritten). Calls go through neither the
    dispatcher nor its modes; the in-place outputs' version counters are bumped as the
    custom op's would be.
    """

    def __init__(self, grad, param, anchor, importance, fisher, offsets, inv_scale, thresh,
                 keep, lam, *, beta, accumulate, importance_kind, directional):
        if grad.device.type != "cpu":
            raise ValueError(f"fused_step: a CPU launch needs CPU tensors, got {grad.device}")
        groups = _fused_step_checks(grad, param, anchor, importance, fisher, offsets,
                                    inv_scale, thresh, keep, lam, accumulate, importance_kind)
        self.groups = groups
        self._mutated = (grad, fisher)
        self._head = (_addr(grad), _addr(param), _addr(anchor), _addr(importance),
                      _addr(fisher), offsets.data_ptr(), inv_scale.data_ptr(),
                      thresh.data_ptr(), keep.data_ptr(), lam.data_ptr())
        self._tail = (grad.numel(), groups, DTYPE_CODES[grad.dtype],
                      DTYPE_CODES[importance.dtype], float(beta), accumulate == "ema",
                      importance_kind == "fisher", bool(directional))
        self._scratch = torch.empty(0, dtype=torch.float64)

    def __call__(self) -> Tensor:
        groups = self.groups
        stats = torch.empty((groups, 7), dtype=torch.float32)
        if groups == 0:
            return stats
        # the team size is read per call (torch.set_num_threads may change it), and the
        # per-thread scratch grown to fit it
        need = _C.cpu_threads() * groups * 7
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.float64)
        _C.cpu_fused_step(*self._head, stats.data_ptr(), self._scratch.data_ptr(), *self._tail)
        torch._C._increment_version(self._mutated)
        return stats


# The CUDA select's scratch must hold zero histograms on entry and is left so by every
# call (each pass clears the bins it read), so one zeroed buffer per (device, stream, G)
# is kept, not a G x 16 KB memset per call. Per stream: two streams never share one. Per
# G: the per-group state that follows the histograms sits at an offset that depends on G,
# inside the histograms of a larger G, so buffers are never shared across G.
_CUDA_SCRATCH: dict[tuple[int, int, int], Tensor] = {}


def _threshold_scratch(device, groups):
    if device.type == "cpu":
        return torch.empty(_C.cpu_threshold_scratch_bytes(groups), dtype=torch.uint8,
                           device=device)
    nbytes = _C.cuda_threshold_scratch_bytes(groups)
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, torch.cuda.current_stream(index).cuda_stream, groups)
    buf = _CUDA_SCRATCH.get(key)
    if buf is None:
        buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        _CUDA_SCRATCH[key] = buf
    return buf


def _cuda_select(key_device, groups, launch):
    """Runs a select launch; a failed one may leave bins set, so its scratch is dropped."""
    try:
        launch()
    except Exception:
        index = key_device.index if key_device.index is not None else torch.cuda.current_device()
        _CUDA_SCRATCH.pop((index, torch.cuda.current_stream(index).cuda_stream, groups), None)
        raise


def _group_thresholds_impl(importance, offsets, mask_ratio, normalize):
    op, device = "group_thresholds", importance.device
    _check(op, "importance", importance, device=device, dtypes=FLOATS)
    _check(op, "offsets", offsets, device=device, dtypes=(torch.int64,))
    groups = offsets.numel() - 1
    _check(op, "mask_ratio", mask_ratio, device=device, dtypes=(torch.float32, torch.float64),
           numel=groups)
    # k = floor(rho * n) in float64 of the value given: fp32 widens exactly
    ratios = mask_ratio.to(torch.float64).contiguous()
    inv_scale = torch.empty(groups, dtype=torch.float32, device=device)
    thresh = torch.empty(groups, dtype=torch.float32, device=device)
    if groups == 0:
        return inv_scale, thresh
    scratch = _threshold_scratch(device, groups)
    args = (_addr(importance), DTYPE_CODES[importance.dtype], offsets.data_ptr(),
            importance.numel(), groups, ratios.data_ptr(), bool(normalize), inv_scale.data_ptr(),
            thresh.data_ptr(), scratch.data_ptr())
    if device.type == "cpu":
        _C.cpu_group_thresholds(*args)
    else:
        _cuda_select(device, groups, lambda: _C.cuda_group_thresholds(*args, *_stream(device)))
    return inv_scale, thresh


def _consolidate_impl(param, anchor, importance, fisher, fisher_scale, decay, merge, alpha):
    op, device = "consolidate_", param.device
    _check(op, "param", param, device=device, dtypes=FLOATS)
    n = param.numel()
    _check(op, "anchor", anchor, device=device, dtypes=(param.dtype,), numel=n)
    _check(op, "importance", importance, device=device, dtypes=FLOATS, numel=n)
    _check(op, "fisher", fisher, device=device, dtypes=(importance.dtype,), numel=n)
    if merge not in MERGE_CODES:
        raise ValueError(f"{op}: argument `merge` must be one of {tuple(MERGE_CODES)}, got {merge!r}")
    if n == 0:
        return
    args = (_addr(param), _addr(anchor), DTYPE_CODES[param.dtype], _addr(importance),
            _addr(fisher), DTYPE_CODES[importance.dtype], n, float(fisher_scale), float(decay),
            float(alpha), MERGE_CODES[merge])
    if device.type == "cpu":
        _C.cpu_consolidate(*args)
    else:
        _C.cuda_consolidate(*args, *_stream(device))


def _align_impl(param, anchor, offsets, align_ratio, mode):
    op, device = "align_", param.device
    _check(op, "param", param, device=device, dtypes=FLOATS)
    _check(op, "anchor", anchor, device=device, dtypes=(param.dtype,), numel=param.numel())
    _check(op, "offsets", offsets, device=device, dtypes=(torch.int64,))
    if mode not in ("anchor", "zero"):
        raise ValueError(f"{op}: argument `mode` must be 'anchor' or 'zero', got {mode!r}")
    groups = offsets.numel() - 1
    if groups <= 0 or param.numel() == 0:
        return
    thresh = torch.empty(groups, dtype=torch.float32, device=device)
    scratch = _threshold_scratch(device, groups)
    args = (_addr(param), _addr(anchor), DTYPE_CODES[param.dtype], offsets.data_ptr(),
            param.numel(), groups, float(align_ratio), mode == "zero", thresh.data_ptr(),
            scratch.data_ptr())
    if device.type == "cpu":
        _C.cpu_align(*args)
    else:
        _cuda_select(device, groups, lambda: _C.cuda_align(*args, *_stream(device)))


def _align_apply_impl(param, anchor, offsets, m_g, mode):
    op, device = "align_apply_", param.device
    _check(op, "param", param, device=device, dtypes=FLOATS)
    _check(op, "anchor", anchor, device=device, dtypes=(param.dtype,), numel=param.numel())
    _check(op, "offsets", offsets, device=device, dtypes=(torch.int64,))
    groups = offsets.numel() - 1
    _check(op, "m_g", m_g, device=device, dtypes=(torch.float32,), numel=max(groups, 0))
    if mode not in ("anchor", "zero"):
        raise ValueError(f"{op}: argument `mode` must be 'anchor' or 'zero', got {mode!r}")
    if groups <= 0 or param.numel() == 0:
        return
    args = (_addr(param), _addr(anchor), DTYPE_CODES[param.dtype], offsets.data_ptr(),
            param.numel(), groups, m_g.data_ptr(), mode == "zero")
    if device.type == "cpu":
        _C.cpu_align_apply(*args)
    else:
        _C.cuda_align_apply(*args, *_stream(device))


# --------------------------------------------------------------------------- torch.library

@torch.library.custom_op("aim_kernels::fused_step", mutates_args=("grad", "fisher"))
def _fused_step_op(grad: Tensor, param: Tensor, anchor: Tensor, importance: Tensor,
                   fisher: Tensor, offsets: Tensor, inv_scale: Tensor, thresh: Tensor,
                   keep: Tensor, lam: Tensor, beta: float, accumulate: str,
                   importance_kind: str, directional: bool) -> Tensor:
    return _fused_step_impl(grad, param, anchor, importance, fisher, offsets, inv_scale, thresh,
                            keep, lam, beta, accumulate, importance_kind, directional)


@_fused_step_op.register_fake
def _(grad, param, anchor, importance, fisher, offsets, inv_scale, thresh, keep, lam, beta,
      accumulate, importance_kind, directional):
    return grad.new_empty((offsets.shape[0] - 1, 7), dtype=torch.float32)


@torch.library.custom_op("aim_kernels::group_thresholds", mutates_args=())
def _group_thresholds_op(importance: Tensor, offsets: Tensor, mask_ratio: Tensor,
                         normalize: bool) -> tuple[Tensor, Tensor]:
    return _group_thresholds_impl(importance, offsets, mask_ratio, normalize)


@_group_thresholds_op.register_fake
def _(importance, offsets, mask_ratio, normalize):
    g = offsets.shape[0] - 1
    return (importance.new_empty((g,), dtype=torch.float32),
            importance.new_empty((g,), dtype=torch.float32))


@torch.library.custom_op("aim_kernels::consolidate_",
                         mutates_args=("param", "anchor", "importance", "fisher"))
def _consolidate_op(param: Tensor, anchor: Tensor, importance: Tensor, fisher: Tensor,
                    fisher_scale: float, decay: float, merge: Optional[str],
                    alpha: float) -> None:
    _consolidate_impl(param, anchor, importance, fisher, fisher_scale, decay, merge, alpha)


@_consolidate_op.register_fake
def _(param, anchor, importance, fisher, fisher_scale, decay, merge, alpha):
    return None


@torch.library.custom_op("aim_kernels::align_", mutates_args=("param",))
def _align_op(param: Tensor, anchor: Tensor, offsets: Tensor, align_ratio: float,
              align_mode: str) -> None:
    # (named align_mode: an argument called `mode` collides with torch's mode dispatch)
    _align_impl(param, anchor, offsets, align_ratio, align_mode)


@_align_op.register_fake
def _(param, anchor, offsets, align_ratio, align_mode):
    return None


@torch.library.custom_op("aim_kernels::align_apply_", mutates_args=("param",))
def _align_apply_op(param: Tensor, anchor: Tensor, offsets: Tensor, m_g: Tensor,
                    align_mode: str) -> None:
    _align_apply_impl(param, anchor, offsets, m_g, align_mode)


@_align_apply_op.register_fake
def _(param, anchor, offsets, m_g, align_mode):
    return None


# --------------------------------------------------------------------------- public (backend)

def _tensors(op: str, **named) -> None:
    """The dispatcher would reject a non-tensor too, but without naming it as we do."""
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: argument `{name}` must be a torch.Tensor, got {type(t).__name__}")


def fused_step(grad, param, anchor, importance, fisher, offsets, inv_scale, thresh, keep, lam,
               *, beta, accumulate="ema", importance_kind="fisher", directional=True) -> Tensor:
    """DESIGN.md 2.1 (signature of ``reference.fused_step``): in place on grad and fisher."""
    _tensors("fused_step", grad=grad, param=param, anchor=anchor, importance=importance,
             fisher=fisher, offsets=offsets, inv_scale=inv_scale, thresh=thresh, keep=keep, lam=lam)
    return torch.ops.aim_kernels.fused_step(grad, param, anchor, importance, fisher, offsets,
                                            inv_scale, thresh, keep, lam, float(beta),
                                            accumulate, importance_kind, bool(directional))


def group_thresholds(importance, offsets, mask_ratio, *, normalize=True):
    """``(inv_scale, thresh)``, fp32 ``[G]`` (signature of ``reference.group_thresholds``)."""
    _tensors("group_thresholds", importance=importance, offsets=offsets, mask_ratio=mask_ratio)
    return torch.ops.aim_kernels.group_thresholds(importance, offsets, mask_ratio,
                                                  bool(normalize))


def consolidate_(param, anchor, importance, fisher, *, fisher_scale, decay, merge=None,
                 alpha=1.0) -> None:
    _tensors("consolidate_", param=param, anchor=anchor, importance=importance, fisher=fisher)
    torch.ops.aim_kernels.consolidate_(param, anchor, importance, fisher, float(fisher_scale),
                                       float(decay), merge, float(alpha))


def align_(param, anchor, offsets, align_ratio, *, mode="anchor") -> None:
    _tensors("align_", param=param, anchor=anchor, offsets=offsets)
    torch.ops.aim_kernels.align_(param, anchor, offsets, float(align_ratio), mode)


def align_apply_(param, anchor, offsets, m_g, *, mode="anchor") -> None:
    """DESIGN.md 2.3 given ``m_g`` (fp32 ``[G]``): the resets only, no select."""
    _tensors("align_apply_", param=param, anchor=anchor, offsets=offsets, m_g=m_g)
    torch.ops.aim_kernels.align_apply_(param, anchor, offsets, m_g, mode)
