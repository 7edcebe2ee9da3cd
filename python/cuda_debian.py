"""NVIDIA's CUDA 12.4 compiler from Debian 13 (trixie) non-free, unpacked under build/.

    python python/cuda_debian.py           # -> build/cuda-12.4/ (a CUDA_HOME-like tree)

Nothing is installed into the system: a private apt state under build/apt points at
trixie, ``apt-get download`` fetches the .debs into build/apt/debs and ``dpkg -x``
unpacks them into build/cuda-12.4/root. Debian's layout is not a toolkit's, so a small
tree of links (bin/, include/, lib64/, nvvm/) is assembled beside it, and nvcc's profile
(a link to /etc/nvcc.profile in the package) is replaced by one relative to the binary.
See /work/shared/notes/cuda-12.4-from-debian.md for how this was worked out.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("nvidia-cuda-toolkit", "libnvvm4", "nvidia-cuda-dev", "libcudart12")
MIRROR = "http://deb.debian.org/debian"
PROFILE = """\
NVVMIR_LIBRARY_DIR = $(_HERE_)/../libdevice
PATH      += $(_HERE_):$(_HERE_)/../../../bin:
INCLUDES  += "-I$(_HERE_)/../../../include" $(_SPACE_)
LIBRARIES =+ $(_SPACE_) "-L$(_HERE_)/../../x86_64-linux-gnu"
"""
TREE_PROFILE = """\
NVVMIR_LIBRARY_DIR = $(_HERE_)/../nvvm/libdevice
PATH      += $(_HERE_):
INCLUDES  += "-I$(_HERE_)/../include" $(_SPACE_)
LIBRARIES =+ $(_SPACE_) "-L$(_HERE_)/../lib64"
"""


def _apt(state: Path, *args: str) -> None:
    opts = [f"-oDir::State={state}/state", f"-oDir::State::Lists={state}/lists",
            f"-oDir::Cache={state}/cache", f"-oDir::Etc::SourceList={state}/sources.list",
            "-oDir::Etc::SourceParts=/nonexistent", "-oDir::Etc::Preferences=/nonexistent",
            "-oDir::Etc::PreferencesParts=/nonexistent", "-oAPT::Get::List-Cleanup=0",
            "-oDebug::NoLocking=1", "-q"]
    subprocess.run(["apt-get", *opts, *args], check=True)


def fetch(dest: Path | None = None) -> Path:
    """The CUDA_HOME-like tree (fetched and unpacked once; later calls reuse it)."""
    dest = dest or ROOT / "build" / "cuda-12.4"
    nvcc = dest / "bin" / "nvcc"
    if nvcc.exists() and (dest / "bin" / "nvcc.profile").is_file() and not (
            dest / "bin" / "nvcc.profile").is_symlink():
        return dest
    state = ROOT / "build" / "apt"
    for sub in ("state", "lists/partial", "cache/archives/partial", "debs"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "state" / "status").touch()
    (state / "sources.list").write_text(
        f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {MIRROR} trixie "
        "main contrib non-free\n")
    _apt(state, "update")
    debs = state / "debs"
    subprocess.run(["apt-get", f"-oDir::State::Lists={state}/lists",
                    f"-oDir::State={state}/state", f"-oDir::Cache={state}/cache",
                    f"-oDir::Etc::SourceList={state}/sources.list",
                    "-oDir::Etc::SourceParts=/nonexistent", "-oDebug::NoLocking=1", "-q",
                    "download", *PACKAGES], check=True, cwd=debs)
    root = dest / "root"
    root.mkdir(parents=True, exist_ok=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    tk = root / "usr/lib/nvidia-cuda-toolkit"
    profile = tk / "bin" / "nvcc.profile"
    if profile.is_symlink() or profile.exists():
        profile.unlink()
    profile.write_text(PROFILE)
    # a toolkit-shaped tree for CMake: bin/nvcc is Debian's driver (it finds cicc etc.
    # next to itself), include/ and lib64/ Debian's folders
    (dest / "bin").mkdir(exist_ok=True)
    for tool in glob.glob(str(tk / "bin" / "*")) + [str(root / "usr/bin" / t) for t in (
            "ptxas", "fatbinary", "cudafe++", "nvlink", "cuobjdump", "nvdisasm")]:
        link = dest / "bin" / Path(tool).name
        if Path(tool).exists() and not link.exists():
            link.symlink_to(os.path.relpath(tool, dest / "bin"))
    # nvcc reads the profile next to the path it was called by: this tree's own
    tree_profile = dest / "bin" / "nvcc.profile"
    if tree_profile.is_symlink() or tree_profile.exists():
        tree_profile.unlink()
    tree_profile.write_text(TREE_PROFILE)
    for name, target in (("include", root / "usr/include"),
                         ("lib64", root / "usr/lib/x86_64-linux-gnu"),
                         ("nvvm", tk)):
        link = dest / name
        if not link.exists():
            link.symlink_to(os.path.relpath(target, dest))
    return dest


if __name__ == "__main__":
    home = fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(home)
