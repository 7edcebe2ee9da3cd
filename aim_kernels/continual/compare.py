"""``aim-kernels compare`` / ``run``: every method on the same seeds and task orders.

quick = one seed (seed 1), full = three seeds (1, 2, 3); seed 0 is kept for tuning
the presets (``benchmarks/results/continual/tuning_seed0.json``), so nothing
reported is tuned on. Writes ``summary.json``, ``report.md``, PNG plots and
``runs.json`` (every run's R, order, timings and per-group drift) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from . import contribution, data, deps, metrics, report
from .model import MODELS, ModelSpec, make_model, model_spec, param_counts
from .train import ALL, METHODS, RunConfig, run_method

PRESETS = {"quick": {"seeds": [1]}, "full": {"seeds": [1, 2, 3]}}


def task_orders(seed: int, n: int, mode: str, skills=data.SKILLS, rc: RunConfig | None = None,
                bench=None) -> list[list[str]]:
    """The task orders of one seed: the default order, ``n`` random ones, or the
    order minimising the cross-modal contribution of adjacent tasks (seed 001)."""
    if mode == "contribution":
        from .contribution import contribution_order, contributions
        model, _ = make_model(rc.spec, seed, rc.checkpoint, rc.cache, progress=rc.progress, bench=bench)
        con = contributions(model, bench, list(skills))
        return [contribution_order(con, list(skills))]
    if mode == "random" or n > 1:
        rng = np.random.default_rng([seed, 7])
        return [list(skills) if (k == 0 and mode != "random") else
                [skills[i] for i in rng.permutation(len(skills))] for k in range(n)]
    return [list(skills)]


def device_name() -> str:
    import os
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def aggregate(runs: list[dict]) -> dict:
    ap = [r["ap"] for r in runs]
    af = [r["af"] for r in runs]
    nv = [r["novel"] for r in runs]
    out = {}
    out["ap"], out["ap_std"] = metrics.mean_std(ap)
    out["af"], out["af_std"] = metrics.mean_std(af)
    out["novel"], out["novel_std"] = metrics.mean_std(nv)
    out["last"], out["last_std"] = metrics.mean_std([r["last"] for r in runs])
    out["bwt"], out["bwt_std"] = metrics.mean_std([r["bwt"] for r in runs])
    R = np.mean([np.array(r["acc_matrix"]) for r in runs], axis=0)
    out["acc_matrix"] = [[round(float(x), 2) for x in row] for row in R]
    out["orders"] = [r["order"] for r in runs]
    out["seconds"] = float(np.mean([r["seconds"] for r in runs]))
    out["train_seconds"] = float(np.mean([r["train_seconds"] for r in runs]))
    out["step_overhead"] = float(np.mean([r["step_overhead"] for r in runs]))
    out["runs"] = len(runs)
    out["unlearnt_runs"] = sum(bool(r["unlearnt"]) for r in runs)
    for k in ("ap", "ap_std", "af", "af_std", "novel", "novel_std", "last", "last_std", "bwt", "bwt_std",
              "seconds", "train_seconds"):
        out[k] = round(out[k], 3)
    out["step_overhead"] = round(out["step_overhead"], 4)
    return out


def paired_differences(runs: dict[str, list[dict]], baseline: str = "naive") -> dict:
    """Per method, its AP / AF / BWT minus ``baseline``'s on the same seed and task order,
    averaged over the pairs with a 95% t-interval (:func:`metrics.paired_difference`)."""
    if baseline not in runs:
        return {}
    base = {(r["seed"], tuple(r["order"])): r for r in runs[baseline]}
    out = {}
    for m, rs in runs.items():
        if m in (baseline, "joint"):
            continue
        pairs = [(r, base[(r["seed"], tuple(r["order"]))]) for r in rs
                 if (r["seed"], tuple(r["order"])) in base]
        if pairs:
            out[m] = {k: metrics.paired_difference([a[k] for a, _ in pairs], [b[k] for _, b in pairs])
                      for k in ("ap", "af", "bwt")}
    return out


def learnt_check(runs: dict[str, list[dict]], chance: dict[str, float]) -> dict:
    """Chance level and learnt threshold per task, and every (method, seed, order, task)
    whose accuracy right after its training stayed below the threshold."""
    flagged = [dict(u, method=m, seed=r["seed"], order=list(r["order"]))
               for m, rs in runs.items() for r in rs for u in r["unlearnt"]]
    return {"rule": f"learnt when R[j][j] >= chance + {metrics.LEARNT_FRACTION:g} x (100 - chance); "
                    "chance = max(100 / candidates, share of the test split's most frequent answer)",
            "chance": {t: round(c, 2) for t, c in chance.items()},
            "threshold": {t: round(metrics.learnt_threshold(c), 2) for t, c in chance.items()},
            "unlearnt": flagged}


PARTIAL = "runs.partial.json"


def _keep_partial(out: Path, runs: dict) -> None:
    """Every finished run, on disk as it lands: a compare stopped after hours (time, a
    shared machine) keeps its runs in ``runs.partial.json`` (runs.json's format, the
    methods' lists so far); the finished compare removes it."""
    tmp = out / (PARTIAL + ".tmp")
    tmp.write_text(json.dumps(runs))
    tmp.replace(out / PARTIAL)


def compare(methods, seeds, out: str | Path, rc: RunConfig, orders: int = 1, order: str = "default",
            preset: str = "custom", overrides: dict | None = None, skills=data.SKILLS,
            sizes: tuple[int, int, int] = (3000, 300, 200), jobs: int = 1, taskset=None) -> dict:
    """Run ``methods`` on ``seeds`` x task orders; write summary.json, runs.json, report.md
    and plots to ``out``. ``overrides``: {method: {AIMConfig field: value}}; ``sizes``:
    examples per task in (train, test, novel) of the generated benchmark; ``taskset``: a
    :class:`taskdata.TaskSet` (``--data``) used instead, its tasks in manifest order."""
    deps.require(lora=bool(rc.spec.lora))
    if taskset is not None:
        skills = tuple(taskset.train)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    cons = []
    jobs_list = []
    counts = None
    pool = None
    if jobs > 1:
        import concurrent.futures as cf
        import dataclasses
        import multiprocessing as mp
        wrc = dataclasses.replace(rc, progress=False)
        pool = cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"))
        # Each seed's set-up (pre-training, the largest serial cost at --model asym, and
        # the contribution matrices) runs in the pool too, all seeds at once.
        prep = [pool.submit(_prepare, seed, wrc, tuple(skills), sizes, taskset) for seed in seeds]
    try:
        for k, seed in enumerate(seeds):
            bench = taskset if taskset is not None else data.make_benchmark(seed, *sizes, skills=tuple(skills))
            if pool is not None:
                c, con = prep[k].result()
            else:
                c, con = _prepare(seed, rc, tuple(skills), sizes, taskset, bench)
            counts = counts or c
            cons.append(con)
            for o in task_orders(seed, orders, order, skills=tuple(skills), rc=rc, bench=bench):
                jobs_list += [(m, seed, o) for m in methods]
    except BaseException:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        raise

    def show(m, seed, o, r):
        print(f"{m:>12} seed {seed} order {'/'.join(s[:3] for s in o)}: AP {r['ap']:.1f} "
              f"AF {r['af']:.1f} novel {r['novel']:.1f} ({r['seconds']:.0f} s, masked_step "
              f"{100 * r['step_overhead']:.1f}% of the step)", flush=True)

    if pool is not None:
        with pool:
            futs = [pool.submit(_job, m, seed, o, wrc, (overrides or {}).get(m), tuple(skills), sizes, taskset)
                    for m, seed, o in jobs_list]
            for (m, seed, o), f in zip(jobs_list, futs):
                r = f.result()
                runs[m].append(r)
                show(m, seed, o, r)
                _keep_partial(out, runs)
    else:
        benches = {}
        for m, seed, o in jobs_list:
            if seed not in benches:
                benches = {seed: taskset if taskset is not None
                           else data.make_benchmark(seed, *sizes, skills=tuple(skills))}
            r = run_method(m, benches[seed], o, seed, rc, (overrides or {}).get(m))
            runs[m].append(r)
            show(m, seed, o, r)
            _keep_partial(out, runs)
    chance = data.chance_levels(taskset if taskset is not None else bench)
    first = next(iter(runs.values()))
    summary = {
        "preset": preset, "device": device_name(), "versions": deps.versions(),
        "data": ({"source": taskset.source, "hash": taskset.data_hash, "vocab_size": taskset.vocab_size,
                  "examples": {t: [len(taskset.train[t]), len(taskset.test[t])] for t in skills}}
                 if taskset is not None else {"source": "generated", "sizes": list(sizes)}),
        "config": {"seeds": list(seeds), "orders": orders, "order": order,
                   "task_orders": [list(o) for o in dict.fromkeys(tuple(r["order"]) for r in first)],
                   "steps_per_task": rc.steps, "first_task_steps": rc.first_steps or rc.steps,
                   "joint_factor": rc.joint_factor,
                   "batch": rc.batch, "lr": rc.lr, "model": asdict(rc.spec), "parameters": counts,
                   "warmup": rc.warmup,
                   "checkpoint": rc.checkpoint, "skills": list(skills),
                   "overrides": {m: _jsonable(ov) for m, ov in (overrides or {}).items()},
                   "presets": {m: _preset_values(m, (overrides or {}).get(m)) for m in methods if m != "joint"},
                   "held_out": ({k: list(v) for k, v in data.HELD_OUT.items()} if taskset is None else None)},
        "methods": {m: aggregate(runs[m]) for m in methods if m != "joint"},
        "paired_vs_naive": paired_differences(runs),
        "learnt_check": learnt_check(runs, chance),
    }
    if "joint" in runs:
        summary["joint"] = aggregate(runs["joint"])
    con = {k: np.mean([c[k] for c in cons], axis=0).round(5).tolist() for k in contribution.KINDS}
    summary["contribution"] = {
        "skills": list(skills), "matrices": con,
        "order_min_cross_modal": contribution.contribution_order(con, list(skills)),
        "correlation_with_drop": {m: contribution.forgetting_correlation(con, list(skills), runs[m])
                                  for m in methods if m != "joint"},
    }
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    # The machine may be shared: the 1/5/15-minute load averages at the end put the wall time in context.
    summary["load_average"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "runs.json").write_text(json.dumps(runs))
    (out / PARTIAL).unlink(missing_ok=True)
    report.write_report(summary, runs, out)
    return summary


def scaled_roles(method: str, x: float) -> dict:
    """``method``'s preset role values with every lambda multiplied by ``x`` (mask ratio and
    keep as shipped); ``--lam-scale`` here, ``tune --scales`` for its candidates."""
    import dataclasses

    import aim_kernels as ak
    roles = ak.preset(method).role_values
    if not any(v.lam for v in roles.values()):
        raise ValueError(f"preset {method!r} has no lambda to scale")
    return {r: dataclasses.replace(v, lam=v.lam * x) for r, v in roles.items()}


def lam_scale_overrides(scales: dict[str, float]) -> dict:
    """``{method: x}`` -> ``{method: {"role_values": ...}}``: the method's preset with every
    role's lambda multiplied by ``x`` (masks and everything else unchanged). ``--lam-scale``:
    presets tuned on the tiny model can be too strong for another model spec."""
    out = {}
    for m, x in scales.items():
        if m not in METHODS:
            raise ValueError(f"--lam-scale: unknown method {m!r}; choose from {METHODS}")
        if not x > 0:
            raise ValueError(f"--lam-scale: the scale of {m!r} must be > 0, got {x}")
        try:
            out[m] = {"role_values": scaled_roles(m, x)}
        except ValueError as e:
            raise ValueError(f"--lam-scale: {e}") from None
    return out


def _jsonable(ov: dict) -> dict:
    """AIMConfig overrides for summary.json (RoleValues as [rho, kappa, lambda] per role)."""
    return {k: ({r: [v.mask_ratio, v.keep, v.lam] for r, v in x.items()} if k == "role_values" else x)
            for k, x in ov.items()}


def _preset_values(method: str, overrides: dict | None = None) -> dict:
    """The run's config (the preset with ``overrides``): its non-default fields and per-role
    (rho, kappa, lambda), for the record."""
    import dataclasses

    import aim_kernels as ak
    cfg, base = ak.preset(method, **(overrides or {})), ak.AIMConfig()
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
           if f.name not in ("role_values", "state_dtype", "groups")
           and getattr(cfg, f.name) != getattr(base, f.name)}
    out["roles"] = {r: [v.mask_ratio, v.keep, v.lam] for r, v in cfg.role_values.items()}
    return out


