"""The presets' sweep on seed 0 only (reported seeds are 1, 2, 3).

``python -m aim_kernels.continual.tune --jobs 2 --out benchmarks/results/continual/tuning_seed0.json``
runs every candidate of ``GRID`` at ``compare``'s settings (tiny model, 300 steps per
task, AdamW lr 4e-3) on seed 0 and records AP / AF / novel and the learnt-task check
per candidate. The pick per method (:func:`pick`) is the highest AP among the
candidates that learn every task (R[j][j] above the task's learnt threshold) and
forget less than naive (AF below naive's); AF breaks ties. A method with no such
candidate is recorded under ``"no_pick"`` with the reason and the candidate kept
for its preset (fewest unlearnt tasks, then highest AP). ``--part k/n`` runs every
n-th candidate; ``--merge`` joins part files.

``--data DIR`` sweeps on task data from files instead (a LLaVA-format folder, as
``compare --data``: the answer-free warm-up, lr 1e-3 unless ``--lr``), and ``--scales
0.1,0.3,1`` replaces ``GRID`` by each ``--only`` method's shipped preset with every
group's lambda multiplied by each factor (rho and kappa kept), e.g. ``python -m
aim_kernels.continual.tune --data DIR --only mm-ewc,aim --scales 0.1,0.3,1 --out F``.
A pick there is passed to ``compare`` with ``--lam METHOD=V/P/L``. ``--model``,
``--first-steps``, ``--lora`` and ``--lora-vocab`` sweep at compare's setting of the same
flags (e.g. the 56x ``--model asym --lr 2e-3 --first-steps 600``), sharing its cache.

Why this grid (round 3): under AdamW the update is the sign-like ``m / sqrt(v)`` of
``g + r``, so once the regulariser ``r = lambda * s * d`` (``s`` has mean 1 per group
when ``normalize``) is much larger than the task gradient ``g``, every element is held
at its anchor whatever ``g`` says: the earlier picks (mm-ewc 1e3/1e4/1e3, aim 1e2/1e3/1e2)
gave ``|r| / |g|`` of 200-2000 and learnt no task after the first. The masks were not
the cause (5% of the projector and 1% of the decoder held). The grid therefore spans
lambda from where ``r`` is comparable to ``g`` (~1) up to the old values.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from aim_kernels.config import ROLES, RoleValues

from . import data
from .compare import DATA_LR, run_spec, scaled_roles
from .model import MODELS
from .train import RunConfig, run_method

LR = 4e-3          # compare's default (RunConfig's 2e-3 is the library default)


def _roles(v=0.0, p=0.0, l=0.0, rv=0.0, rp=0.0, rl=0.0):
    vals = {"vision": (rv, v), "projector": (rp, p), "language": (rl, l)}
    return {r: RoleValues(mask_ratio=vals[r][0], keep=0.0, lam=vals[r][1]) for r in ROLES}


def _same(lam):
    return _roles(lam, lam, lam)


def _asym(lam, rho=(0.0, 0.0)):
    """Projector lambda (and rho) larger than the other groups', as DESIGN 2.5 asks of aim."""
    return _roles(lam, 10 * lam, lam, rho[0], rho[1], rho[0])


# (method, label, overrides); labels are what the JSON records. naive is the reference
# the "protects" half of the criterion is measured against.
GRID = [("naive", "-", {})]
GRID += [("ewc", f"lam={x:g}", {"role_values": _same(x)}) for x in (1e2, 1e3, 1e4)]
GRID += [("mm-ewc", f"lam={x:g}/{10 * x:g}/{x:g}", {"role_values": _asym(x)}) for x in (0.1, 0.3, 1, 3, 10)]
GRID += [("mas", f"lam={x:g}", {"role_values": _same(x)}) for x in (1, 10, 100)]
GRID += [("merge", f"align_every={k}", {"align_every": k}) for k in (10, 50, 150)]
GRID += [("fisher-merge", f"lam={x:g}", {"role_values": _same(x)}) for x in (0.1, 1, 10)]
GRID += [("aim", f"rho={r[0]:g}/{r[1]:g}/{r[0]:g} lam={x:g}/{10 * x:g}/{x:g}",
          {"role_values": _asym(x, r)})
         for r in ((0.01, 0.05), (0.05, 0.2)) for x in (0.3, 1, 3, 10)]
