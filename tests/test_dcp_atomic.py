"""DCP checkpoints (integrations.distributed) never destroy the previous one (issue 14
item 6): single process, no process group; the two-process FSDP2 and Trainer side is in
tests/test_distributed.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import aim_kernels as ak
from aim_kernels.integrations import distributed as dist_ckpt

from .vlm_toy import ToyVLM, snapshot, toy_groups, toy_loss, trained_toy

pytest.importorskip("torch.distributed.checkpoint")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")



def _advance(model, state):
    """Change every buffer of the state (another step and consolidation)."""
    toy_loss(model, 99).backward()
    ak.masked_step(model)
    state.zero_grad()
    ak.consolidate(model)


def _sd(state):
    return {k: v.clone() for k, v in state.state_dict().items()}


def _loaded(path):
    """The state a fresh model reads from ``path``."""
    _, fresh = trained_toy(seed=1)
    dist_ckpt.load(fresh, path)
    return _sd(fresh)


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _folders(parent):
    """The checkpoint folders beside ``ckpt``, and whether ``ckpt`` is a symlink."""
    return sorted(n for n in os.listdir(parent) if n != "ckpt"), os.path.islink(parent / "ckpt")


def _half_then_fail(monkeypatch):
    """Every DCP writer writes its files, truncates them to half and reports a full disk:
    what an in-place save leaves when it dies halfway."""
    from torch.distributed.checkpoint import FileSystemWriter
    real = FileSystemWriter.write_data

    def write_data(self, plan, planner):
        real(self, plan, planner).wait()
        for name in os.listdir(self.path):
            if name.endswith(".distcp"):
                full = os.path.join(self.path, name)
                with open(full, "r+b") as f:
                    f.truncate(os.path.getsize(full) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", write_data)


def test_a_writer_failing_halfway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, state = trained_toy()
    path = tmp_path / "ckpt"
    dist_ckpt.save(state, path)
    good = _sd(state)
    _advance(model, state)
    with monkeypatch.context() as m:
        _half_then_fail(m)
        with pytest.raises(BaseException, match="No space") as info:   # DCP wraps it
            dist_ckpt.save(state, path)
        assert not isinstance(info.value, (KeyboardInterrupt, SystemExit))
    _same(_loaded(path), good)
    folders, link = _folders(tmp_path)
    assert link and folders == [os.readlink(path)]          # the failed folder is gone


def test_a_successful_save_replaces_the_checkpoint(tmp_path):
    model, state = trained_toy()
    path = tmp_path / "ckpt"
    dist_ckpt.save(state, path)
    first = os.readlink(path)
    _advance(model, state)
    dist_ckpt.save(state, path)
    _same(_loaded(path), _sd(state))
    folders, link = _folders(tmp_path)
    assert link and folders == [os.readlink(path)] and folders != [first]   # old one removed


def test_a_folder_written_by_plain_dcp_is_replaced(tmp_path):
    import torch.distributed.checkpoint as dcp
    model, state = trained_toy()
    path = tmp_path / "ckpt"
    dcp.save(state.state_dict(), checkpoint_id=str(path))          # a real folder at path
    _advance(model, state)
    dist_ckpt.save(state, path)
    _same(_loaded(path), _sd(state))
    folders, link = _folders(tmp_path)
    assert link and folders == [os.readlink(path)]


def _crash_at(monkeypatch, func: str, when):
    """``os.<func>`` raises (a crash at that instant) when ``when(*args)`` holds."""
    real = getattr(os, func)

    def crashing(*args, **kwargs):
        if when(*map(str, args)):
            raise OSError(5, f"crash at {func}")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, func, crashing)


_OURS = (".distcp", ".metadata")
# instant of the swap -> crash point (os function, when), whether save raises, what load finds
_INSTANTS = {
    "before the link exists": ("symlink", lambda src, dst: dst.endswith(".link"), True, "old"),
    "before the link replaces ckpt": ("replace", lambda src, dst: dst.endswith("ckpt"), True, "old"),
    # removing the old folder is best effort: the save succeeds, the next removes the rest
    "while the old folder is removed": ("unlink", lambda p, *a: p.endswith(_OURS), False, "new"),
}


@pytest.mark.parametrize("legacy", [False, True], ids=["symlink", "plain-folder"])
@pytest.mark.parametrize("instant", list(_INSTANTS))
def test_a_crash_at_any_instant_of_the_swap_leaves_a_complete_checkpoint(
        tmp_path, monkeypatch, instant, legacy):
    """``legacy``: ``ckpt`` starts as a real folder (plain ``dcp.save``), which the swap
    renames away just before the link replaces ``ckpt``: a crash in between must find the
    new checkpoint through the pending link."""
    import torch.distributed.checkpoint as dcp
    model, state = trained_toy()
    path = tmp_path / "ckpt"
    if legacy:
        dcp.save(state.state_dict(), checkpoint_id=str(path))
    else:
        dist_ckpt.save(state, path)
    old = _sd(state)
    _advance(model, state)
    new = _sd(state)
    func, when, raises, expect = _INSTANTS[instant]
    if legacy and func == "replace":
        expect = "new"
    with monkeypatch.context() as m:
        _crash_at(m, func, when)
        if raises:
            with pytest.raises(OSError, match="crash"):
                dist_ckpt.save(state, path)
        else:
            dist_ckpt.save(state, path)
    if legacy and func == "replace":
        assert not os.path.lexists(path)           # the one instant without ckpt
    if func == "unlink":
        assert len(_folders(tmp_path)[0]) == 2     # the crash left the old folder
    _same(_loaded(path), new if expect == "new" else old)
    _advance(model, state)                          # the next save cleans up after the crash
    dist_ckpt.save(state, path)
    _same(_loaded(path), _sd(state))
    folders, link = _folders(tmp_path)
    assert link and folders == [os.readlink(path)]


def test_a_save_killed_mid_write_leaves_a_folder_that_is_never_read(tmp_path):
    """A kill runs no cleanup: the half-written folder stays beside ckpt; load ignores it
    and the next save removes it."""
    model, state = trained_toy()
    path = tmp_path / "ckpt"
    dist_ckpt.save(state, path)
    good = _sd(state)
    leftover = tmp_path / "ckpt.0123456789abcdef"
    leftover.mkdir()
    (leftover / "__0_0.distcp").write_bytes(b"half")
    _same(_loaded(path), good)
    dist_ckpt.save(state, path)
    assert not leftover.exists()


_SAVER = """
import sys, warnings, torch, aim_kernels as ak
from torch import nn
from aim_kernels.integrations import distributed as dist_ckpt
warnings.simplefilter("ignore")
model = nn.Module(); model.language = nn.Linear(int(sys.argv[2]), 1, bias=False)
state = ak.attach(model, ak.AIMConfig(groups={"language": ak.GroupConfig("language")}))
i = 0
while True:
    i += 1
    with torch.no_grad():
        state.buckets[0].importance.fill_(i); state.buckets[0].fisher.fill_(-i)
    dist_ckpt.save(state, sys.argv[1])
    print(i, flush=True)