def _prepare(seed, rc, skills, sizes, taskset=None, bench=None):
    """One seed's model set-up: fills the pre-training cache the runs load; returns the
    parameter counts and the contribution matrices. In a worker: one torch thread."""
    if bench is None:
        torch.set_num_threads(1)
        bench = taskset if taskset is not None else data.make_benchmark(seed, *sizes, skills=skills)
    model, _ = make_model(rc.spec, seed, rc.checkpoint, rc.cache, progress=rc.progress, bench=bench)
    return param_counts(model), contribution.contributions(model, bench, list(skills))


def _job(method, seed, order, rc, overrides, skills, sizes, taskset=None):
    """One run in a worker process (``--jobs``): one torch thread each."""
    torch.set_num_threads(1)
    bench = taskset if taskset is not None else data.make_benchmark(seed, *sizes, skills=skills)
    return run_method(method, bench, order, seed, rc, overrides)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=RunConfig.steps, help="training steps per task")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=None,
                   help=f"AdamW learning rate (default 4e-3; --data: {DATA_LR})")
    p.add_argument("--orders", type=int, default=1, help="number of task orders per seed")
    p.add_argument("--order", default="default", choices=("default", "random", "contribution"),
                   help="default: the skills' order (plus random ones when --orders > 1); "
                        "contribution: minimise the cross-modal contribution of adjacent tasks")
    p.add_argument("--checkpoint", default=None, help="a local HF LLaVA checkpoint folder")
    p.add_argument("--cache", default=None, help="cache folder of the pre-trained models "
                                                 "(default ~/.cache/aim_kernels/continual)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this size)")
    p.add_argument("--first-steps", type=int, default=0, metavar="N",
                   help="training steps of the first task of each order (default 0: --steps); "
                        "joint trains --joint-factor x the sequential total")
    p.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="linear lr warm-up over the first N steps of each task (default 0: none)")
    p.add_argument("--joint-factor", type=float, default=RunConfig.joint_factor,
                   help="joint trains this many times the sequential total of steps")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (1 thread each)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help=f"visual pre-training / warm-up steps (default {ModelSpec.pretrain_steps}; "
                        f"--data: {DATA_WARMUP_STEPS})")
    p.add_argument("--model", default="tiny", choices=tuple(MODELS),
                   help="tiny: decoder ~11x the projector; asym: >= 50x (see model.MODELS)")
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="PEFT LoRA of rank R on the decoder (projector trained fully)")
    p.add_argument("--lora-vocab", action="store_true",
                   help="with --lora: also train the word embeddings and the output head fully")
    p.add_argument("--data", default=None, metavar="DIR|vqa-v2:DIR|gqa:DIR",
                   help="task data from files instead of the generated benchmark (see taskdata.py)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a local HF tokenizer folder for --data (default: word-level from the training files)")
    p.add_argument("--lam", action="append", default=[], metavar="METHOD=V/P/L",
                   help="replace METHOD's preset lambda of the vision / projector / language groups "
                        "(mask ratio and keep as shipped); repeatable, e.g. --lam aim=3/30/3")


