"""DeepSpeed engines, ZeRO stages 0-3: where the gradients and fp32 weights live.

Under ZeRO a parameter's ``.grad`` is None after ``engine.backward``: the reduced
gradient lives in the optimizer's partition (ZeRO-1/2: ``averaged_gradients``, or
the fp32 ``.grad`` of the partition with CPU offload; ZeRO-3: the grad partition of
each ``ds_tensor``), and the weights the optimizer updates are its fp32 master
partition. This adapter reads exactly those, per managed parameter, as the
*fragment* this rank owns, so the AIM state of a rank covers its own partition
only (1/ranks of the model) and a missing gradient is an error, never a zero.

* Stage 0 (fp32): the parameters and their all-reduced ``.grad`` are replicated;
  every rank holds the whole state, as under DDP.
* Stages 1, 2 (and bf16 at stage 0, DeepSpeed's partitioned BF16 optimizer): each
  parameter's ``_hp_mapping`` names its fp32 master fragment and grad fragment.
* Stage 3: the parameter's slice of the fp32 partition and of the grad partition
  (``ds_tensor``'s elements; the last rank's padding is not managed).

n_g, sum Omega, t_g, m_g and the stats are global over the data-parallel group
(``sharding.global_thresholds`` / ``global_align_thresholds``, kept in the state).
Gradients are copied into the state's fp32 buffer (divided by the loss scale the engine
put in them: ZeRO-1/2/3 fp16; none at stage 0, whose fp16 engine does not scale the loss),
stepped, and copied back in the engine's units: DeepSpeed then clips and steps the
regularised gradient. A non-finite gradient never reaches the AIM state (the step is
skipped on every rank), whether or not DeepSpeed's optimizer skips it too.

Masks hold on the update (DESIGN.md 2.4): a post-hook on the optimizer that updates
the fp32 partition puts every masked element of a keep=0 group back to its anchor,
before DeepSpeed copies the partition to the 16-bit / model weights.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

from . import ops, sharding
from .state import AIMState, Bucket, Slot


# ---- what is not supported -----------------------------------------------------------
def is_engine(model) -> bool:
    ds = sys.modules.get("deepspeed")
    return ds is not None and isinstance(model, ds.DeepSpeedEngine)


def _cfg(obj, *path, default=None):
    for key in path:
        if obj is None:
            return default
        obj = obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)
    return default if obj is None else obj


def _device(zc, what: str) -> str:
    """``offload_*.device`` as a lowercase name ("none", "cpu", "nvme")."""
    return str(_cfg(zc, what, "device", default="none")).lower().split(".")[-1]


def unsupported_features(engine, zero_config=None) -> list[str]:
    """The DeepSpeed features this engine (or this ``zero_optimization`` config, when the
    engine is out of reach) uses that the adapter does not support."""
    found = []
    ds = sys.modules["deepspeed"]
    zc = zero_config if engine is None else (
        engine._config.zero_config if engine.zero_optimization() else None)
    if isinstance(engine, ds.PipelineEngine) or getattr(engine, "pipeline_parallelism", False):
        found.append("pipeline parallelism (PipelineEngine)")
    if _cfg(zc, "zero_quantized_gradients", default=False):
        found.append("ZeRO++ quantized gradients (zero_quantized_gradients)")
    if _cfg(zc, "zero_quantized_weights", default=False) or \
            _cfg(zc, "zero_quantized_nontrainable_weights", default=False):
        found.append("ZeRO++ quantized weights (zero_quantized_weights)")
    if _cfg(zc, "zero_hpz_partition_size", default=1) > 1:
        found.append("ZeRO++ hierarchical partitioning (zero_hpz_partition_size > 1)")
    if _cfg(zc, "mics_shard_size", default=-1) > 0:          # DeepSpeed < 0.19
        found.append("MiCS (mics_shard_size)")
    for what in ("offload_optimizer", "offload_param"):
        if _device(zc, what) == "nvme":
            found.append(f"NVMe offload ({what}.device = nvme)")
    if engine is None:
        return found
    if getattr(engine, "mpu", None) is not None or getattr(engine, "autotp_size", lambda: 0)() > 1:
        found.append("tensor / model parallelism (mpu, AutoTP)")
    if getattr(engine, "has_moe_layers", False):
        found.append("mixture of experts (MoE layers)")
    if getattr(engine, "seq_parallel_group", None) is not None and \
            torch.distributed.get_world_size(engine.seq_parallel_group) > 1:
        found.append("sequence parallelism (Ulysses)")
    if getattr(engine, "torch_autocast_enabled", lambda: False)():
        found.append("torch_autocast")
    if getattr(engine.optimizer, "zenflow", False):
        found.append("ZenFlow")
    if getattr(engine.optimizer, "use_muon", False):
        found.append("the Muon optimizer")
    return found


def check_supported(engine) -> None:
    found = unsupported_features(engine)
    if found:
        raise NotImplementedError(
            "attach: this DeepSpeed engine uses " + "; ".join(found) + ", which aim_kernels "
            "does not support (supported: ZeRO stages 0-3, offload_optimizer cpu, bf16/fp16, "
            "gradient accumulation)")


# ---- where a parameter's local elements live --------------------------------------------
class _Replicated:
    """Stage 0, fp32: the parameter is its own master; its ``.grad`` is all-reduced."""
    sharded = False

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def numel(self, p) -> int:
        return p.numel()

    def master(self, p) -> torch.Tensor:
        return p.data.view(-1)

    def grad(self, p, name) -> torch.Tensor:
        if p.grad is None:
            raise RuntimeError(f"masked_step: parameter {name!r} has no gradient at the "
                               "accumulation boundary (call engine.backward(loss) first)")
        return p.grad.view(-1)

    def sync_params(self, slots) -> None:
        pass

    def inner_optimizers(self):
        return [self.optimizer]


class _Unfused(_Replicated):
    """Stage 0, bf16/fp16 (FP16_UnfusedOptimizer): a replicated fp32 master per parameter;
    the 16-bit ``.grad`` (times the loss scale) is all-reduced."""

    def __init__(self, optimizer):
        super().__init__(optimizer)
        self._master = {id(lp): hp for lps, hps in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                        for lp, hp in zip(lps, hps)}

    def master(self, p) -> torch.Tensor:
        return self._master[id(p)].data.view(-1)

    def sync_params(self, slots) -> None:
        if slots:
            torch._foreach_copy_([s.param.data.view(-1) for s in slots],
                                 [self.master(s.param) for s in slots])

    def inner_optimizers(self):
        return [self.optimizer.optimizer]


class _Flat:
    """ZeRO-1/2 and the bf16 optimizer: each parameter's fragment of the flat fp32 partition."""
    sharded = True

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def numel(self, p) -> int:
        m = p._hp_mapping
        return 0 if m is None else m.lp_fragment_address.numel

    def master(self, p) -> torch.Tensor:
        return p._hp_mapping.hp_fragment

    def grad(self, p, name) -> torch.Tensor:
        m = p._hp_mapping
        try:
            g = m.get_lp_grad_fragment(p._index_in_param_group)
        except (ValueError, KeyError, IndexError) as exc:
            raise RuntimeError(f"masked_step: the reduced gradient of parameter {name!r} is not "
                               "in the ZeRO partition; call it after engine.backward(loss) and "
                               f"before engine.step() ({exc})") from None
        if g is None:
            raise RuntimeError(f"masked_step: parameter {name!r} has no reduced gradient in the "
                               "ZeRO partition (call engine.backward(loss) first)")
        g = g.view(-1)
        addr = m.lp_fragment_address
        if g.numel() == p.numel() and g.numel() != addr.numel:   # a whole-parameter buffer
            g = g.narrow(0, addr.start, addr.numel)
        return g

    def sync_params(self, slots) -> None:
        """Model weights = the fp32 masters, on every rank: DeepSpeed's own end of step
        (each rank's fp32 partition into its 16-bit partition, then one all-gather per
        parameter group, in ``allgather_bucket_size`` pieces)."""
        self.optimizer.update_lp_params()

    def inner_optimizers(self):
        return [self.optimizer.optimizer]


