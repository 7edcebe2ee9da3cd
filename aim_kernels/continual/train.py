"""The continual loop: tasks in order, answer-token loss, AdamW, ``masked_step`` every
step, ``consolidate`` at each task end, evaluation after each task (the matrix R).

``joint`` trains one model on all tasks at once (the upper bound) for
``joint_factor`` (default 2) times the sequential total of steps: six skills
learnt at once converge more slowly than one at a time. Its R has one row.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import aim_kernels as ak

from . import data, metrics
from ..step import state_of
from .model import ModelSpec, inputs, make_model

METHODS = tuple(ak.config.PRESETS)          # naive, ewc, mm-ewc, mas, merge, fisher-merge, aim
ALL = METHODS + ("joint",)


@dataclass
class RunConfig:
    steps: int = 300            # per task
    batch: int = 32
    lr: float = 2e-3
    # Linear lr warm-up over the first ``warmup`` steps of each task (each task starts a
    # fresh AdamW; joint: of its one run); 0: none (the default, unchanged behaviour).
    warmup: int = 0
    # Steps of the first task of each order (0: ``steps``). A deeper decoder (--model asym)
    # sits on a plateau at chance for 100-400 steps on the first task it meets (the first
    # readout of the image for a new question word); later tasks start from that readout.
    first_steps: int = 0
    joint_factor: float = 2.0   # joint trains this many times the sequential total of steps
    drift_every: int = 10       # record per-group stats every this many steps
    eval_batch: int = 512
    progress: bool = True
    spec: ModelSpec = field(default_factory=ModelSpec)
    checkpoint: str | None = None
    cache: str | None = None


def answer_logits(model, images, questions) -> torch.Tensor:
    pix, ids = inputs(model, images, questions)
    return model(input_ids=ids, pixel_values=pix).logits[:, -1]


@torch.no_grad()
def evaluate(model, split: data.Split, batch: int = 512) -> float:
    """Accuracy in percent, the argmax restricted to the skill's candidate answers."""
    was = model.training
    model.eval()
    correct = 0
    for lo in range(0, len(split), batch):
        logits = answer_logits(model, split.images[lo:lo + batch], split.questions[lo:lo + batch])
        pred = split.candidates[logits[:, split.candidates].argmax(-1)]
        correct += int((pred == split.answers[lo:lo + batch]).sum())
    model.train(was)
    return 100.0 * correct / len(split)


def _batches(splits: list[data.Split], steps: int, batch: int, gen: torch.Generator):
    """Random batches drawn uniformly from the union of ``splits``."""
    images = torch.cat([s.images for s in splits])
    questions = torch.cat([s.questions for s in splits])
    answers = torch.cat([s.answers for s in splits])
    for _ in range(steps):
        idx = torch.randint(0, len(answers), (batch,), generator=gen)
        yield images[idx], questions[idx], answers[idx]


def warmup_lr(lr: float, step: int, warmup: int) -> float:
    """The learning rate of step ``step`` (0-based) of a task: ``lr`` times (step + 1) /
    ``warmup`` for the first ``warmup`` steps, then ``lr``."""
    return lr if warmup <= 0 else lr * min(1.0, (step + 1) / warmup)


