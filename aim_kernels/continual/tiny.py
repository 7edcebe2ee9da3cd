"""A tiny LLaVA with random weights and two synthetic VQA tasks, for the demo and tests.

Nothing is downloaded: the model is built from a transformers config. A task is a
stream of (image, question) -> one answer token batches; images are 32x32 RGB
with one coloured square, and each task asks about one attribute of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

VOCAB = 64
IMAGE_TOKEN = VOCAB - 1
IMAGE_SIZE = 32
PATCH = 8
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2
COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0], [1.0, 1.0, 0.1]])
QUESTION = {"colour": 3, "position": 4}          # one question token per task
ANSWER_BASE = {"colour": 10, "position": 20}      # answers are distinct vocab ids


def tiny_llava(seed: int = 0, hidden: int = 32, layers: int = 2):
    """``LlavaForConditionalGeneration`` from a tiny config, random weights, fp32."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=layers, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH)
    text = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB,
                       max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config)
    return model


@dataclass
class Batch:
    pixel_values: torch.Tensor   # [B, 3, 32, 32]
    input_ids: torch.Tensor      # [B, L]
    answers: torch.Tensor        # [B] vocab ids

    def loss(self, model) -> torch.Tensor:
        """Cross-entropy of the answer token, predicted at the last position."""
        logits = model(input_ids=self.input_ids, pixel_values=self.pixel_values).logits
        return torch.nn.functional.cross_entropy(logits[:, -1], self.answers)

    @torch.no_grad()
    def accuracy(self, model) -> float:
        logits = model(input_ids=self.input_ids, pixel_values=self.pixel_values).logits
        return (logits[:, -1].argmax(-1) == self.answers).float().mean().item()


def synthetic_batch(task: str, batch_size: int, generator: torch.Generator) -> Batch:
    """Images of one coloured square in one of four quadrants; ask its colour or position."""
    colour = torch.randint(0, len(COLOURS), (batch_size,), generator=generator)
    quadrant = torch.randint(0, 4, (batch_size,), generator=generator)
    images = 0.05 * torch.rand(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    half = IMAGE_SIZE // 2
    for i in range(batch_size):
        y, x = divmod(int(quadrant[i]), 2)
        images[i, :, y * half + 2:(y + 1) * half - 2, x * half + 2:(x + 1) * half - 2] = \
            COLOURS[colour[i]].view(3, 1, 1)
    target = colour if task == "colour" else quadrant
    ids = torch.tensor([1] + [IMAGE_TOKEN] * NUM_PATCHES + [QUESTION[task]])
    return Batch(pixel_values=images, input_ids=ids.repeat(batch_size, 1),
                 answers=ANSWER_BASE[task] + target)