class _Stage3:
    """ZeRO-3: the parameter's slice of its sub-group's fp32 and grad partitions."""
    sharded = True

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def numel(self, p) -> int:
        part = p.ds_tensor.numel()
        rank = self.optimizer._get_param_partition_rank(p)
        return max(0, min(part, p.ds_numel - rank * part))

    def master(self, p) -> torch.Tensor:
        t, _ = self.optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=True)
        return t.narrow(0, 0, self.numel(p))

    def grad(self, p, name) -> torch.Tensor:
        try:
            t, _ = self.optimizer._get_fp32_grad_state_partition(p, release_swap_buffers=True)
        except (KeyError, AttributeError) as exc:
            raise RuntimeError(f"masked_step: parameter {name!r} has no reduced gradient in the "
                               "ZeRO-3 partition (call engine.backward(loss) first)") from exc
        if t is None:
            raise RuntimeError(f"masked_step: parameter {name!r} has no reduced gradient in the "
                               "ZeRO-3 partition (call engine.backward(loss) first)")
        return t.view(-1).narrow(0, 0, self.numel(p))

    def sync_params(self, slots) -> None:
        if slots:
            torch._foreach_copy_([self._lp_slice(s.param) for s in slots],
                                 [self.master(s.param) for s in slots])
        # The small parameters DeepSpeed keeps gathered ("persistent") would go on serving
        # their old values: release every parameter and gather those again, as the end of
        # DeepSpeed's own step does (all ranks call this: both are collectives).
        self.optimizer._partition_all_parameters()
        persistent = getattr(self.optimizer, "persistent_parameters", None)
        if persistent:
            persistent[0].all_gather(persistent)

    def _lp_slice(self, p):
        return p.ds_tensor.data.view(-1).narrow(0, 0, self.numel(p))

    def inner_optimizers(self):
        opts = [self.optimizer.optimizer, getattr(self.optimizer, "backup_optimizer", None)]
        return [o for o in opts if o is not None]


