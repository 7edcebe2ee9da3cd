"""Probe (issue 12 point 7): does naive learn each skill as the FIRST task at --model asym?

For each seed and each skill, the pre-trained asym model (the compare cache) trains that
skill alone, naive preset, through ``train._train`` (the benchmark's own loop: fresh AdamW,
batch 32, ``--warmup`` as compare applies it), and its test accuracy (argmax over the
skill's candidates) is read after every ``--every`` steps. One torch thread per process.

    .venv/bin/python benchmarks/results/continual/asym-probes/first_task.py \
        --lr 2e-3 --warmup 0 --steps 300 --seeds 0 --jobs 2 --out DIR/lr2e-3.json
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import aim_kernels as ak
from aim_kernels.continual import data, metrics
from aim_kernels.continual.model import make_model, model_spec
from aim_kernels.continual.train import _batches, _train, evaluate


def one(seed, skill, lr, warmup, steps, every, lora):
    torch.set_num_threads(1)
    t0 = time.process_time()
    bench = data.make_benchmark(seed)
    spec = model_spec("asym", lora)
    model, _ = make_model(spec, seed)
    ak.attach(model, ak.preset("naive"))
    curve = []

    def gen():
        for k, b in enumerate(_batches([bench.train[skill]], steps, 32,
                                       torch.Generator().manual_seed(seed * 1000))):
            if k and k % every == 0:
                curve.append((k, round(evaluate(model, bench.test[skill]), 1)))
            yield b
    log = {"step": [], "groups": {}, "task_ends": []}
    _train(model, gen(), steps, lr, "", False, log, 10 ** 9, 0, warmup)
    curve.append((steps, round(evaluate(model, bench.test[skill]), 1)))
    chance = data.chance_levels(bench)[skill]
    return {"seed": seed, "skill": skill, "curve": curve, "chance": round(chance, 1),
            "learnt": curve[-1][1] >= metrics.learnt_threshold(chance),
            "cpu_s": round(time.process_time() - t0, 1)}


def prep(seed, lora):
    torch.set_num_threads(1)
    t0 = time.process_time()
    make_model(model_spec("asym", lora), seed, bench=data.make_benchmark(seed))
    return round(time.process_time() - t0, 1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--seeds", default="0")
    p.add_argument("--skills", default=",".join(data.SKILLS))
    p.add_argument("--lora", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import concurrent.futures as cf
    import multiprocessing as mp
    t0 = time.time()
    jobs = [(int(s), k) for s in a.seeds.split(",") for k in a.skills.split(",")]
    rows = []
    with cf.ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn")) as pool:
        seeds = sorted({s for s, _ in jobs})
        for s, f in zip(seeds, [pool.submit(prep, s, a.lora) for s in seeds]):
            print(f"seed {s}: pre-trained model ready ({f.result()} CPU-s)", flush=True)
        futs = [pool.submit(one, s, k, a.lr, a.warmup, a.steps, a.every, a.lora) for s, k in jobs]
        for f in futs:
            r = f.result()
            rows.append(r)
            print(f"seed {r['seed']} {r['skill']:<10} chance {r['chance']:5.1f} "
                  f"{' '.join(f'{k}:{v:5.1f}' for k, v in r['curve'])} {'' if r['learnt'] else 'NOT LEARNT'}"
                  f" ({r['cpu_s']} CPU-s)", flush=True)
    res = {"args": vars(a), "rows": rows, "unlearnt": sum(not r["learnt"] for r in rows),
           "wall_s": round(time.time() - t0, 1), "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(f"unlearnt {res['unlearnt']}/{len(rows)}; wall {res['wall_s']} s; load {res['load_average']}")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
