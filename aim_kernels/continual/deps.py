"""What ``compare`` / ``run`` need beyond torch, checked before any training starts.

``pip install aim_kernels[continual]`` installs all of it; a missing piece is reported
at once with that command, not after minutes of training (the plots need matplotlib,
reading image files needs Pillow, ``--lora`` needs PEFT).
"""
from __future__ import annotations

import importlib.util
import platform

# import name -> pip name
NEEDED = {"transformers": "transformers", "tqdm": "tqdm", "numpy": "numpy",
          "matplotlib": "matplotlib", "PIL": "pillow"}
LORA = {"peft": "peft"}


def missing(lora: bool = False) -> list[str]:
    """pip names of the optional dependencies that are not importable here."""
    need = dict(NEEDED, **(LORA if lora else {}))
    return [pip for mod, pip in need.items() if importlib.util.find_spec(mod) is None]


def require(lora: bool = False) -> None:
    """SystemExit naming every missing dependency and the command that installs them."""
    gone = missing(lora)
    if gone:
        raise SystemExit(f"aim-kernels: missing optional dependencies: {', '.join(gone)}. "
                         "Install them with: pip install 'aim_kernels[continual]'"
                         " (nothing was trained)")


def versions() -> dict:
    """Versions of what a result depends on, for summary.json."""
    from importlib import metadata
    out = {"python": platform.python_version()}
    for dist in ("aim_kernels", "torch", "transformers", "peft", "numpy", "triton"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