def _partition_of(optimizer, stage: int):
    if stage == 3:
        return _Stage3(optimizer)
    if stage in (1, 2) or hasattr(optimizer, "bf16_groups"):
        return _Flat(optimizer)
    if isinstance(optimizer, torch.optim.Optimizer):
        return _Replicated(optimizer)
    if hasattr(optimizer, "fp16_groups") and isinstance(getattr(optimizer, "fp32_groups", None), list) \
            and all(isinstance(g, list) for g in optimizer.fp32_groups):
        return _Unfused(optimizer)
    raise NotImplementedError(f"attach: DeepSpeed optimizer {type(optimizer).__name__} at ZeRO "
                              f"stage {stage} is not supported")


def _dp_group(optimizer, stage: int):
    for attr in ("dp_process_group", "real_dp_process_group"):
        g = getattr(optimizer, attr, None)
        if isinstance(g, list):
            g = g[0]
        if g is not None:
            return g
    return torch.distributed.group.WORLD


# ---- copies between DeepSpeed's tensors and the state's flat buffers --------------------------
def _continues(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``b`` starts where ``a`` ends in the same flat storage."""
    return (a.dtype == b.dtype and a.device == b.device and a.stride() == (1,)
            and b.stride() == (1,) and b.storage_offset() == a.storage_offset() + a.numel()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def _runs(slots, tensors) -> list[tuple[int, int, torch.Tensor]]:
    """``(start, numel, tensor)`` per run of slots whose DeepSpeed-side 1-D tensors are
    consecutive pieces of one flat buffer (ZeRO-1/2 fragments of a partition, ZeRO-3
    parameters of a sub-group): one copy per run, not one per parameter."""
    out = []
    for s, t in zip(slots, tensors):
        t = t.detach()      # a view of a master that requires grad: copies stay out of autograd
        if out:
            lo, n, prev = out[-1]
            if lo + n == s.start and _continues(prev, t):
                out[-1] = (lo, n + s.numel,
                           prev.as_strided((n + s.numel,), (1,), prev.storage_offset()))
                continue
        out.append((s.start, s.numel, t))
    return out


def _gather(buf: torch.Tensor, runs) -> None:
    """``buf[start:start + numel] = tensor`` for every run, in one foreach call."""
    if runs:
        torch._foreach_copy_([buf.narrow(0, lo, n) for lo, n, _ in runs], [t for _, _, t in runs])


def _scatter(buf: torch.Tensor, runs) -> None:
    """``tensor = buf[start:start + numel]`` for every run, in one foreach call."""
    if runs:
        torch._foreach_copy_([t for _, _, t in runs], [buf.narrow(0, lo, n) for lo, n, _ in runs])


def _any_nonfinite(state: AIMState) -> bool:
    """Any non-finite gradient in any rank's buffer, from one float64 sum per buffer (7x
    cheaper than an isfinite mask on the CPU): a float64 sum of finite fp32 values cannot
    overflow, and inf / NaN survive the sum and the all-reduce, so the answer is exact."""
    flag = torch.zeros(1, dtype=torch.float64)
    for b in state.buckets:
        flag += b.grad.sum(dtype=torch.float64).cpu()
    if state.collectives is not None:
        flag = state.collectives.sum(flag)
    return not bool(torch.isfinite(flag).item())


# ---- the state ---------------------------------------------------------------------------
class ZeroState(AIMState):
    """The AIM state of the elements this rank owns in a DeepSpeed engine.

    All buffers are fp32 on the device of the fp32 master partition (CPU under
    ``offload_optimizer``); ``param`` and ``grad`` are working copies, filled at each
    step, so the state holds 5 x 4 bytes per owned element.
    """

    engine_kind = "deepspeed"

    def __init__(self, engine, optimizer, stage: int, groups, members, config):
        self.engine = engine
        self.stage = stage
        self.optimizer = optimizer
        self.partition = _partition_of(optimizer, stage)
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        super().__init__(groups, members, config)   # local thresholds: Omega = 0, c_g = 0
        if self.partition.sharded:
            self.collectives = sharding.Collectives(_dp_group(optimizer, stage))
            self.refresh_thresholds()
            self.reindex_holds()
        self._hooks = [o.register_step_post_hook(lambda *_args, **_kw: self.hold_masks_())
                       for o in self.partition.inner_optimizers()]
        self.last_skip_reason = None
        self._warned_nonfinite = False
        self._took_step = False
        self._track_backward()
        if engine is not None and engine.fp16_enabled() and stage == 0 and self.loss_scale() == 1.0:
            warnings.warn(
                "aim_kernels: DeepSpeed's fp16 engine at ZeRO stage 0 does not scale the loss in "
                "engine.backward (only ZeRO optimizers do) but its FP16 optimizer divides the "
                "gradients by the loss scale in its step: every update is 1/loss_scale of the "
                "gradient's. masked_step reads the gradients as they are (true units) and writes "
                "them back alike, so its regularisation is scaled as the gradient is; use ZeRO-1 "
                "or bf16 for fp16 training at the intended learning rate", RuntimeWarning,
                stacklevel=3)

    def _track_backward(self) -> None:
        """Know whether the partitions hold a gradient of this step. ZeRO-3 keeps its grad
        partitions between steps (zeros before the first backward, the last step's values
        after ``engine.step()``), so reading them is not proof that a backward ran."""
        self._fresh = None if self.engine is None else False
        if self.engine is None:
            return
        engine, backward, step = self.engine, self.engine.backward, self.engine.step

        def tracked_backward(*args, **kwargs):
            self._fresh = True
            return backward(*args, **kwargs)

        def tracked_step(*args, **kwargs):
            boundary = engine.is_gradient_accumulation_boundary()
            out = step(*args, **kwargs)
            if boundary:                  # the optimizer stepped: its gradients are spent
                self._fresh = False
                if self._took_step and not getattr(engine, "_step_applied", True):
                    warnings.warn("aim_kernels: DeepSpeed skipped an optimizer step whose "
                                  "gradients were finite when masked_step read them; the AIM "
                                  "state took it", RuntimeWarning, stacklevel=2)
                self._took_step = False
            return out

        engine.backward, engine.step = tracked_backward, tracked_step
        self._untrack = lambda: (vars(engine).pop("backward", None), vars(engine).pop("step", None))

    # buckets of fp32 copies of the local fragments, one per master device
    def _make_bucket(self, device, dtype, per_group) -> Bucket:
        slots, offsets, cursor, master_device = [], [0], 0, None
        for g, members in enumerate(per_group):
            for name, p in members:
                n = self.partition.numel(p)
                if n:
                    slots.append(Slot(name, p, g, cursor, n, torch.Size([n]), rehomed=False))
                    master_device = master_device or self.partition.master(p).device
                    cursor += n
            offsets.append(cursor)
        device = master_device or torch.device("cpu")
        param = torch.empty(cursor, dtype=torch.float32, device=device)
        _gather(param, _runs(slots, [self.partition.master(s.param) for s in slots]))
        cfgs = list(self.group_configs.values())
        f32 = dict(dtype=torch.float32, device=device)
        return Bucket(
            device=device, dtype=torch.float32, slots=slots, offsets_host=offsets,
            param=param, grad=torch.zeros(cursor, **f32), anchor=param.clone(),
            importance=torch.zeros(cursor, dtype=self.config.state_dtype, device=device),
            fisher=torch.zeros(cursor, dtype=self.config.state_dtype, device=device),
            offsets=torch.tensor(offsets, dtype=torch.int64, device=device),
            keep=torch.tensor([c.keep for c in cfgs], **f32),
            lam=torch.tensor([c.lam for c in cfgs], **f32),
            mask_ratio=torch.tensor([c.mask_ratio for c in cfgs], dtype=torch.float64, device=device))

    def _model_fingerprint(self) -> bytes:
        import hashlib
        import json
        desc = [("deepspeed", self.stage, self.world, self.rank)] + [
            (s.name, s.start, s.numel, self.group_names[s.group])
            for b in self.buckets for s in b.slots]
        return hashlib.sha256(json.dumps(desc).encode()).digest()

    def state_bytes(self) -> int:
        """Bytes of every per-element buffer this rank holds."""
        return sum(getattr(b, k).numel() * getattr(b, k).element_size()
                   for b in self.buckets for k in ("param", "grad", "anchor", "importance", "fisher"))

    # weights: the fp32 masters are the truth; the model weights follow
    def _master_runs(self, b: Bucket):
        """The bucket's fp32 masters as runs. DeepSpeed keeps its fp32 partitions in place
        (its optimizer steps them as parameters), so the views are found once, and again
        after a checkpoint load (:meth:`forget_views`)."""
        cache = self.__dict__.setdefault("_masters", {})
        if id(b) not in cache:
            cache[id(b)] = _runs(b.slots, [self.partition.master(s.param) for s in b.slots])
        return cache[id(b)]

    def forget_views(self) -> None:
        self.__dict__.pop("_masters", None)

    @torch.no_grad()
    def pull_params(self) -> None:
        for b in self.buckets:
            _gather(b.param, self._master_runs(b))

    @torch.no_grad()
    def push_params(self) -> None:
        for b in self.buckets:
            _scatter(b.param, self._master_runs(b))
        self.partition.sync_params([s for b in self.buckets for s in b.slots])

    def zero_grad(self) -> None:
        raise RuntimeError("zero_grad: a DeepSpeed engine zeroes its own gradients (engine.step())")

    # masks hold on the update (DESIGN.md 2.4): the held positions are indexed by
    # AIMState.reindex_holds (attach, consolidate, load); here they go into the masters
    @torch.no_grad()
    def hold_masks_(self) -> None:
        for h in self._holds:
            b = h.bucket
            for s, idx in h.copied:
                master = self.partition.master(s.param)
                master.index_copy_(0, idx, s.param_view(b.anchor).index_select(0, idx).to(master.dtype))

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if getattr(self, "_untrack", None):
            self._untrack()
            self._untrack = None

    # the step
    def loss_scale(self) -> float:
        """The factor the gradients in the partitions carry: ``engine.backward`` scales the
        loss through the ZeRO optimizer's ``scale_if_loss`` (stages 1-3) and not otherwise."""
        from deepspeed.runtime.base_optimizer import ZeROOptimizer
        opt = self.optimizer
        if not isinstance(opt, ZeROOptimizer):
            return 1.0
        if getattr(opt, "custom_loss_scaler", False):
            return float(opt.external_loss_scale)
        scaler = getattr(opt, "loss_scaler", None)
        return 1.0 if scaler is None else float(scaler.cur_scale)

    def skips_nonfinite(self) -> bool:
        """Will DeepSpeed (0.19) skip an optimizer step whose gradient is not finite?

        Stage 0: the FP16 optimizers check overflow and the BF16 optimizer a non-finite
        norm; a torch optimizer (fp32) is stepped whatever it holds. Stage 3 skips on a
        non-finite norm always. Stages 1-2 skip when they check overflow (fp16; bf16 with
        ``check_grad_overflow``) or compute the norm in fp32 (``compute_grad_norm``, default).
        """
        opt = self.optimizer
        if isinstance(opt, torch.optim.Optimizer):
            return False
        if self.stage in (1, 2):
            return bool(getattr(opt, "check_grad_overflow", False)) or (
                bool(getattr(opt, "compute_grad_norm", True))
                and getattr(opt, "dtype", torch.float32) != torch.bfloat16)
        return True

    def _warn_nonfinite(self) -> None:
        """Once per state: DeepSpeed will put this non-finite step into the weights."""
        if self._warned_nonfinite:
            return
        self._warned_nonfinite = True
        names = [s.name for b in self.buckets for s in b.slots
                 if not bool(torch.isfinite(s.param_view(b.grad)).all())]
        where = f"parameter {names[0]!r}" if names else "a parameter of another rank's partition"
        warnings.warn(
            f"aim_kernels: non-finite gradient ({where}) that DeepSpeed will apply to the weights "
            f"(ZeRO stage {self.stage}, {type(self.optimizer).__name__}: no overflow check for "
            "it); the AIM state skipped the step. Find the source of the non-finite loss, or use "
            "an fp16 engine or ZeRO-1/2/3, whose optimizers skip such steps", RuntimeWarning,
            stacklevel=3)

    @torch.no_grad()
    def masked_step(self, grads=None, skip=False):
        """The fused step on the reduced gradients of this rank's partition, in true units
        (divided by the loss scale the engine multiplied the loss by), written back in the
        engine's units. A non-finite gradient anywhere never reaches the AIM state: the step
        is skipped on every rank (whatever ``skip`` says; DeepSpeed's loss scaler owns that
        decision), with a warning when DeepSpeed will apply the step to the weights."""
        from .step import StepStats, _align, _should_skip, _skipped
        if grads is not None:
            raise ValueError("masked_step: grads= cannot be passed for a DeepSpeed engine; its "
                             "reduced gradients live in the ZeRO partitions, which masked_step reads")
        if self.engine is not None and not self.engine.is_gradient_accumulation_boundary():
            out = _skipped(self)
            out.accumulating = True        # a micro-step inside the accumulation window
            return out
        if self._fresh is False:
            raise RuntimeError("masked_step: no engine.backward(loss) since the last optimizer step "
                               "(or masked_step already ran for this step): the ZeRO partitions "
                               "hold no gradient of this step")
        if self._fresh:
            self._fresh = False
        skipping = _should_skip(skip)
        fetched = [_runs(b.slots, [self.partition.grad(s.param, s.name) for s in b.slots])
                   for b in self.buckets]        # every gradient found before anything moves
        if skipping:
            return _skipped(self)
        scale = self.loss_scale()
        for b, runs in zip(self.buckets, fetched):
            _gather(b.grad, runs)
            if scale != 1.0:
                b.grad.div_(scale)
        if _any_nonfinite(self):
            self.last_skip_reason = "nonfinite"
            if not self.skips_nonfinite():
                self._warn_nonfinite()
            return _skipped(self)
        self.pull_params()
        cfg = self.config
        total = None
        for b, runs in zip(self.buckets, fetched):
            stats = ops.fused_step(
                b.grad, b.param, b.anchor, b.importance, b.fisher, b.offsets, b.inv_scale,
                b.thresh, b.keep, b.lam, beta=cfg.beta, accumulate=cfg.accumulate,
                importance_kind=cfg.importance, directional=cfg.directional, backend=cfg.backend)
            _scatter(b.grad * scale if scale != 1.0 else b.grad, runs)
            total = stats if total is None else total + stats
        if total is None:
            total = torch.zeros(self.num_groups, len(ops.STAT_NAMES))
        self.steps += 1
        self.steps_since_consolidation += 1
        if cfg.align_every and self.steps % cfg.align_every == 0:
            _align(self)          # m_g kept in the state (global); then the weights are pushed
        self.last_skip_reason = None
        self._took_step = True
        return StepStats(total, self.group_names, collectives=self.collectives)

    # resume: each rank's state is its own partition of one engine layout
    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = super().state_dict()
        sd["meta.deepspeed"] = torch.tensor([self.stage, self.world, self.rank], dtype=torch.int64)
        return sd

    def check_layout(self, layout: torch.Tensor) -> None:
        """A saved ``meta.deepspeed`` (stage, world size, rank) against this engine's."""
        stage, world, rank = (int(v) for v in layout.tolist())
        if (stage, world) != (self.stage, self.world):
            raise ValueError(
                f"load: the AIM state was saved from a DeepSpeed engine at ZeRO stage {stage} "
                f"with {world} rank(s); this engine is ZeRO stage {self.stage} with "
                f"{self.world} rank(s). Each rank's state holds its own partition, so it "
                "resumes into the same stage and world size only")
        if rank != self.rank:
            raise ValueError(f"load: the AIM state of rank {rank} was given to rank {self.rank}")

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """As :meth:`AIMState.load_state_dict`, after checking the engine layout: a state
        resumes into the ZeRO stage and world size it was saved from."""
        if "meta.deepspeed" in sd:
            self.check_layout(sd["meta.deepspeed"])
        else:                  # saved before the layout was: the fingerprint still checks it
            sd = {**sd, "meta.deepspeed": self.state_dict()["meta.deepspeed"]}
        super().load_state_dict(sd)

    def load(self, path) -> None:
        """As :meth:`AIMState.load`, after checking the engine layout the file was saved from."""
        from safetensors import safe_open
        try:
            with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
                layout = f.get_tensor("meta.deepspeed") if "meta.deepspeed" in f.keys() else None
        except FileNotFoundError:
            raise
        except Exception:       # noqa: BLE001 -- not safetensors: AIMState.load names the problem
            layout = None
        if layout is not None:
            self.check_layout(layout)
        super().load(path)

