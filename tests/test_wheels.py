"""Each wheel built into dist/ (``make wheel CUDA=...``) installs into a fresh venv with
no build tools and works there on the CPU: ``python -m aim_kernels`` reports the native
module built, and a small ``fused_step`` on the ``cpu`` backend equals the reference.

Gated: without a wheel in dist/ (a fresh clone, ``make test``) there is nothing to
check and the test skips; with one it takes ~1-2 min per wheel (torch is installed into
the venv from the local wheel cache), so it is marked slow too.
"""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WHEELS = sorted((ROOT / "dist").glob("aim_kernels-*.whl"))

SMOKE = r"""
import torch, aim_kernels, aim_kernels.ops as ops
from aim_kernels.ops import native, reference
info = native.built_info()
assert info["built"], info
assert "site-packages" in aim_kernels.__file__, aim_kernels.__file__   # the wheel, not the tree
g = torch.Generator().manual_seed(0)
n = 1000
t = [torch.randn(n, generator=g) for _ in range(3)] + [torch.rand(n, generator=g) for _ in range(2)]
off = torch.tensor([0, 400, n])
per = [torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.3]), torch.zeros(2), torch.ones(2)]
ref = [x.clone() for x in t]
s = ops.fused_step(*t, off, *per, beta=0.9, backend="cpu")
r = reference.fused_step(*ref, off, *per, beta=0.9)
assert torch.equal(t[0], ref[0]) and torch.equal(t[4], ref[4]), "cpu != reference"
torch.testing.assert_close(s, r)
print("wheel ok:", info.get("cuda"), info.get("archs"))
"""


@pytest.mark.slow
@pytest.mark.skipif(not WHEELS, reason="no wheel in dist/ (make wheel CUDA=... builds one)")
@pytest.mark.parametrize("wheel", WHEELS, ids=lambda w: w.name)
def test_wheel_installs_and_runs_in_a_fresh_venv(wheel, tmp_path):
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if f"-{tag}-" not in wheel.name:
        pytest.skip(f"{wheel.name} is for another Python (this is {tag})")
    local = wheel.name.split("-")[1].split("+")[-1]
    if local.startswith("cu"):
        with zipfile.ZipFile(wheel) as zf:
            assert any(n.startswith("aim_kernels/_C") for n in zf.namelist())
    if "manylinux" not in wheel.name:
        pytest.fail(f"{wheel.name}: not a manylinux wheel (build_wheel.py repairs with auditwheel)")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q", "--no-build-isolation"]
    # no build tools in the venv: pip only unpacks wheels (--only-binary for everything)
    subprocess.run([*pip, "--only-binary=:all:", "torch==2.13.0", str(wheel)], check=True,
                   timeout=900)
    for tool in ("cmake", "ninja", "nvcc"):
        assert not (venv / "bin" / tool).exists()
    info = subprocess.run([str(py), "-m", "aim_kernels"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert info.returncode == 0, info.stderr
    assert "cpu" in info.stdout.lower()
    run = subprocess.run([str(py), "-c", SMOKE], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "wheel ok" in run.stdout
