"""Integrations with training frameworks: HF Trainer, AMP, distributed checkpoints.

Imported lazily by name, so ``import aim_kernels`` never imports transformers.
"""
from __future__ import annotations

__all__ = ["AIMCallback", "found_inf", "save_distributed", "load_distributed", "deepspeed"]


def __getattr__(name: str):
    if name == "AIMCallback":
        from .trainer import AIMCallback
        return AIMCallback
    if name == "found_inf":
        from .amp import found_inf
        return found_inf
    if name in ("save_distributed", "load_distributed"):
        from . import distributed
        return getattr(distributed, name.removesuffix("_distributed"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
