"""DeepSpeed checkpoints with the AIM state beside them.

``save_checkpoint(engine, save_dir, tag)`` writes each rank's AIM state (the state of
the partition it owns) to ``save_dir/tag/aim_state_rank<r>.safetensors`` -- through a
temp file, fsync and rename -- and then calls ``engine.save_checkpoint``, which writes
DeepSpeed's ``latest`` pointer last: a crash leaves the previous checkpoint the latest.
``load_checkpoint`` reads and checks the AIM file first, then loads the engine.
A checkpoint resumes into an engine of the same ZeRO stage and world size (each rank's
file holds its own partition); another stage or world size is an error naming both.
"""
from __future__ import annotations

import glob
import os

import torch

from .. import step as _step
from .. import zero


def _state(engine) -> "zero.ZeroState":
    state = _step.state_of(engine, "save_checkpoint")
    if not isinstance(state, zero.ZeroState):
        raise TypeError("save_checkpoint: the model's AIMState is not a DeepSpeed one; "
                        "use state.save(path) for a plain model")
    return state


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def save_checkpoint(engine, save_dir, tag=None, **kwargs):
    """``engine.save_checkpoint(save_dir, tag, **kwargs)`` with the AIM state beside it."""
    state = _state(engine)
    tag = f"global_step{engine.global_steps}" if tag is None else str(tag)
    path = zero.state_file(save_dir, tag, _rank())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    zero.save_atomic(state, path)
    return engine.save_checkpoint(save_dir, tag=tag, **kwargs)


def load_checkpoint(engine, load_dir, tag=None, **kwargs):
    """Load a checkpoint written by :func:`save_checkpoint` into ``engine`` and its AIM state
    (the state is checked against the engine before either is touched)."""
    from safetensors.torch import load_file
    state = _state(engine)
    if tag is None:
        with open(os.path.join(str(load_dir), "latest")) as f:
            tag = f.read().strip()
    path = zero.state_file(load_dir, tag, _rank())
    if not os.path.exists(path):
        folder = os.path.dirname(path)
        saved = len(glob.glob(os.path.join(glob.escape(folder), "aim_state_rank*.safetensors")))
        if saved:
            raise ValueError(f"load_checkpoint: the AIM state in {folder} was saved by {saved} "
                             f"rank(s); this engine has {state.world} (rank {state.rank} has no "
                             "file). It resumes into the same ZeRO stage and world size only")
        raise FileNotFoundError(f"load_checkpoint: no AIM state at {path} (was the checkpoint "
                                "written with aim_kernels.integrations.deepspeed.save_checkpoint?)")
    sd = {k: v.to(state.buckets[0].device if state.buckets else "cpu")
          for k, v in load_file(path).items()}
    state.load_state_dict(sd)          # checks layout, fingerprint, keys, shapes before copying
    out = engine.load_checkpoint(load_dir, tag=tag, **kwargs)
    state.forget_views()
    state.refresh_thresholds()
    return out
