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
