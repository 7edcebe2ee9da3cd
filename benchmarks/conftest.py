"""Benchmark set-up: the provenance every results JSON carries.

``make bench`` writes ``benchmarks/results/<device>-<date>.json`` (pytest-benchmark
format); its ``aim_kernels`` block says on what, with what and by which command.
"""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys

import pytest
import torch

import aim_kernels as ak


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=os.path.dirname(__file__)).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["aim_kernels"] = {
        "device": device_name(),
        "cpu_count": os.cpu_count(),
        "versions": {"aim_kernels": ak.__version__, "torch": torch.__version__,
                     "cuda": torch.version.cuda, "python": platform.python_version()},
        "backends": ak.available_backends(),
        "commit": _commit(),
        "command": shlex.join([os.path.basename(sys.executable), "-m", "pytest"] + sys.argv[1:]),
        "native": _native_info(),
        "speedup_vs_torch": speedups(output_json.get("benchmarks", [])),
        "vs_fused_adamw": vs_adamw(output_json.get("benchmarks", [])),
        "uptime": _uptime(),
    }


def _uptime() -> str:
    """``uptime`` at the end of the run: the load this shared machine was under."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def vs_adamw(benchmarks) -> dict:
    """Per benchmark group holding an ``adamw`` row: mean time of each backend / that of
    torch.optim.AdamW(fused=True) on the same N, measured in this run."""
    by_group: dict = {}
    for b in benchmarks:
        backend = (b.get("params") or {}).get("backend")
        if backend is not None:
            by_group.setdefault(b["group"], {})[backend] = b["stats"]["mean"]
    return {group: {name: t / times["adamw"] for name, t in times.items() if name != "adamw"}
            for group, times in by_group.items() if "adamw" in times}


def _native_info() -> dict:
    try:
        from aim_kernels.ops import native
    except ImportError as exc:
        return {"built": False, "error": str(exc)}
    return native.built_info()


def speedups(benchmarks) -> dict:
    """Per benchmark group, mean time of the ``torch`` backend / mean time of each backend,
    both measured in this run: ``{"fused_step torch.float32 2^24": {"cpu": 31.2, ...}}``."""
    by_group: dict = {}
    for b in benchmarks:
        backend = (b.get("params") or {}).get("backend")
        if backend is not None:
            by_group.setdefault(b["group"], {})[backend] = b["stats"]["mean"]
    return {group: {name: times["torch"] / t for name, t in times.items()
                    if name not in ("torch", "adamw")}
            for group, times in by_group.items() if "torch" in times}


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def results_path() -> str:
    """``benchmarks/results/<device>-<date>.json`` for ``make bench``."""
    import datetime
    import re
    slug = re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-") or "device"
    day = datetime.date.today().isoformat()
    return os.path.join(os.path.dirname(__file__), "results", f"{slug}-{day}.json")
