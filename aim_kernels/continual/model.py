"""The benchmark's model: a tiny ``LlavaForConditionalGeneration`` (random weights, from a
config) or any local HF LLaVA checkpoint; visual pre-training cached per seed; the
vision tower frozen afterwards, as in LLaVA fine-tuning.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import data


@dataclass(frozen=True)
class ModelSpec:
    hidden: int = 64
    layers: int = 2            # language decoder layers
    vision_layers: int = 2
    heads: int = 4
    patch: int = 16            # 32x32 images -> 4 image tokens, one per quadrant
    pretrain_steps: int = 400  # visual pre-training on all concepts
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    intermediate: int = 0      # decoder MLP width (0: 2 x hidden)
    lora: int = 0              # > 0: PEFT LoRA of this rank on the decoder, projector trained fully
    # with lora: also train the word embeddings and the output head fully (what PEFT's
    # modules_to_save does for new tokens): the benchmark's question words and most answer
    # words are never trained before the tasks, so frozen they stay random
    lora_vocab: bool = False
    name: str = "custom"


# ``--model``: tiny = the benchmark's model (decoder ~11x the projector); asym widens and
# deepens the decoder only, to >= 50x the projector's trainable parameters (LLaVA-1.5-7B:
# ~350x), the asymmetry the seeds' claim is about; small is in between.
MODELS = {
    "tiny": ModelSpec(name="tiny"),
    "small": ModelSpec(layers=3, intermediate=256, name="small"),
    "asym": ModelSpec(layers=4, intermediate=512, name="asym"),
}


def model_spec(name: str, lora: int = 0, **changes) -> ModelSpec:
    """A ``--model`` preset with ``--lora`` and other fields replaced."""
    import dataclasses
    if name not in MODELS:
        raise ValueError(f"--model {name!r}: choose from {tuple(MODELS)}")
    if lora < 0:
        raise ValueError(f"--lora must be >= 0, got {lora}")
    if changes.get("lora_vocab") and not lora:
        raise ValueError("--lora-vocab needs --lora R")
    return dataclasses.replace(MODELS[name], lora=lora, **changes)


def build_llava(spec: ModelSpec, seed: int, vocab_size: int = data.VOCAB_SIZE, bos: int = 1):
    """A LLaVA from a config; the image token is the last id of ``vocab_size``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    h = spec.hidden
    vision = CLIPVisionConfig(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=spec.vision_layers,
                              num_attention_heads=spec.heads, image_size=data.IMAGE_SIZE,
                              patch_size=spec.patch)
    text = LlamaConfig(hidden_size=h, intermediate_size=spec.intermediate or 2 * h,
                       num_hidden_layers=spec.layers,
                       num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                       vocab_size=vocab_size, max_position_embeddings=128, pad_token_id=0,
                       bos_token_id=bos, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab_size - 1,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    return LlavaForConditionalGeneration(config)


def base(model):
    """The LLaVA under a PEFT wrapper (PeftModel forwards ``.model`` to the LLaVA itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def add_lora(model, rank: int, vocab: bool = False):
    """PEFT LoRA of ``rank`` on every linear layer of the decoder; the projector stays fully
    trainable (PEFT freezes everything else); the vision tower stays frozen. ``vocab``: the
    word embeddings and the output head are trained fully too."""
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                     target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    model = get_peft_model(model, cfg)
    for n, p in model.named_parameters():
        if "multi_modal_projector" in n or (vocab and ("lm_head" in n or "embed_tokens" in n)):
            p.requires_grad_(True)
    return model


def param_counts(model) -> dict:
    """Parameters per part (all / trainable) and the decoder / projector-trainable ratio."""
    out = {k: {"all": 0, "trainable": 0} for k in ("vision", "projector", "decoder")}
    for n, p in model.named_parameters():
        k = ("vision" if "vision_tower" in n else "projector" if "multi_modal_projector" in n
             else "decoder")
        out[k]["all"] += p.numel()
        out[k]["trainable"] += p.numel() if p.requires_grad else 0
    proj = max(out["projector"]["trainable"], 1)
    out["decoder_over_projector"] = round(out["decoder"]["all"] / proj, 1)
    out["decoder_trainable_over_projector"] = round(out["decoder"]["trainable"] / proj, 2)
    return out


def load_checkpoint(path: str | os.PathLike):
    """A local HF LLaVA checkpoint (``save_pretrained`` folder). Its text vocabulary must
    hold the benchmark's words (ids < ``data.IMAGE_TOKEN``) and its own image token."""
    from transformers import LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
    vocab = model.config.text_config.vocab_size
    if vocab < data.IMAGE_TOKEN:
        raise ValueError(f"checkpoint {path}: text vocab_size {vocab} < {data.IMAGE_TOKEN} "
                         "benchmark words")
    if data.IMAGE_TOKEN != model.config.image_token_index and model.config.image_token_index < data.IMAGE_TOKEN:
        raise ValueError(f"checkpoint {path}: image_token_index {model.config.image_token_index} "
                         "collides with a benchmark word id")
    return model


def geometry(model) -> dict:
    """How to feed the benchmark to ``model``: image token, patch count, image size."""
    vc = model.config.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    if model.config.vision_feature_select_strategy == "full":
        patches += 1
    return {"image_token": model.config.image_token_index, "num_patches": patches,
            "image_size": vc.image_size, "bos": model.config.text_config.bos_token_id}


def inputs(model, images, questions):
    g = geometry(model)
    return data.to_inputs(images, questions, **g)


def _quadrant_features(model, pix):
    """Vision-tower patch features pooled per quadrant: [B, 4, H]."""
    out = vision_tower(model)(pixel_values=pix).last_hidden_state[:, 1:]
    b, p, h = out.shape
    side = int(round(p ** 0.5))
    grid = out.view(b, side, side, h)
    half = side // 2
    return torch.stack([grid[:, y * half:(y + 1) * half, x * half:(x + 1) * half].mean((1, 2))
                        for y in range(2) for x in range(2)], 1)


def vision_tower(model):
    model = base(model)
    return model.model.vision_tower if hasattr(model.model, "vision_tower") else model.vision_tower


def pretrain(model, spec: ModelSpec, seed: int, progress: bool = False) -> dict:
    """Visual pre-training on all concepts: the vision tower with per-quadrant attribute
    heads, and the whole model on "describe <quadrant> <attribute> ?" questions."""
    g = geometry(model)
    h = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleList([torch.nn.Linear(h, len(data.COLOURS) + 1),
                                 torch.nn.Linear(h, len(data.SHAPES) + 1),
                                 torch.nn.Linear(h, len(data.SIZES) + 1),
                                 torch.nn.Linear(h, 4)])   # the quadrant: keeps position in the features
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=spec.pretrain_lr, weight_decay=0.0)
    images, targets, desc = data.pretrain_scenes(spec.pretrain_steps * spec.pretrain_batch // 2, seed)
    gen = torch.Generator().manual_seed(seed)
    it = range(spec.pretrain_steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="visual pre-training", leave=False)
    acc = qa = 0.0
    for step in it:
        idx = torch.randint(0, len(images), (spec.pretrain_batch,), generator=gen)
        pix, ids = inputs(model, images[idx], desc.questions[idx])
        feats = _quadrant_features(model, pix)
        t = torch.cat([targets[idx], torch.arange(4).view(1, 4, 1).expand(len(idx), 4, 1)], -1)
        loss, correct = 0.0, 0.0
        for k, head in enumerate(heads):
            logits = head(feats)
            loss = loss + torch.nn.functional.cross_entropy(logits.flatten(0, 1), t[..., k].flatten())
            correct += (logits.argmax(-1) == t[..., k]).float().mean().item() / len(heads)
        logits = model(input_ids=ids, pixel_values=pix).logits[:, -1]
        loss = loss + torch.nn.functional.cross_entropy(logits, desc.answers[idx])
        right = (logits.argmax(-1) == desc.answers[idx]).float().mean().item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc = 0.9 * acc + 0.1 * correct if step else correct
        qa = 0.9 * qa + 0.1 * right if step else right
        if progress:
            it.set_postfix(loss=f"{loss.item():.3f}", attr=f"{100 * acc:.0f}%", describe=f"{100 * qa:.0f}%", refresh=False)
    return {"attr_acc": acc, "describe_acc": qa}


def default_cache() -> Path:
    return Path(os.environ.get("AIM_KERNELS_CACHE", Path.home() / ".cache" / "aim_kernels")) / "continual"


def make_model(spec: ModelSpec = ModelSpec(), seed: int = 0, checkpoint: str | None = None,
               cache: str | os.PathLike | None = None, progress: bool = False, bench=None):
    """The model a method starts from: built (or loaded), visually pre-trained (generated
    benchmark) or warmed up without answers (task data from files, ``bench`` a
    :class:`taskdata.TaskSet`), cached per seed (and data hash), vision tower frozen,
    LoRA added when ``spec.lora``. Returns ``(model, info)``."""
    from .taskdata import TaskSet
    on_files = isinstance(bench, TaskSet)
    arch = {k: v for k, v in asdict(spec).items() if k not in ("lora", "lora_vocab", "name")}
    if checkpoint:
        model = load_checkpoint(checkpoint)
        if on_files and model.config.text_config.vocab_size < bench.vocab_size:
            raise ValueError(f"checkpoint {checkpoint}: text vocab_size {model.config.text_config.vocab_size}"
                             f" < the data's {bench.vocab_size} (use --tokenizer with the checkpoint's own)")
        key_src = {"checkpoint": str(Path(checkpoint).resolve()), "spec": arch, "seed": seed}
    elif on_files:
        model = build_llava(spec, seed, bench.vocab_size, bench.bos)
        key_src = {"spec": arch, "seed": seed, "data": bench.data_hash, "warmup": 6}
    else:
        model = build_llava(spec, seed)
        key_src = {"spec": arch, "seed": seed, "data": 3}
    if on_files:
        key_src["data"] = bench.data_hash
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(cache) if cache else default_cache()
    path = cache_dir / f"pretrained-{key}.pt"
    info = {"cache": str(path), "cached": path.exists()}
    vt = vision_tower(model)
    if spec.pretrain_steps > 0:
        if path.exists():
            model.load_state_dict(torch.load(path, weights_only=True))
        else:
            torch.manual_seed(seed + 1)
            if on_files:
                from .warmup import warm_up
                info.update(warm_up(model, bench.pretrain_images, spec.pretrain_steps, spec.pretrain_batch,
                                    spec.pretrain_lr, seed, bench.captions, progress,
                                    questions=bench.pretrain_questions))
            else:
                info.update(pretrain(model, spec, seed, progress))
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save(model.state_dict(), tmp)
                os.replace(tmp, path)
            except OSError:
                pass
    vt.requires_grad_(False)
    if spec.lora:
        model = add_lora(model, spec.lora, spec.lora_vocab)
    torch.manual_seed(seed + 2)
    return model, info
