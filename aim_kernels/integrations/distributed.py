"""Distributed checkpoints of the AIM state with ``torch.distributed.checkpoint`` (DCP).

For an FSDP2 model every per-element buffer is saved per parameter, as a DTensor
with that parameter's placements, so DCP writes each shard once and can load it
into another world size. The per-group ``c_g``, ``t_g`` are recomputed at load
(they follow from Omega). A DDP / single-process state is saved as plain tensors.

A save never destroys the previous checkpoint: ``path`` is a symlink swapped atomically
to a complete new folder (``atomic_folder``), and a load reads the folder ``path``
resolves to once, checking the fingerprint before anything is read into the state.
"""
from __future__ import annotations

import torch

from ..state import AIMState
from . import atomic_folder

_KINDS = ("anchor", "importance", "fisher")


def _dcp_state_dict(state: AIMState) -> dict[str, torch.Tensor]:
    if state.collectives is None:
        return state.state_dict()
    from torch.distributed.tensor import DTensor
    sd = {"meta.fingerprint": torch.frombuffer(bytearray(state._fingerprint), dtype=torch.uint8),
          "meta.steps": torch.tensor([state.steps, state.steps_since_consolidation])}
    for b in state.buckets:
        for s in b.slots:
            p = s.param
            for kind in _KINDS:
                sd[f"{s.name}.{kind}"] = DTensor.from_local(
                    s.param_view(getattr(b, kind)), p.device_mesh, p.placements,
                    run_check=False, shape=p.shape, stride=p.stride())
    return sd


def save(state: AIMState, path) -> None:
    """Write ``state`` to the DCP checkpoint ``path`` (a collective call), atomically:
    ``path`` becomes a symlink to a complete new folder beside it, or, on any failure,
    stays what it was."""
    import torch.distributed.checkpoint as dcp
    sd = _dcp_state_dict(state)
    atomic_folder.write_swapped(path, lambda folder: dcp.save(
        sd, storage_writer=dcp.FileSystemWriter(folder, sync_files=True)))


def load(state: AIMState, path) -> None:
    """Load a checkpoint written by :func:`save` into ``state`` in place (collective)."""
    import torch.distributed.checkpoint as dcp
    path = atomic_folder.resolve(path)
    if state.collectives is None:
        sd = {k: v.clone() for k, v in state.state_dict().items()}
        dcp.load(sd, checkpoint_id=path)
        state.load_state_dict(sd)
        return
    sd = _dcp_state_dict(state)
    meta = {k: v.clone() for k, v in sd.items() if k.startswith("meta.")}
    dcp.load(meta, checkpoint_id=path)            # check before touching anything
    if not torch.equal(meta["meta.fingerprint"], sd["meta.fingerprint"]):
        raise ValueError("load: the checkpoint was saved from another model or AIMConfig "
                         "(managed names, shapes, dtypes, groups or config differ)")
    with torch.no_grad():
        dcp.load({k: v for k, v in sd.items() if not k.startswith("meta.")},
                 checkpoint_id=path)
    state.steps, state.steps_since_consolidation = (int(v) for v in meta["meta.steps"].tolist())
    state.refresh_thresholds()
    state.reindex_holds()
