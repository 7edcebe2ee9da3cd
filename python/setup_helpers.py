"""Which nvcc builds ``_C`` for a requested CUDA version (used by setup.py and build_wheel.py)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path


def nvcc_version(nvcc: str) -> str | None:
    """``"X.Y"`` from ``nvcc --version``, or None when it does not run."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _candidates(cuda: str, root: Path):
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        yield Path(home) / "bin" / "nvcc"
    if shutil.which("nvcc"):
        yield Path(shutil.which("nvcc"))
    yield Path("/usr/local/cuda/bin/nvcc")
    if cuda not in ("auto", "cpu"):     # NVIDIA's compiler from Debian (python/cuda_debian.py)
        yield root / "build" / f"cuda-{cuda}" / "bin" / "nvcc"
    if cuda not in ("auto", "cpu"):     # NVIDIA's compiler from PyPI (python/build_wheel.py)
        yield from sorted((root / "build" / f"toolchain-cu{cuda}").glob(
            "lib/python*/site-packages/nvidia/*/bin/nvcc"))


def find_nvcc(cuda: str, root: Path) -> tuple[str | None, str | None]:
    """``(nvcc, "X.Y")`` for ``AIM_CUDA=cuda`` ("auto", "cpu" or "X.Y"); ``(None, None)``
    for a CPU-only build. Raises RuntimeError when version X.Y is asked for and absent."""
    if cuda == "cpu":
        return None, None
    for path in _candidates(cuda, root):
        if path.exists():
            version = nvcc_version(str(path))
            if version and (cuda == "auto" or version == cuda):
                return str(path), version
    if cuda == "auto":
        return None, None
    raise RuntimeError(f"AIM_CUDA={cuda}: no nvcc {cuda} found (set CUDA_HOME, or run "
                       f"`make wheel CUDA={cuda}`, which installs NVIDIA's compiler from PyPI)")
