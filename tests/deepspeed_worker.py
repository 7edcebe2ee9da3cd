"""The per-process side of tests/test_deepspeed.py: DeepSpeed engines on CPU (gloo).

``run`` is one recipe (two tasks, masked_step at every step, consolidate at each task's
end) for every engine configuration, so a 2-rank and a 1-rank run differ only in how
DeepSpeed partitions the model. Each process writes what the test compares into
``out/<scenario>-w<world>-rank<r>.pt``.
"""
from __future__ import annotations

import faulthandler
import os
import traceback

import torch
from torch import nn

import aim_kernels as ak
from tests.vlm_toy import ToyVLM, masked_by_spec, release_deepspeed_shm, toy_groups

GLOBAL_BATCH = 8
TASKS, STEPS = 2, 3
FP16_SCALE = 2 ** 10


def aim_config() -> ak.AIMConfig:
    return ak.AIMConfig(groups=toy_groups(mask_ratio=0.3, lam=2.0), align_every=2,
                        align_ratio=0.5, beta=0.9, merge="linear", merge_alpha=0.7)


def ds_config(stage: int, world: int, *, gas: int = 1, offload: bool = False,
              bf16: bool = False, fp16: bool = False, bf16_check: bool = True,
              **extra_zero) -> dict:
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
        cfg["bf16"] = {"enabled": True, "check_grad_overflow": bf16_check}
    if fp16:     # a loss scale of 2^10: the division by the scale is not a no-op
        cfg["fp16"] = {"enabled": True, "initial_scale_power": FP16_SCALE.bit_length() - 1,
                       "loss_scale_window": 1000}
        allow_fp16_on_cpu()
    return cfg


def allow_fp16_on_cpu() -> None:
    """DeepSpeed's CPU accelerator reports fp16 unsupported where oneDNN lacks fp16 kernels;
    torch still computes in fp16 on the CPU (slowly), which is all these tiny runs need."""
    from deepspeed.accelerator import get_accelerator
    get_accelerator().is_fp16_supported = lambda: True


def make_optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    if name == "sgd-fp16-z0":      # what DeepSpeed's stage-0 fp16 engine applies: lr / loss scale
        return torch.optim.SGD(params, lr=0.1 / FP16_SCALE)
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
    opt = engine.optimizer
    masters = {id(lp): hp for lps, hps in zip(getattr(opt, "fp16_groups", []),
                                              getattr(opt, "fp32_groups", []))
               for lp, hp in zip(lps, hps)} if engine.zero_optimization_stage() == 0 else {}
    out = {}
    for name, p in engine.module.named_parameters():
        if engine.zero_optimization_stage() > 0:
            full = safe_get_full_fp32_param(p)
        else:
            full = masters.get(id(p), p)
        out[name] = full.detach().clone().float()
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


def train_step(engine, task: int, step: int, rank: int, world: int, gas: int = 1):
    """One optimizer step of ``gas`` micro-steps; returns (stats of the boundary call,
    how many calls said they were inside the accumulation window)."""
    accumulating, stats = 0, None
    for micro in range(gas):
        x, y = micro_batch(task, step, micro, rank, world, gas)
        x = x.to(torch.bfloat16) if engine.bfloat16_enabled() else \
            x.half() if engine.fp16_enabled() else x
        engine.backward(nn.functional.cross_entropy(engine(x).float(), y))
        out = ak.masked_step(engine)
        if getattr(out, "accumulating", False):
            assert out.skipped
            accumulating += 1
        else:
            stats = out.as_dict()
        engine.step()
    return stats, accumulating


def result(engine, state, stats, accumulating=0) -> dict:
    return {"stats": stats, "params": full_params(engine), "state": full_state(engine, state),
            "steps": state.steps, "accumulating": accumulating, "bytes": state.state_bytes(),
            "local_numel": sum(b.numel for b in state.buckets)}


