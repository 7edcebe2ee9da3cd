"""Tiny transformers VLMs built from configs (random weights, nothing downloaded).

One builder per layout ``aim_kernels.groups`` knows, each returning a model whose
parameter names are those of the real checkpoints.
"""
from __future__ import annotations

import torch

from aim_kernels.continual.tiny import tiny_llava

_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
_QWEN_TEXT = dict(_TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]})
_QWEN_VISION = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, intermediate_size=64,
                    out_hidden_size=32, patch_size=4, spatial_merge_size=2, temporal_patch_size=1)
_BLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, image_size=16, patch_size=8)
_QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, encoder_hidden_size=32, vocab_size=64)
_OPT = dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=1,
            num_attention_heads=2, vocab_size=64, max_position_embeddings=64,
            word_embed_proj_dim=32)


def llava():
    return tiny_llava(seed=0, hidden=32, layers=1)


def qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    torch.manual_seed(0)
    vision = {k: v for k, v in _QWEN_VISION.items() if k != "out_hidden_size"}  # Qwen2.5 only
    cfg = Qwen2VLConfig(text_config=_QWEN_TEXT, vision_config=vision)
    return Qwen2VLForConditionalGeneration(cfg)


def qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(text_config=_QWEN_TEXT, vision_config=_QWEN_VISION)
    return Qwen2_5_VLForConditionalGeneration(cfg)


def blip2():
    from transformers import Blip2Config, Blip2ForConditionalGeneration
    torch.manual_seed(0)
    cfg = Blip2Config(vision_config=_BLIP_VISION, qformer_config=_QFORMER, text_config=_OPT,
                      num_query_tokens=4)
    return Blip2ForConditionalGeneration(cfg)


def instructblip():
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration
    torch.manual_seed(0)
    cfg = InstructBlipConfig(vision_config=_BLIP_VISION, qformer_config=_QFORMER,
                             text_config=_OPT, num_query_tokens=4)
    return InstructBlipForConditionalGeneration(cfg)


class GenericVLM(torch.nn.Module):
    """A hand-rolled VLM naming its parts the usual way, like many research codebases."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image_encoder = torch.nn.Linear(12, 8)
        self.connector = torch.nn.Linear(8, 16)
        self.text_decoder = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))


BUILDERS = {"llava": llava, "qwen2-vl": qwen2_vl, "qwen2.5-vl": qwen2_5_vl, "blip-2": blip2,
            "instructblip": instructblip, "generic": GenericVLM}

# Which layout each builder must be recognised as, and a name per role that must land there.
EXPECTED = {
    "llava": ("llava", {"vision": "vision_tower.", "projector": "multi_modal_projector.",
                        "language": "lm_head.weight"}),
    "qwen2-vl": ("qwen2-vl", {"vision": "visual.blocks.", "projector": "visual.merger.",
                              "language": "lm_head.weight"}),
    "qwen2.5-vl": ("qwen2-vl", {"vision": "visual.patch_embed.", "projector": "visual.merger.",
                                "language": "language_model."}),
    "blip-2": ("blip-2", {"vision": "vision_model.", "projector": "query_tokens",
                          "language": "language_model."}),
    "instructblip": ("blip-2", {"vision": "vision_model.", "projector": "language_projection.",
                                "language": "language_model."}),
    "generic": ("generic", {"vision": "image_encoder.", "projector": "connector.",
                            "language": "text_decoder."}),
}
