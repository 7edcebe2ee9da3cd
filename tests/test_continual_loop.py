"""The continual loop end to end on a very short run, the CLI, local checkpoints,
and seed 001's contribution analysis."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from aim_kernels import cli  # noqa: E402
from aim_kernels.continual import contribution, data  # noqa: E402
from aim_kernels.continual.compare import compare  # noqa: E402
from aim_kernels.continual.model import ModelSpec, build_llava, make_model  # noqa: E402
from aim_kernels.continual.train import RunConfig, run_method  # noqa: E402

TINY = ModelSpec(hidden=16, layers=1, vision_layers=1, heads=2, pretrain_steps=2, pretrain_batch=8)
SKILLS = ("colour", "count")
KEYS = {"ap", "af", "novel", "ap_std", "af_std", "acc_matrix", "seconds", "step_overhead"}


@pytest.fixture()
def rc(tmp_path):
    return RunConfig(steps=3, batch=8, progress=False, drift_every=1, spec=TINY,
                     cache=str(tmp_path / "cache"))


def test_compare_writes_summary_report_and_plots(tmp_path, rc):
    out = tmp_path / "out"
    summary = compare(["naive", "aim", "joint"], [0], out, rc, preset="quick", skills=SKILLS,
                      sizes=(32, 16, 8))
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["preset"] == "quick" and "CPU" in on_disk["device"]
    assert set(on_disk["methods"]) == {"naive", "aim"} and "joint" not in on_disk["methods"]
    for r in list(on_disk["methods"].values()) + [on_disk["joint"]]:
        assert KEYS <= set(r)
        assert 0 <= r["ap"] <= 100 and 0 <= r["novel"] <= 100 and 0 < r["step_overhead"] < 1
    R = on_disk["methods"]["naive"]["acc_matrix"]
    assert np.array(R).shape == (2, 2) and np.array(on_disk["joint"]["acc_matrix"]).shape == (1, 2)
    assert summary["methods"]["aim"]["ap"] == on_disk["methods"]["aim"]["ap"]
    report = (out / "report.md").read_text()
    assert "| `aim` |" in report and "| `joint` (upper bound) |" in report
    assert len(on_disk["load_average"]) == 3 and "load average at the end" in report
    for png in ("acc_matrices.png", "ap_af.png", "drift.png", "contribution.png"):
        assert (out / png).stat().st_size > 1000
    runs = json.loads((out / "runs.json").read_text())
    drift = runs["aim"][0]["drift"]
    assert set(drift["groups"]) == {"vision", "projector", "language"}
    assert drift["task_ends"] == [3, 6] and len(drift["step"]) == 6
    assert not (out / "runs.partial.json").exists()


def test_a_stopped_compare_keeps_its_finished_runs(tmp_path, rc, monkeypatch):
    from aim_kernels.continual import compare as compare_mod
    real = compare_mod.run_method

    def stop_at_aim(m, *a, **k):
        if m == "aim":
            raise KeyboardInterrupt
        return real(m, *a, **k)

    monkeypatch.setattr(compare_mod, "run_method", stop_at_aim)
    with pytest.raises(KeyboardInterrupt):
        compare(["naive", "aim"], [0], tmp_path / "out", rc, skills=SKILLS, sizes=(32, 16, 8))
    kept = json.loads((tmp_path / "out" / "runs.partial.json").read_text())
    assert kept["aim"] == [] and len(kept["naive"]) == 1
    assert np.array(kept["naive"][0]["acc_matrix"]).shape == (2, 2)
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.slow
def test_pooled_set_up_gives_the_serial_results(tmp_path, rc):
    """--jobs 2 runs each seed's pre-training and contribution matrices in the pool: the
    same models (cache files), contributions and R as one process."""
    import dataclasses
    serial = compare(["naive", "aim"], [0, 1], tmp_path / "a", rc, skills=SKILLS, sizes=(32, 16, 8))
    rc2 = dataclasses.replace(rc, cache=str(tmp_path / "cache2"))
    pooled = compare(["naive", "aim"], [0, 1], tmp_path / "b", rc2, skills=SKILLS, sizes=(32, 16, 8), jobs=2)
    assert sorted(p.name for p in (tmp_path / "cache2").iterdir()) == \
        sorted(p.name for p in (tmp_path / "cache").iterdir()) and len(list((tmp_path / "cache2").iterdir())) == 2
    assert pooled["contribution"]["matrices"] == serial["contribution"]["matrices"]
    assert pooled["config"]["parameters"] == serial["config"]["parameters"]
    for m in ("naive", "aim"):
        assert pooled["methods"][m]["acc_matrix"] == serial["methods"][m]["acc_matrix"]


def test_pretraining_is_cached_per_seed_and_freezes_the_vision_tower(rc):
    m1, info1 = make_model(TINY, 5, cache=rc.cache)
    m2, info2 = make_model(TINY, 5, cache=rc.cache)
    assert not info1["cached"] and info2["cached"]
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), n
        assert p.requires_grad == ("vision_tower" not in n)


def test_local_checkpoint_from_save_pretrained(tmp_path, rc):
    path = tmp_path / "ckpt"
    build_llava(TINY, seed=0).save_pretrained(path)
    rc.checkpoint = str(path)
    bench = data.make_benchmark(0, 32, 16, 8, skills=SKILLS)
    r = run_method("ewc", bench, SKILLS, 0, rc)
    assert len(r["acc_matrix"]) == 2 and r["pretrain"]["cache"] != ""


def test_cli_run_writes_the_report(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["run", "--method", "naive", "--steps", "1", "--batch", "4", "--pretrain-steps", "1",
                     "--cache", str(tmp_path / "c"), "--no-progress", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert list(s["methods"]) == ["naive"] and len(s["methods"]["naive"]["acc_matrix"]) == len(data.SKILLS)


def test_cli_lam_overrides_the_preset_lambda_and_is_recorded(tmp_path):
    from aim_kernels.continual.compare import lam_overrides
    ov = lam_overrides(["aim=0.5/5/0.25"], ["naive", "aim"])
    got = ov["aim"]["role_values"]
    assert [got[r].lam for r in ("vision", "projector", "language")] == [0.5, 5.0, 0.25]
    assert got["projector"].mask_ratio == 0.05 and got["vision"].mask_ratio == 0.01   # the preset's masks
    for bad, why in ((["aim=1/2"], "expected METHOD"), (["aim"], "expected METHOD"), (["ewc=1/1/1"], "not a"),
                     (["naive=1/1/1"], "not a"), (["aim=a/1/1"], "numbers"), (["aim=1/-1/1"], "lam"),
                     (["aim=1/1/1", "aim=2/2/2"], "twice")):
        with pytest.raises(ValueError, match=why):
            lam_overrides(bad, ["naive", "aim"])
    out = tmp_path / "run"
    assert cli.main(["run", "--method", "aim", "--lam", "aim=0.5/5/0.25", "--steps", "1", "--batch", "4",
                     "--pretrain-steps", "1", "--cache", str(tmp_path / "c"), "--no-progress",
                     "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["overrides"]["aim"]["role_values"]["projector"] == [0.05, 0.0, 5.0]
    assert s["config"]["presets"]["aim"]["roles"]["language"] == [0.01, 0.0, 0.25]
    assert "`aim` λ vision / projector / language = 0.5 / 5 / 0.25" in (out / "report.md").read_text()
    with pytest.raises(SystemExit):
        cli.main(["compare", "--methods", "naive,aim", "--lam", "mm-ewc=1/1/1", "--steps", "1"])


def test_contribution_matrices_and_order(rc):
    model, _ = make_model(TINY, 0, cache=rc.cache)
    bench = data.make_benchmark(0, 8, 32, 8)
    con = contribution.contributions(model, bench, data.SKILLS, n=32)
    T = len(data.SKILLS)
    for k in contribution.KINDS:
        M = np.array(con[k])
        assert M.shape == (T, T) and (np.abs(M) <= 1 + 1e-5).all()
    assert np.allclose(np.array(con["I->T"]).T, con["T->I"], atol=1e-4)
    assert np.allclose(np.diag(con["T->T"]), 1, atol=1e-4)     # one question template per skill
    order = contribution.contribution_order(con, data.SKILLS)
    assert sorted(order) == sorted(data.SKILLS)
    best = min(contribution.order_cost(con, data.SKILLS, o) for o in itertools.permutations(data.SKILLS))
    assert contribution.order_cost(con, data.SKILLS, order) == pytest.approx(best)
    run = {"order": list(data.SKILLS), "acc_matrix": np.eye(T).tolist()}
    corr = contribution.forgetting_correlation(con, data.SKILLS, [run])
    assert corr["pairs"] == T * (T - 1) // 2 and set(contribution.KINDS) <= set(corr)


def test_contribution_order_prefers_low_cross_modal_neighbours():
    skills = ["a", "b", "c"]
    high = [[0, 1, 0], [1, 0, 0], [0, 0, 0]]    # a and b must not be adjacent
    con = {k: high for k in contribution.KINDS}
    order = contribution.contribution_order(con, skills)
    assert order.index("c") == 1
