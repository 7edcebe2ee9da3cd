"""Visual warm-up for task data read from files: no task answer is used.

The generated benchmark pre-trains on its scenes' labelled attributes
(:func:`model.pretrain`); real task data has no such labels. Before the first task, the
vision tower learns from the training images alone, as an autoencoder: each patch's
feature, through a small MLP decoder dropped afterwards, must reconstruct that patch's
detail -- the image minus its local 9x9 mean. Then, the vision tower frozen, the
projector and decoder learn to carry the image to the position answers are read from
(given an image and one of its training questions, never the answer). With a manifest
``"pretrain"`` list of caption records (LLaVA's stage 1), they also learn to generate each
image's caption. The result is cached per data hash and seed.

Why detail and not plain pixels (measured on the photo-like folder of
:func:`taskfolder.write_photo_tasks`, 5 x 400 training images, a linear probe on the
frozen patch features): plain pixels spend the code on the backgrounds' smooth gradients
(shape 50%, count 52% after 3000 steps, about the random tower's 46 / 46); detail keeps
colour and position (97-100%) and makes shape (80%), size (97%) and count (67%) readable.
The warm-up this replaced trained the whole model on a mix of pixel, patch-position and
thumbnail losses; its features collapsed (between-image spread 0.008 per dimension, from
0.255 at initialisation) and every task stayed at chance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DETAIL_POOL = 9       # the local mean removed from the target: larger than an object's edge
DETAIL_SCALE = 4.0    # detail is small (~0.05); scaled so the loss is not lost to rounding
# the decoder stages' rate: a decoder that has never read an image stays at chance at 4e-3
# (colour, 300 steps from initialisation: 25%) and learns at 1e-3 (98%)
DECODER_LR = 1e-3


def _patch_targets(pix: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, P, 3 * patch^2]: each patch's pixels, row-major patches."""
    p = patch
    t = pix.unfold(2, p, p).unfold(3, p, p)               # [B, 3, gy, gx, p, p]
    return t.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)


