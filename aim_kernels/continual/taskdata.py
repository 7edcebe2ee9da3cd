"""Task data from files: a ``tasks.json`` manifest of LLaVA-conversation files (CoIN,
MCITlib), or VQA v2 / GQA files through :mod:`realdata` (VQACL's 10 skills).

``--data DIR`` reads ``DIR/tasks.json``::

    {"image_folder": "images",
     "tasks": [{"name": "colour", "train": "colour/train.json", "test": "colour/test.json",
                "novel": "colour/novel.json"}, ...],          # "novel" optional, per task
     "novel": "novel.json",                                    # optional, over all tasks' answers
     "pretrain": "captions.json"}                              # optional, see warmup.warm_up

every path relative to DIR; each file a list of ``{"id", "image", "conversations":
[{"from": "human", "value": "<image>\\n<question>"}, {"from": "gpt", "value": "<answer>"}]}``.
``--data vqa-v2:DIR`` / ``--data gqa:DIR`` read the loaders' files from DIR (see
:func:`load_source`).

Everything is validated before a model is built: a missing file, an image not found, an
empty task, a malformed conversation or an unknown scheme raises :class:`TaskDataError`
naming the file and the record. Answers are compared after VQA-style normalisation
(:func:`normalize_answer`); each normalised answer is one vocabulary entry, so accuracy is
the exact match of the normalised answer, the argmax over the task's candidate answers.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import data

SCHEMES = ("vqa-v2", "gqa")
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")   # ids 0..3, as the synthetic vocabulary's first


class TaskDataError(ValueError):
    """Bad task data; the message names the file and the record."""


# ---- VQA-style answer normalisation -------------------------------------------------------
_NUMBERS = {w: str(i) for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six",
                                             "seven", "eight", "nine", "ten"))}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:']")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def normalize_answer(text: str) -> str:
    """The VQA evaluation's normalisation: lowercase, punctuation removed (a decimal point
    kept), number words as digits, articles dropped, whitespace collapsed."""
    t = _PERIOD.sub("", _PUNCT.sub(" ", text.lower().strip()))
    words = [_NUMBERS.get(w, w) for w in t.split() if w not in _ARTICLES]
    return " ".join(words)


def question_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.replace("<image>", " ").lower())


# ---- records ------------------------------------------------------------------------------
@dataclass
class Example:
    qid: str
    image: Path
    question: str
    answer: str           # normalised


def _fail(file, index, rec, why: str):
    rid = rec.get("id") if isinstance(rec, dict) else None
    where = f"record {index}" + (f" (id {rid!r})" if rid is not None else "")
    raise TaskDataError(f"{file}: {where}: {why}")


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise TaskDataError(f"{what}: file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}: not valid JSON ({e})") from None


def read_conversations(path: Path, image_folder: Path, what: str, caption: bool = False) -> list[Example]:
    """Records of one LLaVA-conversation file, checked one by one."""
    recs = _read_json(path, what)
    if not isinstance(recs, list):
        raise TaskDataError(f"{path}: expected a list of records, got {type(recs).__name__}")
    out = []
    for i, rec in enumerate(recs):
        if not isinstance(rec, dict):
            _fail(path, i, rec, f"expected an object, got {type(rec).__name__}")
        if "image" not in rec:
            _fail(path, i, rec, "no 'image'")
        conv = rec.get("conversations")
        if (not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(c, dict) for c in conv)
                or conv[0].get("from") != "human" or conv[1].get("from") != "gpt"
                or not isinstance(conv[0].get("value"), str) or not isinstance(conv[1].get("value"), str)):
            _fail(path, i, rec, "malformed 'conversations': expected [{'from': 'human', 'value': "
                                "'<image>\\n<question>'}, {'from': 'gpt', 'value': '<answer>'}]")
        question, answer = conv[0]["value"], conv[1]["value"]
        if "<image>" not in question:
            _fail(path, i, rec, "the human turn has no '<image>' placeholder")
        if not question_words(question) and not caption:
            _fail(path, i, rec, "the human turn has no question after '<image>'")
        norm = answer.strip() if caption else normalize_answer(answer)
        if not norm:
            _fail(path, i, rec, f"empty answer {answer!r} after normalisation")
        img = image_folder / str(rec["image"])
        if not img.is_file():
            _fail(path, i, rec, f"image not found: {img}")
        out.append(Example(str(rec.get("id", i)), img, question, norm))
    return out


@dataclass
class RawTasks:
    """Validated examples of every task, before tokenisation."""
    source: str
    train: dict[str, list[Example]]
    test: dict[str, list[Example]]
    novel: dict[str, list[Example]] = field(default_factory=dict)   # task or "all" -> examples
    pretrain: list[Example] = field(default_factory=list)            # captions (no answers)
    files: list[Path] = field(default_factory=list)                  # hashed into the data hash


def read_manifest(folder) -> RawTasks:
    folder = Path(folder)
    mpath = folder / "tasks.json"
    man = _read_json(mpath, f"--data {folder}")
    if not isinstance(man, dict) or not isinstance(man.get("tasks"), list) or not man["tasks"]:
        raise TaskDataError(f"{mpath}: expected {{'image_folder': ..., 'tasks': [{{'name', 'train', "
                            "'test'}, ...]}} with at least one task")
    images = folder / str(man.get("image_folder", "."))
    if not images.is_dir():
        raise TaskDataError(f"{mpath}: image_folder not found: {images}")
    raw = RawTasks(f"manifest:{folder}", {}, {}, files=[mpath])
    for k, t in enumerate(man["tasks"]):
        if not isinstance(t, dict) or not all(isinstance(t.get(x), str) for x in ("name", "train", "test")):
            raise TaskDataError(f"{mpath}: task {k}: needs string 'name', 'train' and 'test'")
        name = t["name"]
        if name in raw.train:
            raise TaskDataError(f"{mpath}: task {k}: duplicate name {name!r}")
        for split in ("train", "test", "novel"):
            if split not in t:
                continue
            p = folder / t[split]
            ex = read_conversations(p, images, f"{mpath}: task {name!r} {split}")
            if not ex:
                raise TaskDataError(f"{p}: task {name!r} has an empty {split} split")
            getattr(raw, split)[name] = ex
            raw.files.append(p)
    if "novel" in man:
        p = folder / str(man["novel"])
        raw.novel["all"] = read_conversations(p, images, f"{mpath}: novel")
        raw.files.append(p)
    if "pretrain" in man:
        p = folder / str(man["pretrain"])
        raw.pretrain = read_conversations(p, images, f"{mpath}: pretrain", caption=True)
        raw.files.append(p)
    return raw


def _one(folder: Path, pattern: str, what: str) -> Path:
    hits = sorted(folder.glob(pattern))
    if len(hits) != 1:
        raise TaskDataError(f"{folder}: expected exactly one {what} ({pattern}), found "
                            f"{[h.name for h in hits] or 'none'}")
    return hits[0]


def _image_dir(folder: Path) -> Path:
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        from .realdata import IMAGE_EXTS
        if any(f.suffix.lower() in IMAGE_EXTS for f in d.iterdir()):
            return d
    raise TaskDataError(f"{folder}: no image folder (a sub-folder of .jpg/.png files)")


def read_loader(scheme: str, folder, test_share: float = 0.2, min_examples: int = 2) -> RawTasks:
    """VQA v2 (``*questions*.json``, ``*annotations*.json``, an image sub-folder) or GQA
    (``*questions*.json``, an image sub-folder) in ``folder``; one task per VQACL skill
    present, in VQACL's order; a fixed ``test_share`` of each skill (by a hash of the
    question id, so it never depends on the seed) is its test split."""
    from . import realdata
    folder = Path(folder)
    if not folder.is_dir():
        raise TaskDataError(f"--data {scheme}:{folder}: folder not found")
    q = _one(folder, "*questions*.json", "questions file")
    imgs = _image_dir(folder)
    if scheme == "vqa-v2":
        a = _one(folder, "*annotations*.json", "annotations file")
        records, files = realdata.load_vqa_v2(q, a, imgs), [q, a]
    else:
        records, files = realdata.load_gqa(q, imgs), [q]
    raw = RawTasks(f"{scheme}:{folder}", {}, {}, files=files)
    for skill in realdata.VQACL_SKILLS:
        rs = [r for r in records if r.skill == skill]
        if len(rs) < min_examples:
            continue          # VQACL's skills absent from these files
        ex = [Example(r.qid, r.image, r.question, normalize_answer(r.answer)) for r in rs]
        is_test = [int(hashlib.sha256(e.qid.encode()).hexdigest(), 16) % 1000 < 1000 * test_share for e in ex]
        if all(is_test) or not any(is_test):      # tiny files: keep both splits non-empty
            is_test = [k == len(ex) - 1 for k in range(len(ex))]
        raw.train[skill] = [e for e, t in zip(ex, is_test) if not t]
        raw.test[skill] = [e for e, t in zip(ex, is_test) if t]
    if not raw.train:
        raise TaskDataError(f"{folder}: no VQACL skill has {min_examples} or more questions with images")
    return raw


def read_source(spec: str) -> RawTasks:
    """``DIR`` (a tasks.json folder), ``vqa-v2:DIR`` or ``gqa:DIR``."""
    scheme, sep, rest = spec.partition(":")
    if sep and not Path(spec).exists() and len(scheme) > 1:   # a Windows drive letter is not a scheme
        if scheme not in SCHEMES:
            raise TaskDataError(f"--data {spec!r}: unknown scheme {scheme!r}; use DIR (with tasks.json), "
                                f"{' or '.join(s + ':DIR' for s in SCHEMES)}")
        return read_loader(scheme, rest)
    return read_manifest(spec)


# ---- tokenisation and tensors --------------------------------------------------------------
class WordTokenizer:
    """Word-level: question words of the training files; each normalised answer one token."""

    def __init__(self, raw: RawTasks):
        words = list(SPECIALS)
        for split in (raw.train, raw.test, raw.novel):      # every answer is a candidate word
            for exs in split.values():
                words += [e.answer.replace(" ", "_") for e in exs]
        for exs in raw.train.values():
            for e in exs:
                words += question_words(e.question)
        for e in raw.pretrain:
            words += question_words(e.answer)
        self.words = list(dict.fromkeys(words))
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.bos, self.pad, self.unk = 1, 0, 3
        self.vocab_size = len(self.words) + 1               # + the image token (the last id)

    def question(self, text: str) -> list[int]:
        return [self.ids.get(w, self.unk) for w in question_words(text)]

    def answer(self, norm: str) -> int:
        return self.ids[norm.replace(" ", "_")]

    def text(self, text: str) -> list[int]:
        return self.question(text)


class HFTokenizer:
    """A local HF tokenizer folder (``--tokenizer``): questions as it splits them; an answer
    is the first token of " <answer>", which must differ between a task's candidates."""

    def __init__(self, folder):
        from transformers import AutoTokenizer
        if not Path(folder).is_dir():
            raise TaskDataError(f"--tokenizer {folder}: folder not found")
        self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.bos = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.pad
        self.unk = self.tok.unk_token_id if self.tok.unk_token_id is not None else self.pad
        self.vocab_size = len(self.tok) + 1

    def question(self, text: str) -> list[int]:
        return self.tok(" ".join(question_words(text)), add_special_tokens=False)["input_ids"]

    def answer(self, norm: str) -> int:
        ids = self.tok(" " + norm, add_special_tokens=False)["input_ids"]
        return ids[0] if ids else self.unk

    def text(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


@dataclass
class TaskSet(data.Benchmark):
    """A :class:`data.Benchmark` read from files, with what the model needs to read it."""
    vocab_size: int = data.VOCAB_SIZE
    bos: int = 1
    question_len: int = 4
    data_hash: str = ""
    source: str = ""
    pretrain_images: torch.Tensor | None = None      # every training image (no answers)
    pretrain_questions: torch.Tensor | None = None   # and its question
    captions: data.Split | None = None               # the manifest's "pretrain" list, if any

    @property
    def image_token(self) -> int:
        return self.vocab_size - 1


def _load_images(examples: list[Example], size: int) -> torch.Tensor:
    from PIL import Image
    out = []
    for e in examples:
        try:
            with Image.open(e.image) as im:
                im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                out.append(np.asarray(im).transpose(2, 0, 1).copy())
        except OSError as err:
            raise TaskDataError(f"{e.image}: cannot read image of record {e.qid!r} ({err})") from None
    return torch.from_numpy(np.stack(out))


def _split(name, exs, tok, qlen, size, candidates) -> data.Split:
    qs = []
    for e in exs:
        ids = tok.question(e.question)[-qlen:]
        qs.append([tok.pad] * (qlen - len(ids)) + ids)       # left-padded: the answer is read last
    return data.Split(name, _load_images(exs, size), torch.tensor(qs, dtype=torch.long),
                      torch.tensor([tok.answer(e.answer) for e in exs]), candidates)


def data_hash(raw: RawTasks) -> str:
    """sha256 of the manifest and record files (images are named by them)."""
    h = hashlib.sha256()
    for p in raw.files:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build(raw: RawTasks, tokenizer: str | None = None, image_size: int = data.IMAGE_SIZE,
          max_question_len: int = 24) -> TaskSet:
    """Tensors of every split; images resized to ``image_size``."""
    tok = HFTokenizer(tokenizer) if tokenizer else WordTokenizer(raw)
    qlen = min(max_question_len, max(len(tok.question(e.question))
                                     for split in (raw.train, raw.test) for exs in split.values() for e in exs))
    qlen = max(qlen, 1)
    train, test, novel = {}, {}, {}
    for name in raw.train:
        answers = sorted({e.answer for e in raw.train[name] + raw.test.get(name, [])
                          + raw.novel.get(name, [])})
        ids = [tok.answer(a) for a in answers]
        if len(set(ids)) != len(ids):
            raise TaskDataError(f"task {name!r}: two candidate answers share one token under "
                                f"--tokenizer {tokenizer} ({answers}); use the word-level tokenizer")
        cands = torch.tensor(ids)
        train[name] = _split(name, raw.train[name], tok, qlen, image_size, cands)
        test[name] = _split(name, raw.test[name], tok, qlen, image_size, cands)
        if name in raw.novel:
            novel[name] = _split(name, raw.novel[name], tok, qlen, image_size, cands)
    if "all" in raw.novel:
        every = torch.unique(torch.cat([s.candidates for s in train.values()]))
        novel["all"] = _split("all", raw.novel["all"], tok, qlen, image_size, every)
    captions = None
    if raw.pretrain:
        caps = [tok.text(e.answer)[:48] for e in raw.pretrain]
        clen = max(len(c) for c in caps)
        ids = torch.tensor([c + [tok.pad] * (clen - len(c)) for c in caps])
        captions = data.Split("captions", _load_images(raw.pretrain, image_size), ids,
                              torch.tensor([len(c) for c in caps]), torch.zeros(0, dtype=torch.long))
    pre = torch.cat([s.images for s in train.values()])
    pre_q = torch.cat([s.questions for s in train.values()])
    return TaskSet(seed=0, train=train, test=test, novel=novel, vocab_size=tok.vocab_size, bos=tok.bos,
                   question_len=qlen, data_hash=data_hash(raw), source=raw.source,
                   pretrain_images=pre, pretrain_questions=pre_q, captions=captions)


def load(spec: str, tokenizer: str | None = None, image_size: int = data.IMAGE_SIZE) -> TaskSet:
    """Read, validate and tensorise ``--data spec`` (no model touched)."""
    return build(read_source(spec), tokenizer, image_size)