def run(engine, rank: int, world: int, gas: int = 1) -> dict:
    """The recipe: per task STEPS optimizer steps of gas micro-steps each, then consolidate."""
    state = ak.attach(engine, aim_config())
    stats, accumulating = [], 0
    for task in range(TASKS):
        for step in range(STEPS):
            out, acc = train_step(engine, task, step, rank, world, gas)
            count, held = masked_equals_anchor(state)
            stats.append({**out, "held": {"count": count, "held": held}})
            accumulating += acc
        ak.consolidate(engine)
    return result(engine, state, stats, accumulating)


def resume(rank: int, world: int, out: str, stage: int, opt: str, fp16: bool = False) -> dict:
    """Save in the middle of task 1 (Omega, F, anchors and optimizer moments all in play),
    load into a fresh engine of another initial model, and finish both: equal bit for bit."""
    from aim_kernels.integrations import deepspeed as ds_ckpt
    ckpt = os.path.join(out, f"ckpt-z{stage}{'-fp16' * fp16}-w{world}")
    engines = {}
    for name in ("straight", "resumed"):
        engine = engine_for(ds_config(stage, world, fp16=fp16), opt,
                            seed=0 if name == "straight" else 5)
        state = ak.attach(engine, aim_config())
        if name == "straight":
            for step in range(STEPS):
                train_step(engine, 0, step, rank, world)
            ak.consolidate(engine)
            train_step(engine, 1, 0, rank, world)
            ds_ckpt.save_checkpoint(engine, ckpt, tag="mid")
        else:
            ds_ckpt.load_checkpoint(engine, ckpt, tag="mid")
        for step in range(1, STEPS):
            train_step(engine, 1, step, rank, world)
        ak.consolidate(engine)
        engines[name] = result(engine, state, [])
    return engines


def never_zero(rank: int, world: int, out: str, stage: int, fp16: bool = False) -> dict:
    """Under ZeRO-2/3 every p.grad is None after backward; masked_step must read the reduced
    gradients (their sum of squares is that of a plain model's gradient), and refuse to
    run when no backward fed the partitions (before the first one, after engine.step())."""
    engine = engine_for(ds_config(stage, world, fp16=fp16), "sgd")
    ak.attach(engine, aim_config())
    errors = []
    try:
        ak.masked_step(engine)
    except RuntimeError as exc:
        errors.append(str(exc))
    x, y = micro_batch(0, 0, 0, rank, world, 1)
    engine.backward(nn.functional.cross_entropy(engine(x.half() if fp16 else x).float(), y))
    grads_none = all(p.grad is None for p in engine.module.parameters())
    got = {g: v["grad_sq"] for g, v in ak.masked_step(engine).as_dict().items()}
    engine.step()
    try:
        ak.masked_step(engine)
    except RuntimeError as exc:
        errors.append(str(exc))
    plain = ToyVLM(seed=0)
    xs, ys = micro_batch(0, 0, 0, 0, 1, 1)
    nn.functional.cross_entropy(plain(xs), ys).backward()
    want = {g: sum(float(p.grad.double().pow(2).sum()) for n, p in plain.named_parameters()
                   if n.startswith(g + ".")) for g in got}
    return {"grads_none": grads_none, "got": got, "want": want, "errors": errors}


def unsupported(rank: int, world: int, out: str) -> dict:
    """attach on an engine that uses each unsupported feature: the error names it, and no
    state is attached. The features are switched on in the engine's own config objects
    (most cannot be initialised on this CPU: NVMe needs libaio, MiCS/hpZ several nodes)."""
    engine = engine_for(ds_config(3, world), "sgd")
    zc = engine._config.zero_config
    features = {
        "pipeline parallelism": ("engine", "pipeline_parallelism", True),
        "ZeRO++ quantized gradients": ("zero", "zero_quantized_gradients", True),
        "ZeRO++ quantized weights": ("zero", "zero_quantized_weights", True),
        "ZeRO++ hierarchical partitioning": ("zero", "zero_hpz_partition_size", 2),
        "NVMe offload": ("zero", "offload_optimizer", {"device": "nvme"}),
        "mixture of experts": ("engine", "has_moe_layers", True),
    }
    messages = {}
    for feature, (where, attr, value) in features.items():
        obj = engine if where == "engine" else zc
        old = getattr(obj, attr)
        object.__setattr__(obj, attr, value)
        try:
            ak.attach(engine, aim_config())
            messages[feature] = None
            ak.detach(engine)
        except NotImplementedError as exc:
            messages[feature] = str(exc)
        finally:
            object.__setattr__(obj, attr, old)
    ak.attach(engine, aim_config())           # and with every feature off again, it attaches
    return {"messages": messages}


