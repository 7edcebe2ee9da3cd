"""The per-process side of tests/test_deepspeed.py: DeepSpeed engines on CPU (gloo).

``run`` is one recipe (two tasks, masked_step at every step, consolidate at each task's
end) for every engine configuration, so a 2-rank and a 1-rank run differ only in how
DeepSpeed partitions the model. Each process writes what the test compares into
``out/<scenario>-w<world>-rank<r>.pt``.
"""
from __future__ import annotations

import os
import traceback

import torch
from torch import nn

import aim_kernels as ak
from tests.vlm_toy import ToyVLM, toy_groups

GLOBAL_BATCH = 8
TASKS, STEPS = 2, 3


def aim_config() -> ak.AIMConfig:
    return ak.AIMConfig(groups=toy_groups(mask_ratio=0.3, lam=2.0), align_every=2,
                        align_ratio=0.5, beta=0.9)


def ds_config(stage: int, world: int, *, gas: int = 1, offload: bool = False,
              bf16: bool = False, **extra_zero) -> dict:
    micro = GLOBAL_BATCH // (world * gas)
    zero = {"stage": stage, **extra_zero}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 8   # biases stay gathered, weights partitioned
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
           "train_batch_size": micro * gas * world, "zero_optimization": zero,
           "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
           "gradient_clipping": 0.0, "steps_per_print": 10 ** 9}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def make_optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    return torch.optim.AdamW(params, lr=0.02, weight_decay=0.1)


def engine_for(cfg: dict, opt: str, seed: int = 0):
    import deepspeed
    model = ToyVLM(seed=seed)
    engine, _, _, _ = deepspeed.initialize(model=model, config=cfg,
                                           optimizer=make_optimizer(opt, model.parameters()))
    return engine


def micro_batch(task: int, step: int, micro: int, rank: int, world: int, gas: int):
    """Micro-batch ``micro`` of this rank: the global batch of (task, step) is cut into
    gas x world equal pieces, so every configuration sees the same samples."""
    gen = torch.Generator().manual_seed(1000 * task + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=gen) + task
    y = torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen)
    share = GLOBAL_BATCH // (world * gas)
    lo = (micro * world + rank) * share
    return x[lo:lo + share], y[lo:lo + share]


def full_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 master (gathered over the ranks)."""
    from deepspeed.utils import safe_get_full_fp32_param
    out = {}
    for name, p in engine.module.named_parameters():
        out[name] = (safe_get_full_fp32_param(p) if engine.zero_optimization_stage() > 0
                     or engine.bfloat16_enabled() else p.detach()).detach().clone().float()
    return out


def full_state(engine, state) -> dict[str, torch.Tensor]:
    """The per-element AIM state per parameter, gathered over the ranks, and c_g, t_g."""
    out = {}
    world = state.world if state.collectives is not None else 1
    for name, p in engine.module.named_parameters():
        for kind in ("anchor", "importance", "fisher"):
            local = torch.zeros(_numel(p), dtype=torch.float64)
            for b in state.buckets:
                for s in b.slots:
                    if s.name == name:
                        lo = _local_start(state, s.param)
                        local[lo:lo + s.numel] = s.param_view(getattr(b, kind)).double()
            if world > 1:
                torch.distributed.all_reduce(local)
            out[f"{name}.{kind}"] = local.float()
    out["inv_scale"] = state.buckets[0].inv_scale.clone()
    out["thresh"] = state.buckets[0].thresh.clone()
    return out


def _numel(p) -> int:
    return getattr(p, "ds_numel", p.numel())


def _local_start(state, p) -> int:
    """Where this rank's fragment starts in the flattened parameter."""
    if state.stage == 3:
        return state.partition.optimizer._get_param_partition_rank(p) * p.ds_tensor.numel()
    mapping = getattr(p, "_hp_mapping", None)
    return 0 if mapping is None else mapping.lp_fragment_address.start


def masked_equals_anchor(state) -> tuple[int, bool]:
    """(masked elements of keep-0 groups on this rank, all of them at their anchors)."""
    count, held = 0, True
    state.pull_params()
    for b in state.buckets:
        for g in range(state.num_groups):
            lo, hi = b.group_range(g)
            om = b.importance[lo:hi]
            masked = (om >= b.thresh[g]) & (om > 0)
            count += int(masked.sum())
            held &= torch.equal(b.param[lo:hi][masked], b.anchor[lo:hi][masked])
    return count, held


def run(engine, rank: int, world: int, gas: int = 1, tasks=range(TASKS), state=None) -> dict:
    """The recipe: per task STEPS optimizer steps of gas micro-steps each, then consolidate."""
    state = state or ak.attach(engine, aim_config())
    stats, accumulating = [], 0
    for task in tasks:
        for step in range(STEPS):
            for micro in range(gas):
                x, y = micro_batch(task, step, micro, rank, world, gas)
                engine.backward(nn.functional.cross_entropy(engine(x).float(), y))
                out = ak.masked_step(engine)
                if getattr(out, "accumulating", False):
                    assert out.skipped
                    accumulating += 1
                else:
                    stats.append(out.as_dict())
                engine.step()
            count, held = masked_equals_anchor(state)
            stats[-1]["held"] = {"count": count, "held": held}
        ak.consolidate(engine)
    return {"stats": stats, "params": full_params(engine), "state": full_state(engine, state),
            "steps": state.steps, "accumulating": accumulating, "bytes": state.state_bytes(),
            "local_numel": sum(b.numel for b in state.buckets)}


def scenarios(world: int):
    """(name, function of (rank, world, out) -> dict) for every configuration compared."""
    out = []
    for stage in (0, 1, 2, 3):
        for opt in ("sgd", "adamw"):
            out.append((f"z{stage}-{opt}", lambda r, w, o, s=stage, op=opt:
                        run(engine_for(ds_config(s, w), op), r, w)))
    out.append(("z2-gas4", lambda r, w, o: run(engine_for(ds_config(2, w, gas=4), "sgd"), r, w, gas=4)))
    out.append(("z3-gas4", lambda r, w, o: run(engine_for(ds_config(3, w, gas=4), "adamw"), r, w, gas=4)))
    out.append(("z2-offload", lambda r, w, o: run(engine_for(ds_config(2, w, offload=True), "adamw"), r, w)))
    out.append(("z3-offload", lambda r, w, o: run(engine_for(ds_config(3, w, offload=True), "adamw"), r, w)))
    out.append(("z2-bf16", lambda r, w, o: run(engine_for(ds_config(2, w, bf16=True), "adamw"), r, w)))
    out.append(("z3-bf16", lambda r, w, o: run(engine_for(ds_config(3, w, bf16=True), "adamw"), r, w)))
    return out


def worker(rank: int, world: int, port: int, out: str, only: list | None = None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                      DS_ACCELERATOR="cpu")
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.set_num_threads(1)
    try:
        for name, fn in scenarios(world):
            if only and name not in only:
                continue
            try:
                result = fn(rank, world, out)
            except Exception:      # noqa: BLE001  -- the test shows the traceback
                result = {"error": traceback.format_exc()}
            torch.save(result, os.path.join(out, f"{name}-w{world}-rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()
