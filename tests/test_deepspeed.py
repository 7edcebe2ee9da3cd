"""DeepSpeed ZeRO 0-3 on CPU (DS_ACCELERATOR=cpu, gloo): 2 processes against 1.

One 1-process and one 2-process run per module (``tests/deepspeed_worker.py`` holds the
recipes); each test reads what they wrote. A 2-rank engine must reach the weights and
AIM state of the 1-rank engine of the same config (up to the summation order of the
gradient reduction), with the same masks and counts at every step.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
from tests import deepspeed_worker as W  # noqa: E402
from tests.vlm_toy import free_port  # noqa: E402

pytestmark = pytest.mark.slow
GROUPS = ("vision", "projector", "language")



def _last_words(out, world: int) -> str:
    """Per rank: the scenario it was in and the last lines of its stderr."""
    said = []
    for rank in range(world):
        path = W.log_path(str(out), world, rank)
        lines = []
        if os.path.exists(path):
            with open(path) as f:
                lines = f.read().splitlines()
        where = [ln for ln in lines if ln.startswith("scenario ")]
        tail = [ln for ln in lines if ln.strip() and not ln.startswith("scenario ")
                and "Warning" not in ln and "return func(" not in ln][-30:]
        said.append(f"rank {rank}, in {where[-1][9:] if where else '(start-up)'}:\n  "
                    + "\n  ".join(tail))
    return "\n".join(said)


def _spawn(world: int, out) -> None:
    """One run of every scenario on `world` ranks. A rank killed by a signal (DeepSpeed's CPU
    all-reduce and gloo abort the process on a transport error) is reported with its
    scenario and stderr, then the scenarios it had not finished run once more on a fresh
    port; a second death fails the module."""
    only = None
    for attempt in (1, 2):
        try:
            torch.multiprocessing.spawn(W.worker, args=(world, free_port(), str(out), only),
                                        nprocs=world, join=True)
            return
        except torch.multiprocessing.ProcessExitedException as exc:
            said = _last_words(out, world)
            if attempt == 2:
                raise RuntimeError(f"DeepSpeed {world}-rank run died twice ({exc}):\n{said}") from exc
            warnings.warn(f"DeepSpeed {world}-rank run died ({exc}); rerunning its unfinished "
                          f"scenarios once:\n{said}")
            only = [name for name, _ in W.scenarios(world)
                    if not all((out / f"{name}-w{world}-rank{r}.pt").exists() for r in range(world))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    old = os.environ.get("DS_ACCELERATOR")
    os.environ["DS_ACCELERATOR"] = "cpu"       # the spawned processes inherit it
    try:
        for world in (1, 2):
            _spawn(world, out)
    finally:
        if old is None:
            os.environ.pop("DS_ACCELERATOR")
        else:
            os.environ["DS_ACCELERATOR"] = old

    def load(name, world=2):
        results = [torch.load(out / f"{name}-w{world}-rank{r}.pt", weights_only=False)
                   for r in range(world)]
        for r, res in enumerate(results):
            if isinstance(res, dict) and "error" in res:
                pytest.fail(f"{name} (world {world}, rank {r}) failed:\n{res['error']}")
        return results
    return load


def _close(got: dict, want: dict, what: str, rtol=1e-5, atol=1e-6) -> None:
    assert got.keys() == want.keys(), what
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what} {key}: {m}")


def _same_run(got: dict, want: dict, what: str, rtol=1e-5, atol=1e-6, stat_rel=1e-4) -> None:
    assert got["steps"] == want["steps"] == W.TASKS * W.STEPS, what
    _close(got["params"], want["params"], f"{what} weights", rtol, atol)
    _close(got["state"], want["state"], f"{what} state", rtol, atol)
    assert len(got["stats"]) == len(want["stats"])
    for step, (g, w) in enumerate(zip(got["stats"], want["stats"])):
        for group in GROUPS:
            assert g[group]["masked"] == w[group]["masked"], f"{what} step {step} {group}"
            assert g[group]["nonfinite"] == w[group]["nonfinite"] == 0
            for stat, value in w[group].items():
                assert g[group][stat] == pytest.approx(value, rel=stat_rel, abs=1e-7), \
                    f"{what} step {step} {group} {stat}"
        assert g["held"]["held"], f"{what} step {step}: a masked element left its anchor"


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_ranks_equal_one(runs, stage, opt):
    want = runs(f"z{stage}-{opt}", world=1)[0]
    for rank, got in enumerate(runs(f"z{stage}-{opt}")):
        _same_run(got, want, f"ZeRO-{stage} {opt} rank {rank}")
    # not vacuous: masks, regularisation and the mask hold were all at work
    last = want["stats"][-1]
    assert all(last[g]["masked"] > 0 for g in GROUPS) and last["projector"]["penalty"] > 0
    assert want["stats"][-1]["held"]["count"] > 0


def test_stages_agree_with_each_other_and_the_plain_library(runs):
    """A 1-rank engine at every stage is the library's plain single-process path (SGD)."""
    import aim_kernels as ak
    from tests.vlm_toy import ToyVLM
    model = ToyVLM(seed=0)
    state = ak.attach(model, W.aim_config())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for task in range(W.TASKS):
        for step in range(W.STEPS):
            x, y = W.micro_batch(task, step, 0, 0, 1, 1)
            opt.zero_grad(set_to_none=False)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            ak.masked_step(model)
            opt.step()
        ak.consolidate(model)
    plain = {n: p.detach().clone() for n, p in model.named_parameters()}
    for stage in (0, 1, 2, 3):
        got = runs(f"z{stage}-sgd", world=1)[0]
        _close(got["params"], plain, f"ZeRO-{stage} vs plain")
        _close({k: v for k, v in got["state"].items() if k not in ("inv_scale", "thresh")},
               {f"{s.name}.{kind}": s.param_view(getattr(b, kind)).reshape(-1)
                for b in state.buckets for s in b.slots for kind in ("anchor", "importance", "fisher")},
               f"ZeRO-{stage} state vs plain")
        assert got["steps"] == state.steps


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_engine_two_ranks_equal_one(runs, stage):
    want = runs(f"z{stage}-bf16", world=1)[0]
    for rank, got in enumerate(runs(f"z{stage}-bf16")):
        # bf16 forward/backward: the reduction order shows at bf16 precision
        _same_run(got, want, f"ZeRO-{stage} bf16 rank {rank}", rtol=2e-2, atol=2e-3, stat_rel=5e-2)
    # and the step saw the true gradient: the first step's stats are the fp32 run's
    fp32 = runs(f"z{stage}-adamw", world=1)[0]["stats"][0]
    for group in GROUPS:
        assert want["stats"][0][group]["grad_sq"] == pytest.approx(fp32[group]["grad_sq"], rel=2e-2)


