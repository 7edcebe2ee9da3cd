"""The per-process side of tests/test_distributed.py (2 processes, gloo, CPU).

``train`` is the one training recipe every run follows -- single process, DDP, FSDP2 --
so the runs differ only in how the model is distributed. Each process writes what the
test compares into ``out/<name>-rank<r>.pt``.
"""
from __future__ import annotations

import os

import torch
from torch import nn

import aim_kernels as ak
from aim_kernels import sharding
from aim_kernels.ops import reference
from tests.vlm_toy import ToyVLM, masked_by_spec, toy_groups

GLOBAL_BATCH = 8
TASKS, STEPS = 2, 4


def config() -> ak.AIMConfig:
    return ak.AIMConfig(groups=toy_groups(mask_ratio=0.3, lam=2.0), align_every=3,
                        align_ratio=0.5, beta=0.9)


def batch(task: int, step: int, rank: int = 0, world: int = 1):
    """This process's share of the global batch of (task, step)."""
    gen = torch.Generator().manual_seed(1000 * task + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=gen) + task
    y = torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen)
    share = GLOBAL_BATCH // world
    return x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]


def train(model, inner, rank: int = 0, world: int = 1) -> list[dict]:
    """Two tasks of SGD with masked_step every step; returns the stats of every step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = []
    for task in range(TASKS):
        for step in range(STEPS):
            x, y = batch(task, step, rank, world)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            stats.append(ak.masked_step(inner).as_dict())
            opt.step()
        ak.consolidate(inner)
    return stats


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if sharding.is_sharded(t) else t


def per_param_state(model, state) -> dict[str, torch.Tensor]:
    """Full (unsharded) anchor / importance / fisher per parameter, and c_g, t_g."""
    from aim_kernels.integrations.distributed import _dcp_state_dict
    out = {}
    if state.collectives is None:
        for b in state.buckets:
            for s in b.slots:
                for kind in ("anchor", "importance", "fisher"):
                    out[f"{s.name}.{kind}"] = s.param_view(getattr(b, kind)).clone()
    else:
        out = {k: full(v).clone() for k, v in _dcp_state_dict(state).items()
               if not k.startswith("meta.")}
    out["inv_scale"] = state.buckets[0].inv_scale.clone()
    out["thresh"] = state.buckets[0].thresh.clone()
    for name, p in model.named_parameters():
        out[f"param:{name}"] = full(p.detach()).clone()
    return out


def single_process_run() -> dict:
    model = ToyVLM(seed=0)
    state = ak.attach(model, config())
    stats = train(model, model)
    return {"stats": stats, "state": per_param_state(model, state), "steps": state.steps}


def _fsdp(rank: int, world: int, out: str) -> None:
    model = _sharded(ToyVLM(seed=0))
    state = ak.attach(model, config())
    stats = train(model, model, rank, world)
    result = {"stats": stats, "state": per_param_state(model, state), "steps": state.steps,
              "sharded": state.collectives is not None,
              "local_numel": sum(b.numel for b in state.buckets)}

    # DCP round trip into a fresh sharded model; a wrong config is refused untouched.
    from aim_kernels.integrations import distributed as dist_ckpt
    ckpt = os.path.join(out, "fsdp-ckpt")
    dist_ckpt.save(state, ckpt)
    fresh = _sharded(ToyVLM(seed=1))
    other = ak.attach(fresh, ak.AIMConfig(groups=toy_groups(mask_ratio=0.1, lam=2.0)))
    before = per_param_state(fresh, other)
    try:
        dist_ckpt.load(other, ckpt)
        result["wrong_config_error"] = ""
    except ValueError as exc:
        result["wrong_config_error"] = str(exc)
    result["wrong_config_untouched"] = all(torch.equal(before[k], v)
                                           for k, v in per_param_state(fresh, other).items())
    ak.detach(fresh)
    reloaded = ak.attach(fresh, config())
    dist_ckpt.load(reloaded, ckpt)
    result["reloaded"] = {k: v for k, v in per_param_state(fresh, reloaded).items()
                          if not k.startswith("param:")}
    result["reloaded_steps"] = (reloaded.steps, reloaded.steps_since_consolidation)
    result["trainer"] = _trainer_save(model, state, rank, out)
    torch.save(result, os.path.join(out, f"fsdp-rank{rank}.pt"))


def _half_then_fail_on(rank: int):
    """A DCP writer that, on ``rank`` only, writes its files, truncates them to half and
    reports a full disk: what an in-place save leaves when one process dies halfway."""
    from torch.distributed.checkpoint import FileSystemWriter
    real = FileSystemWriter.write_data

    def write_data(self, plan, planner):
        done = real(self, plan, planner)
        if torch.distributed.get_rank() != rank:
            return done
        done.wait()
        for name in os.listdir(self.path):
            if name.startswith(f"__{rank}_") and name.endswith(".distcp"):
                full = os.path.join(self.path, name)
                with open(full, "r+b") as f:
                    f.truncate(os.path.getsize(full) // 2)
        raise OSError(28, "No space left on device")
    return FileSystemWriter, real, write_data


def _trainer_save(model, state, rank: int, out: str) -> dict:
    """The Trainer's FSDP2 path (AIMCallback.on_save / resume): a second save whose
    rank-1 writer fails halfway leaves the first checkpoint loading bit for bit."""
    from types import SimpleNamespace

    from aim_kernels.integrations.trainer import STATE_DIR, AIMCallback
    args = SimpleNamespace(output_dir=os.path.join(out, "trainer"), should_save=rank == 0)
    step = SimpleNamespace(global_step=TASKS * STEPS)
    folder = os.path.join(args.output_dir, f"checkpoint-{step.global_step}")
    os.makedirs(folder, exist_ok=True)           # the Trainer made it before on_save
    callback = AIMCallback(config())
    callback.state = state
    callback.on_save(args, step, None)
    good = {k: v for k, v in per_param_state(model, state).items() if not k.startswith("param:")}

    x, y = batch(TASKS, 0, rank, torch.distributed.get_world_size())
    nn.functional.cross_entropy(model(x), y).backward()
    ak.masked_step(model)
    ak.consolidate(model)                        # every buffer changed
    writer, real, failing = _half_then_fail_on(rank=1)
    writer.write_data = failing
    try:
        callback.on_save(args, step, None)
        error = ""
    except BaseException as exc:                 # DCP's CheckpointException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        error = f"{type(exc).__name__}: {exc}"
    finally:
        writer.write_data = real

    fresh = _sharded(ToyVLM(seed=1))
    resumed = AIMCallback(config())
    resumed.state = ak.attach(fresh, config())
    try:
        resumed._load(args, step)
        reloaded = {k: v for k, v in per_param_state(fresh, resumed.state).items()
                    if not k.startswith("param:")}
        load_error = ""
    except BaseException as exc:                 # old in-place saves: a truncated shard
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        reloaded, load_error = {}, f"{type(exc).__name__}: {exc}"
    return {"good": good, "save_error": error, "reloaded": reloaded, "load_error": load_error,
            "is_link": os.path.islink(os.path.join(folder, STATE_DIR))}


def _sharded(model):
    from torch.distributed.fsdp import fully_shard
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(model)
    return model


def _attached(model) -> bool:
    try:
        ak.detach(model)
        return True
    except RuntimeError:                 # "detach: no AIMState is attached"
        return False


def _fsdp_bad_input(rank: int, world: int, out: str) -> None:
    """The README's FSDP2 bad input: a model mixing shards and plain parameters, and a DCP
    checkpoint of another model. Each must raise, naming the culprit, and touch nothing."""
    from torch.distributed.fsdp import fully_shard

    from aim_kernels.integrations import distributed as dist_ckpt
    result = {}

    mixed = ToyVLM(seed=0)
    fully_shard(mixed.vision[0])             # one layer sharded, the rest plain
    before = {n: full(p.detach()).clone() for n, p in mixed.named_parameters()}
    # any exception is recorded, not raised, so a wrong one fails only its own test
    try:
        ak.attach(mixed, config())
        result["mixed_error"] = ""
    except Exception as exc:             # noqa: BLE001
        result["mixed_error"] = f"{type(exc).__name__}: {exc}"
    result["mixed_untouched"] = all(torch.equal(before[n], full(p.detach()))
                                    for n, p in mixed.named_parameters())
    result["mixed_attached"] = _attached(mixed)

    bigger = _sharded(ToyVLM(seed=1, layers=3))    # another model: one more vision layer
    state = ak.attach(bigger, config())
    before = per_param_state(bigger, state)
    try:
        dist_ckpt.load(state, os.path.join(out, "fsdp-ckpt"))      # written by _fsdp
        result["other_model_error"] = ""
    except BaseException as exc:         # DCP's CheckpointException is not an Exception
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        result["other_model_error"] = f"{type(exc).__name__}: {exc}"
    after = per_param_state(bigger, state)
    result["other_model_untouched"] = before.keys() == after.keys() and all(
        torch.equal(before[k], after[k]) for k in before)
    result["other_model_steps"] = (state.steps, state.steps_since_consolidation)
    torch.save(result, os.path.join(out, f"fsdp_bad-rank{rank}.pt"))


def _ddp(rank: int, world: int, out: str) -> None:
    model = ToyVLM(seed=0)
    state = ak.attach(model, config())       # attach first: DDP then sees the re-homed params
    ddp = nn.parallel.DistributedDataParallel(model)
    stats = train(ddp, model, rank, world)
    torch.save({"stats": stats, "state": per_param_state(model, state), "steps": state.steps},
               os.path.join(out, f"ddp-rank{rank}.pt"))


def masked_local(state) -> list[tuple]:
    """Per bucket: this process's masked elements of keep = 0 groups (from its Ω and the
    global t_g), the live local weights and the anchors, flat."""
    out = []
    for b, masked in zip(state.buckets, masked_by_spec(state, keep_zero_only=True)):
        live = torch.cat([sharding.local(s.param.detach()).reshape(-1) for s in b.slots])
        out.append((masked, live, b.anchor))
    return out


def adamw_holds(model, inner, state, rank: int = 0, world: int = 1) -> dict:
    """Two tasks of AdamW (default weight_decay=0.01, one optimiser) with the README order;
    after every step of task two, count masked elements and those off their anchors."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    held = off = moved = 0
    for task in range(TASKS):
        for step in range(STEPS):
            x, y = batch(task, step, rank, world)
            opt.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(model(x), y).backward()
            ak.masked_step(inner)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if task == 0:
                continue
            for masked, live, anchor in masked_local(state):
                held += int(masked.sum())
                off += int((live[masked] != anchor[masked]).sum())
                moved += int((live[~masked] != anchor[~masked]).sum())
        ak.consolidate(inner)
    return {"held": held, "off": off, "moved": moved}