def attach(engine, config, groups_fn) -> ZeroState:
    """The state of a DeepSpeed engine (after ``deepspeed.initialize``)."""
    check_supported(engine)
    stage = engine.zero_optimization_stage()
    if engine.optimizer is None:
        raise ValueError("attach: the DeepSpeed engine has no optimizer (pass one, or an "
                         "\"optimizer\" section, to deepspeed.initialize)")
    groups, members = groups_fn(engine.module)
    return ZeroState(engine, engine.optimizer, stage, groups, members, config)


def deepspeed_optimizer(optimizer):
    """The DeepSpeed ZeRO optimizer behind ``optimizer`` (accelerate wraps it), or None."""
    ds = sys.modules.get("deepspeed")
    if ds is None or optimizer is None:
        return None
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    for opt in (optimizer, getattr(optimizer, "optimizer", None)):
        if isinstance(opt, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)):
            return opt
    return None


def attach_optimizer(module, optimizer, config, groups_fn, previous: "ZeroState | None" = None):
    """The state for a ZeRO optimizer whose engine is out of reach: the HF Trainer's
    callbacks see the module and the optimizer only, and its DeepSpeed path runs
    ``engine.backward`` and ``engine.step`` in one call (accelerate's ``backward``), leaving
    no point in between; so ``masked_step`` runs at the start of the optimizer's own step
    (:func:`step_inside`), which DeepSpeed calls at accumulation boundaries only.

    Each ``trainer.train()`` builds a new engine: ``previous`` (the state of the last task's
    engine) is carried into the new one, whose partitions are laid out alike.
    """
    stage = 3 if hasattr(optimizer, "fp32_partitioned_groups_flat") else \
        (2 if getattr(optimizer, "partition_gradients", False) else 1)
    groups, members = groups_fn(module)
    state = ZeroState(None, optimizer, stage, groups, members, config)
    if previous is not None:
        previous.remove_hooks()
        state.load_state_dict(previous.state_dict())
    step_inside(state)
    return state


