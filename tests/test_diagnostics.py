import re
import subprocess
import sys

from aim_kernels.cli import main


def test_python_m_aim_kernels_reports_every_backend():
    out = subprocess.run([sys.executable, "-m", "aim_kernels"], capture_output=True, text=True,
                         check=True).stdout
    for name in ("torch", "cpu", "triton", "cuda"):
        assert f"  {name}" in out
    assert re.search(r"torch\s+usable", out)


def test_cli_info(capsys):
    assert main(["info"]) == 0
    assert "backends:" in capsys.readouterr().out


def test_report_says_what_the_native_module_was_built_for():
    from aim_kernels import diagnostics
    from aim_kernels.ops import native
    out = diagnostics.report()
    info = native.built_info()
    if not info["built"]:
        assert "native module: not built" in out
        assert re.search(r"cpu\s+unavailable: .*not built", out)
        return
    assert "native module:" in out and re.search(r"cpu\s+usable", out)
    if info["cuda"]:
        assert f"built for CUDA {info['cuda']}, sm {info['archs']}" in out
        assert "driver:" in out
        if not native._C.cuda_driver_version():
            assert "driver: none found" in out
    else:
        assert "cuda: not compiled in" in out
    if not __import__("torch").cuda.is_available():
        assert re.search(r"cuda\s+unavailable: ", out)


def test_without_the_compiled_module_native_backends_say_why(monkeypatch):
    """A pure-Python install (no compiler at install time): cpu/cuda are unavailable with
    the reason, and the report says the module is not built."""
    from aim_kernels import diagnostics
    from aim_kernels.ops import native
    monkeypatch.setattr(native, "_C", None)
    monkeypatch.setattr(native, "_IMPORT_ERROR", "No module named 'aim_kernels._C'")
    for name in ("cpu", "cuda"):
        assert "aim_kernels._C is not built" in native.unavailable_reason(name)
    assert native.built_info() == {"built": False, "error": "No module named 'aim_kernels._C'"}
    assert "native module: not built (No module named 'aim_kernels._C')" in diagnostics.native_lines()


def test_native_module_is_built_where_the_tools_are():
    """`make test` builds `_C` when CMake and a C++ compiler are there, with CUDA when an
    nvcc is found: a build that silently fell back to pure Python fails here, not later."""
    import os
    import shutil

    import pytest
    from aim_kernels.ops import native
    if not (shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++"))):
        pytest.skip("no CMake or C++ compiler here: a pure-Python install is expected")
    info = native.built_info()
    assert info["built"], info
    nvcc = shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and
                                    "/usr/local/cuda/bin/nvcc")
    if nvcc and os.environ.get("AIM_CUDA", "auto") != "cpu":
        assert info["cuda"], f"nvcc at {nvcc} but _C was built without CUDA: {info}"
