"""The figures README's "Findings at the 56x asymmetry" quotes, from a compare folder.

    .venv/bin/python benchmarks/results/continual/findings.py benchmarks/results/continual/asym-learnt

Per method: AP / AF (mean ± std over seeds x orders, from summary.json), the paired
differences against naive with 95% t-intervals (summary.json's ``paired_vs_naive``),
AIM against mm-ewc head to head (paired by seed and task order from runs.json, the same
:func:`metrics.paired_difference` compare uses), the projector / decoder squared drift
Σd² from the anchor at the last step of each task after the first (runs.json's per-group
``drift_sq``, mean over those tasks and the runs), and the unlearnt run-tasks.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from aim_kernels.continual import metrics


def drift_at_task_ends(run: dict, group: str) -> float:
    log = run["drift"]
    at = dict(zip(log["step"], log["groups"][group]["drift_sq"]))
    ends = log["task_ends"][1:]                      # tasks after the first
    return float(np.mean([at[e - 1] for e in ends]))


def fmt(d: dict) -> str:
    if d["low"] is None:
        return f"{d['mean']:+.1f}"
    return f"{d['mean']:+.1f} [{d['low']:.1f}, {d['high']:.1f}]{'' if d['significant'] else ' n.s.'}"


def main(folder: str) -> dict:
    folder = Path(folder)
    s = json.loads((folder / "summary.json").read_text())
    runs = json.loads((folder / "runs.json").read_text())
    out = {"wall_seconds": s["wall_seconds"], "load_average": s.get("load_average"), "methods": {}}
    print(f"{folder}: wall {s['wall_seconds']} s, load at the end {s.get('load_average')}")
    print("| method | AP | AF | AP − naive | AF − naive | projector Σd² | decoder Σd² | unlearnt run-tasks |")
    print("|---|---|---|---|---|---|---|---|")
    for m, rs in runs.items():
        agg = s["joint"] if m == "joint" else s["methods"][m]
        pv = s["paired_vs_naive"].get(m)
        row = {"ap": agg["ap"], "ap_std": agg["ap_std"], "af": agg["af"], "af_std": agg["af_std"],
               "unlearnt": sum(len(r["unlearnt"]) for r in rs)}
        if m != "joint":
            row["proj_d2"] = float(np.mean([drift_at_task_ends(r, "projector") for r in rs]))
            row["dec_d2"] = float(np.mean([drift_at_task_ends(r, "language") for r in rs]))
        out["methods"][m] = row
        af = "–" if m == "joint" else f"{row['af']:.1f} ± {row['af_std']:.1f}"
        d2 = ("", "") if m == "joint" else (f"{row['proj_d2']:.3g}", f"{row['dec_d2']:.3g}")
        print(f"| `{m}` | {row['ap']:.1f} ± {row['ap_std']:.1f} | {af} | {fmt(pv['ap']) if pv else '–'} | "
              f"{fmt(pv['af']) if pv else '–'} | {d2[0]} | {d2[1]} | {row['unlearnt'] if m != 'joint' else '–'} |")
    if "aim" in runs and "mm-ewc" in runs:
        base = {(r["seed"], tuple(r["order"])): r for r in runs["mm-ewc"]}
        pairs = [(r, base[(r["seed"], tuple(r["order"]))]) for r in runs["aim"]]
        h2h = {k: metrics.paired_difference([a[k] for a, _ in pairs], [b[k] for _, b in pairs])
               for k in ("ap", "af")}
        out["aim_vs_mm_ewc"] = h2h
        print(f"aim − mm-ewc (paired, n={len(pairs)}): AP {fmt(h2h['ap'])}, AF {fmt(h2h['af'])}")
    flagged = s["learnt_check"]["unlearnt"]
    out["unlearnt"] = [(u["method"], u["seed"], "/".join(t[:3] for t in u["order"]), u["task"],
                        round(u.get("acc", u.get("accuracy", float("nan"))), 1)) for u in flagged]
    for u in out["unlearnt"]:
        print("  unlearnt:", *u)
    return out


if __name__ == "__main__":
    main(sys.argv[1])