def _holds(rank: int, world: int, out: str) -> None:
    """The masks hold under AdamW through FSDP2 and through DDP wrapped before attach
    (the order the HF Trainer uses), with masked_step called on the DDP wrapper."""
    model = _sharded(ToyVLM(seed=0))
    state = ak.attach(model, config())
    result = {"fsdp": adamw_holds(model, model, state, rank, world)}
    model = ToyVLM(seed=0)
    ddp = nn.parallel.DistributedDataParallel(model)
    state = ak.attach(ddp, config())                 # attaches to ddp.module
    result["ddp_attached_inner"] = ak.step.state_of(model) is state
    result["ddp"] = adamw_holds(ddp, ddp, state, rank, world)
    torch.save(result, os.path.join(out, f"holds-rank{rank}.pt"))


def _thresholds(rank: int, world: int, out: str) -> None:
    """Global thresholds of a vector split unevenly over the processes, ties included."""
    gen = torch.Generator().manual_seed(7)
    omega = torch.randint(0, 6, (101,), generator=gen).float() / 4       # many ties
    offsets = torch.tensor([0, 40, 40, 101])                             # an empty group
    ratio = torch.tensor([0.3, 0.5, 0.75], dtype=torch.float64)
    cut = [0, 23, 101][rank:rank + 2] if world == 2 else [0, 101]
    pieces = [[omega[max(lo, cut[0]):min(hi, cut[1])]] if min(hi, cut[1]) > max(lo, cut[0])
               else [] for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    coll = sharding.Collectives(torch.distributed.group.WORLD)
    c, t = sharding.global_thresholds(coll, pieces, ratio.tolist(), normalize=True)
    c_ref, t_ref = reference.group_thresholds(omega, offsets, ratio)
    torch.save({"c": c, "t": t, "c_ref": c_ref.tolist(), "t_ref": t_ref.tolist()},
               os.path.join(out, f"thresholds-rank{rank}.pt"))


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        _thresholds(rank, world, out)
        _ddp(rank, world, out)
        _fsdp(rank, world, out)
        _fsdp_bad_input(rank, world, out)
        _holds(rank, world, out)
    finally:
        torch.distributed.destroy_process_group()
