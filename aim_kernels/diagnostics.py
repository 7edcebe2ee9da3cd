"""What is built and usable here, and why not: ``python -m aim_kernels``."""
from __future__ import annotations

import platform

import torch

from .ops.backends import BACKENDS, unavailable_reason


def native_lines() -> list[str]:
    """The compiled module: where it is, what it was built for, what the driver says."""
    try:
        from .ops import native
    except ImportError as exc:
        return [f"native module: cannot import aim_kernels.ops.native ({exc})"]
    info = native.built_info()
    if not info["built"]:
        return [f"native module: not built ({info['error']})"]
    lines = [f"native module: {info['path']}",
             f"  cpu: OpenMP, {info['cpu_threads']} threads, code path {info['cpu_isa']} "
             f"(this CPU runs: {', '.join(info['cpu_isas'])})"]
    if info["cuda"] is None:
        lines.append("  cuda: not compiled in (no nvcc when the module was built)")
        return lines
    lines.append(f"  cuda: built for CUDA {info['cuda']}, sm {info['archs']} "
                 f"(PTX for the newest), static runtime")
    C = native._C
    driver = C.cuda_driver_version()      # lazy: the first call that touches the driver
    lines.append("  driver: " + (f"supports CUDA {driver // 1000}.{driver % 1000 // 10}"
                                 if driver else "none found"))
    if driver:
        lines.append(f"  devices seen by the module: {C.cuda_device_count()}")
    return lines


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
    lines += native_lines()
    lines.append("backends:")
    for name in BACKENDS:
        why = unavailable_reason(name)
        lines.append(f"  {name:<7} {'usable' if not why else 'unavailable: ' + why}")
    return "\n".join(lines)