def nonfinite(rank: int, world: int, out: str, fp16: bool = False, stage: int = 2,
              clip: float = 1.0, bf16: bool = False, bf16_check: bool = True) -> dict:
    """A step with an inf in the batch never reaches the AIM state (state, step count
    untouched), whether DeepSpeed skips it (fp16 overflow; a non-finite norm) or, with no
    check of its own (ZeRO-0 fp32), applies it to the weights: then masked_step warns once,
    naming a parameter."""
    import warnings
    engine = engine_for(ds_config(stage, world, fp16=fp16, bf16=bf16, bf16_check=bf16_check)
                        | {"gradient_clipping": clip}, "sgd")
    state = ak.attach(engine, aim_config())
    train_step(engine, 0, 0, rank, world)
    before = {k: v.clone() for k, v in state.state_dict().items()}
    masters = full_params(engine)
    warned = []
    for _ in range(2):                   # the second one is not warned about again
        x, y = micro_batch(0, 1, 0, rank, world, 1)
        x[0, 0] = float("inf")
        x = x.half() if fp16 else x.to(torch.bfloat16) if bf16 else x
        engine.backward(nn.functional.cross_entropy(engine(x).float(), y))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats = ak.masked_step(engine)
        warned += [str(w.message) for w in caught if "non-finite gradient" in str(w.message)]
        engine.step()
    after = state.state_dict()
    return {"skipped": stats.skipped, "ds_overflow": bool(getattr(engine.optimizer, "overflow", False)),
            "ds_applied": bool(engine._step_applied), "warned": warned,
            "state_same": all(torch.equal(before[k], after[k]) for k in before),
            "params_same": all(torch.equal(masters[k], v) for k, v in full_params(engine).items()),
            "steps": state.steps}


# (stage, dtype, gradient_clipping): engines whose optimizers do and do not skip a
# non-finite step (DeepSpeed 0.19; "bf16-nocheck": bf16.check_grad_overflow = false)
NONFINITE_MATRIX = {"z0-fp32": (0, "fp32", 0.0), "z0-bf16": (0, "bf16", 0.0),
                    "z1-fp32": (1, "fp32", 0.0), "z2-bf16": (2, "bf16", 0.0),
                    "z2-bf16-nocheck": (2, "bf16-nocheck", 0.0),
                    "z3-fp32": (3, "fp32", 0.0), "z3-bf16-nocheck": (3, "bf16-nocheck", 1.0)}


def nonfinite_matrix(rank: int, world: int, out: str) -> dict:
    return {name: nonfinite(rank, world, out, stage=stage, clip=clip, bf16=dtype != "fp32",
                            bf16_check=dtype == "bf16")
            for name, (stage, dtype, clip) in NONFINITE_MATRIX.items()}


def save_untrained(rank: int, world: int, out: str, stage: int) -> dict:
    """A checkpoint of ``world`` ranks for the layout-mismatch test of another world size."""
    from aim_kernels.integrations import deepspeed as ds_ckpt
    engine = engine_for(ds_config(stage, world), "adamw")
    ak.attach(engine, aim_config())
    ds_ckpt.save_checkpoint(engine, os.path.join(out, f"ckpt-untrained-z{stage}-w{world}"), tag="t")
    return {}


