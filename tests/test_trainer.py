"""HF Trainer with AIMCallback (one ``trainer.train()`` = one task) and a PEFT-wrapped
LLaVA, on a tiny LLaVA on CPU: masked elements are held through the next task."""
from __future__ import annotations

import pytest
import torch

import aim_kernels as ak

transformers = pytest.importorskip("transformers")
from aim_kernels.continual.tiny import synthetic_batch, tiny_llava  # noqa: E402
from aim_kernels.integrations import AIMCallback  # noqa: E402

from .vlm_toy import masked_by_spec  # noqa: E402

STEPS = 12


class TaskData(torch.utils.data.Dataset):
    def __init__(self, task: str, n: int = STEPS * 8, seed: int = 0):
        b = synthetic_batch(task, n, torch.Generator().manual_seed(seed))
        self.items = [dict(pixel_values=b.pixel_values[i], input_ids=b.input_ids[i],
                           answers=b.answers[i]) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class AnswerTrainer(transformers.Trainer):
    """Cross-entropy of the answer token at the last position (as ``tiny.Batch.loss``)."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        logits = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, -1], inputs["answers"])
        return (loss, logits) if return_outputs else loss


def _args(out, **over):
    kw = dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=STEPS,
              learning_rate=3e-3, weight_decay=0.01, max_grad_norm=1.0, report_to=[],
              use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
              remove_unused_columns=False, seed=0, dataloader_num_workers=0)
    kw.update(over)
    return transformers.TrainingArguments(**kw)


def _train(model, task, callback, tmp_path, extra=(), resume=None, **over):
    trainer = AnswerTrainer(model=model, args=_args(tmp_path / task, **over),
                            train_dataset=TaskData(task), callbacks=[callback, *extra])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


class MasksHeld(transformers.TrainerCallback):
    """After every optimizer.step(): the masked elements equal their anchors, bitwise."""

    def __init__(self, state, masks):
        self.state, self.masks, self.steps = state, masks, 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        for b, (masked, anchor) in zip(self.state.buckets, self.masks):
            assert torch.equal(b.param[masked], anchor[masked]), f"step {state.global_step}"
        self.steps += 1


class GradNorm(transformers.TrainerCallback):
    """The norm of the gradient the optimiser applied (grads are zeroed after this)."""

    def __init__(self):
        self.norms = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g.float()) for g in grads]))))


def _masks(state):
    """Per bucket, the masked elements after the last consolidation, and the anchors."""
    return [(m, b.anchor.clone()) for b, m in zip(state.buckets, masked_by_spec(state, keep_zero_only=True))]


def _holds_masks_through_second_task(model, tmp_path):
    callback = AIMCallback(ak.preset("aim"))
    _train(model, "colour", callback, tmp_path)
    state = callback.state
    assert state is ak.step.state_of(model) and state.steps == STEPS
    assert state.steps_since_consolidation == 0                   # consolidated at train end
    masks = _masks(state)
    assert any(m.any() for m, _ in masks)
    held = MasksHeld(state, masks)     # AdamW with weight_decay=0.01 across the steps
    _train(model, "position", callback, tmp_path, extra=[held])   # same state, second task
    assert state.steps == 2 * STEPS and held.steps == STEPS
    moved = 0
    for b, (masked, anchor) in zip(state.buckets, masks):
        # masked elements: kappa = 0 and, with drift 0, r = 0 -> never moved
        assert torch.equal(b.param[masked], anchor[masked])
        moved += int((b.param[~masked] != anchor[~masked]).sum())
    assert moved > 0
    return state


def test_trainer_callback_two_tasks_holds_masked_elements(tmp_path):
    state = _holds_masks_through_second_task(tiny_llava(seed=0, layers=1), tmp_path)
    assert list(state.groups) == ["vision", "projector", "language"]


def test_peft_lora_llava_trains_with_the_right_groups(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                          modules_to_save=["multi_modal_projector"])
    model = peft.get_peft_model(tiny_llava(seed=0, layers=1), cfg)
    state = _holds_masks_through_second_task(model, tmp_path)
    assert state.groups["vision"] == []
    assert state.groups["projector"] and all("modules_to_save" in n
                                             for n in state.groups["projector"])
    assert state.groups["language"] and all("lora_" in n for n in state.groups["language"])


def test_trainer_clips_the_whole_gradient_regulariser_included(tmp_path):
    """masked_step runs on the raw gradient, then the callback clips the sum (DESIGN.md 3):
    with an EWC λ of 10⁴ (fixed here: the tuned preset may change) the applied gradient
    still has norm <= max_grad_norm."""
    from aim_kernels.config import RoleValues, ROLES
    model = tiny_llava(seed=0, layers=1)
    callback = AIMCallback(ak.preset("ewc", role_values={r: RoleValues(lam=1e4) for r in ROLES}))
    _train(model, "colour", callback, tmp_path)
    norms = GradNorm()
    trainer = _train(model, "position", callback, tmp_path, extra=[norms],
                     logging_strategy="steps", logging_steps=1)
    assert len(norms.norms) == STEPS
    assert max(norms.norms) <= 1.0 * (1 + 1e-5)
    assert trainer.args.max_grad_norm == 1.0                       # handed back at the end
    # the regulariser is active (without clipping the norm would be far above 1) and the
    # Fisher saw the unclipped gradient: grad_sq is the square of the Trainer's raw norm
    assert callback.last_stats.as_dict()["language"]["reg_sq"] > 10.0
    raw = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    grad_sq = sum(g["grad_sq"] for g in callback.last_stats.as_dict().values())
    assert raw[-1] > 1.0 and grad_sq == pytest.approx(raw[-1] ** 2, rel=1e-4)


@pytest.mark.slow
def test_trainer_resume_from_checkpoint_is_exact(tmp_path):
    """Task one, then task two saving every 4 steps; a fresh model, callback and Trainer
    resumed from task two's checkpoint-4 end bitwise where the uninterrupted run ended."""
    model = tiny_llava(seed=0, layers=1)
    callback = AIMCallback(ak.preset("aim"))
    _train(model, "colour", callback, tmp_path)
    over = dict(save_strategy="steps", save_steps=4, output_dir=str(tmp_path / "two"))
    _train(model, "position", callback, tmp_path, **over)
    want = {k: v.clone() for k, v in callback.state.state_dict().items()}
    want_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    ckpt = tmp_path / "two" / "checkpoint-4"
    assert (ckpt / "aim_state.safetensors").exists()

    # A fresh model from the checkpoint: transformers 5.24's Trainer reloads weights with
    # load_state_dict under the names save_pretrained wrote, which for LLaVA are the legacy
    # ones (`vision_tower.*` for `model.vision_tower.*`), so it would load none of them.
    model = type(model).from_pretrained(str(ckpt))
    callback = AIMCallback(ak.preset("aim"))
    _train(model, "position", callback, tmp_path, resume=str(ckpt), **over)
    got = callback.state
    assert got.steps == 2 * STEPS and got.steps_since_consolidation == 0
    assert want["bucket0.importance"].any()
    for key, value in want.items():
        assert torch.equal(got.state_dict()[key], value), key
    for name, p in model.named_parameters():
        assert torch.equal(p, want_params[name]), name


def test_trainer_resume_without_the_aim_state_raises(tmp_path):
    model = tiny_llava(seed=0, layers=1)
    callback = AIMCallback(ak.preset("aim"))
    over = dict(save_strategy="steps", save_steps=4, max_steps=4)
    _train(model, "colour", callback, tmp_path, **over)
    ckpt = tmp_path / "colour" / "checkpoint-4"
    (ckpt / "aim_state.safetensors").unlink()
    fresh = AIMCallback(ak.preset("aim"))
    with pytest.raises(RuntimeError, match="no AIM state"):
        _train(tiny_llava(seed=0, layers=1), "colour", fresh, tmp_path, resume=str(ckpt),
               max_steps=8, save_strategy="no")


def test_trainer_fp16_grad_scaler_skips_with_the_optimizer(tmp_path):
    """fp16 through accelerate's GradScaler path, driven by a CPU GradScaler: the first step
    overflows (init_scale 2^127), the scaler and the callback both skip it, the scale backs
    off, and the remaining steps are taken by both."""
    model = tiny_llava(seed=0, layers=1)
    callback = AIMCallback(ak.preset("aim"))
    trainer = AnswerTrainer(model=model, args=_args(tmp_path / "fp16", fp16=True,
                                                    logging_strategy="steps", logging_steps=1),
                            train_dataset=TaskData("colour"), callbacks=[callback])
    acc = trainer.accelerator
    # 2^127 overflows; one backoff to 2^7 keeps the fp16 activations' gradients finite
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, backoff_factor=2.0 ** -120,
                                      growth_interval=1000)
    acc.native_amp = True
    skipped = []

    class Skips(transformers.TrainerCallback):      # GradScaler backs off on a skipped step
        def on_step_begin(self, args, state, control, **kwargs):
            self.scale = acc.scaler.get_scale()

        def on_optimizer_step(self, args, state, control, **kwargs):
            skipped.append(acc.scaler.get_scale() < self.scale)

    trainer.add_callback(Skips())
    trainer.train()
    state = callback.state
    assert skipped[0] and not any(skipped[1:]) and len(skipped) == STEPS, (skipped, state.steps, acc.scaler.get_scale())
    assert state.steps == STEPS - 1          # the skipped step left the state untouched
    assert all(torch.isfinite(b.importance).all() and b.importance.any() for b in state.buckets)