def lam_overrides(specs: list[str], methods) -> dict:
    """``--lam METHOD=V/P/L`` -> ``{method: {"role_values": ...}}``: the shipped preset's
    per-role values with lambda replaced. Raises ValueError naming the bad item."""
    from aim_kernels.config import ROLES, RoleValues

    import aim_kernels as ak
    out = {}
    for spec in specs:
        method, eq, vals = spec.partition("=")
        parts = vals.split("/")
        if not eq or len(parts) != len(ROLES):
            raise ValueError(f"--lam {spec!r}: expected METHOD={'/'.join(r[0].upper() for r in ROLES)} "
                             f"(lambda of the {', '.join(ROLES)} groups)")
        if method not in methods or method in ("naive", "joint"):
            raise ValueError(f"--lam {spec!r}: {method!r} is not a regularising method of this run "
                             f"({', '.join(m for m in methods if m not in ('naive', 'joint'))})")
        if method in out:
            raise ValueError(f"--lam {spec!r}: {method!r} given twice")
        try:
            lams = [float(x) for x in parts]
        except ValueError:
            raise ValueError(f"--lam {spec!r}: lambda must be numbers") from None
        base = ak.preset(method).role_values
        roles = {r: RoleValues(mask_ratio=base[r].mask_ratio, keep=base[r].keep, lam=x) for r, x in zip(ROLES, lams)}
        ak.preset(method, role_values=roles)       # validates (finite, >= 0)
        out[method] = {"role_values": roles}
    return out