def step_inside(state: ZeroState):
    """Run ``masked_step`` at the start of every step of the DeepSpeed optimizer (DeepSpeed
    calls its step at accumulation boundaries only): the Trainer's DeepSpeed path runs
    backward and step in one call, leaving no point in between for a callback."""
    opt = state.optimizer
    original = opt.step
    state.last_stats = None

    def step(*args, **kwargs):
        state.last_stats = state.masked_step()
        out = original(*args, **kwargs)
        if getattr(opt, "overflow", False) and state.last_skip_reason is None:
            warnings.warn("aim_kernels: DeepSpeed skipped an optimizer step whose gradients were "
                          "finite; the AIM state took it", RuntimeWarning, stacklevel=2)
        return out

    opt.step = step
    previous_untrack = getattr(state, "_untrack", None)

    def untrack():
        vars(opt).pop("step", None)
        if previous_untrack:
            previous_untrack()
    state._untrack = untrack


# ---- checkpoints ---------------------------------------------------------------------------
def state_file(save_dir, tag, rank: int) -> str:
    return os.path.join(str(save_dir), str(tag), f"aim_state_rank{rank:05d}.safetensors")


def save_atomic(state: ZeroState, path: str) -> None:
    """Write the state to ``path`` through a temp file, fsync and rename."""
    from safetensors.torch import save
    import json
    data = save({k: v.contiguous().cpu() for k, v in state.state_dict().items()},
                metadata={"format": "aim_kernels.AIMState", "names": json.dumps(state.names)})
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)