@pytest.mark.parametrize("name,ref", [("z0-gas4", "z0-sgd"), ("z1-gas4", "z1-adamw"),
                                      ("z2-gas4", "z2-sgd"), ("z3-gas4", "z3-adamw")])
def test_gradient_accumulation_4_equals_4x_batch(runs, name, ref):
    want = runs(ref)[0]
    for rank, got in enumerate(runs(name)):
        _same_run(got, want, f"{name} rank {rank}")
        # 3 of every 4 calls are inside the accumulation window: no-ops that say so
        assert got["accumulating"] == 3 * W.TASKS * W.STEPS


@pytest.mark.parametrize("name,ref", [("z1-offload", "z1-adamw"), ("z2-offload", "z2-adamw"), ("z3-offload", "z3-adamw"),
                                      ("z3-offload-param", "z3-adamw")])
def test_cpu_offload_equals_no_offload(runs, name, ref):
    want = runs(ref, world=1)[0]
    for rank, got in enumerate(runs(name)):
        _same_run(got, want, f"{name} rank {rank}")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_state_bytes_per_rank_halve(runs, stage):
    one = runs(f"z{stage}-sgd", world=1)[0]
    two = runs(f"z{stage}-sgd")
    assert sum(r["local_numel"] for r in two) == one["local_numel"]     # a partition, no overlap
    for r in two:
        assert 0.4 * one["bytes"] <= r["bytes"] <= 0.6 * one["bytes"], (r["bytes"], one["bytes"])


def test_stage0_is_replicated(runs):
    one = runs("z0-sgd", world=1)[0]
    assert all(r["bytes"] == one["bytes"] for r in runs("z0-sgd"))


@pytest.mark.parametrize("name", ["z0-resume", "z1-resume", "z2-resume", "z3-resume",
                                  "z0-fp16-resume"])
