"""AIMState.save never destroys the previous file (issue 14 item 6), and load checks a file
before anything is read into the state."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import aim_kernels as ak

from .vlm_toy import ToyVLM, snapshot, toy_groups, toy_loss, trained_toy



def _file_state(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_writer_failing_halfway_leaves_the_previous_file(tmp_path, monkeypatch):
    """Whatever safetensors does (0.4-0.7 truncate the target first), a failed write
    must not reach the target: the mock writes half the file to the path it is given."""
    import safetensors.torch as st
    model, state = trained_toy()
    path = tmp_path / "aim.safetensors"
    state.save(path)
    good = _file_state(path)

    toy_loss(model, 99).backward()
    ak.masked_step(model)
    ak.consolidate(model)                                   # the state changed
    real = st.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        size = os.path.getsize(filename)
        with open(filename, "r+b") as f:
            f.truncate(size // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "save_file", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        state.save(path)
    monkeypatch.setattr(st, "save_file", real)
    _same(_file_state(path), good)
    assert os.listdir(tmp_path) == ["aim.safetensors"]      # the temporary file is gone
    _, fresh = trained_toy(seed=1)
    fresh.load(path)
    _same({k: v for k, v in fresh.state_dict().items()}, good)


_SAVER = """
import sys, torch, aim_kernels as ak
from torch import nn
n = int(sys.argv[2])
model = nn.Module(); model.language = nn.Linear(n, 1, bias=False)
state = ak.attach(model, ak.AIMConfig(groups={"language": ak.GroupConfig("language")}))
with torch.no_grad():
    state.buckets[0].importance.fill_(7.0); state.buckets[0].fisher.fill_(3.0)
print("ready", flush=True)
sys.stdin.readline()
while True:
    state.save(sys.argv[1])
"""


@pytest.mark.slow
def test_a_process_killed_mid_save_leaves_the_previous_file(tmp_path):
    n = 1 << 23                                  # 3 x 32 MiB of state: a save takes a while
    path = tmp_path / "aim.safetensors"
    model = torch.nn.Module()
    model.language = torch.nn.Linear(n, 1, bias=False)
    state = ak.attach(model, ak.AIMConfig(groups={"language": ak.GroupConfig("language")}))
    with torch.no_grad():
        state.buckets[0].importance.fill_(1.0)
    state.save(path)
    good = _file_state(path)

    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path), str(n)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:          # kill while a temporary file grows
            tmps = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
            if tmps and os.path.getsize(tmp_path / tmps[0]) > 0:
                break
        else:
            pytest.fail("the saver never started writing")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    got = _file_state(path)
    # the file is the previous one or, had a save completed, the saver's: never a mix
    if not torch.equal(got["bucket0.importance"], good["bucket0.importance"]):
        assert bool((got["bucket0.importance"] == 7.0).all())
    else:
        _same(got, good)
    state.load(path)


def test_load_checks_the_file_before_touching_the_state(tmp_path):
    model, state = trained_toy()
    path = tmp_path / "aim.safetensors"
    state.save(path)
    raw = path.read_bytes()

    cases = {}
    (tmp_path / "truncated.safetensors").write_bytes(raw[:len(raw) // 2])
    cases["truncated.safetensors"] = "not a readable safetensors file"
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    cases["junk.safetensors"] = "not a readable safetensors file"
    from safetensors.torch import save_file
    sd = {k: v.contiguous() for k, v in state.state_dict().items()}
    save_file(sd, str(tmp_path / "format.safetensors"), metadata={"format": "other"})
    cases["format.safetensors"] = "not an AIMState file"
    names = list(state.names)
    names[2] = "projector.renamed"
    save_file(sd, str(tmp_path / "names.safetensors"),
              metadata={"format": "aim_kernels.AIMState", "names": json.dumps(names)})
    cases["names.safetensors"] = "'projector.renamed'"
    wrong = dict(sd)
    wrong["bucket0.fisher"] = torch.zeros(3)
    save_file(wrong, str(tmp_path / "sizes.safetensors"),
              metadata={"format": "aim_kernels.AIMState", "names": json.dumps(state.names)})
    cases["sizes.safetensors"] = "'bucket0.fisher'"
    other = ak.attach(ToyVLM(seed=0), ak.AIMConfig(groups=toy_groups(mask_ratio=0.1)))
    other.save(tmp_path / "config.safetensors")
    cases["config.safetensors"] = "another AIMConfig"

    toy_loss(model, 5).backward()
    before = snapshot(model, state)
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message):
            state.load(tmp_path / name)
        after = snapshot(model, state)
        for key in before:
            assert torch.equal(before[key], after[key]), f"{name}: {key} changed"
