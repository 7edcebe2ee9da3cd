"""`make demo`: a tiny LLaVA trained on two synthetic tasks with preset("aim").

Prints the accuracy on both tasks after each task and the per-group stats of the
last step of each task. Runs in well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

import aim_kernels as ak
from aim_kernels.continual.tiny import synthetic_batch, tiny_llava

TASKS = ("position", "colour")


def _print_stats(stats: ak.StepStats) -> None:
    names = ak.ops.STAT_NAMES
    print(f"  {'group':<10}" + "".join(f"{n:>12}" for n in names))
    for group, row in stats.as_dict().items():
        print(f"  {group:<10}" + "".join(f"{row[n]:>12.4g}" for n in names))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="aim", choices=ak.config.PRESETS)
    parser.add_argument("--steps", type=int, default=200, help="steps per task")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = tiny_llava(seed=args.seed)
    state = ak.attach(model, ak.preset(args.method))
    print(f"aim_kernels {ak.__version__}, backends {ak.available_backends()}, method {args.method}")
    print(state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    test = {t: synthetic_batch(t, 512, torch.Generator().manual_seed(10_000 + i))
            for i, t in enumerate(TASKS)}
    acc = []
    for i, task in enumerate(TASKS):
        bar = tqdm(range(args.steps), desc=f"task {i} ({task})", leave=False)
        step_time = masked_time = 0.0
        for _ in bar:
            t0 = time.perf_counter()
            batch = synthetic_batch(task, args.batch, gen)
            loss = batch.loss(model)
            state.zero_grad()
            loss.backward()
            t1 = time.perf_counter()
            stats = ak.masked_step(model)
            masked_time += time.perf_counter() - t1
            optimizer.step()
            step_time += time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss.item():.3f}")
        ak.consolidate(model)
        acc.append({t: test[t].accuracy(model) for t in TASKS})
        print(f"after task {i} ({task}): " + ", ".join(
            f"{t} acc {100 * a:.1f}%" for t, a in acc[-1].items())
              + f"; masked_step {100 * masked_time / step_time:.1f}% of the step time")
        print(f"  stats of the last step of task {i}:")
        _print_stats(stats)
    forgetting = 100 * (acc[0][TASKS[0]] - acc[1][TASKS[0]])
    print(f"forgetting of task 0 ({TASKS[0]}): {forgetting:.1f} points")
    return {"acc": acc, "forgetting": forgetting}


if __name__ == "__main__":
    main()
