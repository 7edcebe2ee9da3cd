"""Argument checks shared by every backend: run before anything is touched.

Each failure is a ``ValueError``/``TypeError`` that names the argument. Offsets are
checked by value only when they live on the CPU; on a GPU that would cost a host
sync every step (the model-level API builds them itself).
"""
from __future__ import annotations

import math

import torch

STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fail(op: str, name: str, what: str, exc=ValueError):
    raise exc(f"{op}: argument `{name}` {what}")


def vector(op: str, name: str, t, *, numel: int | None, device: torch.device | None,
           dtypes=STORAGE_DTYPES, like: str = "grad") -> torch.Tensor:
    """A dense, contiguous 1-D tensor of one of ``dtypes``, ``numel`` long, on ``device``
    (``numel`` and ``device`` being those of the argument ``like``)."""
    if not isinstance(t, torch.Tensor):
        _fail(op, name, f"must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if t.layout != torch.strided:
        _fail(op, name, f"must be a dense (strided) tensor, got layout {t.layout}")
    if t.dim() != 1:
        _fail(op, name, f"must be 1-D, got shape {tuple(t.shape)}")
    if numel is not None and t.numel() != numel:
        _fail(op, name, f"must have {numel} elements like `{like}`, got {t.numel()}")
    if t.dtype not in dtypes:
        _fail(op, name, f"must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}", TypeError)
    if device is not None and t.device != device:
        _fail(op, name, f"must be on {device} like `{like}`, got {t.device}")
    if not t.is_contiguous():
        _fail(op, name, "must be contiguous")
    return t


def same_dtype(op: str, names: tuple[str, ...], tensors) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        pairs = ", ".join(f"{n}={t.dtype}" for n, t in zip(names, tensors))
        raise TypeError(f"{op}: arguments {names} must share one dtype, got {pairs}")


def offsets(op: str, t, n: int, device: torch.device, like: str = "grad") -> int:
    """Checks ``offsets`` (int64 ``[G+1]``, 0 .. n, non-decreasing); returns G."""
    vector(op, "offsets", t, numel=None, device=device, dtypes=(torch.int64,), like=like)
    if t.numel() < 1:
        _fail(op, "offsets", "must hold at least one element (offsets[0] = 0)")
    if t.device.type == "cpu" and not torch.compiler.is_compiling():   # values: eager only
        if t.numel() <= SMALL:
            # one read of the values: with a cold cache (a 96 MiB copy before each call)
            # the tensor ops below and group_thresholds' test of mask_ratio took 0.31 ms
            # of one thread, these reads 0.13 ms with the rest of this check (load 4.5)
            v = t.tolist()
            first, last, decreasing = v[0], v[-1], any(b < a for a, b in zip(v, v[1:]))
        else:
            first, last = t[0].item(), t[-1].item()
            decreasing = t.numel() > 1 and bool((t[1:] < t[:-1]).any())
        if first != 0 or last != n:
            _fail(op, "offsets", f"must start at 0 and end at N={n} (the length of `{like}`), got "
                  f"{first} .. {last}")
        if decreasing:
            _fail(op, "offsets", "must be non-decreasing")
    return t.numel() - 1


# Up to this many values a check reads them into Python at once (Tensor.tolist) rather
# than testing them with tensor ops.
SMALL = 4096


def in_unit_interval(t: torch.Tensor) -> bool:
    """Every value of a CPU tensor in [0, 1) (NaN is not)."""
    if t.numel() <= SMALL:
        return all(0 <= r < 1 for r in t.tolist())
    return bool(((t >= 0) & (t < 1)).all())


def per_group(op: str, name: str, t, groups: int, device: torch.device,
              dtypes=(torch.float32,)) -> None:
    vector(op, name, t, numel=groups, device=device, dtypes=dtypes, like="offsets[1:]")


def choice(op: str, name: str, value, allowed) -> None:
    if value not in allowed:
        _fail(op, name, f"must be one of {tuple(allowed)}, got {value!r}")


def real(op: str, name: str, value, lo: float = -math.inf, hi: float = math.inf,
         lo_open: bool = False, hi_open: bool = False) -> float:
    try:
        if isinstance(value, (str, bytes, bool)):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        _fail(op, name, f"must be a real number, got {value!r}", TypeError)
    below = v <= lo if lo_open else v < lo
    above = v >= hi if hi_open else v > hi
    if math.isnan(v) or below or above:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        _fail(op, name, f"must lie in {interval}, got {value!r}")
    return v
