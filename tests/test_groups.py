"""Group auto-detection on real transformers layouts (tiny configs), PEFT wrapping,
frozen parts, and the errors of group assignment."""
from __future__ import annotations

import re
from contextlib import contextmanager

import pytest
import torch

import aim_kernels as ak
from aim_kernels.groups import detect_layout

from .hf_models import BUILDERS, EXPECTED


@contextmanager
def attached(model, config):
    """The model's AIMState for the ``with`` block; detached after it, pass or fail."""
    state = ak.attach(model, config)
    try:
        yield state
    finally:
        ak.detach(model)


def _trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _check_partition(state, model):
    """Every trainable parameter sits in exactly one group; frozen ones in none."""
    grouped = [n for names in state.groups.values() for n in names]
    assert sorted(grouped) == sorted(_trainable(model))
    assert len(grouped) == len(set(grouped))
    assert grouped == state.names


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def built(request):
    return request.param, BUILDERS[request.param]()


def test_layout_detected_and_roles_land_right(built):
    key, model = built
    layout, probes = EXPECTED[key]
    assert detect_layout(model).name == layout
    with attached(model, ak.preset("aim")) as state:
        assert list(state.groups) == ["vision", "projector", "language"]
        _check_partition(state, model)
        for role, probe in probes.items():
            hits = [n for n in state.names if probe in n]
            assert hits, f"{key}: no parameter named like {probe!r}"
            for n in hits:
                assert n in state.groups[role], f"{key}: {n} should be in {role}"


@pytest.mark.parametrize("key", ["qwen2-vl", "qwen2.5-vl"])
def test_qwen_merger_is_the_projector_not_vision(key):
    model = BUILDERS[key]()
    with attached(model, ak.preset("aim")) as state:
        assert state.groups["projector"]
        assert all(".visual.merger." in "." + n for n in state.groups["projector"])
        assert not any("merger" in n for n in state.groups["vision"])
        assert all("visual." in n for n in state.groups["vision"])


@pytest.mark.parametrize("key", ["blip-2", "instructblip"])
def test_blip_projector_holds_qformer_queries_and_projection(key):
    model = BUILDERS[key]()
    with attached(model, ak.preset("aim")) as state:
        proj = state.groups["projector"]
        assert "query_tokens" in proj
        assert any(n.startswith("qformer.") for n in proj)
        assert any(n.startswith("language_projection.") for n in proj)
        assert all(re.match(r"(qformer\.|query_tokens$|language_projection\.)", n) for n in proj)


def test_frozen_vision_tower_gives_an_empty_group_and_steps():
    model = BUILDERS["llava"]()
    for name, p in model.named_parameters():
        if "vision_tower" in name:
            p.requires_grad_(False)
    with attached(model, ak.preset("aim")) as state:
        assert state.groups["vision"] == []
        _check_partition(state, model)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.ones_like(p)
        stats = ak.masked_step(model).as_dict()
        assert stats["vision"]["grad_sq"] == 0.0
        assert stats["projector"]["grad_sq"] > 0
        ak.consolidate(model)


@pytest.mark.parametrize("key", ["llava", "qwen2-vl", "blip-2"])
def test_peft_lora_wrapped_model(key):
    peft = pytest.importorskip("peft")
    model = BUILDERS[key]()
    layout, _ = EXPECTED[key]
    projector = {"llava": ["multi_modal_projector"], "qwen2-vl": ["merger"],
                 "blip-2": ["language_projection"]}[key]
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                          modules_to_save=projector)
    wrapped = peft.get_peft_model(model, cfg)
    names = _trainable(wrapped)
    assert all(n.startswith("base_model.model.") for n in names)
    assert detect_layout(wrapped).name == layout
    with attached(wrapped, ak.preset("aim")) as state:
        _check_partition(state, wrapped)
        lora = [n for n in names if "lora_" in n]
        assert lora and set(lora) <= set(state.groups["language"])
        assert state.groups["projector"]
        assert all("modules_to_save" in n for n in state.groups["projector"])
        assert state.groups["vision"] == []           # PEFT freezes the rest
        for p in wrapped.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)
        ak.masked_step(wrapped)


def test_unclaimed_trainable_parameter_is_named():
    model = BUILDERS["generic"]()
    model.stray = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="'stray'"):
        ak.attach(model, ak.preset("aim"))
    groups = {"a": ak.GroupConfig(r"image_encoder\."), "b": ak.GroupConfig(r"connector\.")}
    with pytest.raises(ValueError, match=r"text_decoder\.0\.weight"):
        ak.attach(BUILDERS["generic"](), ak.AIMConfig(groups=groups))


def test_user_pattern_matching_nothing_is_named():
    groups = {"all": ak.GroupConfig(r"."), "ghost": ak.GroupConfig(r"^no_such_module\.")}
    with pytest.raises(ValueError, match="group 'ghost'"):
        ak.attach(BUILDERS["generic"](), ak.AIMConfig(groups=groups))


def test_user_pattern_matching_only_frozen_parameters_is_kept_empty():
    model = BUILDERS["generic"]()
    model.image_encoder.requires_grad_(False)
    groups = {"vision": ak.GroupConfig(r"image_encoder\."), "rest": ak.GroupConfig(r".")}
    with attached(model, ak.AIMConfig(groups=groups)) as state:
        assert state.groups["vision"] == []
        _check_partition(state, model)


def test_first_matching_group_wins():
    groups = {"first": ak.GroupConfig(r"connector\."), "all": ak.GroupConfig(r".")}
    model = BUILDERS["generic"]()
    with attached(model, ak.AIMConfig(groups=groups)) as state:
        assert state.groups["first"] == ["connector.weight", "connector.bias"]


def test_unknown_layout_asks_for_explicit_groups():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="could not recognise"):
        ak.attach(model, ak.preset("aim"))