# --data: the answer-free warm-up trains the vision tower alone (~10 ms a step at batch 64)
DATA_WARMUP_STEPS = 2000
# --data: a decoder that learnt to read images only in the warm-up trains better at 1e-3
# (photo-like folder, seed 1: joint AP 95.3 against 87.3 at 4e-3, naive mean R[i][i] 85 / 83)
DATA_LR = 1e-3


def run_spec(model: str = "tiny", lora: int = 0, lora_vocab: bool = False,
             pretrain_steps: int | None = None, data_folder: bool = False) -> ModelSpec:
    """The model spec of these flags (``compare`` and ``tune`` share it, and so the
    pre-training / warm-up cache): ``pretrain_steps`` None is the default of the data's
    kind (--data: the warm-up's DATA_WARMUP_STEPS)."""
    if pretrain_steps is None:
        pretrain_steps = DATA_WARMUP_STEPS if data_folder else ModelSpec.pretrain_steps
    return model_spec(model, lora, pretrain_steps=pretrain_steps, lora_vocab=lora_vocab)


def _rc(args) -> RunConfig:
    torch.set_num_threads(args.threads)
    try:
        spec = run_spec(args.model, args.lora, args.lora_vocab, args.pretrain_steps, bool(args.data))
    except ValueError as e:
        raise SystemExit(f"aim-kernels: {e}") from None
    lr = args.lr if args.lr is not None else DATA_LR if args.data else 4e-3
    if args.warmup < 0:
        raise SystemExit(f"aim-kernels: --warmup must be >= 0, got {args.warmup}")
    if args.first_steps < 0:
        raise SystemExit(f"aim-kernels: --first-steps must be >= 0, got {args.first_steps}")
    return RunConfig(steps=args.steps, first_steps=args.first_steps, batch=args.batch, lr=lr, warmup=args.warmup, progress=not args.no_progress,
                     joint_factor=args.joint_factor,
                     checkpoint=args.checkpoint, cache=args.cache, spec=spec)


