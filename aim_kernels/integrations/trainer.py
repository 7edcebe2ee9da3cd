"""HF Trainer: one ``trainer.train()`` is one task.

``AIMCallback(config)`` attaches at the first ``on_train_begin``, runs ``masked_step``
at ``on_pre_optimizer_step`` (after the Trainer's unscale and clipping, before
``optimizer.step()``) and consolidates at ``on_train_end``. Reuse one callback
across the tasks of a model: its state carries over.
"""
from __future__ import annotations

from transformers import TrainerCallback

from .. import step as _step
from ..config import AIMConfig
from .amp import found_inf


class AIMCallback(TrainerCallback):
    def __init__(self, config: AIMConfig | None = None, *, log_every: int = 0):
        self.config = config
        self.log_every = log_every
        self.last_stats = None
        self.state = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise RuntimeError("AIMCallback: the Trainer passed no model to on_train_begin")
        if args.deepspeed:            # DeepSpeed: a new engine per train(); see zero.py
            from ..zero import trainer_attach
            self.state = trainer_attach(model, optimizer, self.config, args)
            return
        try:
            self.state = _step.state_of(model)
        except RuntimeError:
            self.state = _step.attach(model, self.config)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.deepspeed:            # masked_step ran inside DeepSpeed's optimizer step
            self.last_stats = self.state.last_stats
        else:
            self.last_stats = _step.masked_step(model, skip=_skip_flag(optimizer))
        if self.log_every and state.global_step % self.log_every == 0:
            state.log_history.append({"step": state.global_step,
                                      "aim": self.last_stats.as_dict()})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        _step.consolidate(model)


def _skip_flag(optimizer):
    """What tells masked_step that the optimiser will skip this step.

    accelerate wraps the optimiser with its GradScaler (fp16). The Trainer unscales
    only when it clips; otherwise unscale here, as GradScaler allows once per step.
    Without a scaler, a non-finite gradient still reaches the optimiser, so the step
    is taken and the state is updated (the non-finite elements aside, DESIGN.md 2.1).
    """
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return False
    from torch.amp.grad_scaler import OptState
    inner = optimizer.optimizer
    if scaler._per_optimizer_states[id(inner)]["stage"] is not OptState.UNSCALED:
        scaler.unscale_(inner)
    return found_inf(scaler, inner)
