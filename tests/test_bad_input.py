"""Bad input to the model-level API: a clear exception naming the culprit, and
nothing half-updated (parameters, grads and the whole AIM state are compared
bit for bit before and after)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import aim_kernels as ak
from tests.vlm_toy import ToyVLM, assert_same, backward, snapshot, toy_groups


@pytest.fixture
def trained():
    """A toy model with a non-trivial state (Ω > 0, masks set, drift) and fresh grads."""
    model = ToyVLM(seed=2)
    state = ak.attach(model, ak.AIMConfig(groups=toy_groups()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in range(3):
        opt.zero_grad(set_to_none=False)
        backward(model, seed)
        ak.masked_step(model)
        opt.step()
    ak.consolidate(model)
    opt.zero_grad(set_to_none=False)
    backward(model, 9)
    return model, state


def grads_of(model):
    return [p.grad.clone() for p in model.parameters()]


def _wrong_count(model, state):
    return ak.masked_step(model, grads_of(model)[:-1])


def _wrong_shape(model, state):
    grads = grads_of(model)
    grads[2] = grads[2].reshape(-1)
    return ak.masked_step(model, grads)


def _wrong_dtype(model, state):
    grads = grads_of(model)
    grads[3] = grads[3].double()
    return ak.masked_step(model, grads)


def _wrong_device(model, state):
    grads = grads_of(model)
    grads[0] = torch.empty_like(grads[0], device="meta")
    return ak.masked_step(model, grads)


def _sparse(model, state):
    grads = grads_of(model)
    grads[0] = grads[0].to_sparse()
    return ak.masked_step(model, grads)


def _sparse_dot_grad(model, state):
    p = model.vision[0].weight
    p.grad = p.grad.detach().clone().to_sparse()
    return ak.masked_step(model)


def _none_in_sequence(model, state):
    grads = grads_of(model)
    grads[3] = None
    return ak.masked_step(model, grads)


def _dict_unknown_key(model, state):
    grads = dict(zip(state.names, grads_of(model)))
    grads["not.a.param"] = grads[state.names[0]]
    return ak.masked_step(model, grads)


def _dict_missing_key(model, state):
    grads = dict(zip(state.names, grads_of(model)))
    del grads[state.names[-1]]
    return ak.masked_step(model, grads)


def _not_a_collection(model, state):
    return ak.masked_step(model, 3.0)


def _param_moved(model, state):
    model.language[2].bias.data = model.language[2].bias.data.clone()
    return ak.masked_step(model)


def _consolidate_param_moved(model, state):
    model.language[2].bias.data = model.language[2].bias.data.clone()
    return ak.consolidate(model)


def _attach_twice(model, state):
    return ak.attach(model, ak.AIMConfig(groups=toy_groups()))


def _load_from_another_model(model, state):
    other = ToyVLM(layers=3)
    return state.load_state_dict(ak.attach(other, ak.AIMConfig(groups=toy_groups())).state_dict())


def _load_from_another_config(model, state):
    other = ToyVLM(seed=2)
    cfg = ak.AIMConfig(groups=toy_groups(lam=3.0))
    return state.load_state_dict(ak.attach(other, cfg).state_dict())


def _load_with_a_missing_key(model, state):
    sd = dict(state.state_dict())
    del sd["bucket0.fisher"]
    return state.load_state_dict(sd)


def _load_with_a_wrong_shape(model, state):
    sd = {k: v.clone() for k, v in state.state_dict().items()}
    sd["bucket0.fisher"] = torch.ones(3)
    sd["bucket0.anchor"].add_(1.0)           # would be copied first, if checks came late
    return state.load_state_dict(sd)


CASES = {
    # name: (call, exception, words the message must contain)
    "grads of the wrong count": (_wrong_count, ValueError, ["grads has", "entries"]),
    "a grad of the wrong shape": (_wrong_shape, ValueError, ["vision.1.weight", "shape"]),
    "a grad of the wrong dtype": (_wrong_dtype, TypeError, ["vision.1.bias", "dtype"]),
    "a grad on the wrong device": (_wrong_device, ValueError, ["vision.0.weight", "meta"]),
    "a sparse grad": (_sparse, ValueError, ["vision.0.weight", "sparse"]),
    "a sparse .grad": (_sparse_dot_grad, ValueError, ["vision.0.weight", "sparse"]),
    "None in a grads sequence": (_none_in_sequence, TypeError, ["vision.1.bias", "tensor"]),
    "a grads dict with an unknown key": (_dict_unknown_key, ValueError, ["not.a.param"]),
    "a grads dict missing a key": (_dict_missing_key, ValueError, ["language.2.bias"]),
    "grads of an unsupported type": (_not_a_collection, TypeError, ["grads must be"]),
    "a parameter moved after attach": (_param_moved, RuntimeError, ["language.2.bias", "attach"]),
    "consolidate after a parameter moved": (_consolidate_param_moved, RuntimeError, ["language.2.bias"]),
    "attach twice": (_attach_twice, RuntimeError, ["already", "detach"]),
    "load_state_dict from another model": (_load_from_another_model, ValueError, ["another model"]),
    "load_state_dict from another config": (_load_from_another_config, ValueError, ["another AIMConfig"]),
    "load_state_dict missing a key": (_load_with_a_missing_key, ValueError, ["bucket0.fisher"]),
    "load_state_dict with a wrong shape": (_load_with_a_wrong_shape, ValueError, ["bucket0.fisher"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_and_touches_nothing(trained, case):
    model, state = trained
    call, exc, words = CASES[case]
    before = snapshot(model, state)
    steps = (state.steps, state.steps_since_consolidation)
    with pytest.raises(exc) as info:
        call(model, state)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
    after = snapshot(model, state)
    if case in ("a parameter moved after attach", "consolidate after a parameter moved"):
        # the user replaced the tensor; everything else must be untouched
        key = "param:language.2.bias"
        assert torch.equal(before.pop(key), after.pop(key))
    if case == "a sparse .grad":
        before.pop("grad:vision.0.weight"), after.pop("grad:vision.0.weight")
    assert_same(before, after)
    assert (state.steps, state.steps_since_consolidation) == steps


def assert_same_bits(a: dict, b: dict) -> None:
    """Every tensor of two snapshots equal bit for bit (-0.0 is not +0.0, NaN is itself)."""
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        assert x.dtype == y.dtype and torch.equal(x.view(as_int), y.view(as_int)), f"{key} changed"


@pytest.mark.parametrize("op", ["masked_step", "consolidate", "detach"])
def test_calls_before_attach_say_so(op):
    with pytest.raises(RuntimeError, match=f"{op}: no AIMState is attached.*ak.attach"):
        getattr(ak, op)(ToyVLM())


CONFIG_CASES = {
    "mask_ratio = 1": (dict(groups={"all": ak.GroupConfig(".", mask_ratio=1.0)}), "mask_ratio"),
    "mask_ratio < 0": (dict(groups={"all": ak.GroupConfig(".", mask_ratio=-0.1)}), "mask_ratio"),
    "keep > 1": (dict(groups={"all": ak.GroupConfig(".", keep=1.5)}), "keep"),
    "keep < 0": (dict(groups={"all": ak.GroupConfig(".", keep=-0.5)}), "keep"),
    "lam < 0": (dict(groups={"all": ak.GroupConfig(".", lam=-1.0)}), "lam"),
    "lam = nan": (dict(groups={"all": ak.GroupConfig(".", lam=float("nan"))}), "lam"),
    "a bad regex": (dict(groups={"all": ak.GroupConfig("(")}), "pattern"),
    "beta = 1": (dict(beta=1.0), "beta"),
    "accumulate": (dict(accumulate="mean"), "accumulate"),
    "importance": (dict(importance="grad"), "importance"),
    "merge": (dict(merge="avg"), "merge"),
    "decay < 0": (dict(decay=-0.5), "decay"),
    "decay = nan": (dict(decay=float("nan")), "decay"),
    "merge_alpha < 0": (dict(merge="linear", merge_alpha=-1.0), "merge_alpha"),
    "merge_alpha = nan": (dict(merge="fisher", merge_alpha=float("nan")), "merge_alpha"),
    "align_every < 0": (dict(align_every=-1), "align_every"),
    "align_ratio > 1": (dict(align_ratio=1.5), "align_ratio"),
    "align_mode": (dict(align_mode="flip"), "align_mode"),
    "state_dtype": (dict(state_dtype=torch.int32), "state_dtype"),
    "backend": (dict(backend="opencl"), "backend"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_is_refused_at_attach_before_anything_moves(case):
    kwargs, word = CONFIG_CASES[case]
    model = ToyVLM()
    backward(model, 0)
    ptrs = [p.data_ptr() for p in model.parameters()]
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=rf"AIMConfig\S*\.{word} |{word}.* regex"):
        ak.attach(model, ak.AIMConfig(**kwargs))
    assert ptrs == [p.data_ptr() for p in model.parameters()]     # not re-homed
    assert_same_bits(before, snapshot(model))                     # nor written to
    ak.attach(model, ak.AIMConfig(groups=toy_groups()))   # and it was not half-attached


def test_a_preset_override_is_validated():
    with pytest.raises(ValueError, match="beta"):
        ak.preset("aim", beta=2.0)
    cfg = ak.preset("aim")
    cfg.role_values["projector"] = dataclasses.replace(cfg.role_values["projector"], mask_ratio=1.0)
    with pytest.raises(ValueError, match="projector.*mask_ratio"):
        ak.attach(ToyVLM(), cfg)


def test_a_group_pattern_that_matches_nothing_names_the_group():
    groups = dict(toy_groups(), audio=ak.GroupConfig(r"^audio\."))
    with pytest.raises(ValueError, match="group 'audio'.*matches no parameter"):
        ak.attach(ToyVLM(), ak.AIMConfig(groups=groups))


def test_an_unclaimed_trainable_parameter_is_named():
    groups = {"vision": ak.GroupConfig(r"^vision\."), "language": ak.GroupConfig(r"^language\.")}
    with pytest.raises(ValueError, match="projector.weight"):
        ak.attach(ToyVLM(), ak.AIMConfig(groups=groups))


def test_a_frozen_unclaimed_parameter_is_fine():
    model = ToyVLM()
    model.projector.requires_grad_(False)
    groups = {"vision": ak.GroupConfig(r"^vision\."), "language": ak.GroupConfig(r"^language\.")}
    state = ak.attach(model, ak.AIMConfig(groups=groups))
    assert not any(n.startswith("projector") for n in state.names)


def test_a_model_with_nothing_trainable_is_refused():
    model = ToyVLM().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        ak.attach(model, ak.AIMConfig(groups={"all": ak.GroupConfig(".")}))
