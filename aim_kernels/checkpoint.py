"""AIMState files: atomic writes, and loads that check the file before touching the state.

Ω is the memory of every finished task and cannot be rebuilt without retraining them
all, so a save must never destroy the previous file: safetensors 0.4-0.7 truncate the
target before writing, and no version fsyncs. Here the file is written under a temporary
name in the same folder (so the rename cannot cross file systems), fsynced, renamed over
the target, and the folder is fsynced so the rename itself survives a power loss.
"""
from __future__ import annotations

import json
import os
import uuid

import torch

FORMAT = "aim_kernels.AIMState"


def write_atomic(path, write) -> None:
    """``write(tmp_path)`` then rename ``tmp_path`` over ``path``; on any error the
    temporary file is removed and ``path`` is left as it was."""
    path = os.path.abspath(os.fspath(path))
    folder, base = os.path.split(path)
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb"):          # claims the name, with the umask's permissions
            pass
        write(tmp)
        with open(tmp, "rb") as f:      # writers may replace tmp: fsync what is there now
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    if not hasattr(os, "O_DIRECTORY"):         # Windows: directories cannot be fsynced
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(state, path) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.contiguous() for k, v in state.state_dict().items()}
    metadata = {"format": FORMAT, "names": json.dumps(state.names),
                "layout": json.dumps(_layout(state))}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# safetensors' spelling of the dtypes a state holds (as ``get_slice().get_dtype()``)
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                torch.bfloat16: "BF16", torch.int64: "I64", torch.uint8: "U8"}


def read_checked(state, path) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors of the file at ``path``, after checking format, names, keys, sizes and
    fingerprint against ``state``; raises ValueError naming the first mismatch. The flag
    is True when the file was saved before the model was cast (see :func:`_cast_sd`)."""
    from safetensors import safe_open
    path = os.fspath(path)
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except FileNotFoundError:
        raise
    except Exception as exc:       # SafetensorError: truncated or not a safetensors file
        raise ValueError(f"load: {path!r} is not a readable safetensors file ({exc})") from None
    with handle as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"load: {path!r} is not an AIMState file (format "
                             f"{meta.get('format')!r}, expected {FORMAT!r})")
        names = json.loads(meta.get("names", "[]"))
        if names != state.names:
            diff = next((i for i, (a, b) in enumerate(zip(names, state.names)) if a != b),
                        min(len(names), len(state.names)))
            got = names[diff] if diff < len(names) else "(none)"
            want = state.names[diff] if diff < len(state.names) else "(none)"
            raise ValueError(f"load: {path!r} manages other parameters: entry {diff} is "
                             f"{got!r}, this state's is {want!r} ({len(names)} names in the "
                             f"file, {len(state.names)} here)")
        expected = state.state_dict()
        keys = set(f.keys())
        if "meta.version" in keys and int(f.get_tensor("meta.version")[0]) == 1:
            # a version-1 file has no m_g: load_state_dict recomputes it from the anchors
            expected = {k: v for k, v in expected.items() if not k.endswith(".align_m")}
        fp = bytes(f.get_tensor("meta.fingerprint").tolist())
        own = state._fingerprint
        half = len(own) // 2
        if fp[:half] != own[:half]:
            raise ValueError(f"load: {path!r} was saved with another AIMConfig")
        if fp != own and json.loads(meta.get("layout", "[]")) != _layout(state):
            return _cast_sd(state, f, path), True
        if keys != set(expected):
            raise ValueError(f"load: {path!r} has keys {sorted(keys ^ set(expected))[:4]} "
                             "that differ from this state's; was it saved from another model?")
        for key, ref in expected.items():
            if key.startswith("meta."):
                continue
            got = f.get_slice(key)
            if list(got.get_shape()) != list(ref.shape) or got.get_dtype() != _DTYPE_NAMES.get(ref.dtype):
                raise ValueError(f"load: {path!r} holds {key!r} as {got.get_shape()} "
                                 f"{got.get_dtype()}, this state {list(ref.shape)} {ref.dtype}")
        if fp != own:
            raise ValueError(f"load: {path!r} was saved from another model (managed "
                             "parameter names, shapes, dtypes or groups differ)")
        return {k: f.get_tensor(k) for k in keys}, False


def _layout(state) -> list:
    """Per bucket: its dtype and ``[name, shape]`` of its slots, in order."""
    return [[str(b.dtype).removeprefix("torch."), [[s.name, list(s.shape)] for s in b.slots]]
            for b in state.buckets]


def load(state, path) -> None:
    sd, cast = read_checked(state, path)
    state.load_state_dict(sd)
    if cast:
        state.refresh_thresholds()          # per-bucket copies of c_g, t_g for the new layout
        state.reindex_holds()


def _cast_sd(state, f, path) -> dict[str, torch.Tensor]:
    """A file saved before the model was cast (same names, sizes, groups and config;
    other parameter dtypes): each parameter's anchor is cast as its weight was, Ω and F
    are taken as they are; c_g and t_g are recomputed from Ω by the caller."""
    meta = f.metadata()
    if "layout" not in meta:
        raise ValueError(f"load: {path!r} was saved from another model (managed parameter "
                         "names, shapes, dtypes or groups differ)")
    where, shapes = {}, {}
    for i, (_, slots) in enumerate(json.loads(meta["layout"])):
        start = 0
        for name, shape in slots:
            numel = int(torch.Size(shape).numel())
            where[name], shapes[name] = (i, start, numel), shape
            start += numel
    if shapes != {s.name: list(s.shape) for b in state.buckets for s in b.slots}:
        raise ValueError(f"load: {path!r} was saved from another model (managed parameter "
                         "names, shapes or groups differ)")
    expected = state.state_dict()
    sd = {k: v.clone() for k, v in expected.items()}
    cache = {}
    for j, b in enumerate(state.buckets):
        for kind in ("anchor", "importance", "fisher"):
            dst = sd[f"bucket{j}.{kind}"]
            for s in b.slots:
                i, start, numel = where[s.name]
                key = f"bucket{i}.{kind}"
                if key not in cache:
                    cache[key] = f.get_tensor(key)
                dst[s.start:s.start + s.numel].copy_(cache[key][start:start + numel])
    sd["meta.steps"] = f.get_tensor("meta.steps")
    sd["meta.version"] = f.get_tensor("meta.version")
    return sd