# round 2 (--resume), after round 1 left merge with no candidate that learns shape (its
# linear merge halves each task's progress and the alignment resets sign flips) and mas
# protecting little at lam=1 and 10 and not learning existence at 100
GRID += [("merge", "align_every=300", {"align_every": 300}), ("mas", "lam=30", {"role_values": _same(30)})]


def _lam_label(roles: dict) -> str:
    lam = "/".join(f"{roles[r].lam:g}" for r in ROLES)
    rho = "/".join(f"{roles[r].mask_ratio:g}" for r in ROLES)
    return (f"rho={rho} " if any(roles[r].mask_ratio for r in ROLES) else "") + f"lam={lam}"


def scaled_grid(methods, scales) -> list[tuple[str, str, dict]]:
    """naive, then per method its shipped preset with every group's lambda times each
    scale (mask ratio and keep as shipped); labels as ``GRID``'s (``lam=V/P/L``, with
    ``rho=...`` first where the preset masks)."""
    grid = [("naive", "-", {})]
    for m in methods:
        if m == "naive":
            continue
        for f in scales:
            try:
                roles = scaled_roles(m, f)
            except ValueError as e:
                raise ValueError(f"--scales: {e}") from None
            grid.append((m, _lam_label(roles), {"role_values": roles}))
    return grid


def _jsonable(ov: dict) -> dict:
    return {k: ({r: {f: getattr(x, f) for f in x.__dataclass_fields__} for r, x in v.items()}
                if k == "role_values" else v) for k, v in ov.items()}


def _one(method, label, ov, steps, lr, cache, taskset, spec, first_steps):
    torch.set_num_threads(1)
    rc = RunConfig(steps=steps, lr=lr, progress=False, cache=cache, first_steps=first_steps, spec=spec)
    if taskset is not None:
        r = run_method(method, taskset, tuple(taskset.train), 0, rc, ov)
    else:
        r = run_method(method, data.make_benchmark(0), data.SKILLS, 0, rc, ov)
    return {"method": method, "label": label, "overrides": _jsonable(ov),
            "ap": round(r["ap"], 2), "af": round(r["af"], 2), "novel": round(r["novel"], 2),
            "learnt_all": not r["unlearnt"], "unlearnt": [u["task"] for u in r["unlearnt"]],
            "diagonal": [round(r["acc_matrix"][j][j], 1) for j in range(len(r["acc_matrix"]))],
            "acc_matrix": r["acc_matrix"], "seconds": round(r["seconds"], 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None,
                   help="default benchmarks/results/continual/tuning_seed0.json (required with --data)")
    p.add_argument("--part", default="0/1")
    p.add_argument("--steps", type=int, default=RunConfig.steps)
    p.add_argument("--lr", type=float, default=None, help=f"default {LR:g} (--data: 1e-3)")
    p.add_argument("--data", default=None, metavar="DIR", help="task data from files (as compare --data)")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="pre-training / --data warm-up steps (default compare's, so its cache is shared)")
    p.add_argument("--model", default="tiny", choices=tuple(MODELS), help="as compare --model")
    p.add_argument("--first-steps", type=int, default=0, metavar="N",
                   help="as compare --first-steps: steps of the first task (0: --steps)")
    p.add_argument("--lora", type=int, default=0, metavar="R", help="as compare --lora")
    p.add_argument("--lora-vocab", action="store_true", help="as compare --lora-vocab")
    p.add_argument("--scales", default=None,
                   help="comma-separated factors: candidates are the --only methods' presets with lambda scaled")
    p.add_argument("--jobs", type=int, default=1, help="candidates in parallel processes (1 thread each)")
    p.add_argument("--cache", default=None)
    p.add_argument("--only", default=None, help="comma-separated methods (naive is always run)")
    p.add_argument("--merge", nargs="*", default=None, help="part files to join into --out")
    p.add_argument("--resume", action="store_true", help="keep --out's rows and run only the missing candidates")
    args = p.parse_args(argv)
    taskset = None
    if args.data:
        from .taskdata import TaskDataError, load
        if args.out is None:
            p.error("--data needs --out (tuning_seed0.json is the generated benchmark's sweep)")
        try:
            taskset = load(args.data)
        except TaskDataError as e:
            p.error(f"bad --data: {e}")
    if args.out is None:
        args.out = "benchmarks/results/continual/tuning_seed0.json"
    if args.lr is None:
        args.lr = DATA_LR if taskset is not None else LR
    if args.first_steps < 0:
        p.error(f"--first-steps must be >= 0, got {args.first_steps}")
    try:
        spec = run_spec(args.model, args.lora, args.lora_vocab, args.pretrain_steps, taskset is not None)
    except ValueError as e:
        p.error(str(e))
    grid = GRID
    if args.scales:
        if not args.only:
            p.error("--scales needs --only (the methods whose presets are scaled)")
        grid = scaled_grid(args.only.split(","), [float(x) for x in args.scales.split(",")])
    meta = {"steps_per_task": args.steps, "lr": args.lr, "model": args.model,
            "command": "python -m aim_kernels.continual.tune " + " ".join(argv if argv is not None else
                                                                         __import__("sys").argv[1:])}
    if taskset is not None:
        meta.update(data={"source": taskset.source, "hash": taskset.data_hash}, skills=list(taskset.train))
    if args.pretrain_steps:
        meta["pretrain_steps"] = args.pretrain_steps
    if args.first_steps:
        meta["first_task_steps"] = args.first_steps
    if args.lora:
        meta.update(lora=args.lora, lora_vocab=args.lora_vocab)
    if args.merge is not None:
        rows = [r for f in args.merge for r in json.loads(Path(f).read_text())["candidates"]]
        write(rows, args.out, meta)
        return
    k, n = (int(x) for x in args.part.split("/"))
    grid = [g for i, g in enumerate(grid) if i % n == k
            and (not args.only or g[0] in args.only.split(",") + ["naive"])]
    rows = []
    if args.resume and Path(args.out).exists():
        old = json.loads(Path(args.out).read_text())
        rows = old["candidates"]
        meta["command"] = old["command"] + "; then " + meta["command"]
        have = {(r["method"], r["label"]) for r in rows}
        grid = [g for g in grid if (g[0], g[1]) not in have]

    def done(row):
        rows.append(row)
        print(f"{row['method']:>12} {row['label']:<34} AP {row['ap']:5.1f} AF {row['af']:5.1f} "
              f"R[j][j] {row['diagonal']}{'' if row['learnt_all'] else ' unlearnt: ' + ','.join(row['unlearnt'])}",
              flush=True)
        write(rows, args.out, meta)

    if args.jobs > 1:
        import concurrent.futures as cf
        import multiprocessing as mp
        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futs = [pool.submit(_one, m, lab, ov, args.steps, args.lr, args.cache, taskset, spec,
                                args.first_steps) for m, lab, ov in grid]
            for f in cf.as_completed(futs):
                done(f.result())
    else:
        for m, lab, ov in grid:
            done(_one(m, lab, ov, args.steps, args.lr, args.cache, taskset, spec, args.first_steps))


