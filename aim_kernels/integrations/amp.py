"""Mixed precision: which steps GradScaler will skip.

GradScaler skips ``optimizer.step()`` when the unscaled gradients hold an inf or
NaN; the AIM state must skip that step too (``masked_step(model, skip=...)``), or
F would take the finite part of a gradient the optimiser never applied.
"""
from __future__ import annotations

import torch


def found_inf(scaler, optimizer) -> torch.Tensor:
    """GradScaler's found-inf flag for ``optimizer`` after ``scaler.unscale_(optimizer)``:
    a one-element tensor, non-zero when the scaler will skip this step.

    Pass it as ``masked_step(model, skip=found_inf(scaler, optimizer))``.
    """
    if not scaler.is_enabled():
        return torch.zeros(1)
    per_device = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    if not per_device:
        raise RuntimeError("found_inf: call scaler.unscale_(optimizer) before masked_step, "
                           "so the gradients are unscaled and checked for inf")
    return sum(v.to("cpu", torch.float32) for v in per_device.values())
