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


def test_scaled_grid_scales_the_shipped_lambdas_and_keeps_the_masks():
    grid = tune.scaled_grid(["mm-ewc", "aim"], [0.1, 1.0])
    assert [(m, lab) for m, lab, _ in grid] == [
        ("naive", "-"), ("mm-ewc", "lam=0.3/3/0.3"), ("mm-ewc", "lam=3/30/3"),
        ("aim", "rho=0.01/0.05/0.01 lam=1/10/1"), ("aim", "rho=0.01/0.05/0.01 lam=10/100/10")]
    shipped = ak.preset("aim").role_values
    for m, _, ov in grid[1:]:
        cfg = ak.preset(m, **ov)           # a valid config
        assert all(cfg.role_values[r].mask_ratio == ak.preset(m).role_values[r].mask_ratio
                   for r in cfg.role_values)
    got = grid[3][2]["role_values"]
    assert {r: v.lam for r, v in got.items()} == {r: v.lam * 0.1 for r, v in shipped.items()}
    with pytest.raises(ValueError, match="no lambda"):
        tune.scaled_grid(["merge"], [0.1])


def test_tune_on_a_data_folder(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("PIL")
    from aim_kernels.continual.taskfolder import write_photo_tasks
    folder = write_photo_tasks(tmp_path / "tasks", n_train=12, n_test=6, tasks=("colour", "where"))
    out = tmp_path / "sweep.json"
    tune.main(["--data", str(folder), "--only", "aim", "--scales", "0.1", "--steps", "2",
               "--pretrain-steps", "2", "--cache", str(tmp_path / "c"), "--out", str(out)])
    s = json.loads(out.read_text())
    assert s["skills"] == ["colour", "where"] and s["lr"] == 1e-3 and s["pretrain_steps"] == 2
    assert s["data"]["source"].startswith("manifest:") and len(s["data"]["hash"]) == 16
    rows = {(r["method"], r["label"]): r for r in s["candidates"]}
    assert set(rows) == {("naive", "-"), ("aim", "rho=0.01/0.05/0.01 lam=1/10/1")}
    assert len(rows[("naive", "-")]["diagonal"]) == 2
    assert rows[("aim", "rho=0.01/0.05/0.01 lam=1/10/1")]["overrides"]["role_values"]["projector"]["lam"] == 10
    with pytest.raises(SystemExit):              # --data never writes over the generated sweep
        tune.main(["--data", str(folder), "--steps", "2"])


def test_tune_at_compare_model_flags(tmp_path):
    """--model / --first-steps / --lora reach the runs and the record, so a sweep at the 56x
    spec pairs with compare's runs of the same flags."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from aim_kernels.continual import train
    seen = []
    real = train.run_method

    def spy(method, bench, skills, seed, rc, ov=None):
        seen.append((rc.spec, rc.first_steps))
        return real(method, bench, skills[:2], seed, rc, ov)

    out = tmp_path / "sweep.json"
    orig = tune.run_method
    tune.run_method = spy
    try:
        tune.main(["--model", "asym", "--lora", "2", "--lora-vocab", "--first-steps", "3",
                   "--steps", "2", "--pretrain-steps", "2", "--only", "mm-ewc", "--scales", "0.3",
                   "--cache", str(tmp_path / "c"), "--out", str(out)])
    finally:
        tune.run_method = orig
    s = json.loads(out.read_text())
    assert (s["model"], s["first_task_steps"], s["lora"], s["lora_vocab"], s["pretrain_steps"]) == \
        ("asym", 3, 2, True, 2)
    from aim_kernels.continual.model import MODELS
    spec = seen[0][0]
    assert (spec.layers, spec.hidden, spec.lora, spec.lora_vocab, spec.pretrain_steps) == \
        (MODELS["asym"].layers, MODELS["asym"].hidden, 2, True, 2)
    assert [f for _, f in seen] == [3, 3]
    assert {r["method"] for r in s["candidates"]} == {"naive", "mm-ewc"}
    with pytest.raises(SystemExit):
        tune.main(["--lora-vocab", "--out", str(out)])          # --lora-vocab needs --lora
