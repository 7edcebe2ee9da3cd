"""What is built and usable here, and why not: ``python -m aim_kernels``."""
from __future__ import annotations

import platform

import torch

from .ops.backends import BACKENDS, unavailable_reason


def report() -> str:
    from . import __version__
    lines = [
        f"aim_kernels {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} "
        f"(built for CUDA {torch.version.cuda or 'none'})",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"device cuda:{i}: {p.name}, sm_{p.major}{p.minor}, "
                         f"{p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("device: no CUDA device visible to PyTorch")
    lines.append("backends:")
    for name in BACKENDS:
        why = unavailable_reason(name)
        lines.append(f"  {name:<7} {'usable' if not why else 'unavailable: ' + why}")
    return "\n".join(lines)
