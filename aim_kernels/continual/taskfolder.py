"""Writes LLaVA-format task folders (``tasks.json`` + conversation files + image files)
for ``--data``: used by the tests, the committed ``--data`` runs and anyone who wants to
see the format.

``write_photo_tasks``: photo-like pictures (64x64 JPEG: a lit, noisy gradient background
with texture strokes, one or more anti-aliased objects with shading, colour jitter and a
soft shadow), five question types in natural language, answers as people write them
("Two", "a circle", "top left."), so the answer normalisation is exercised. Nothing in
them is the generated benchmark's scenes or its pre-training labels.

``write_scene_tasks``: the generated benchmark's scenes exported to the format (PNG),
so ``--data`` can be compared with the in-memory benchmark.

``python -m aim_kernels.continual.taskfolder DIR [--kind photo|scenes]``
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

COLOURS = {"red": (200, 40, 35), "green": (40, 160, 60), "blue": (40, 80, 210),
           "yellow": (230, 200, 40), "purple": (130, 50, 170), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle", "diamond")
WHERE = ("top left", "top right", "bottom left", "bottom right")
PHOTO_TASKS = {
    "colour": ("What color is the object?", "What is the color of the object in the photo?"),
    "shape": ("What shape is the object?", "Which shape do you see?"),
    "where": ("Where is the object?", "In which part of the picture is the object?"),
    "count": ("How many objects are there?", "How many things can you count?"),
    "size": ("Is the object big or small?", "Is the object large or small?"),
}


def _background(rng, size, dark=False):
    if dark:
        return np.clip(rng.normal(15, 5, (size, size, 3)), 0, 255)
    y, x = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(70, 150, 3)
    tilt = rng.uniform(-25, 25, (2, 3))
    img = base + x[..., None] * tilt[0] + y[..., None] * tilt[1]
    return np.clip(img + rng.normal(0, 5, (size, size, 3)), 0, 255)


def _draw(img, rng, shape, colour, cy, cx, r):
    from PIL import Image, ImageDraw, ImageFilter
    size = img.shape[0]
    pil = Image.fromarray(img.astype(np.uint8))
    shadow = Image.new("L", (size, size), 0)
    mask = Image.new("L", (size, size), 0)
    for m, (dy, dx) in ((shadow, (2, 2)), (mask, (0, 0))):
        d = ImageDraw.Draw(m)
        y, x = cy + dy, cx + dx
        if shape == "circle":
            d.ellipse([x - r, y - r, x + r, y + r], fill=255)
        elif shape == "square":
            d.rectangle([x - r * 0.85, y - r * 0.85, x + r * 0.85, y + r * 0.85], fill=255)
        elif shape == "triangle":
            d.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=255)
        else:
            d.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=255)
    pil.paste((20, 20, 20), mask=shadow.filter(ImageFilter.GaussianBlur(1.5)).point(lambda v: v // 3))
    rgb = np.clip(np.array(COLOURS[colour]) * rng.uniform(0.8, 1.1) + rng.normal(0, 12, 3), 0, 255)
    yy = np.linspace(1.1, 0.85, size)[:, None, None]              # light from above
    body = np.clip(rgb[None, None] * yy + rng.normal(0, 5, (size, size, 3)), 0, 255).astype(np.uint8)
    pil.paste(Image.fromarray(body), mask=mask.filter(ImageFilter.GaussianBlur(0.6)))
    return np.asarray(pil, dtype=np.float64)


def photo_example(task: str, rng, size: int = 64):
    """(uint8 image [size, size, 3], question, answer as a person would write it);
    ``task`` "caption": (image, None, a caption naming every object, LLaVA stage-1 style)."""
    from PIL import Image, ImageDraw
    img = _background(rng, size)
    pil = Image.fromarray(img.astype(np.uint8))
    d = ImageDraw.Draw(pil)
    for _ in range(3):                                   # texture: faint strokes
        pts = rng.uniform(0, size, 4)
        d.line(list(pts), fill=tuple(int(v) for v in rng.uniform(60, 200, 3)), width=1)
    img = np.asarray(pil, dtype=np.float64)
    half = size // 2
    n = int(rng.integers(1, 4)) if task in ("count", "caption") else 1
    quads = rng.permutation(4)[:n]
    big = bool(rng.integers(2))
    parts = []
    for q in quads:
        qy, qx = divmod(int(q), 2)
        if task == "caption":
            big = bool(rng.integers(2))
        r = (rng.uniform(12, 15) if big else rng.uniform(6, 8)) if task in ("size", "caption") else rng.uniform(10, 14)
        cy = qy * half + half / 2 + rng.uniform(-2, 2)
        cx = qx * half + half / 2 + rng.uniform(-2, 2)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        img = _draw(img, rng, shape, colour, cy, cx, r)
        parts.append(f"a {'big' if big else 'small'} {colour} {shape} at the {WHERE[int(q)]}")
    if task == "caption":
        return img.astype(np.uint8), None, f"{('One', 'Two', 'Three')[n - 1]} objects: " + ", ".join(parts) + "."
    question = PHOTO_TASKS[task][int(rng.integers(2))]
    answer = {"colour": colour, "shape": f"a {shape}", "where": WHERE[int(quads[0])].capitalize() + ".",
              "count": ("One", "Two", "Three")[n - 1], "size": "big" if big else "small"}[task]
    return img.astype(np.uint8), question, answer


def _record(rid, image, question, answer):
    return {"id": rid, "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                              {"from": "gpt", "value": answer}]}


def write_photo_tasks(folder, n_train: int = 400, n_test: int = 100, seed: int = 0,
                      tasks=tuple(PHOTO_TASKS), n_captions: int = 0) -> Path:
    """A tasks.json folder of photo-like pictures, with a "pretrain" list of ``n_captions``
    captioned pictures of their own (no task question or answer) when > 0; returns ``folder``."""
    from PIL import Image
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for t, task in enumerate(tasks):
        (folder / task).mkdir(exist_ok=True)
        entry = {"name": task}
        for s, (split, n) in enumerate((("train", n_train), ("test", n_test))):
            rng = np.random.default_rng([seed, t, s])
            recs = []
            for i in range(n):
                img, q, a = photo_example(task, rng)
                name = f"{task}-{split}-{i:05d}.jpg"
                Image.fromarray(img).save(folder / "images" / name, quality=90)
                recs.append(_record(f"{task}-{split}-{i}", name, q, a))
            (folder / task / f"{split}.json").write_text(json.dumps(recs))
            entry[split] = f"{task}/{split}.json"
        entries.append(entry)
    manifest = {"image_folder": "images", "tasks": entries}
    if n_captions:
        rng = np.random.default_rng([seed, 999])
        recs = []
        for i in range(n_captions):
            img, _, caption = photo_example("caption", rng)
            name = f"caption-{i:05d}.jpg"
            Image.fromarray(img).save(folder / "images" / name, quality=90)
            recs.append(_record(f"caption-{i}", name, "Describe the picture.", caption))
        (folder / "pretrain.json").write_text(json.dumps(recs))
        manifest["pretrain"] = "pretrain.json"
    (folder / "tasks.json").write_text(json.dumps(manifest, indent=1))
    return folder


def write_scene_tasks(folder, n_train: int = 3000, n_test: int = 300, n_novel: int = 200,
                      seed: int = 0) -> Path:
    """The generated benchmark of ``seed`` as a tasks.json folder (with per-task novel splits)."""
    from PIL import Image

    from . import data
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    bench = data.make_benchmark(seed, n_train, n_test, n_novel)
    words = {i: w for w, i in data.WORD_ID.items()}
    entries = []
    for skill in bench.skills:
        (folder / skill).mkdir(exist_ok=True)
        entry = {"name": skill}
        for split in ("train", "test", "novel"):
            sp = getattr(bench, split).get(skill)
            if sp is None:
                continue
            recs = []
            for i in range(len(sp)):
                name = f"{skill}-{split}-{i:05d}.png"
                Image.fromarray(sp.images[i].permute(1, 2, 0).numpy()).save(folder / "images" / name)
                q = " ".join(words[int(w)] for w in sp.questions[i])
                recs.append(_record(f"{skill}-{split}-{i}", name, q, words[int(sp.answers[i])]))
            (folder / skill / f"{split}.json").write_text(json.dumps(recs))
            entry[split] = f"{skill}/{split}.json"
        entries.append(entry)
    (folder / "tasks.json").write_text(json.dumps({"image_folder": "images", "tasks": entries}, indent=1))
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--kind", choices=("photo", "scenes"), default="photo")
    p.add_argument("--train", type=int, default=None)
    p.add_argument("--test", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captions", type=int, default=0, help="photo: pictures in a 'pretrain' caption list")
    a = p.parse_args(argv)
    if a.kind == "photo":
        write_photo_tasks(a.folder, a.train or 400, a.test or 100, a.seed, n_captions=a.captions)
    else:
        write_scene_tasks(a.folder, a.train or 3000, a.test or 300, seed=a.seed)
    print(f"wrote {a.folder}/tasks.json")


if __name__ == "__main__":
    main()
