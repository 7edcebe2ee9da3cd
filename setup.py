"""Build script: the Python package plus ``aim_kernels._C`` built with CMake (+ninja).

Metadata lives in pyproject.toml; this file adds the native module and the local
version tag naming what it was built for (``0.1.0+cu130``, ``0.1.0+cpu``).

Environment:
  AIM_CUDA          "auto" (default): CUDA part when an nvcc is found (CUDA_HOME, PATH,
                    /usr/local/cuda); "cpu": CPU part only; "X.Y": CUDA X.Y, from
                    CUDA_HOME, the nvcc on PATH if it is X.Y, or build/toolchain-cuX.Y
                    (a venv with NVIDIA's PyPI compiler packages, see python/build_wheel.py)
  AIM_CUDA_ARCHS    e.g. "80;86;89;90" (default; SASS for each, PTX for the newest)
  AIM_REQUIRE_NATIVE=1   fail instead of falling back to a pure-Python install
  AIM_BUILD_JOBS    parallel compile jobs (default: all cores)

Without CMake or a C++ compiler the build prints a warning and installs the
pure-Python package, whose ``torch`` backend runs anywhere.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "python"))
from setup_helpers import find_nvcc  # noqa: E402


def _version() -> str:
    text = (ROOT / "aim_kernels" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


CUDA = os.environ.get("AIM_CUDA", "auto").strip().lower() or "auto"
NVCC, NVCC_VERSION = find_nvcc(CUDA, ROOT)
TAG = "cu" + NVCC_VERSION.replace(".", "") if NVCC else "cpu"
if shutil.which("cmake") is None and os.environ.get("AIM_REQUIRE_NATIVE") != "1":
    TAG = None        # nothing native will be built: a plain, pure-Python version


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt into build/cmake-<tag>-<python> (kept, so
    rebuilds are incremental) and copies ``_C`` where setuptools expects it."""

    def run(self):
        try:
            super().run()
        except Exception as exc:   # noqa: BLE001 - any build failure means "no _C"
            if os.environ.get("AIM_REQUIRE_NATIVE") == "1":
                raise
            for ext in self.extensions:   # never ship a stale _C from an earlier build
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            self.warn(f"aim_kernels: the native module was not built ({exc}); installing the "
                      "pure-Python package (the `torch` backend works everywhere). "
                      "`python -m aim_kernels` shows what is available.")
            print(f"WARNING: aim_kernels._C not built: {exc}", file=sys.stderr)

    def build_extension(self, ext):
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake was not found")
        build_dir = ROOT / "build" / f"cmake-{TAG}-{sysconfig.get_config_var('SOABI') or 'py'}"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"]
        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as ninja_pkg   # the PyPI package
                ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
            except ImportError:
                ninja = None
        if ninja and not (build_dir / "CMakeCache.txt").exists():
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if NVCC:
            args += ["-DAIM_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={NVCC}"]
        else:
            args += ["-DAIM_CUDA=OFF"]
        archs = os.environ.get("AIM_CUDA_ARCHS")
        if archs is not None:
            args.append(f"-DAIM_CUDA_ARCHS={archs.replace(',', ';')}")
        jobs = os.environ.get("AIM_BUILD_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)
        built = next(build_dir.glob("_C*" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")))
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)
        target.chmod(0o755)


setup(
    version=f"{_version()}+{TAG}" if TAG else _version(),
    ext_modules=[Extension("aim_kernels._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