def _taskset(args):
    """Read and check ``--data`` before anything trains (None for the generated benchmark)."""
    if args.tokenizer and not args.data:
        raise SystemExit("aim-kernels: --tokenizer needs --data")
    if not args.data:
        return None
    from .taskdata import TaskDataError, load
    try:
        ts = load(args.data, args.tokenizer)
    except TaskDataError as e:
        raise SystemExit(f"aim-kernels: bad --data: {e}") from None
    print(f"data {ts.source}: {len(ts.train)} tasks ({', '.join(ts.train)}), vocabulary {ts.vocab_size}, "
          f"hash {ts.data_hash}", flush=True)
    return ts


def _csv(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def compare_main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="aim-kernels compare", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="quick", choices=tuple(PRESETS))
    p.add_argument("--methods", default=",".join(ALL), help=f"comma-separated, from {ALL}")
    p.add_argument("--seeds", default=None, help="comma-separated (default: the preset's)")
    p.add_argument("--out", default="results/continual")
    p.add_argument("--lam-scale", default=None, metavar="METHOD=X[,...]",
                   help="multiply every role's lambda of METHOD's preset by X (e.g. mm-ewc=0.3,aim=0.3); "
                        "recorded in summary.json")
    _common(p)
    args = p.parse_args(argv)
    methods = _csv(args.methods)
    bad = [m for m in methods if m not in ALL]
    if bad:
        p.error(f"unknown method {bad[0]!r}; choose from {ALL}")
    seeds = [int(s) for s in _csv(args.seeds)] if args.seeds else PRESETS[args.preset]["seeds"]
    try:
        overrides = lam_overrides(args.lam, methods)
    except ValueError as e:
        p.error(str(e))
    if args.lam_scale:
        try:
            scales = {m: float(x) for m, x in (kv.split("=", 1) for kv in _csv(args.lam_scale))}
            scaled = lam_scale_overrides(scales)
        except ValueError as e:
            p.error(str(e) if "--lam-scale" in str(e) else f"--lam-scale {args.lam_scale!r}: expected METHOD=X[,...]")
        both = sorted(set(scaled) & set(overrides))
        if both:
            p.error(f"--lam and --lam-scale both set {both[0]!r}'s lambda; give one")
        overrides.update(scaled)
    deps.require(lora=args.lora > 0)
    rc = _rc(args)
    ts = _taskset(args)
    summary = compare(methods, seeds, args.out, rc, args.orders, args.order, args.preset,
                      overrides=overrides, jobs=args.jobs, taskset=ts)
    print((Path(args.out) / "report.md").read_text())
    return summary


