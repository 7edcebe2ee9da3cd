"""aim_kernels: fused per-modality protection for continual fine-tuning of VLMs.

The public names of DESIGN.md section 3; the flat ops live in ``aim_kernels.ops``.
"""
from . import ops
from .config import AIMConfig, GroupConfig, preset
from .ops.backends import available_backends
from .state import AIMState
from .step import StepStats, attach, consolidate, detach, masked_step

__version__ = "0.1.0"

__all__ = ["AIMConfig", "GroupConfig", "preset", "attach", "masked_step", "consolidate",
           "detach", "AIMState", "StepStats", "available_backends", "ops"]
