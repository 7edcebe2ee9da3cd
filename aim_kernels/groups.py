"""Parameter -> group assignment, and auto-detection of HF VLM layouts.

A parameter joins the first group whose regex ``re.search``-es its name. Patterns
anchor on a dot or the start, so PEFT's ``base_model.model.`` prefix and its
``lora_A``/``modules_to_save`` infixes need nothing special.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .config import ROLES, AIMConfig, GroupConfig

_S = r"(?:^|\.)"   # a name component starts here


@dataclass(frozen=True)
class Layout:
    name: str
    patterns: dict[str, str]   # role -> regex

    def matches(self, names: list[str]) -> bool:
        """The layout is recognised when its vision and projector parts both exist."""
        return all(any(re.search(self.patterns[r], n) for n in names) for r in ("vision", "projector"))


LAYOUTS = (
    # HF LLaVA (also LLaVA-NeXT, LLaVA-OneVision): vision_tower / multi_modal_projector / LM.
    Layout("llava", {
        "vision": _S + r"vision_tower\.",
        "projector": _S + r"multi_modal_projector\.",
        "language": _S + r"(?:language_model|lm_head)(?:\.|$)",
    }),
    # Qwen2-VL, Qwen2.5-VL: `visual` minus its `merger` / `visual.merger` / decoder + lm_head.
    Layout("qwen2-vl", {
        "vision": _S + r"visual\.(?!merger\.)",
        "projector": _S + r"visual\.merger\.",
        "language": _S + r"(?:language_model|lm_head)(?:\.|$)|^(?:base_model\.model\.)?model\."
                    r"(?:embed_tokens|layers|norm)\.",
    }),
    # BLIP-2, InstructBLIP: vision_model / qformer + query_tokens + language_projection / LM.
    Layout("blip-2", {
        "vision": _S + r"vision_model\.",
        "projector": _S + r"(?:qformer\.|query_tokens$|language_projection\.)",
        "language": _S + r"(?:language_model|lm_head)(?:\.|$)",
    }),
    # Anything else that names its parts the usual way.
    Layout("generic", {
        "vision": r"(?i)(?:vision|visual|image_encoder|img_encoder|vit)",
        "projector": r"(?i)(?:projector|projection|connector|adapter|resampler|merger|bridge)",
        "language": r"(?i)(?:language|text|llm|decoder|lm_head|embed_tokens|transformer)",
    }),
)


def detect_layout(model: torch.nn.Module) -> Layout:
    """The first known layout whose vision and projector parts appear in ``model``."""
    names = [n for n, _ in model.named_parameters()]
    for layout in LAYOUTS:
        if layout.matches(names):
            return layout
    raise ValueError(
        "groups=None: could not recognise the model's vision / projector / language parts "
        f"(known layouts: {[l.name for l in LAYOUTS]}); pass AIMConfig(groups={{name: "
        "GroupConfig(pattern=...)}}) explicitly")


def resolve_groups(model: torch.nn.Module, cfg: AIMConfig) -> dict[str, GroupConfig]:
    """The groups the state will manage: ``cfg.groups``, or the detected layout's roles."""
    if cfg.groups is not None:
        return dict(cfg.groups)
    layout = detect_layout(model)
    return {role: GroupConfig(layout.patterns[role], v.mask_ratio, v.keep, v.lam)
            for role in ROLES for v in (cfg.role_values[role],)}


def assign(model: torch.nn.Module, groups: dict[str, GroupConfig], *,
           user_groups: bool) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """``{group: [(name, param)]}`` of the trainable parameters, in model order.

    Raises if a trainable parameter joins no group, or (for user groups) a pattern
    matches no parameter of the model at all. A group whose parameters are all
    frozen is kept, empty (e.g. the frozen vision tower of LLaVA fine-tuning).
    """
    compiled = {name: re.compile(g.pattern) for name, g in groups.items()}
    out: dict[str, list] = {name: [] for name in groups}
    seen = {name: False for name in groups}
    unclaimed = []
    for pname, param in model.named_parameters():
        hit = next((g for g, rx in compiled.items() if rx.search(pname)), None)
        for g, rx in compiled.items():
            seen[g] = seen[g] or bool(rx.search(pname))
        if not param.requires_grad:
            continue
        if hit is None:
            unclaimed.append(pname)
        else:
            out[hit].append((pname, param))
    if unclaimed:
        more = f" (and {len(unclaimed) - 5} more)" if len(unclaimed) > 5 else ""
        raise ValueError(f"trainable parameter {unclaimed[0]!r} matches no group pattern; "
                         f"unclaimed: {unclaimed[:5]}{more}. Add a group for it or freeze it.")
    if user_groups:
        for g, hit in seen.items():
            if not hit:
                raise ValueError(f"group {g!r}: pattern {groups[g].pattern!r} matches no "
                                 "parameter of the model")
    return out
