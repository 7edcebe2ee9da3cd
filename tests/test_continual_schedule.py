"""The loop's schedule options (issue 12 point 7, --model asym): ``--first-steps`` (more
steps for the first task of each order), ``--warmup`` (linear lr warm-up per task) and
``--lam-scale`` (a preset's lambda scaled for another model spec). Defaults unchanged."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
import aim_kernels as ak  # noqa: E402
from aim_kernels import cli  # noqa: E402
from aim_kernels.continual import data  # noqa: E402
from aim_kernels.continual.compare import lam_scale_overrides  # noqa: E402
from aim_kernels.continual.model import ModelSpec, make_model  # noqa: E402
from aim_kernels.continual.train import RunConfig, run_method, sequential_steps, task_steps, warmup_lr  # noqa: E402

TINY = ModelSpec(hidden=16, layers=1, vision_layers=1, heads=2, pretrain_steps=2, pretrain_batch=8)
SKILLS = ("colour", "count", "size")


@pytest.fixture()
def rc(tmp_path):
    rc = RunConfig(steps=3, batch=8, progress=False, drift_every=1, spec=TINY, cache=str(tmp_path / "cache"))
    make_model(TINY, 0, cache=rc.cache)    # pre-trained now: its AdamW steps are not the tasks'
    return rc


@pytest.fixture()
def bench():
    return data.make_benchmark(0, 32, 16, 8, skills=SKILLS)


def test_warmup_lr_is_linear_then_flat():
    assert [warmup_lr(1.0, s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [warmup_lr(2e-3, s, 0) for s in range(3)] == [2e-3] * 3
    assert warmup_lr(2e-3, 0, 1) == 2e-3


def _record_lrs(monkeypatch):
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    return seen


def test_each_task_restarts_the_warmup(monkeypatch, rc, bench):
    rc.steps, rc.warmup, rc.lr = 4, 2, 1e-3
    seen = _record_lrs(monkeypatch)
    run_method("naive", bench, SKILLS, 0, rc)
    assert seen == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3] * len(SKILLS))


def test_no_warmup_keeps_the_lr_and_warmup_1_changes_nothing(monkeypatch, rc, bench):
    seen = _record_lrs(monkeypatch)
    a = run_method("aim", bench, SKILLS, 0, rc)
    assert seen == [rc.lr] * rc.steps * len(SKILLS)
    rc.warmup = 1
    b = run_method("aim", bench, SKILLS, 0, rc)
    assert a["acc_matrix"] == b["acc_matrix"]


def test_first_steps_lengthens_the_first_task_only(monkeypatch, rc, bench):
    plain = run_method("naive", bench, SKILLS, 0, rc)
    assert plain["drift"]["task_ends"] == [3, 6, 9]
    same = run_method("naive", bench, SKILLS, 0, RunConfig(**{**rc.__dict__, "first_steps": 3}))
    assert same["acc_matrix"] == plain["acc_matrix"]          # first_steps == steps: the default run
    rc.first_steps = 5
    assert [task_steps(rc, k) for k in range(3)] == [5, 3, 3] and sequential_steps(rc, 3) == 11
    seen = _record_lrs(monkeypatch)
    r = run_method("mm-ewc", bench, SKILLS, 0, rc)
    assert r["drift"]["task_ends"] == [5, 8, 11] and len(seen) == 11
    assert r["drift"]["step"][:6] == [0, 1, 2, 3, 4, 5]
    seen.clear()
    j = run_method("joint", bench, SKILLS, 0, rc)
    assert j["drift"]["task_ends"] == [22] and len(seen) == 22   # joint_factor 2 x the sequential 11


def test_lam_scale_overrides_scale_every_role_and_nothing_else():
    ov = lam_scale_overrides({"aim": 0.3, "mm-ewc": 0.1})
    for m, x in (("aim", 0.3), ("mm-ewc", 0.1)):
        base = ak.preset(m)
        cfg = ak.preset(m, **ov[m])
        for role, v in base.role_values.items():
            got = cfg.role_values[role]
            assert got.lam == pytest.approx(v.lam * x) and got.mask_ratio == v.mask_ratio and got.keep == v.keep
        assert cfg.normalize == base.normalize and cfg.directional == base.directional
    for bad in ({"naive": 0.5}, {"merge": 0.5}, {"aim": 0.0}, {"nope": 1.0}):
        with pytest.raises(ValueError, match="--lam-scale"):
            lam_scale_overrides(bad)


def test_cli_records_the_options(tmp_path):
    out = tmp_path / "o"
    assert cli.main(["compare", "--methods", "naive,aim", "--seeds", "0", "--steps", "1", "--first-steps", "2",
                     "--warmup", "2", "--lam-scale", "aim=0.5", "--batch", "4", "--pretrain-steps", "1",
                     "--cache", str(tmp_path / "c"), "--no-progress", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    cfg = s["config"]
    assert cfg["first_task_steps"] == 2 and cfg["steps_per_task"] == 1 and cfg["warmup"] == 2
    assert cfg["presets"]["aim"]["roles"]["projector"][2] == pytest.approx(50.0)
    assert cfg["overrides"]["aim"]["role_values"]["language"][2] == pytest.approx(5.0)   # [rho, kappa, lambda]
    runs = json.loads((out / "runs.json").read_text())
    assert runs["aim"][0]["drift"]["task_ends"][:2] == [2, 3]
    report = (out / "report.md").read_text()
    assert "(2 for the first task of each order)" in report and "warm-up over each task's first 2 steps" in report
    assert "`aim` λ vision / projector / language = 5 / 50 / 5" in report
    with pytest.raises(SystemExit):
        cli.main(["compare", "--methods", "aim", "--lam-scale", "aim", "--out", str(out)])
