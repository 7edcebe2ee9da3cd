"""Visual warm-up for task data read from files: no task answer is used.

The generated benchmark pre-trains on its scenes' labelled attributes
(:func:`model.pretrain`); real task data has no such labels, and a LLaVA built from a
config cannot learn its tasks from a random vision tower (every task stays at chance,
even joint training). So, before the first task, the vision tower learns from the
training images alone: each patch's feature must reconstruct that patch's pixels and say which patch it is (position stays in the features). With a
manifest ``"pretrain"`` list of caption records (LLaVA's stage 1), the whole model also
learns to generate each image's caption. The result is cached per data hash and seed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _patch_targets(pix: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, P, 3 * patch^2]: each patch's pixels, row-major patches."""
    p = patch
    t = pix.unfold(2, p, p).unfold(3, p, p)               # [B, 3, gy, gx, p, p]
    return t.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)


def warm_up(model, images: torch.Tensor, questions: torch.Tensor, steps: int, batch: int, lr: float,
            seed: int, captions=None, progress: bool = False) -> dict:
    """Self-supervised warm-up on uint8 ``images`` and their ``questions`` (token ids; no
    answers), and ``captions`` (a Split of caption ids with their lengths as ``answers``).
    Returns the final reconstruction errors and the caption next-token accuracy."""
    from .model import base, inputs, vision_tower
    vt = vision_tower(model)
    vc = base(model).config.vision_config
    h, patch = vc.hidden_size, vc.patch_size
    n_patch = (vc.image_size // patch) ** 2
    recon = torch.nn.Linear(h, 3 * patch ** 2 + 3)
    where = torch.nn.Linear(h, n_patch)
    thumb = torch.nn.Linear(base(model).config.text_config.hidden_size, 3 * 8 * 8)
    params = [p for m in (model, recon, where, thumb) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="visual warm-up (no answers)", leave=False)
    err = rerr = cap_acc = 0.0
    for step in it:
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        pix = images[idx].float() / 255.0
        if pix.shape[-1] != vc.image_size:
            pix = F.interpolate(pix, size=(vc.image_size,) * 2, mode="bilinear", align_corners=False)
        feats = vt(pixel_values=pix).last_hidden_state[:, -n_patch:]
        # each patch's mean colour and its detail (the image minus its local 5x5 mean), the
        # detail scale-free: plain pixel reconstruction spends a tiny tower on the background
        # gradients of photo-like images and leaves objects unreadable (every task at chance)
        detail = _patch_targets(pix - F.avg_pool2d(pix, 5, 1, 2, count_include_pad=False), patch)
        mean = _patch_targets(pix, patch).unflatten(-1, (3, -1)).mean(-1)
        out = recon(feats)
        mse = F.mse_loss(out[..., :3], mean) + F.mse_loss(out[..., 3:], detail) / (detail.var() + 1e-4)
        pos = F.cross_entropy(where(feats).flatten(0, 1), torch.arange(n_patch).repeat(batch))
        _, ids = inputs(model, images[idx], questions[idx])
        last = model(input_ids=ids, pixel_values=pix, output_hidden_states=True).hidden_states[-1][:, -1]
        read = F.mse_loss(thumb(last), F.adaptive_avg_pool2d(pix, 8).flatten(1))
        # VICReg's variance and mean terms: centred, unit-spread features; without them a large
        # constant part swamps what differs between images, and the projector learns slowly
        flat = feats.flatten(0, 1)
        spread = F.relu(1.0 - flat.std(0)).mean() + flat.mean(0).pow(2).mean()
        loss = 10.0 * (mse + read) + pos + spread
        if captions is not None:
            cidx = torch.randint(0, len(captions), (batch,), generator=gen)
            cap, lens = captions.questions[cidx], captions.answers[cidx]
            cpix, ids = inputs(model, captions.images[cidx], cap)
            start = ids.shape[1] - cap.shape[1]
            logits = model(input_ids=ids, pixel_values=cpix).logits[:, start - 1:-1]
            mask = torch.arange(cap.shape[1]).view(1, -1) < lens.view(-1, 1)
            loss = loss + F.cross_entropy(logits[mask], cap[mask])
            right = (logits[mask].argmax(-1) == cap[mask]).float().mean().item()
            cap_acc = 0.9 * cap_acc + 0.1 * right if step else right
        opt.zero_grad()
        loss.backward()
        opt.step()
        err = 0.9 * err + 0.1 * mse.item() if step else mse.item()
        rerr = 0.9 * rerr + 0.1 * read.item() if step else read.item()
        if progress:
            it.set_postfix(recon=f"{err:.4f}", read=f"{rerr:.4f}", refresh=False)
    out = {"warmup_recon_mse": round(err, 5), "warmup_read_mse": round(rerr, 5)}
    if captions is not None:
        out["warmup_caption_acc"] = round(cap_acc, 4)
    return out
