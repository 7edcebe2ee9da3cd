"""``make gpu-check DRY=1``: the GPU machine's one-shot script runs here on the CPU at
small sizes and writes every field the GPU run writes, so it cannot rot between leases.
(~1.5 min on 2 busy cores: it runs the ops, the reference, torch.compile, a tiny LLaVA.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_writes_every_field(tmp_path):
    out = tmp_path / "gpu-check.json"
    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import FIELDS
    assert set(FIELDS) <= set(result)
    failed = {k: v for k, v in result.items() if isinstance(v, dict) and "error" in v}
    assert not failed, failed
    env = result["env"]
    assert env["mode"] == "dry" and env["commit"] and env["command"] and env["device"]
    assert env["aim_kernels_C"]["built"]
    assert result["info"]["rc"] == 0
    for name in ("pytest_cuda", "pytest_triton"):
        assert result["tests"][name]["rc"] in (0, 5), result["tests"][name]
    assert result["sanitizer"]["cases_on_cpu"]["rc"] == 0
    rows = result["fused_step"]["rows"]
    measured = {(r["n"], r["dtype"], r["backend"]) for r in rows if "gbs" in r}
    for n in {r["n"] for r in rows}:
        for dtype in ("float32", "bfloat16"):
            for backend in ("cpu", "torch", "torch.compile"):
                assert (n, dtype, backend) in measured, (n, dtype, backend)
    assert all("error" not in r for r in rows), [r for r in rows if "error" in r]
    assert all("fraction_of_copy" in r for r in rows if "gbs" in r)
    assert all("gbs" in r for r in result["adamw"]["rows"])
    layouts = {(r["layout"], r["backend"]) for r in result["group_thresholds"]["rows"]
               if "seconds" in r}
    assert {("dominant", "cpu"), ("G1000", "cpu")} <= layouts
    ms = result["masked_step"]
    assert 0 < ms["share"] < 1 and ms["groups"] == ["vision", "projector", "language"]
