"""report.md and PNG plots (matplotlib, Agg) from a comparison's summary and runs."""
from __future__ import annotations

from pathlib import Path


def _fmt(m: float, s: float) -> str:
    return f"{m:.1f} ± {s:.1f}"


def _opt(r: dict, k: str) -> str:
    return _fmt(r[k], r[k + "_std"]) if k in r else "–"


def table(summary: dict) -> str:
    """The markdown table of AP / AF / novel and MCITlib's Last / BWT (percent, mean ± std
    over runs) and timings."""
    rows = ["| method | AP ↑ | AF ↓ | Last ↑ | BWT ↑ | novel ↑ | s / run | masked_step share of a step |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in summary["methods"].items():
        rows.append(f"| `{name}` | {_fmt(r['ap'], r['ap_std'])} | {_fmt(r['af'], r['af_std'])} | "
                    f"{_opt(r, 'last')} | {_opt(r, 'bwt')} | "
                    f"{_fmt(r['novel'], r['novel_std'])} | {r['seconds']:.0f} | "
                    f"{100 * r['step_overhead']:.1f}% |")
    if "joint" in summary:
        r = summary["joint"]
        rows.append(f"| `joint` (upper bound) | {_fmt(r['ap'], r['ap_std'])} | – | {_opt(r, 'last')} | – | "
                    f"{_fmt(r['novel'], r['novel_std'])} | {r['seconds']:.0f} | "
                    f"{100 * r['step_overhead']:.1f}% |")
    return "\n".join(rows)


def _interval(d: dict) -> str:
    if d["low"] is None:
        return f"{d['mean']:+.1f} (one pair: no interval)"
    return f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"


def significance_table(paired: dict) -> str:
    """Per method, AP / AF / BWT minus naive's on the same seed and order, with the 95%
    interval, and which differences are significant (interval excludes 0)."""
    rows = ["| method | ΔAP vs naive [95% CI] | ΔAF vs naive [95% CI] | ΔBWT vs naive [95% CI] | pairs | verdict |",
            "|---|---|---|---|---|---|"]
    for m, d in paired.items():
        verdict = []
        for k, better in (("ap", 1), ("af", -1)):
            x = d[k]
            if not x["significant"]:
                verdict.append(f"{k.upper()}: not significant")
            else:
                verdict.append(f"{k.upper()}: {'better' if x['mean'] * better > 0 else 'worse'} than naive")
        rows.append(f"| `{m}` | {_interval(d['ap'])} | {_interval(d['af'])} | {_interval(d['bwt'])} | "
                    f"{d['ap']['n']} | {'; '.join(verdict)} |")
    return "\n".join(rows)


def learnt_section(check: dict) -> list[str]:
    """Chance level per task, and every run in which a task was not learnt, flagged."""
    tasks = list(check["chance"])
    lines = ["## Learnt-task check", "",
             f"Each run checks every task right after training it ({check['rule']}).", "",
             "| task | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|",
             "| chance % | " + " | ".join(f"{check['chance'][t]:.1f}" for t in tasks) + " |",
             "| learnt from % | " + " | ".join(f"{check['threshold'][t]:.1f}" for t in tasks) + " |", ""]
    if not check["unlearnt"]:
        lines += ["Every task was learnt in every run.", ""]
        return lines
    lines += [f"**⚠ {len(check['unlearnt'])} task(s) NOT LEARNT** -- AP / AF of these runs describe "
              "tasks that did not train:", ""]
    for u in check["unlearnt"]:
        lines.append(f"- ⚠ `{u['method']}` seed {u['seed']}, order {'/'.join(u['order'])}: task "
                     f"`{u['task']}` reached {u['acc']:.1f}% (chance {u['chance']:.1f}%, learnt from "
                     f"{u['threshold']:.1f}%)")
    return lines + [""]


def model_line(summary: dict) -> str:
    cfg = summary["config"]
    spec, n = cfg.get("model") or {}, cfg.get("parameters")
    if not n:
        return ""
    lora = f", LoRA rank {spec['lora']} on the decoder" if spec.get("lora") else ""
    if spec.get("lora") and spec.get("lora_vocab"):
        lora += " (word embeddings and output head trained fully)"
    return (f"Model `{spec.get('name', 'custom')}`{lora}: decoder {n['decoder']['all']:,} parameters "
            f"({n['decoder']['trainable']:,} trainable), projector {n['projector']['trainable']:,} "
            f"trainable, vision {n['vision']['all']:,} (frozen after pre-training); "
            f"**decoder / projector-trainable parameter ratio {n['decoder_over_projector']:g}x** "
            f"(trainable decoder / projector {n['decoder_trainable_over_projector']:g}x).")


def _load(summary: dict) -> str:
    la = summary.get("load_average")
    return f" (load average at the end {la[0]:g} / {la[1]:g} / {la[2]:g} over 1 / 5 / 15 min)" if la else ""


def _first(cfg: dict) -> str:
    first = cfg.get("first_task_steps", cfg["steps_per_task"])
    return f" ({first} for the first task of each order)" if first != cfg["steps_per_task"] else ""


def _warm(cfg: dict) -> str:
    return f", linear warm-up over each task's first {cfg['warmup']} steps" if cfg.get("warmup") else ""


def _overridden(cfg: dict) -> list[str]:
    """A line naming the presets whose lambda was overridden (``--lam`` / ``--lam-scale``),
    with the per-role lambda the runs used."""
    ov = cfg.get("overrides") or {}
    if not ov:
        return []
    parts = []
    for m in ov:
        roles = cfg.get("presets", {}).get(m, {}).get("roles", {})
        parts.append(f"`{m}` λ {' / '.join(roles)} = " + " / ".join(f"{v[2]:g}" for v in roles.values()))
    return ["Presets overridden for this run (`--lam` / `--lam-scale`): " + "; ".join(parts)
            + " (mask ratio and keep as shipped).", ""]


def write_report(summary: dict, runs: dict, out: Path) -> None:
    out = Path(out)
    cfg = summary["config"]
    lines = [f"# Continual-VQA comparison ({summary['preset']})", "",
             f"Device: {summary['device']}. Seeds {cfg['seeds']}, {cfg['orders']} task order(s) per "
             f"seed ({cfg['order']}), {cfg['steps_per_task']} steps per task{_first(cfg)} (joint: "
             f"{cfg.get('joint_factor', 1):g} x the sequential total), batch {cfg['batch']}, "
             f"AdamW lr {cfg['lr']}{_warm(cfg)}. Percent, mean ± std over seeds x orders. "
             f"Wall time {summary.get('wall_seconds', 0):.0f} s{_load(summary)}.", "",
             model_line(summary), "",
             *_overridden(cfg),
             table(summary), "",
             "AP = mean accuracy over all tasks after the last; AF = mean over tasks but the last "
             "of (best accuracy before the end - final accuracy); novel = final accuracy on the "
             "held-out skill-concept compositions (DESIGN.md 4). Accuracy is the argmax over the "
             "task's candidate answers. `s / run` is the wall time of one method on one seed "
             "(model set-up, training, evaluation); the last column is the time inside "
             "`ak.masked_step` over the time of whole steps (forward, backward, masked_step, "
             "AdamW). Last and BWT are MCITlib's: Last = mean of the last row (the same number "
             "as AP); BWT = mean over tasks but the last of (final accuracy - accuracy right after "
             "training it).", ""]
    data = summary.get("data") or {}
    if data.get("hash"):
        lines += [f"Data: `{data['source']}`, hash {data['hash']}, tasks (train/test examples): "
                  + ", ".join(f"{t} {a}/{b}" for t, (a, b) in data["examples"].items()) + ".", ""]
    if summary.get("paired_vs_naive"):
        lines += ["## Against naive (paired by seed and task order)", "",
                  significance_table(summary["paired_vs_naive"]), "",
                  "Mean of the per-pair differences with a 95% Student-t interval; \"not significant\" "
                  "where the interval holds 0 (one pair has no interval and is never significant). "
                  "AF: lower is better.", ""]
    if summary.get("learnt_check"):
        lines += learnt_section(summary["learnt_check"])
    first = next(iter(runs.values()))[0]
    lines += [f"## Accuracy matrices R (mean over runs; rows: after task i, columns: task j; "
              f"order of the first run: {', '.join(first['order'])})", ""]
    for name, r in list(summary["methods"].items()) + ([("joint", summary["joint"])]
                                                       if "joint" in summary else []):
        lines += [f"### `{name}`", "", "| after \\ task | " + " | ".join(str(j) for j in range(len(r['acc_matrix'][0]))) + " |",
                  "|---" * (len(r["acc_matrix"][0]) + 1) + "|"]
        for i, row in enumerate(r["acc_matrix"]):
            lines.append(f"| {i} | " + " | ".join(f"{x:.1f}" for x in row) + " |")
        lines.append("")
    con = summary.get("contribution")
    if con:
        lines += ["## Cross-modal contributions (seed 001)", "",
                  "Expected cosines between tasks' projected image features (I) and question-text "
                  "embeddings (T), from the pre-trained model before the first task "
                  f"(tasks: {', '.join(con['skills'])}); see `contribution.png`. Order minimising the "
                  f"summed I->T + T->I contribution of adjacent tasks: {', '.join(con['order_min_cross_modal'])}.",
                  "", "Pearson r between Con(i, j) and the accuracy task i loses while task j trains "
                  "(every pair i < j of every run):", "",
                  "| method | " + " | ".join(f"Con {k}" for k in ("I->T", "T->I", "I->I", "T->T")) + " | pairs |",
                  "|---|---|---|---|---|---|"]
        for m, c in con["correlation_with_drop"].items():
            lines.append(f"| `{m}` | " + " | ".join(f"{c[k]:.2f}" for k in ("I->T", "T->I", "I->I", "T->T"))
                         + f" | {c['pairs']} |")
        lines.append("")
    lines += ["Plots: `acc_matrices.png`, `ap_af.png`, `drift.png` (per-group squared drift from "
              "the anchor, over the steps of the first run).", ""]
    (out / "report.md").write_text("\n".join(lines))
    plots(summary, runs, out)


def plots(summary: dict, runs: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    named = list(summary["methods"].items()) + ([("joint", summary["joint"])] if "joint" in summary else [])
    n = len(named)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, r) in zip(axes.flat, named):
        R = np.array(r["acc_matrix"])
        ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
        for (i, j), v in np.ndenumerate(R):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if v < 60 else "black")
        ax.set_title(f"{name}: AP {r['ap']:.1f}", fontsize=9)
        ax.set_xlabel("task j", fontsize=7)
        ax.set_ylabel("after task i", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "acc_matrices.png", dpi=110)
    plt.close(fig)

    methods = list(summary["methods"])
    x = np.arange(len(methods))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(methods)), 3.2))
    ap = [summary["methods"][m]["ap"] for m in methods]
    af = [summary["methods"][m]["af"] for m in methods]
    ax.bar(x - 0.2, ap, 0.4, yerr=[summary["methods"][m]["ap_std"] for m in methods], label="AP")
    ax.bar(x + 0.2, af, 0.4, yerr=[summary["methods"][m]["af_std"] for m in methods], label="AF")
    if "joint" in summary:
        ax.axhline(summary["joint"]["ap"], color="k", ls="--", lw=1, label="joint AP")
    ax.set_xticks(x, methods, fontsize=8)
    ax.set_ylabel("percent")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ap_af.png", dpi=110)
    plt.close(fig)

    con = summary.get("contribution")
    if con:
        fig, axes = plt.subplots(1, 4, figsize=(13, 3.3))
        for ax, k in zip(axes, ("I->T", "T->I", "I->I", "T->T")):
            M = np.array(con["matrices"][k])
            im = ax.imshow(M, cmap="coolwarm")
            ax.set_title(f"Con {k}", fontsize=9)
            ax.set_xticks(range(len(con["skills"])), con["skills"], rotation=60, fontsize=6)
            ax.set_yticks(range(len(con["skills"])), con["skills"], fontsize=6)
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(out / "contribution.png", dpi=110)
        plt.close(fig)

    groups = sorted({g for rs in runs.values() for g in rs[0]["drift"]["groups"]})
    groups = [g for g in groups if any(sum(rs[0]["drift"]["groups"].get(g, {}).get("drift_sq", [0])) > 0
                                       for rs in runs.values())] or groups
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(4.5 * max(1, len(groups)), 3.2), squeeze=False)
    for ax, g in zip(axes.flat, groups):
        for name, rs in runs.items():
            d = rs[0]["drift"]
            if g in d["groups"]:
                ax.plot(d["step"], d["groups"][g]["drift_sq"], label=name, lw=1)
        for end in runs[methods[0]][0]["drift"]["task_ends"][:-1] if methods else []:
            ax.axvline(end, color="grey", lw=0.5, ls=":")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title(f"{g}: Σ (θ - anchor)²", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "drift.png", dpi=110)
    plt.close(fig)
