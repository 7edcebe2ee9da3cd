"""What a CPU machine can check of the CUDA build (no GPU needed, nvcc needed).

* ``ops_cuda.cu`` compiled with the project's own nvcc flags (read from CMakeLists.txt)
  for sm_80 and sm_90: every kernel at 0 spill bytes (``ptxas -v``), and no
  ``fma.rn.f32`` in the PTX (``-fmad=false``: CUDA equals the CPU backend bit for bit on
  fp32). A failing compile fails the test: it never passes on missing output.
* The probe force-loads every kernel: each ``__global__`` function of the file is named
  in ``load_every_kernel``, and the count of instantiations ptxas compiled is the one
  ``cuda_kernel_count`` reports.
* ``csrc/device_guard.h`` against a fake runtime (tests/csrc/device_guard_test.cpp): the
  caller's device is current again after an op on another device, exception or not.

The compile takes ~1 min on 2 busy cores, so it is marked slow.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CU = ROOT / "csrc" / "ops_cuda.cu"
ARCHS = (80, 90)
# every compiler a wheel is built with here: the machine's, and CUDA 12.4 from Debian's
# packages once `make wheel CUDA=12.4` has unpacked it (ptxas versions spill differently)
NVCCS = [n for n in (shutil.which("nvcc"), str(ROOT / "build" / "cuda-12.4" / "bin" / "nvcc"))
         if n and Path(n).exists()]
CXX = shutil.which("c++") or shutil.which("g++")


def project_nvcc_flags() -> list[str]:
    """The ``AIM_NVCC_FLAGS`` list of CMakeLists.txt: what the build passes to nvcc."""
    m = re.search(r"set\(AIM_NVCC_FLAGS ([^)]*)\)", (ROOT / "CMakeLists.txt").read_text())
    assert m, "CMakeLists.txt no longer sets AIM_NVCC_FLAGS"
    return m.group(1).split()


def spills(ptxas_log: str) -> dict[str, int]:
    """``{kernel: spill store bytes}`` from ``ptxas -v`` output."""
    out, name = {}, None
    for line in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and name is not None:
            out[name] = int(m.group(1))
            name = None
    return out


@pytest.fixture(scope="module", params=NVCCS or [None],
                ids=lambda n: "no-nvcc" if n is None else Path(n).parent.parent.name)
def compiled(request, tmp_path_factory):
    """Per arch: (ptxas -v log, PTX text), from one nvcc run with the project's flags."""
    NVCC = request.param
    if NVCC is None:
        pytest.skip("no nvcc on PATH")
    keep = tmp_path_factory.mktemp("nvcc")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [NVCC, *project_nvcc_flags(), "-std=c++17", "-DAIM_WITH_CUDA", f"-I{ROOT / 'csrc'}",
           *gencode, "-Xptxas", "-v", "--keep", f"--keep-dir={keep}", "-c", str(CU),
           "-o", str(keep / "ops_cuda.o")]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=keep)
    assert run.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{run.stderr[-4000:]}"
    result = {}
    for arch in ARCHS:
        ptx = list(keep.glob(f"*compute_{arch}*.ptx")) or list(keep.glob(f"*sm_{arch}*.ptx"))
        assert len(ptx) == 1, f"no PTX for sm_{arch} kept in {sorted(p.name for p in keep.iterdir())}"
        result[arch] = (_arch_log(run.stderr, arch), ptx[0].read_text())
    return result


def _arch_log(stderr: str, arch: int) -> str:
    """The lines of the ptxas log that belong to ``sm_<arch>``."""
    lines, keep = [], False
    for line in stderr.splitlines():
        m = re.search(r"for 'sm_(\d+)'", line)
        if m:
            keep = int(m.group(1)) == arch
        if keep:
            lines.append(line)
    return "\n".join(lines)


def _kernel_count_in_source() -> int:
    m = re.search(r"int cuda_kernel_count\(\) \{ return ([^;]+);", CU.read_text())
    assert m, "cuda_kernel_count() not found in ops_cuda.cu"
    return eval(m.group(1), {})   # a constant expression of the file, e.g. 9 * 2 + 3 * 2 + 4


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills(compiled, arch):
    by_kernel = spills(compiled[arch][0])
    assert len(by_kernel) == _kernel_count_in_source(), (
        f"sm_{arch}: ptxas compiled {len(by_kernel)} kernels, cuda_kernel_count() says "
        f"{_kernel_count_in_source()} (the probe must load every one)")
    spilling = {k: v for k, v in by_kernel.items() if v}
    assert not spilling, f"sm_{arch}: spill bytes per kernel: {spilling}"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_no_fma_contraction(compiled, arch):
    ptx = compiled[arch][1]
    assert "fma.rn.f32" not in ptx, (
        f"sm_{arch}: {ptx.count('fma.rn.f32')} fma.rn.f32 in the PTX: build without -fmad=false?")
    assert "mul.rn.f32" in ptx or "mul.f32" in ptx   # the math is there, unfused


def test_flags_disable_contraction():
    assert "-fmad=false" in project_nvcc_flags()


def test_probe_loads_every_kernel():
    """Each ``__global__`` function of ops_cuda.cu is taken by ``load_every_kernel``."""
    src = CU.read_text()
    kernels = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\)?\s*)?(\w+)\(",
                             src))
    kernels |= set(re.findall(r"__launch_bounds__\([^\n]*\n(\w+)\(", src))
    body = src[src.index("cudaError_t load_every_kernel()"):src.index("int cuda_runtime_version")]
    assert kernels >= {"fused_step_kernel", "select_hist", "align_apply", "select_walk"}
    missing = sorted(k for k in kernels if k not in body)
    assert not missing, f"load_every_kernel does not load {missing}"


def test_device_guard_restores_the_callers_device(tmp_path):
    if CXX is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "device_guard_test"
    subprocess.run([CXX, "-std=c++17", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests" / "csrc" / "device_guard_test.cpp"), "-o", str(exe)],
                   check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout


def test_every_cuda_entry_point_guards_the_device():
    """Each host entry point that launches sets the device through the guard, never bare."""
    src = CU.read_text()
    assert "cudaSetDevice(" not in src.replace("cudaSetDevice(device))", ""), \
        "a bare cudaSetDevice outside the guard's runtime binding"
    for fn in ("cuda_fused_step", "cuda_group_thresholds", "cuda_consolidate", "cuda_align",
               "cuda_align_apply", "cuda_probe"):
        body = src[src.index(f"{fn}("):]
        body = body[:body.index("\n}\n")]
        assert "OnDevice on(device)" in body, f"{fn} does not restore the caller's device"
