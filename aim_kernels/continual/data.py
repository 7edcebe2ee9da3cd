"""A procedurally generated compositional VQA benchmark (VQACL / CLEVR in miniature).

Scenes: 32x32 RGB images of 1-4 objects, one per quadrant, each with a shape
(square, circle, triangle, cross), a colour (6), a size (small, large) and a
position (the quadrant, with a pixel of jitter). Six tasks, one skill each:

=========  ====================================  ==========================
skill      question (4 tokens)                   answers
=========  ====================================  ==========================
colour     what-colour the large ?               6 colour words
shape      what-shape the large ?                4 shape words
count      how-many any any ?                    one two three four
position   where the large ?                     4 quadrant words
existence  is-there large any ?                  yes no
size       how-many small any ?                  zero one two three four
=========  ====================================  ==========================

In colour / shape / position scenes exactly one object is large (the referent),
the others small. A fixed set of skill-concept compositions (``HELD_OUT``: colour
questions about triangles, shape questions about blue objects, position
questions about circles) never occurs in
training; they form the ``novel`` split. Words are shared where natural: count
and size answer with the same number words and share the question word; size and
existence words ("small", "large") are concepts of other skills' answers. The
skills map onto VQACL's: colour = color, shape = type, position = location,
existence = judge, count = count, size = subcategory. (Yes/no questions that
bind a colour word to an object -- "is there a red object?" -- stayed at chance
for this 2-layer model within the step budget, so existence asks about size.)

Evaluation is restricted to each task's candidate answers (the argmax over the
task's answer words, as VQACL scores per question type): with one softmax over
the whole vocabulary and disjoint answers per task, the output bias alone moves
every answer to the current task and every method "forgets" 100%, which says
nothing about what the methods protect. Training uses the plain full-vocabulary
cross-entropy of the answer token.

Everything is deterministic by seed and generated in memory in a second or two.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 32
PATCH = 8
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
RGB = np.array([[1.0, 0.1, 0.1], [0.1, 0.85, 0.1], [0.15, 0.3, 1.0], [1.0, 1.0, 0.1],
                [1.0, 0.15, 1.0], [0.1, 1.0, 1.0]], dtype=np.float32)
SHAPES = ("square", "circle", "triangle", "cross")
SIZES = ("small", "large")
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
COUNTS = ("one", "two", "three", "four")
NUMBERS = ("zero",) + COUNTS
SKILLS = ("colour", "shape", "count", "position", "existence", "size")
QWORD = {"colour": "what-colour", "shape": "what-shape", "count": "how-many",
         "position": "where", "existence": "is-there", "size": "how-many"}

# Word vocabulary; the image token is the last id.
_WORDS = (["<pad>", "<bos>", "<eos>", "?", "the", "any"] + list(dict.fromkeys(QWORD.values()))
          + list(COLOURS) + list(SHAPES) + list(SIZES) + list(POSITIONS) + list(NUMBERS)
          + ["yes", "no"] + ["describe", "colour", "shape", "size", "none"])
VOCAB_SIZE = 64
IMAGE_TOKEN = VOCAB_SIZE - 1
WORD_ID = {w: i for i, w in enumerate(_WORDS)}
assert len(_WORDS) < IMAGE_TOKEN

ANSWERS = {"colour": COLOURS, "shape": SHAPES, "count": COUNTS, "position": POSITIONS,
           "existence": ("yes", "no"), "size": NUMBERS}
# Skill -> (concept kind, concept held out of training): the referent's shape or colour
# (colour, shape, position).
HELD_OUT = {"colour": ("shape", "triangle"), "shape": ("colour", "blue"),
            "position": ("shape", "circle")}


def answer_ids(skill: str) -> torch.Tensor:
    """The vocabulary ids of a skill's candidate answers."""
    return torch.tensor([WORD_ID[w] for w in ANSWERS[skill]])


# ---- rendering -----------------------------------------------------------------------
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)


def _shape_mask(shape: int, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = _YY - cy, _XX - cx
    if shape == 0:    # square
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if shape == 1:    # circle
        return dy * dy + dx * dx <= (r + 0.5) ** 2
    if shape == 2:    # triangle, apex up
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2 + 0.5)
    w = max(r / 3, 1.0)  # cross
    return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))


