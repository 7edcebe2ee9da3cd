"""Checkpoint folders replaced atomically (the DCP side of ``checkpoint.write_atomic``).

A DCP checkpoint is a folder of files written by every process, and a folder cannot be
renamed over a non-empty one, so ``path`` is a symlink: ``path -> <name>.<id>``, a
sibling in the same parent. A save writes a new ``<name>.<id>`` folder, fsyncs it, then
replaces the symlink with ``os.replace`` (one ``rename(2)``, atomic on POSIX file
systems), fsyncs the parent and only then removes the old folder. At every instant
``path`` resolves to a complete checkpoint, the old one or the new one; a crash leaves at
most an unreferenced ``<name>.<id>`` folder, which the next save removes.

Why a symlink rather than keeping a real folder at ``path`` (rename the old one away,
rename the new one in): that leaves an instant with no ``path``, so every reader would
need recovery rules. The cost of the symlink: the file system must support symlinks, and
a tool that copies a checkpoint without following or keeping symlinks (a plain glob
upload) gets ``<name>.<id>`` without ``path``; pass that folder to ``load`` directly.

A real folder already at ``path`` (a DCP checkpoint written without this module) is
migrated at the next save: the new folder is complete and a pending link
``.<name>.<id>.link`` points to it before the old folder is renamed away, so in the one
instant without ``path`` :func:`resolve` follows the pending link (and the next save
rolls it forward).

All file-system changes are made by rank 0; the folder's name is chosen there and
broadcast. Every process fsyncs the folder it wrote into (DCP fsyncs each file it writes
and renames its ``.metadata`` into place last).
"""
from __future__ import annotations

import os
import re
import shutil
import uuid

from ..checkpoint import _fsync_folder

_METADATA = ".metadata"          # DCP writes it last, after every process's data


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _split(path) -> tuple[str, str]:
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    if not name:
        raise ValueError(f"checkpoint path {path!r} names no folder")
    return parent, name


def _ours(name: str) -> re.Pattern:
    return re.compile(re.escape(name) + r"\.[0-9a-f]{16}")


def _pending_links(parent: str, name: str) -> list[str]:
    """Links to complete folders that a save made but had not swapped in, newest first."""
    pattern = re.compile(r"\." + re.escape(name) + r"\.[0-9a-f]{16}\.link")
    found = []
    for entry in os.scandir(parent):
        if pattern.fullmatch(entry.name) and entry.is_symlink() and \
                os.path.isfile(os.path.join(entry.path, _METADATA)):
            found.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.path))
    return [p for _, p in sorted(found, reverse=True)]


def resolve(path) -> str:
    """The complete checkpoint folder ``path`` stands for (follows the symlink once, so a
    load reads one folder throughout even if a save swaps ``path`` meanwhile)."""
    parent, name = _split(path)
    full = os.path.join(parent, name)
    if os.path.lexists(full):
        if not os.path.exists(full):
            raise FileNotFoundError(f"load: {full!r} links to {os.readlink(full)!r}, "
                                    "which does not exist")
        if not os.path.isdir(full):
            raise ValueError(f"load: {full!r} is not a checkpoint folder")
        return os.path.realpath(full)
    pending = _pending_links(parent, name) if os.path.isdir(parent) else []
    if pending:                          # a save was migrating a real folder at ``path``
        return os.path.realpath(pending[0])
    raise FileNotFoundError(f"load: no checkpoint at {full!r}")


def _on_rank0(fn):
    """``fn()`` on rank 0, its result (or its failure, as an exception) on every rank."""
    dist = _dist()
    if dist is None:
        return fn()
    box, error = [None, None], None
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except Exception as exc:             # noqa: BLE001 -- every rank must hear of it
            error, box[1] = exc, f"{type(exc).__name__}: {exc}"
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise RuntimeError(f"save: rank 0 failed: {box[1]}")
    return box[0]


def _prepare(parent: str, name: str) -> str:
    """Rank 0, before writing: finish a migration a crash interrupted, remove what
    earlier failed saves left, and choose the new folder's name."""
    full = os.path.join(parent, name)
    os.makedirs(parent, exist_ok=True)
    if not os.path.lexists(full):
        pending = _pending_links(parent, name)
        if pending:                           # roll the interrupted swap forward
            os.replace(pending[0], full)
            _fsync_folder(parent)
    elif not os.path.islink(full) and not os.path.isdir(full):
        raise ValueError(f"save: {full!r} exists and is not a checkpoint folder")
    current = os.path.basename(os.readlink(full)) if os.path.islink(full) else None
    _remove_stale(parent, name, keep=current)
    return f"{name}.{uuid.uuid4().hex[:16]}"


def _remove_stale(parent: str, name: str, keep: str | None) -> None:
    ours, link = _ours(name), re.compile(r"\." + re.escape(name) + r"\.[0-9a-f]{16}\.link")
    for entry in os.scandir(parent):
        if link.fullmatch(entry.name) and entry.is_symlink():
            os.unlink(entry.path)
        elif ours.fullmatch(entry.name) and entry.name != keep and \
                entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)


def _swap(parent: str, name: str, new: str) -> None:
    """Rank 0, after every process wrote and fsynced ``new``: point ``path`` at it."""
    full = os.path.join(parent, name)
    if not os.path.isfile(os.path.join(parent, new, _METADATA)):
        raise RuntimeError(f"save: the checkpoint in {new!r} has no {_METADATA}")
    _fsync_folder(os.path.join(parent, new))
    link = os.path.join(parent, f".{new}.link")
    os.symlink(new, link)                 # relative: the pair can be moved together
    _fsync_folder(parent)
    old = None
    if os.path.islink(full):
        target = os.readlink(full)
        if _ours(name).fullmatch(target):    # never delete a folder the user linked to
            old = os.path.join(parent, target)
    elif os.path.isdir(full):             # a real folder: written without this module
        old = os.path.join(parent, f"{name}.{uuid.uuid4().hex[:16]}")
        os.rename(full, old)              # until the next line, resolve() follows ``link``
    os.replace(link, full)
    _fsync_folder(parent)
    if old is not None and old != os.path.join(parent, new):
        shutil.rmtree(old, ignore_errors=True)   # a leftover is removed by the next save


def write_swapped(path, write) -> None:
    """``write(folder)`` into a new sibling folder of ``path``, then swap ``path`` to it
    (a collective call when a process group is initialised). On any error ``path`` is
    left as it was and the new folder is removed."""
    parent, name = _split(path)
    new = _on_rank0(lambda: _prepare(parent, name))
    folder = os.path.join(parent, new)
    error = None
    try:
        write(folder)
        if os.path.isdir(folder):
            _fsync_folder(folder)         # this process's entries in it
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:          # DCP's CheckpointException is a BaseException
        error = exc
    dist = _dist()
    failed = [error is not None]
    if dist is not None:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, error is not None)
        failed = every
    if any(failed):
        if dist is None or dist.get_rank() == 0:
            shutil.rmtree(folder, ignore_errors=True)
        if dist is not None:
            dist.barrier()
        if error is not None:
            raise error
        raise RuntimeError(f"save: ranks {[r for r, f in enumerate(failed) if f]} failed "
                           f"writing {folder!r}; {os.path.join(parent, name)!r} is unchanged")
    _on_rank0(lambda: _swap(parent, name, new))