"""


@pytest.mark.slow
def test_a_process_killed_mid_save_leaves_a_complete_checkpoint(tmp_path):
    """SIGKILL halfway through a save: ckpt is then one whole save, never a mix or a
    truncated file (save i fills Ω with i and F with -i)."""
    n = 1 << 21
    path = tmp_path / "ckpt"
    model = torch.nn.Module()
    model.language = torch.nn.Linear(n, 1, bias=False)
    state = ak.attach(model, ak.AIMConfig(groups={"language": ak.GroupConfig("language")}))
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path), str(n)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"
        start = time.monotonic()
        assert proc.stdout.readline().strip() == "2"
        time.sleep((time.monotonic() - start) / 2)     # halfway through the third save
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    dist_ckpt.load(state, path)
    i = float(state.buckets[0].importance[0])
    assert i >= 1 and bool((state.buckets[0].importance == i).all())
    assert bool((state.buckets[0].fisher == -i).all())


def test_load_checks_the_checkpoint_before_touching_the_state(tmp_path):
    model, state = trained_toy()
    other = ak.attach(ToyVLM(seed=0), ak.AIMConfig(groups=toy_groups(mask_ratio=0.1)))
    dist_ckpt.save(other, tmp_path / "other")
    toy_loss(model, 5).backward()
    before = snapshot(model, state)
    with pytest.raises(ValueError, match="another AIMConfig"):
        dist_ckpt.load(state, tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        dist_ckpt.load(state, tmp_path / "missing")
    after = snapshot(model, state)
    for key in before:
        assert torch.equal(before[key], after[key]), key