def resume_mismatch(rank: int, world: int, out: str) -> dict:
    """Loading a checkpoint of another ZeRO stage or world size: an error naming both,
    before the state or the engine is touched."""
    from aim_kernels.integrations import deepspeed as ds_ckpt
    engine = engine_for(ds_config(2, world), "adamw")
    state = ak.attach(engine, aim_config())
    before = {k: v.clone() for k, v in state.state_dict().items()}
    messages = {}
    for what, folder, tag in (("stage", f"ckpt-z1-w{world}", "mid"),
                              ("world", "ckpt-untrained-z2-w1", "t")):
        try:
            ds_ckpt.load_checkpoint(engine, os.path.join(out, folder), tag=tag)
            messages[what] = None
        except ValueError as exc:
            messages[what] = str(exc)
    after = state.state_dict()
    return {"messages": messages, "state_same": all(torch.equal(before[k], after[k]) for k in before)}


def sync_collectives(rank: int, world: int, out: str, stage: int) -> dict:
    """The DeepSpeed collectives ``consolidate`` issues to put the fp32 masters into the
    model's weights (the AIM thresholds' own all-reduces go through torch.distributed and
    are not counted): ZeRO-1/2 gather each parameter group once, not each parameter."""
    import deepspeed.comm as dist
    engine = engine_for(ds_config(stage, world), "sgd")
    ak.attach(engine, aim_config())
    train_step(engine, 0, 0, rank, world)
    calls = []
    names = [n for n in ("all_reduce", "all_gather", "all_gather_into_tensor", "allgather_fn",
                         "broadcast", "reduce_scatter_fn", "reduce_scatter_tensor")
             if callable(getattr(dist, n, None))]
    originals = {n: getattr(dist, n) for n in names}

    def counted(name):
        def call(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)
        return call
    for n in names:
        setattr(dist, n, counted(n))
    try:
        ak.consolidate(engine)
    finally:
        for n, f in originals.items():
            setattr(dist, n, f)
    return {"calls": calls, "params": len(list(engine.module.parameters())),
            "groups": len(engine.optimizer.bit16_groups)}