def run_main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="aim-kernels run", description="one method, one seed")
    p.add_argument("--method", default="aim", choices=ALL)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None, help="also write summary.json / report.md / plots here")
    _common(p)
    args = p.parse_args(argv)
    try:
        overrides = lam_overrides(args.lam, [args.method])
    except ValueError as e:
        p.error(str(e))
    deps.require(lora=args.lora > 0)
    rc = _rc(args)
    ts = _taskset(args)
    if args.out:
        return compare([args.method], [args.seed], args.out, rc, args.orders, args.order, "run",
                       overrides=overrides, taskset=ts)
    bench = ts if ts is not None else data.make_benchmark(args.seed)
    result = None
    for o in task_orders(args.seed, args.orders, args.order, skills=tuple(bench.train), rc=rc, bench=bench):
        result = run_method(args.method, bench, o, args.seed, rc, overrides.get(args.method))
        print(f"{args.method} seed {args.seed}, order {o}")
        for row in result["acc_matrix"]:
            print("  " + " ".join(f"{x:6.1f}" for x in row))
        print(f"AP {result['ap']:.1f}  AF {result['af']:.1f}  novel {result['novel']:.1f}  "
              f"{result['seconds']:.0f} s, masked_step {100 * result['step_overhead']:.1f}% of the step")
    return result


__all__ = ["compare", "compare_main", "run_main", "task_orders", "METHODS", "ALL", "PRESETS"]
