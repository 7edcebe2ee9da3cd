"""Two processes on CPU (gloo) against a single-process run: DDP, FSDP2, DCP checkpoints.

The processes are started once per module; ``tests/distributed_worker.py`` holds
what they run. A sharded run must take the same masks and reach the same state as
the single-process run (up to the summation order of the gradient reduction).
"""
from __future__ import annotations


import pytest
import torch

from tests import distributed_worker as W
from tests.vlm_toy import free_port

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch built without distributed support")
WORLD = 2



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torch.multiprocessing.spawn(W.worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD,
                                join=True)
    load = lambda name, r: torch.load(out / f"{name}-rank{r}.pt", weights_only=False)  # noqa: E731
    return {name: [load(name, r) for r in range(WORLD)]
            for name in ("thresholds", "ddp", "fsdp", "fsdp_bad", "holds")}


@pytest.fixture(scope="module")
def single():
    return W.single_process_run()


def _close_states(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{what} {key}: {m}")


def _close_stats(got: list, want: list, what: str) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        for group in w:
            assert g[group]["masked"] == w[group]["masked"], f"{what} step {step} {group}"
            assert g[group]["nonfinite"] == w[group]["nonfinite"]
            for stat, value in w[group].items():
                assert g[group][stat] == pytest.approx(value, rel=1e-4, abs=1e-7), \
                    f"{what} step {step} {group} {stat}"


def test_global_thresholds_are_exact_over_uneven_shards(runs):
    for r in runs["thresholds"]:
        assert r["t"] == r["t_ref"]
        assert r["c"] == pytest.approx(r["c_ref"], rel=1e-6)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_equal_one(runs, single, kind):
    for rank, r in enumerate(runs[kind]):
        assert r["steps"] == single["steps"] == W.TASKS * W.STEPS
        _close_states(r["state"], single["state"], f"{kind} rank {rank}")
        _close_stats(r["stats"], single["stats"], f"{kind} rank {rank}")


def test_fsdp_masks_something(runs):
    """The comparison above is not vacuous: each process held a shard, and masks and
    regularisation were active."""
    total = sum(p.numel() for p in W.ToyVLM().parameters())
    assert all(r["sharded"] for r in runs["fsdp"])
    assert sum(r["local_numel"] for r in runs["fsdp"]) == total
    assert all(0 < r["local_numel"] < total for r in runs["fsdp"])
    last = runs["fsdp"][0]["stats"][-1]
    assert last["projector"]["masked"] > 0 and last["language"]["penalty"] > 0


def test_dcp_checkpoint_round_trip(runs):
    for r in runs["fsdp"]:
        want = {k: v for k, v in r["state"].items() if not k.startswith("param:")}
        assert r["reloaded"].keys() == want.keys()
        for key in want:
            assert torch.equal(r["reloaded"][key], want[key]), key
        assert r["reloaded_steps"] == (W.TASKS * W.STEPS, 0)


def test_trainer_fsdp2_checkpoint_survives_a_save_failing_halfway(runs):
    """AIMCallback.on_save's FSDP2 path saves atomically (issue 14 item 6): a save whose
    rank-1 writer fails halfway raises on every rank and leaves the previous checkpoint,
    which a resumed callback loads bit for bit."""
    for r in runs["fsdp"]:
        t = r["trainer"]
        assert "No space left on device" in t["save_error"], t["save_error"]
        assert t["load_error"] == "" and t["is_link"]
        assert t["reloaded"].keys() == t["good"].keys()
        for key in t["good"]:
            assert torch.equal(t["reloaded"][key], t["good"][key]), key


def test_dcp_refuses_another_config_before_touching_anything(runs):
    for r in runs["fsdp"]:
        assert "another model or AIMConfig" in r["wrong_config_error"]
        assert r["wrong_config_untouched"]


def test_fsdp2_shards_mixed_with_plain_parameters_are_refused(runs):
    for r in runs["fsdp_bad"]:
        msg = r["mixed_error"]
        assert msg.startswith("ValueError: attach: parameter 'vision.1.weight' is a plain tensor "
                              "while 'vision.0.weight' is sharded (DTensor)"), msg
        assert r["mixed_untouched"] and not r["mixed_attached"]


def test_dcp_refuses_another_model_before_touching_anything(runs):
    for r in runs["fsdp_bad"]:
        msg = r["other_model_error"]
        assert msg.startswith("ValueError: load: the checkpoint was saved from another model or "
                              "AIMConfig"), msg
        assert r["other_model_untouched"] and r["other_model_steps"] == (0, 0)


def test_global_thresholds_c_is_zero_where_n_over_the_sum_overflows():
    """DESIGN.md 2 in the FSDP2 path: a group whose Omega sums to ~1e-44 gets c_g = 0, not
    n / sum = inf (one process: the all-reduce is the identity)."""
    from aim_kernels import sharding

    class OneProcess:
        device = torch.device("cpu")

        @staticmethod
        def sum(t):
            return t.clone()

    tiny = torch.full((7,), 1.401298464324817e-45)
    ok = torch.full((2,), 1e-37)
    c, t = sharding.global_thresholds(OneProcess(), [[tiny[:3], tiny[3:]], [ok]], [0.0, 0.5],
                                      normalize=True)
    assert c == [0.0, float(torch.tensor(1e37))], c
    assert t == [float("inf"), float(torch.tensor(1e-37))]
@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_masks_hold_under_adamw(runs, kind):
    """DESIGN.md 2.4 through FSDP2 shards and DDP: after every AdamW step (weight decay
    0.01, one optimiser across tasks) each masked element equals its anchor, bitwise."""
    results = [r[kind] for r in runs["holds"]]
    assert all(r["off"] == 0 for r in results), results
    assert sum(r["held"] for r in results) > 0 and all(r["moved"] > 0 for r in results)
    if kind == "fsdp":                 # each shard held some of the masked elements
        assert all(r["held"] > 0 for r in results), results
    else:
        assert all(r["ddp_attached_inner"] for r in runs["holds"])
