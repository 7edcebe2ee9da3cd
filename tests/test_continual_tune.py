"""The presets' pick rule (tune.py): a candidate must learn every task and forget less than
naive before its AP counts; the committed sweep's picks are the presets the library ships."""
import json
from pathlib import Path

import pytest

import aim_kernels as ak
from aim_kernels.continual import tune

SWEEP = Path(__file__).resolve().parents[1] / "benchmarks/results/continual/tuning_seed0.json"


def _row(method, label, ap, af, learnt=True):
    return {"method": method, "label": label, "ap": ap, "af": af, "learnt_all": learnt}


def test_pick_skips_unlearnt_and_unprotecting_candidates():
    rows = [_row("naive", "-", 45.0, 60.0),
            _row("aim", "frozen", 50.0, 5.0, learnt=False),      # best AP, but a task never trained
            _row("aim", "weak", 49.0, 61.0),                     # learns, forgets more than naive
            _row("aim", "ok", 47.0, 40.0),
            _row("aim", "ok-tie", 47.0, 30.0),                   # same AP, less forgetting: wins
            _row("aim", "ablation: x", 60.0, 1.0),
            _row("mm-ewc", "frozen", 40.0, 2.0, learnt=False) | {"unlearnt": ["a", "b"]},
            _row("mm-ewc", "half", 30.0, 9.0, learnt=False) | {"unlearnt": ["a"]},
            _row("ewc", "weak", 44.0, 70.0)]
    picked, no_pick = tune.pick(rows)
    assert picked == {"aim": "ok-tie"}
    assert no_pick["mm-ewc"] == {"reason": "no candidate learns every task", "kept": "half"}
    assert "forgets at least as much as naive" in no_pick["ewc"]["reason"]


def test_grid_spans_lambda_where_the_regulariser_meets_the_gradient():
    lams = {m: sorted({ov["role_values"]["projector"].lam for mm, _, ov in tune.GRID if mm == m})
            for m in ("mm-ewc", "aim")}
    assert all(min(v) <= 3 for v in lams.values()), lams


@pytest.mark.skipif(not SWEEP.exists(), reason="no committed sweep")
def test_shipped_presets_are_the_committed_picks():
    sweep = json.loads(SWEEP.read_text())
    rows = {(r["method"], r["label"]): r for r in sweep["candidates"]}
    assert tune.pick(sweep["candidates"])[0] == sweep["picked"]
    shipped = dict(sweep["picked"], **{m: v["kept"] for m, v in sweep["no_pick"].items()})
    assert set(shipped) == set(ak.config.PRESETS) - {"naive"}
    for method, label in shipped.items():
        want = rows[(method, label)]["overrides"]
        cfg = ak.preset(method)
        for key, value in want.items():
            if key == "role_values":
                got = {r: {f: getattr(v, f) for f in ("mask_ratio", "keep", "lam")}
                       for r, v in cfg.role_values.items()}
                assert got == value, (method, label)
            else:
                assert getattr(cfg, key) == value, (method, key)
        assert rows[(method, label)]["learnt_all"] == (method in sweep["picked"]), (method, label)
