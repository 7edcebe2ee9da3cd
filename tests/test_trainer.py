"""HF Trainer with AIMCallback (one ``trainer.train()`` = one task) and a PEFT-wrapped
LLaVA, on a tiny LLaVA on CPU: masked elements are held through the next task."""
from __future__ import annotations

import pytest
import torch

import aim_kernels as ak

transformers = pytest.importorskip("transformers")
from aim_kernels.continual.tiny import synthetic_batch, tiny_llava  # noqa: E402
from aim_kernels.integrations import AIMCallback  # noqa: E402

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


def _train(model, task, callback, tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / task), per_device_train_batch_size=8, max_steps=STEPS,
        learning_rate=3e-3, weight_decay=0.0, max_grad_norm=1.0, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True,
        remove_unused_columns=False, seed=0, dataloader_num_workers=0)
    AnswerTrainer(model=model, args=args, train_dataset=TaskData(task),
                  callbacks=[callback]).train()


def _masks(state):
    """Per bucket, the masked elements after the last consolidation, and the anchors."""
    out = []
    for b in state.buckets:
        masked = torch.zeros(b.numel, dtype=torch.bool)
        for g in range(state.num_groups):
            lo, hi = b.group_range(g)
            om = b.importance[lo:hi]
            masked[lo:hi] = (om >= b.thresh[g]) & (om > 0)
        out.append((masked, b.anchor.clone()))
    return out


def _holds_masks_through_second_task(model, tmp_path):
    callback = AIMCallback(ak.preset("aim"))
    _train(model, "colour", callback, tmp_path)
    state = callback.state
    assert state is ak.step.state_of(model) and state.steps == STEPS
    assert state.steps_since_consolidation == 0                   # consolidated at train end
    masks = _masks(state)
    assert any(m.any() for m, _ in masks)
    _train(model, "position", callback, tmp_path)                 # same state, second task
    assert state.steps == 2 * STEPS
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