def detail_targets(pix: torch.Tensor, patch: int) -> torch.Tensor:
    """Each patch's detail: the image minus its local mean, scaled by ``DETAIL_SCALE``."""
    local = F.avg_pool2d(pix, DETAIL_POOL, 1, DETAIL_POOL // 2, count_include_pad=False)
    return DETAIL_SCALE * _patch_targets(pix - local, patch)


def _pixels(model, images: torch.Tensor) -> torch.Tensor:
    size = model.config.vision_config.image_size
    pix = images.float() / 255.0
    if pix.shape[-1] != size:
        pix = F.interpolate(pix, size=(size, size), mode="bilinear", align_corners=False)
    return pix


@torch.no_grad()
def patch_features(model, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The vision tower's patch features (what the projector reads): [N, P, H]."""
    from .model import vision_tower
    vc = model.config.vision_config
    n_patch = (vc.image_size // vc.patch_size) ** 2
    vt = vision_tower(model)
    return torch.cat([vt(pixel_values=_pixels(model, images[lo:lo + batch])).last_hidden_state[:, -n_patch:]
                      for lo in range(0, len(images), batch)])


def feature_spread(model, images: torch.Tensor) -> float:
    """Mean over patch positions and dimensions of the features' std between images: how
    much the image tokens differ from one image to the next (0 = the image is ignored)."""
    return float(patch_features(model, images).std(0).mean())


def warm_up(model, images: torch.Tensor, steps: int, batch: int, lr: float, seed: int,
            captions=None, progress: bool = False, questions: torch.Tensor | None = None) -> dict:
    """Self-supervised warm-up on uint8 ``images`` for ``steps`` steps at ``lr`` (vision
    tower only); then, with their ``questions`` (token ids, no answers), ``steps // 5``
    steps of carrying the image to the answer position (:func:`_read_stage`); then, with
    ``captions`` (a Split of caption ids with their lengths as ``answers``), ``steps // 2``
    steps of caption generation. Returns the final detail reconstruction error, the
    features' between-image spread before and after, and the later stages' figures."""
    from .model import vision_tower
    vt = vision_tower(model)
    vc = model.config.vision_config
    h, patch = vc.hidden_size, vc.patch_size
    n_patch = (vc.image_size // patch) ** 2
    probe = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:256]]
    before = feature_spread(model, probe)
    # an MLP, not a linear map: a linear decoder makes the code a PCA of the patch, which
    # a few background directions dominate
    dec = torch.nn.Sequential(torch.nn.Linear(h, 4 * h), torch.nn.GELU(), torch.nn.Linear(4 * h, 3 * patch ** 2))
    opt = torch.optim.AdamW(list(vt.parameters()) + list(dec.parameters()), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="visual warm-up (no answers)", leave=False)
    err = 0.0
    for step in it:
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        pix = _pixels(model, images[idx])
        feats = vt(pixel_values=pix).last_hidden_state[:, -n_patch:]
        loss = F.mse_loss(dec(feats), detail_targets(pix, patch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        err = 0.9 * err + 0.1 * loss.item() if step else loss.item()
        if progress:
            it.set_postfix(detail_mse=f"{err:.4f}", refresh=False)
    out = {"warmup_detail_mse": round(err, 5), "warmup_spread_before": round(before, 4),
           "warmup_spread": round(feature_spread(model, probe), 4)}
    if questions is not None:
        out["warmup_read_mse"] = round(_read_stage(model, images, questions, max(steps // 5, 1), batch, gen), 4)
    if captions is not None:
        out["warmup_caption_acc"] = round(_caption_stage(model, captions, max(steps // 2, 1), batch, gen), 4)
    return out


def _caption_stage(model, captions, steps: int, batch: int, gen: torch.Generator) -> float:
    """LLaVA stage 1: the projector and decoder learn to generate each image's caption
    (next-token loss on the caption), the vision tower frozen. Returns the final
    next-token accuracy (running mean)."""
    from .model import inputs, vision_tower
    vt = vision_tower(model)
    vt.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=DECODER_LR, weight_decay=0.0)
    acc = 0.0
    for step in range(steps):
        cidx = torch.randint(0, len(captions), (batch,), generator=gen)
        cap, lens = captions.questions[cidx], captions.answers[cidx]
        pix, ids = inputs(model, captions.images[cidx], cap)
        start = ids.shape[1] - cap.shape[1]
        logits = model(input_ids=ids, pixel_values=pix).logits[:, start - 1:-1]
        mask = torch.arange(cap.shape[1]).view(1, -1) < lens.view(-1, 1)
        loss = F.cross_entropy(logits[mask], cap[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
        right = (logits[mask].argmax(-1) == cap[mask]).float().mean().item()
        acc = 0.9 * acc + 0.1 * right if step else right
    vt.requires_grad_(True)
    return acc


def _read_stage(model, images, questions, steps: int, batch: int, gen: torch.Generator) -> float:
    """The projector and decoder learn to carry the image to the position answers are read
    from: given an image and one of its training questions (never the answer), the last
    hidden state must reproduce the image's standardised patch features (vision frozen).
    Without it the first tasks can sit at chance for their whole 300 steps (measured on the
    photo-like folder, naive at lr 1e-3: shape 29% after training it; with it 70%)."""
    from .model import inputs, vision_tower
    vt = vision_tower(model)
    vt.requires_grad_(False)
    # statistics of the first 2048 images (the images come task by task: with more, the
    # first tasks' only)
    feats = patch_features(model, images[:2048]).flatten(1)
    # one image has no spread: its target is then 0, not NaN
    mu, sd = feats.mean(0), (feats.std(0) if len(feats) > 1 else torch.zeros_like(feats[0])) + 1e-4
    head = torch.nn.Linear(model.config.text_config.hidden_size, feats.shape[1])
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=DECODER_LR, weight_decay=0.0)
    err = 0.0
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        pix, ids = inputs(model, images[idx], questions[idx])
        with torch.no_grad():
            target = (patch_features(model, images[idx]).flatten(1) - mu) / sd
        last = model(input_ids=ids, pixel_values=pix, output_hidden_states=True).hidden_states[-1][:, -1]
        loss = F.mse_loss(head(last), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        err = 0.9 * err + 0.1 * loss.item() if step else loss.item()
    vt.requires_grad_(True)
    return err