def _fresh_tiny_llava():
    """A plain tiny LLaVA: once ZeRO-3 TrainingArguments have existed in this process,
    transformers builds new models inside deepspeed.zero.Init (partitioned at birth) until
    its global DeepSpeed config is unset; the recipes hand the Trainer a plain model."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    from aim_kernels.continual.tiny import tiny_llava
    unset_hf_deepspeed_config()
    return tiny_llava(seed=0, layers=1)


def trainer_two_tasks(rank: int, world: int, out: str, stage: int) -> dict:
    """HF Trainer + TrainingArguments(deepspeed=...) + AIMCallback, one train() per task
    (each builds a new engine; the state carries over): the masked elements of task 1
    (keep 0, SGD) stay at their anchors through task 2."""
    import transformers
    from aim_kernels.continual.tiny import tiny_llava
    from aim_kernels.integrations import AIMCallback
    from tests.test_trainer import AnswerTrainer, TaskData
    steps = 4
    callback = AIMCallback(ak.preset("aim"))
    model = _fresh_tiny_llava()
    masks, result = None, {}
    for task in ("colour", "position"):
        ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "train_batch_size": "auto", "gradient_clipping": "auto",
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9}
        args = transformers.TrainingArguments(
            output_dir=os.path.join(out, f"trainer-z{stage}-{task}"), deepspeed=ds,
            per_device_train_batch_size=8 // world, max_steps=steps, learning_rate=3e-2,
            optim="sgd", weight_decay=0.0, max_grad_norm=1.0, report_to=[], save_strategy="no",
            logging_strategy="no", disable_tqdm=True, remove_unused_columns=False, seed=0,
            dataloader_num_workers=0, lr_scheduler_type="constant", use_cpu=True)
        AnswerTrainer(model=model, args=args, train_dataset=TaskData(task, n=steps * 8),
                      callbacks=[callback]).train()
        state = callback.state
        state.pull_params()
        if masks is None:
            masks = [(m, b.anchor.clone())
                     for b, m in zip(state.buckets, masked_by_spec(state, keep_zero_only=True))]
            result["masked"] = sum(int(m.sum()) for m, _ in masks)
            result["steps_task1"] = state.steps
    result["held"] = all(torch.equal(b.param[m], a[m]) for b, (m, a) in zip(state.buckets, masks))
    result["moved"] = sum(int((b.param[~m] != a[~m]).sum()) for b, (m, a) in zip(state.buckets, masks))
    result["steps"] = state.steps
    result["local_numel"] = sum(b.numel for b in state.buckets)
    result["total_numel"] = sum(p.numel() for p in model.parameters() if p.requires_grad) \
        if stage < 3 else sum(p.ds_numel for p in model.parameters() if p.requires_grad)
    result["grad_sq"] = state.last_stats.as_dict()["projector"]["grad_sq"]
    return result


def trainer_resume(rank: int, world: int, out: str, stage: int) -> dict:
    """Trainer + DeepSpeed saving every 2 steps (AIMCallback.on_save writes each rank's
    state into checkpoint-N); a fresh model resumed from checkpoint-2 ends where the
    uninterrupted run does."""
    import transformers
    from aim_kernels.continual.tiny import tiny_llava
    from aim_kernels.integrations import AIMCallback
    from tests.test_trainer import AnswerTrainer, TaskData
    results = {}
    models = {"straight": _fresh_tiny_llava(), "resumed": _fresh_tiny_llava()}
    for name in ("straight", "resumed"):
        resume = None if name == "straight" else os.path.join(
            out, f"trainer-resume-z{stage}-straight", "checkpoint-2")
        callback = AIMCallback(ak.preset("aim"), resume_from=resume)
        model = models[name]
        ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "train_batch_size": "auto", "gradient_clipping": "auto",
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9}
        output = os.path.join(out, f"trainer-resume-z{stage}-{name}")
        args = transformers.TrainingArguments(
            output_dir=output, deepspeed=ds, per_device_train_batch_size=8 // world, max_steps=4,
            learning_rate=3e-2, optim="sgd", weight_decay=0.0, max_grad_norm=1.0, report_to=[],
            save_strategy="steps", save_steps=2, logging_strategy="no", disable_tqdm=True,
            remove_unused_columns=False, seed=0, dataloader_num_workers=0,
            lr_scheduler_type="constant", use_cpu=True)
        trainer = AnswerTrainer(model=model, args=args, train_dataset=TaskData("colour", n=32),
                                callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        state = callback.state
        state.pull_params()
        results[name] = {"param": torch.cat([b.param for b in state.buckets]).clone(),
                         "state": {k: v.clone() for k, v in state.state_dict().items()},
                         "steps": state.steps}
    return results


def scenarios(world: int):
    """(name, function of (rank, world, out) -> result) of every configuration the tests
    look at; the 1-process run holds only the references the 2-process runs compare with."""
    out = []
    for stage in (0, 1, 2, 3):
        for opt in ("sgd", "adamw"):
            out.append((f"z{stage}-{opt}", lambda r, w, o, s=stage, op=opt:
                        run(engine_for(ds_config(s, w), op), r, w)))
    for stage in (0, 1, 2, 3):
        out.append((f"z{stage}-bf16", lambda r, w, o, s=stage:
                    run(engine_for(ds_config(s, w, bf16=True), "adamw"), r, w)))
    out += [("z0-fp16", lambda r, w, o: run(engine_for(ds_config(0, w, fp16=True), "sgd"), r, w))]
    if world == 1:
        return out + [
            ("unsupported", unsupported), ("nonfinite-matrix", nonfinite_matrix),
            ("z0-sgd-fp16-lr", lambda r, w, o: run(engine_for(ds_config(0, w), "sgd-fp16-z0"), r, w)),
            ("save-untrained-z2", lambda r, w, o: save_untrained(r, w, o, 2))]
    out += [
        ("z0-gas4", lambda r, w, o: run(engine_for(ds_config(0, w, gas=4), "sgd"), r, w, gas=4)),
        ("z1-gas4", lambda r, w, o: run(engine_for(ds_config(1, w, gas=4), "adamw"), r, w, gas=4)),
        ("z2-gas4", lambda r, w, o: run(engine_for(ds_config(2, w, gas=4), "sgd"), r, w, gas=4)),
        ("z3-gas4", lambda r, w, o: run(engine_for(ds_config(3, w, gas=4), "adamw"), r, w, gas=4)),
        ("z1-offload", lambda r, w, o: run(engine_for(ds_config(1, w, offload=True), "adamw"), r, w)),
        ("z2-offload", lambda r, w, o: run(engine_for(ds_config(2, w, offload=True), "adamw"), r, w)),
        ("z3-offload", lambda r, w, o: run(engine_for(ds_config(3, w, offload=True), "adamw"), r, w)),
        ("z3-offload-param", lambda r, w, o: run(engine_for(ds_config(
            3, w, offload=True, offload_param={"device": "cpu"}), "adamw"), r, w)),
        ("nonfinite-fp16", lambda r, w, o: nonfinite(r, w, o, fp16=True)),
        ("z0-nonfinite-fp16", lambda r, w, o: nonfinite(r, w, o, fp16=True, stage=0)),
        ("z1-fp16", lambda r, w, o: run(engine_for(ds_config(1, w, fp16=True), "adamw"), r, w)),
        ("z2-fp16", lambda r, w, o: run(engine_for(ds_config(2, w, fp16=True), "sgd"), r, w)),
        ("z3-fp16", lambda r, w, o: run(engine_for(ds_config(3, w, fp16=True), "adamw"), r, w)),
    ]
    for stage in (0, 1, 2, 3):
        out.append((f"z{stage}-never-zero", lambda r, w, o, s=stage: never_zero(r, w, o, s)))
    out.append(("z0-fp16-never-zero", lambda r, w, o: never_zero(r, w, o, 0, fp16=True)))
    out.append(("z0-fp16-resume", lambda r, w, o: resume(r, w, o, 0, "sgd", fp16=True)))
    for stage in (0, 1, 2, 3):
        out.append((f"z{stage}-resume", lambda r, w, o, s=stage: resume(r, w, o, s, "adamw")))
        out.append((f"z{stage}-nonfinite", lambda r, w, o, s=stage: nonfinite(r, w, o, stage=s)))
    out.append(("resume-mismatch", resume_mismatch))
    for stage in (1, 2):
        out.append((f"z{stage}-sync-collectives", lambda r, w, o, s=stage: sync_collectives(r, w, o, s)))
    for stage in (1, 2, 3):
        out.append((f"z{stage}-trainer", lambda r, w, o, s=stage: trainer_two_tasks(r, w, o, s)))
        out.append((f"z{stage}-trainer-resume", lambda r, w, o, s=stage: trainer_resume(r, w, o, s)))
    return out


def log_path(out: str, world: int, rank: int) -> str:
    return os.path.join(out, f"stderr-w{world}-rank{rank}.log")


def worker(rank: int, world: int, port: int, out: str, only: list | None = None) -> None:
    # A process that dies on a signal leaves no traceback in the parent: its C-level stderr
    # ("terminate called after ...") and faulthandler's Python stacks go to a file the test
    # quotes, with the scenario it was in (the last "scenario" line).
    log = open(log_path(out, world, rank), "a", buffering=1)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log, all_threads=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      DS_ACCELERATOR="cpu")
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.set_num_threads(1)
    try:
        for name, fn in scenarios(world):
            if only and name not in only:
                continue
            log.write(f"scenario {name}\n")
            try:
                result = fn(rank, world, out)
            except Exception:      # noqa: BLE001  -- the test shows the traceback
                result = {"error": traceback.format_exc()}
            torch.save(result, os.path.join(out, f"{name}-w{world}-rank{rank}.pt"))
        log.write("scenario (all done)\n")
    finally:
        torch.distributed.destroy_process_group()
        release_deepspeed_shm(rank)