def test_resume_from_deepspeed_checkpoint_is_exact(runs, name):
    for rank, r in enumerate(runs(name)):
        a, b = r["straight"], r["resumed"]
        for part in ("params", "state"):
            for key in a[part]:
                assert torch.equal(a[part][key], b[part][key]), f"rank {rank} {part} {key}"
        assert a["steps"] == b["steps"] == W.TASKS * W.STEPS


@pytest.mark.parametrize("name,rel", [("z0-never-zero", 1e-5), ("z1-never-zero", 1e-5),
                                      ("z2-never-zero", 1e-5), ("z3-never-zero", 1e-5),
                                      ("z0-fp16-never-zero", 2e-3)])
def test_masked_step_never_reads_zero_for_real_gradients(runs, name, rel):
    stage = int(name[1])
    for r in runs(name):
        assert r["grads_none"] == (stage >= 1)   # ZeRO-1/2/3: every p.grad is None after backward
        for group, want in r["want"].items():
            assert want > 0 and r["got"][group] == pytest.approx(want, rel=rel)
        assert len(r["errors"]) == 2         # before any backward; after engine.step()
        assert all("no engine.backward(loss)" in e for e in r["errors"])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_skipped_step_leaves_state_untouched(runs, stage):
    """fp32 + gradient_clipping, an inf in the batch: DeepSpeed's ZeRO optimizer skips."""
    for r in runs(f"z{stage}-nonfinite"):
        assert r["ds_overflow"] and not r["ds_applied"] and r["skipped"]
        assert r["state_same"] and r["params_same"] and r["steps"] == 1
        assert r["warned"] == []


def test_stage0_fp32_nonfinite_step_never_reaches_the_state(runs):
    """ZeRO-0 fp32 has no overflow check: DeepSpeed clips (inf x 0 = NaN) and steps the
    torch optimizer. The AIM state (Omega, F, anchors, counts) is left as it was on every
    rank, and masked_step warns, once, naming a parameter, that DeepSpeed applies the step."""
    for r in runs("z0-nonfinite"):
        assert r["ds_applied"] and not r["ds_overflow"] and not r["params_same"]
        assert r["skipped"] and r["state_same"] and r["steps"] == 1
        assert len(r["warned"]) == 1 and "parameter 'vision.0.weight'" in r["warned"][0]


@pytest.mark.parametrize("name", list(W.NONFINITE_MATRIX))
def test_nonfinite_step_never_reaches_the_state_and_warns_when_deepspeed_applies_it(runs, name):
    """Each engine kind (stage, fp32/bf16, bf16.check_grad_overflow, clipping): the state
    skips the step; the warning comes exactly when DeepSpeed's optimizer applies it."""
    r = runs("nonfinite-matrix", world=1)[0][name]
    assert r["skipped"] and r["state_same"] and r["steps"] == 1
    assert r["ds_applied"] == (not r["params_same"])
    assert len(r["warned"]) == int(r["ds_applied"]), (name, r["ds_applied"], r["warned"])


def test_unsupported_features_are_named_at_attach(runs):
    messages = runs("unsupported", world=1)[0]["messages"]
    assert messages, "no feature was tried"
    for feature, message in messages.items():
        assert message is not None, f"{feature}: attach accepted it"
        assert feature in message, message


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_trainer_deepspeed_two_tasks_holds_masked_elements(runs, stage):
    """Trainer(args=TrainingArguments(deepspeed=...), callbacks=[AIMCallback(preset aim)])."""
    results = runs(f"z{stage}-trainer")
    for r in results:
        assert r["steps_task1"] == 4 and r["steps"] == 8     # one state across both engines
        assert r["masked"] > 0 and r["held"] and r["moved"] > 0
        assert r["grad_sq"] > 0
    assert sum(r["local_numel"] for r in results) == results[0]["total_numel"]


@pytest.mark.parametrize("name,ref,atol", [("z1-fp16", "z1-adamw", 5e-3), ("z2-fp16", "z2-sgd", 5e-3),
                                           ("z3-fp16", "z3-adamw", 5e-3),
                                           ("z0-fp16", "z0-sgd-fp16-lr", 5e-4)])