CRITERION = ("highest AP among the candidates that learn every task (learnt-task check) and "
             "forget less than naive (AF < naive's); ties: lowest AF; ablation rows are not candidates")


def pick(rows: list[dict]) -> tuple[dict, dict]:
    """``(picked, no_pick)``: per method the label of the pick under :data:`CRITERION`,
    and for a method with no admissible candidate, why."""
    naive = next((r for r in rows if r["method"] == "naive"), None)
    picked, no_pick = {}, {}
    for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "naive"):
        cands = [r for r in rows if r["method"] == m and not r["label"].startswith("ablation")]
        ok = [r for r in cands if r.get("learnt_all", True)
              and (naive is None or r["af"] < naive["af"])]
        if ok:
            picked[m] = max(ok, key=lambda r: (r["ap"], -r["af"]))["label"]
        elif cands:
            learnt = [r for r in cands if r.get("learnt_all", True)]
            # The preset still needs values: the candidate that leaves the fewest tasks
            # unlearnt, then the highest AP.
            kept = min(cands, key=lambda r: (len(r.get("unlearnt", [])), -r["ap"], r["af"]))
            no_pick[m] = {"reason": "no candidate learns every task" if not learnt else
                          f"every candidate that learns every task forgets at least as much as naive "
                          f"(AF {min(r['af'] for r in learnt):.1f} vs {naive['af']:.1f})",
                          "kept": kept["label"]}
    return picked, no_pick


def write(rows, out, meta: dict) -> None:
    picked, no_pick = pick(rows)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({
        "seed": 0, "skills": list(data.SKILLS), **meta, "criterion": CRITERION,
        "candidates": rows, "picked": picked, "no_pick": no_pick}, indent=1))


if __name__ == "__main__":
    main()