def render(objects, rng: np.random.Generator) -> np.ndarray:
    """objects: [(colour, shape, size, quadrant)] -> uint8 [3, 32, 32]."""
    img = rng.random((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32) * 0.08
    half = IMAGE_SIZE // 2
    for colour, shape, size, quad in objects:
        qy, qx = divmod(quad, 2)
        cy = qy * half + half / 2 - 0.5 + rng.integers(-1, 2)
        cx = qx * half + half / 2 - 0.5 + rng.integers(-1, 2)
        mask = _shape_mask(shape, cy, cx, 6.0 if size else 3.0)
        img[:, mask] = RGB[colour][:, None] * (0.85 + 0.15 * rng.random())
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


# ---- scenes and questions ------------------------------------------------------------
def _random_object(rng, colour=None, shape=None, avoid_colour=None, avoid_shape=None):
    choices_c = [c for c in range(len(COLOURS)) if c != avoid_colour]
    choices_s = [s for s in range(len(SHAPES)) if s != avoid_shape]
    c = int(rng.choice(choices_c)) if colour is None else colour
    s = int(rng.choice(choices_s)) if shape is None else shape
    return [c, s, int(rng.integers(2))]


def _concepts(skill: str, split: str) -> list[int]:
    """The referent concepts a skill's question may name in a split."""
    kind, held = HELD_OUT.get(skill, (None, None))
    names = COLOURS if kind == "colour" else SHAPES
    if kind is None:
        return []
    if split == "novel":
        return [names.index(held)]
    return [i for i, n in enumerate(names) if n != held]


def make_example(skill: str, split: str, rng: np.random.Generator):
    """One (objects, question words, answer word) of a skill; ``split`` in train/test/novel."""
    n = int(rng.integers(1, 5))
    quads = rng.permutation(4)[:n].tolist()
    concepts = _concepts(skill, split)
    ref = int(rng.choice(concepts)) if concepts else None
    kind = HELD_OUT.get(skill, (None,))[0]
    if skill in ("colour", "shape", "position"):   # the referent: the only large object
        first = _random_object(rng, colour=ref if kind == "colour" else None,
                               shape=ref if kind == "shape" else None)
        first[2] = 1
        objs = [first] + [_random_object(rng) for _ in range(n - 1)]
        for o in objs[1:]:
            o[2] = 0
        q = [QWORD[skill], "the", "large", "?"]
        ans = {"colour": COLOURS[first[0]], "shape": SHAPES[first[1]],
               "position": POSITIONS[quads[0]]}[skill]
    elif skill == "count":
        objs = [_random_object(rng) for _ in range(n)]
        q = [QWORD[skill], "any", "any", "?"]
        ans = COUNTS[n - 1]
    elif skill == "size":
        objs = [_random_object(rng) for _ in range(n)]
        q = [QWORD[skill], "small", "any", "?"]
        ans = NUMBERS[sum(o[2] == 0 for o in objs)]
    elif skill == "existence":               # is there a large object? balanced yes/no
        yes = bool(rng.integers(2))
        objs = [_random_object(rng) for _ in range(n)]
        for k, o in enumerate(objs):
            o[2] = int(yes and (k == 0 or rng.random() < 0.3))
        q = [QWORD[skill], "large", "any", "?"]
        ans = "yes" if yes else "no"
    else:
        raise ValueError(f"unknown skill {skill!r}; choose from {SKILLS}")
    objs = [(c, s, z, quad) for (c, s, z), quad in zip(objs, quads)]
    return objs, q, ans


@dataclass
class Split:
    """Examples of one task: uint8 images, question ids, answer ids, candidate answers."""
    skill: str
    images: torch.Tensor      # uint8 [N, 3, 32, 32]
    questions: torch.Tensor   # int64 [N, 4]
    answers: torch.Tensor     # int64 [N]
    candidates: torch.Tensor  # int64 [A]: the skill's answer ids

    def __len__(self) -> int:
        return len(self.answers)

    def subset(self, idx: torch.Tensor) -> "Split":
        return Split(self.skill, self.images[idx], self.questions[idx], self.answers[idx],
                     self.candidates)


def make_split(skill: str, split: str, n: int, seed: int) -> Split:
    salt = {"train": 0, "test": 1, "novel": 2}[split]
    rng = np.random.default_rng([seed, SKILLS.index(skill), salt])
    images, qs, ans = [], [], []
    for _ in range(n):
        objs, q, a = make_example(skill, split, rng)
        images.append(render(objs, rng))
        qs.append([WORD_ID[w] for w in q])
        ans.append(WORD_ID[a])
    return Split(skill, torch.from_numpy(np.stack(images)), torch.tensor(qs), torch.tensor(ans),
                 answer_ids(skill))


@dataclass
class Benchmark:
    """Train / test / novel splits of every skill, for one seed."""
    seed: int
    train: dict[str, Split]
    test: dict[str, Split]
    novel: dict[str, Split]

    @property
    def skills(self) -> tuple[str, ...]:
        return tuple(self.train)


def make_benchmark(seed: int = 0, n_train: int = 3000, n_test: int = 300, n_novel: int = 200,
                   skills=SKILLS) -> Benchmark:
    """All splits of ``skills`` (T >= 5 by default), deterministic by ``seed``."""
    return Benchmark(
        seed=seed,
        train={s: make_split(s, "train", n_train, seed) for s in skills},
        test={s: make_split(s, "test", n_test, seed) for s in skills},
        novel={s: make_split(s, "novel", n_novel, seed) for s in skills if s in HELD_OUT})


def to_inputs(images: torch.Tensor, questions: torch.Tensor, image_token: int = IMAGE_TOKEN,
              num_patches: int = NUM_PATCHES, image_size: int | None = None, bos: int = 1):
    """(pixel_values float [B,3,H,W], input_ids [B, 1 + P + 4]) for a LLaVA forward."""
    pix = images.float() / 255.0
    if image_size is not None and image_size != pix.shape[-1]:
        pix = torch.nn.functional.interpolate(pix, size=(image_size, image_size), mode="bilinear",
                                              align_corners=False)
    b = len(questions)
    ids = torch.cat([torch.full((b, 1), bos),
                     torch.full((b, num_patches), image_token), questions], dim=1)
    return pix, ids


def scene_attributes(objects) -> torch.Tensor:
    """Per-quadrant targets for visual pre-training: [4, 3] (colour+1, shape+1, size+1; 0 = empty)."""
    t = torch.zeros(4, 3, dtype=torch.long)
    for c, s, z, quad in objects:
        t[quad] = torch.tensor([c + 1, s + 1, z + 1])
    return t


def pretrain_scenes(n: int, seed: int):
    """Random scenes of every concept, and one description question each.

    Returns uint8 images, [n, 4, 3] per-quadrant targets (colour+1, shape+1, size+1;
    0 = empty) for the vision heads, and a :class:`Split` of "describe <quadrant>
    <colour|shape|size> ?" questions (answer: the attribute's word or "none") that
    align the projector and decoder with the visual concepts (LLaVA's stage 1).
    None of the six skills' question words occurs in it.
    """
    rng = np.random.default_rng([seed, 99])
    images, targets, qs, ans = [], [], [], []
    kinds = (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES))
    for _ in range(n):
        k = int(rng.integers(1, 5))
        quads = rng.permutation(4)[:k].tolist()
        objs = [tuple(_random_object(rng)) + (q,) for q in quads]
        images.append(render(objs, rng))
        t = scene_attributes(objs)
        targets.append(t)
        quad, kind = int(rng.integers(4)), int(rng.integers(3))
        qs.append([WORD_ID[w] for w in ("describe", POSITIONS[quad], kinds[kind][0], "?")])
        v = int(t[quad, kind])
        ans.append(WORD_ID[kinds[kind][1][v - 1] if v else "none"])
    images = torch.from_numpy(np.stack(images))
    cands = torch.tensor([WORD_ID[w] for w in COLOURS + SHAPES + SIZES + ("none",)])
    return images, torch.stack(targets), Split("describe", images, torch.tensor(qs),
                                               torch.tensor(ans), cands)


def chance_levels(bench: Benchmark) -> dict[str, float]:
    """Per task, the chance accuracy (percent) of :func:`metrics.chance_level`: the better of
    a uniform guess over the candidates and the test split's most frequent answer."""
    from .metrics import chance_level
    out = {}
    for name, split in bench.test.items():
        counts = torch.unique(split.answers, return_counts=True)[1]
        out[name] = chance_level(len(split.candidates), float(counts.max()) / len(split))
    return out
