"""Which implementations of the flat ops exist here, and which one serves a call.

A backend is a module exposing ``fused_step``, ``group_thresholds``,
``consolidate_`` and ``align_`` with the signatures of ``reference.py``. Each one
is probed once, lazily; a backend that cannot be used keeps the reason, and asking
for it raises :class:`BackendUnavailable` with that reason.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS


class BackendUnavailable(RuntimeError):
    """The requested backend is not built, not installed, or cannot run on this device."""


def triton_interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _probe(name: str) -> tuple[ModuleType | None, str]:
    """Import the backend's module; ``(module, "")`` or ``(None, why not)``."""
    if name == "torch":
        from . import reference
        return reference, ""
    if name in ("cpu", "cuda"):
        try:
            native = importlib.import_module("aim_kernels.ops.native")
        except ImportError as exc:
            return None, f"the compiled module is not part of this build ({exc})"
        why = native.unavailable_reason(name)
        return (None, why) if why else (native.backend(name), "")
    if name == "triton":
        try:
            importlib.import_module("triton")
        except ImportError:
            return None, "the `triton` package is not installed"
        try:
            kernels = importlib.import_module("aim_kernels.ops.triton_kernels")
        except ImportError as exc:
            return None, f"aim_kernels.ops.triton_kernels could not be imported ({exc})"
        return kernels, ""
    raise ValueError(f"backend must be one of {CHOICES}, got {name!r}")


def unavailable_reason(name: str) -> str:
    """Empty when the backend is usable on some device of this machine, else why not."""
    module, why = _probe(name)
    if module is None:
        return why
    if name == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible to PyTorch"
    if name == "triton" and not (torch.cuda.is_available() or triton_interpreting()):
        return "Triton needs a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)"
    return ""


def available_backends() -> list[str]:
    """The backends usable here, e.g. ``["torch", "cpu", "triton", "cuda"]``."""
    return [name for name in BACKENDS if not unavailable_reason(name)]


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        # a GPU this build has no code for (another architecture) is not the cuda backend's
        return device.type == "cuda" and (device.index is None or not _probe("cuda")[0] or
                                          not _device_problem(device.index))
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())


def _device_problem(index: int) -> str:
    """Why the compiled CUDA code cannot run on GPU ``index`` ("" when it can)."""
    from . import native
    return native.device_problem(index)


def resolve(backend: str, device: torch.device, op: str) -> ModuleType:
    """The module that runs ``op`` for tensors on ``device``.

    Under ``torch.compile`` the choice is made once, when tracing, and kept as a constant
    (probing imports modules, which dynamo does not trace): the graph then holds the
    chosen backend's op (``torch.ops.aim_kernels.*`` for the compiled module).
    """
    return _CHOSEN[_choose_name(backend, str(device), op)]


_CHOSEN: dict[str, ModuleType] = {}


@torch.compiler.assume_constant_result
def _choose_name(backend: str, device: str, op: str) -> str:
    name, module = _choose(backend, torch.device(device), op)
    _CHOSEN[name] = module
    return name


def _choose(backend: str, device: torch.device, op: str) -> tuple[str, ModuleType]:
    if backend not in CHOICES:
        raise ValueError(f"{op}: backend must be one of {CHOICES}, got {backend!r}")
    if backend == "auto":
        # Compiled code first, then Triton, then the reference, which runs anywhere.
        order = ("cpu", "torch") if device.type == "cpu" else ("cuda", "triton", "torch")
        for name in order:
            if _runs_on(name, device) and not unavailable_reason(name):
                return name, _probe(name)[0]
        return "torch", _probe("torch")[0]
    why = unavailable_reason(backend)
    if why:
        raise BackendUnavailable(f"{op}: backend {backend!r} is not available: {why}")
    if not _runs_on(backend, device):
        raise BackendUnavailable(
            f"{op}: backend {backend!r} cannot run on tensors on device {device}")
    return backend, _probe(backend)[0]