def _train(model, batches, steps: int, lr: float, desc: str, progress: bool, log: dict,
           drift_every: int, offset: int, warmup: int = 0) -> tuple[float, float]:
    """One task. Returns (seconds of whole steps, seconds inside masked_step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)   # fresh per task
    state = state_of(model)
    step_t = masked_t = 0.0
    bar = batches
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(batches, total=steps, desc=desc, leave=False)
    run_loss = run_acc = None
    model.train()
    for step, (images, questions, answers) in enumerate(bar):
        pix, ids = inputs(model, images, questions)
        t0 = time.perf_counter()
        logits = model(input_ids=ids, pixel_values=pix).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, answers)
        state.zero_grad()
        loss.backward()
        t1 = time.perf_counter()
        stats = ak.masked_step(model)
        t2 = time.perf_counter()
        if warmup:
            for group in opt.param_groups:
                group["lr"] = warmup_lr(lr, step, warmup)
        opt.step()
        t3 = time.perf_counter()
        step_t += t3 - t0
        masked_t += t2 - t1
        if step % drift_every == 0 or step == steps - 1:
            log["step"].append(offset + step)
            for g, row in stats.as_dict().items():
                log["groups"].setdefault(g, {"drift_sq": [], "penalty": [], "masked": []})
                for k in ("drift_sq", "penalty", "masked"):
                    log["groups"][g][k].append(row[k])
        if progress:
            acc = float((logits.detach().argmax(-1) == answers).float().mean())
            run_loss = loss.item() if run_loss is None else 0.9 * run_loss + 0.1 * loss.item()
            run_acc = acc if run_acc is None else 0.9 * run_acc + 0.1 * acc
            bar.set_postfix(loss=f"{run_loss:.3f}", acc=f"{100 * run_acc:.0f}%", refresh=False)
    return step_t, masked_t


def _warn_unlearnt(method, seed, task, acc, chance):
    """Say at once (not only in the report) when a task did not train."""
    if acc < metrics.learnt_threshold(chance):
        print(f"warning: {method} seed {seed}: task {task!r} not learnt: {acc:.1f}% right after "
              f"training it (chance {chance:.1f}%, learnt from {metrics.learnt_threshold(chance):.1f}%)",
              flush=True)


def task_steps(rc: RunConfig, k: int) -> int:
    """Training steps of the ``k``-th task (0-based) of an order."""
    return rc.first_steps if (k == 0 and rc.first_steps > 0) else rc.steps


def sequential_steps(rc: RunConfig, tasks: int) -> int:
    """The sequential total of steps over ``tasks`` tasks (joint trains ``joint_factor`` x this)."""
    return sum(task_steps(rc, k) for k in range(tasks))


def run_method(method: str, bench: data.Benchmark, order, seed: int, rc: RunConfig,
               overrides: dict | None = None) -> dict:
    """Train one method through ``order`` (skill names); returns R, AP, AF, novel, timings."""
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    model, info = make_model(rc.spec, seed, rc.checkpoint, rc.cache, progress=rc.progress, bench=bench)
    chance = data.chance_levels(bench)
    cfg = ak.preset("naive" if method == "joint" else method, **(overrides or {}))
    ak.attach(model, cfg)
    order = list(order)
    log = {"step": [], "groups": {}, "task_ends": []}
    step_t = masked_t = 0.0
    R = []
    try:
        if method == "joint":
            gen = torch.Generator().manual_seed(seed * 1000 + 999)
            total = int(round(sequential_steps(rc, len(order)) * rc.joint_factor))
            batches = _batches([bench.train[s] for s in order], total, rc.batch, gen)
            s_t, m_t = _train(model, batches, total, rc.lr, f"{method} s{seed} all tasks",
                              rc.progress, log, rc.drift_every, 0, rc.warmup)
            step_t, masked_t = step_t + s_t, masked_t + m_t
            R.append([evaluate(model, bench.test[s], rc.eval_batch) for s in order])
            log["task_ends"].append(total)
        else:
            done = 0
            for k, skill in enumerate(order):
                gen = torch.Generator().manual_seed(seed * 1000 + k)
                steps = task_steps(rc, k)
                batches = _batches([bench.train[skill]], steps, rc.batch, gen)
                s_t, m_t = _train(model, batches, steps, rc.lr,
                                  f"{method} s{seed} task {k + 1}/{len(order)} {skill}",
                                  rc.progress, log, rc.drift_every, done, rc.warmup)
                step_t, masked_t = step_t + s_t, masked_t + m_t
                ak.consolidate(model)
                done += steps
                log["task_ends"].append(done)
                R.append([evaluate(model, bench.test[s], rc.eval_batch) for s in order])
                _warn_unlearnt(method, seed, skill, R[k][k], chance[skill])
        novel_parts = [evaluate(model, bench.novel[s], rc.eval_batch)
                       for s in list(order) + sorted(set(bench.novel) - set(order)) if s in bench.novel]
    finally:
        ak.detach(model)
    novel = sum(novel_parts) / len(novel_parts) if novel_parts else float("nan")
    return {
        "method": method, "seed": seed, "order": order, "acc_matrix": R,
        "ap": metrics.average_performance(R), "af": metrics.average_forgetting(R),
        "last": metrics.last_average(R), "bwt": metrics.backward_transfer(R),
        "unlearnt": metrics.unlearnt_tasks(R, order, chance), "chance": chance,
        "novel": novel, "seconds": time.perf_counter() - t_start,
        "train_seconds": step_t, "step_overhead": masked_t / step_t if step_t else 0.0,
        "drift": log, "pretrain": info,
    }
