"""HF Trainer: one ``trainer.train()`` is one task.

``AIMCallback(config)`` attaches at the first ``on_train_begin`` (to the model the
wrappers hold: the Trainer calls it after DDP/``torch.compile`` wrapping and after
loading a resume checkpoint), runs ``masked_step`` at ``on_pre_optimizer_step`` and
consolidates at ``on_train_end``. Reuse one callback across the tasks of a model.

Clipping. The Trainer clips before ``on_pre_optimizer_step``, so a regulariser added
there would escape the user's ``max_grad_norm`` (λ = 10⁴ gave norms of 10⁵). The
callback therefore takes the clipping over: at ``on_train_begin`` it sets
``args.max_grad_norm`` to 0 (restored at ``on_train_end``) and, each step, unscales
(fp16), runs ``masked_step`` on the raw gradient, then clips the whole gradient to the
user's ``max_grad_norm`` (DESIGN.md 3). The Trainer's logged ``grad_norm`` is then
the raw gradient's norm, before the regulariser. Under DeepSpeed the engine clips.

Checkpoints. ``on_save`` writes the AIM state into the Trainer's checkpoint folder
(``aim_state.safetensors``, atomically; a DCP folder ``aim_state`` for FSDP2), and
a resumed run (``train(resume_from_checkpoint=...)``) loads it back at
``on_train_begin``, so a resume continues exactly where the checkpoint was.
"""
from __future__ import annotations

import os

import torch
from transformers import TrainerCallback

from .. import step as _step
from ..binding import unwrap
from ..config import AIMConfig

STATE_FILE = "aim_state.safetensors"     # in each checkpoint-N folder
STATE_DIR = "aim_state"                  # the same, as a DCP folder, for FSDP2 states


class AIMCallback(TrainerCallback):
    def __init__(self, config: AIMConfig | None = None, *, log_every: int = 0,
                 resume_from: str | None = None):
        """``resume_from``: the checkpoint folder to take the AIM state from when the
        Trainer resumes; by default ``<output_dir>/checkpoint-<global_step>``, the
        folder the Trainer itself resumes from."""
        self.config = config
        self.log_every = log_every
        self.resume_from = resume_from
        self.last_stats = None
        self.state = None
        self._max_norm = 0.0

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise RuntimeError("AIMCallback: the Trainer passed no model to on_train_begin")
        model = unwrap(model)[-1]
        if args.deepspeed:      # DeepSpeed: a new engine per train(); see zero.trainer_attach
            from ..zero import trainer_attach
            self.state = trainer_attach(model, optimizer, self.config, args)
        else:
            try:
                self.state = _step.state_of(model)
            except RuntimeError:
                self.state = _step.attach(model, self.config)
        if state.global_step > 0:          # the Trainer resumed from a checkpoint
            self._load(args, state)
        if args.max_grad_norm and args.max_grad_norm > 0 and not getattr(args, "deepspeed", None):
            self._max_norm, args.max_grad_norm = args.max_grad_norm, 0.0

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.deepspeed:      # masked_step ran inside DeepSpeed's optimizer step
            self.last_stats = self.state.last_stats
            if self.log_every and self.last_stats is not None and \
                    state.global_step % self.log_every == 0:
                state.log_history.append({"step": state.global_step,
                                          "aim": self.last_stats.as_dict()})
            return
        scaled = _unscale(optimizer)
        # with a GradScaler the step is skipped iff a gradient is non-finite after unscaling
        self.last_stats = _step.masked_step(model, skip="nonfinite" if scaled else False)
        if self._max_norm > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.grad is not None], self._max_norm)
        if self.log_every and state.global_step % self.log_every == 0:
            state.log_history.append({"step": state.global_step,
                                      "aim": self.last_stats.as_dict()})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        _step.consolidate(model)
        if self._max_norm > 0:
            args.max_grad_norm, self._max_norm = self._max_norm, 0.0

    def on_save(self, args, state, control, **kwargs):
        if self.state is None:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            raise RuntimeError(f"AIMCallback.on_save: no checkpoint folder {folder!r} to add the "
                               "AIM state to")
        if getattr(self.state, "engine_kind", None) == "deepspeed":   # each rank its partition
            from .. import zero
            zero.save_atomic(self.state, zero.state_file(args.output_dir,
                                                         f"checkpoint-{state.global_step}",
                                                         self.state.rank))
        elif self.state.collectives is not None:          # FSDP2: every process writes its shard
            from .distributed import save
            save(self.state, os.path.join(folder, STATE_DIR))
        elif args.should_save:
            self.state.save(os.path.join(folder, STATE_FILE))

    def _load(self, args, state) -> None:
        folder = self.resume_from or os.path.join(args.output_dir,
                                                  f"checkpoint-{state.global_step}")
        if self.state.collectives is not None and \
                getattr(self.state, "engine_kind", None) != "deepspeed":
            from .distributed import load
            load(self.state, os.path.join(folder, STATE_DIR))
            return
        path = os.path.join(folder, STATE_FILE)
        if getattr(self.state, "engine_kind", None) == "deepspeed":
            from .. import zero
            path = zero.state_file(os.path.dirname(folder), os.path.basename(folder),
                                   self.state.rank)
        if not os.path.isfile(path):
            raise RuntimeError(
                f"AIMCallback: the Trainer resumes at step {state.global_step} but there is no "
                f"AIM state at {path!r}; without it Ω and the anchors would restart from zero. "
                "Pass AIMCallback(..., resume_from=<the checkpoint folder>)")
        self.state.load(path)


def _unscale(optimizer) -> bool:
    """Unscale the gradients if a GradScaler scales them (accelerate's wrapper holds it).
    True when a scaler is active: it will then skip the step on a non-finite gradient."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return False
    try:
        scaler.unscale_(getattr(optimizer, "optimizer", optimizer))
    except RuntimeError as exc:     # the Trainer unscaled already (to log or clip the norm)
        if "already been called" not in str(exc):
            raise
    return True