def trainer_attach(module, optimizer, config, args=None) -> ZeroState:
    """``AIMCallback.on_train_begin`` under ``TrainingArguments(deepspeed=...)``: attach to
    the ZeRO optimizer of this ``train()``'s engine, carrying the last task's state over."""
    from . import step as _step
    ds_opt = deepspeed_optimizer(optimizer)
    if ds_opt is None:
        raise NotImplementedError(
            "AIMCallback: under TrainingArguments(deepspeed=...) aim_kernels supports ZeRO "
            f"stages 1-3; the Trainer's optimizer is {type(optimizer).__name__}")
    hf_config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None) or {}
    found = unsupported_features(None, hf_config.get("zero_optimization") or {})
    if found:
        raise NotImplementedError("AIMCallback: the DeepSpeed config uses " + "; ".join(found) +
                                  ", which aim_kernels does not support")
    previous = _step._STATES.get(module)
    if previous is not None and not isinstance(previous, ZeroState):
        raise RuntimeError("AIMCallback: the model has a plain AIMState; detach it before "
                           "training with DeepSpeed")
    cfg = config if config is not None else (previous.config if previous is not None else None)
    from .config import AIMConfig
    cfg = cfg or AIMConfig()
    cfg.validate()
    state = attach_optimizer(module, ds_opt, cfg, lambda m: _step._groups(m, cfg), previous)
    _step._STATES[module] = state
    return state
__all__ = ["ZeroState", "attach", "attach_optimizer", "check_supported", "is_engine", "trainer_attach", "unsupported_features"]
