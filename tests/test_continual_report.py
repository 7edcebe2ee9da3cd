"""The comparison's statistics and report on a constructed case: three seeds, naive with
one task left at chance, aim better than naive on AP in every pair, mm-ewc no different."""
from __future__ import annotations

import json

import pytest

from aim_kernels.continual import compare as cmp
from aim_kernels.continual import metrics, report

ORDER = ["colour", "shape", "count"]
CHANCE = {"colour": 100 / 6, "shape": 25.0, "count": 25.0}


def _run(method, seed, R):
    return {"method": method, "seed": seed, "order": ORDER, "acc_matrix": R,
            "ap": metrics.average_performance(R), "af": metrics.average_forgetting(R),
            "last": metrics.last_average(R), "bwt": metrics.backward_transfer(R), "novel": 50.0,
            "unlearnt": metrics.unlearnt_tasks(R, ORDER, CHANCE), "seconds": 1.0,
            "train_seconds": 1.0, "step_overhead": 0.1,
            "drift": {"step": [0, 1], "task_ends": [1, 2],
                      "groups": {"projector": {"drift_sq": [0.0, 0.1], "penalty": [0, 0], "masked": [0, 0]}}}}


def _runs():
    naive, aim, mm = [], [], []
    for k, seed in enumerate((1, 2, 3)):
        # seed 2: naive never learns colour (19.7% against chance 16.7%)
        c0 = 19.7 if seed == 2 else 90.0
        naive.append(_run("naive", seed, [[c0, 20, 20], [40, 90, 20], [30 + k, 40, 90]]))
        aim.append(_run("aim", seed, [[90, 20, 20], [70, 85, 20], [60 + k, 70 + k, 85]]))
        mm.append(_run("mm-ewc", seed, [[90, 20, 20], [40 - 3 * k, 90, 20], [30 + 2 * k - 2, 40, 90]]))
    joint = [_run("joint", s, [[85, 80, 88]]) for s in (1, 2, 3)]
    return {"naive": naive, "mm-ewc": mm, "aim": aim, "joint": joint}


def test_learnt_check_flags_the_task_left_at_chance():
    check = cmp.learnt_check(_runs(), CHANCE)
    assert check["chance"]["colour"] == pytest.approx(16.67)
    assert check["threshold"]["colour"] == pytest.approx(100 / 6 + 0.2 * (100 - 100 / 6), abs=0.01)
    assert [(u["method"], u["seed"], u["task"]) for u in check["unlearnt"]] == [("naive", 2, "colour")]


def test_paired_differences_against_naive():
    paired = cmp.paired_differences(_runs())
    assert set(paired) == {"aim", "mm-ewc"}                       # not naive, not joint
    ap = paired["aim"]["ap"]
    # per seed: aim AP - naive AP = (60+k + 70+k + 85 - (30+k + 40 + 90)) / 3 = (55 + k) / 3
    assert ap["n"] == 3 and ap["mean"] == pytest.approx(56 / 3, abs=1e-3)
    assert ap["significant"] and ap["low"] > 0
    assert not paired["mm-ewc"]["ap"]["significant"] and paired["mm-ewc"]["ap"]["low"] < 0 < paired["mm-ewc"]["ap"]["high"]


def test_report_states_chance_flags_unlearnt_and_says_not_significant(tmp_path):
    runs = _runs()
    summary = {"preset": "test", "device": "CPU", "wall_seconds": 1,
               "config": {"seeds": [1, 2, 3], "orders": 1, "order": "default", "steps_per_task": 1,
                          "batch": 1, "lr": 1.0, "joint_factor": 2,
                          "model": {"name": "asym", "lora": 0},
                          "parameters": {"vision": {"all": 10, "trainable": 0},
                                         "projector": {"all": 100, "trainable": 100},
                                         "decoder": {"all": 5600, "trainable": 5600},
                                         "decoder_over_projector": 56.0,
                                         "decoder_trainable_over_projector": 56.0}},
               "methods": {m: cmp.aggregate(runs[m]) for m in ("naive", "mm-ewc", "aim")},
               "joint": cmp.aggregate(runs["joint"]),
               "paired_vs_naive": cmp.paired_differences(runs),
               "learnt_check": cmp.learnt_check(runs, CHANCE)}
    report.write_report(summary, runs, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "NOT LEARNT" in text and "`naive` seed 2" in text and "task `colour` reached 19.7%" in text
    assert "| chance % | 16.7 | 25.0 | 25.0 |" in text
    row = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `")}
    assert "AP: better than naive" in row["`aim`"]
    assert "AP: not significant" in row["`mm-ewc`"]
    assert "ratio 56x" in text
    assert "| Last ↑ | BWT ↑ |" in text
    json.dumps(summary)                                      # summary.json-able