def test_fp16_engine_unscales_before_the_step(runs, name, ref, atol):
    """fp16 with a loss scale of 2^10 (fp16 enabled on the CPU for the test): the step sees
    the true gradient (F and the stats match the fp32 run to fp16 precision; without the
    division by the scale they would be 2^20 times larger), masks and counts are exact, and
    the gradient goes back scaled (under SGD a missing re-scale would shrink every step).

    ZeRO-0: DeepSpeed 0.19's fp16 engine does not scale the loss there, and its optimizer
    divides the gradient by the scale: the run is the fp32 run at lr / 2^10. masked_step
    reads the unscaled gradient and writes it back unscaled (re-scaling it would make the
    steps 2^10 times those DeepSpeed takes without aim_kernels)."""
    want = runs(ref, world=1)[0]
    for rank, got in enumerate(runs(name)):
        for step, (g, w) in enumerate(zip(got["stats"], want["stats"])):
            for group in GROUPS:
                assert g[group]["masked"] == w[group]["masked"]
                assert g[group]["grad_sq"] == pytest.approx(w[group]["grad_sq"], rel=2e-2)
            assert g["held"]["held"]
        _close(got["params"], want["params"], f"fp16 rank {rank}", rtol=0, atol=atol)


def test_fp16_stage0_two_ranks_equal_one(runs):
    want = runs("z0-fp16", world=1)[0]
    for rank, got in enumerate(runs("z0-fp16")):
        # the 2-rank engine all-reduces fp16 gradients: Omega and the stats differ at fp16
        # precision (the weights, stepped at lr / loss scale, hardly)
        _same_run(got, want, f"ZeRO-0 fp16 rank {rank}", rtol=2e-3, stat_rel=1e-2)


@pytest.mark.parametrize("name", ["nonfinite-fp16", "z0-nonfinite-fp16"])
def test_fp16_overflow_leaves_state_untouched(runs, name):
    for r in runs(name):
        assert r["ds_overflow"] and r["skipped"]
        assert r["state_same"] and r["params_same"] and r["steps"] == 1
        assert r["warned"] == []


def test_resume_into_another_stage_or_world_size_is_an_error_naming_both(runs):
    """A ZeRO-1 checkpoint into a ZeRO-2 engine; a 1-rank checkpoint into 2 ranks (rank 0
    finds its file of another layout, rank 1 none): refused before anything is loaded."""
    for rank, r in enumerate(runs("resume-mismatch")):
        assert "ZeRO stage 1 with 2 rank(s)" in r["messages"]["stage"]
        assert "ZeRO stage 2 with 2 rank(s)" in r["messages"]["stage"]
        world = r["messages"]["world"]
        assert ("ZeRO stage 2 with 1 rank(s)" in world and "stage 2 with 2 rank(s)" in world) \
            if rank == 0 else ("saved by 1 rank(s); this engine has 2" in world)
        assert r["state_same"]


@pytest.mark.parametrize("zero_config,feature", [
    ({"zero_quantized_gradients": True}, "ZeRO++ quantized gradients"),
    ({"zero_quantized_weights": True}, "ZeRO++ quantized weights"),
    ({"zero_hpz_partition_size": 8}, "ZeRO++ hierarchical partitioning"),
    ({"offload_optimizer": {"device": "nvme"}}, "NVMe offload"),
    ({"offload_param": {"device": "nvme"}}, "NVMe offload"),
])
def test_trainer_path_names_unsupported_config(zero_config, feature):
    """Under the Trainer the engine is out of reach: its zero_optimization config is checked."""
    from aim_kernels import zero
    assert any(feature in f for f in zero.unsupported_features(None, zero_config))
    assert zero.unsupported_features(None, {"stage": 3, "offload_optimizer": {"device": "cpu"}}) == []


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_trainer_deepspeed_resume_is_exact(runs, stage):
    """AIMCallback.on_save writes each rank's state into the Trainer's DeepSpeed checkpoint;
    train(resume_from_checkpoint=checkpoint-2) on a fresh model ends bitwise where the
    uninterrupted run ends."""
    for rank, r in enumerate(runs(f"z{stage}-trainer-resume")):
        a, b = r["straight"], r["resumed"]
        assert a["steps"] == b["steps"] == 4
        assert torch.equal(a["param"], b["param"]), f"rank {rank}"
        for key in a["state"]:
            assert torch.equal(a["state"][key], b["state"][key]), f"rank {rank} {key}"


@pytest.mark.parametrize("stage", [1, 2])
def test_weight_sync_is_one_collective_per_parameter_group(runs, stage):
    """consolidate puts the fp32 masters into the model's weights with DeepSpeed's own
    gather of each parameter group (here 1 group, 10 parameters), not a collective per
    parameter."""
    for r in runs(f"z{stage}-sync-collectives"):
        assert 0 < len(r["calls"]) <= r["groups"] < r["params"], r["calls"]
