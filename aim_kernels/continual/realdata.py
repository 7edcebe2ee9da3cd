"""Loaders for real VQA data in the VQA v2 and GQA formats, mapped onto VQACL's 10 skills.

VQA v2: a questions JSON (``{"questions": [{"question_id", "image_id", "question"}]}``),
an annotations JSON (``{"annotations": [{"question_id", "image_id", "question_type",
"answer_type", "multiple_choice_answer", ...}]}``) and an image folder whose file
names end in the image id (``COCO_val2014_000000000042.jpg`` or ``42.png``).

GQA: a questions JSON (``{qid: {"imageId", "question", "answer", "types":
{"structural", "semantic", "detailed"}}}``) and an image folder of ``<imageId>.jpg``.

VQACL (CVPR 2023) splits VQA v2 into 10 linguistic skills: recognition, location,
judge, commonsense, count, action, color, type, subcategory, causal. ``vqa_skill`` and
``gqa_skill`` assign every question one of them from its question type / GQA types
and its words (rules below; the first that fires wins). ``encode`` turns records into
the tensors of :class:`aim_kernels.continual.data.Split`, one per skill.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VQACL_SKILLS = ("recognition", "location", "judge", "commonsense", "count", "action", "color",
                "type", "subcategory", "causal")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


@dataclass
class Record:
    qid: str
    image: Path
    question: str
    answer: str
    skill: str


_JUDGE = re.compile(r"^(is|are|does|do|did|can|could|was|were|has|have|will|should|would)\b")


def vqa_skill(question_type: str, question: str, answer_type: str = "") -> str:
    """VQACL skill of a VQA v2 question (from its ``question_type``, words, ``answer_type``)."""
    qt, q = question_type.lower().strip(), question.lower().strip()
    if "color" in qt or "colour" in q:
        return "color"
    if qt.startswith("how many") or q.startswith("how many"):
        return "count"
    if qt.startswith("where") or q.startswith("where"):
        return "location"
    if qt.startswith("why") or q.startswith("why"):
        return "causal"
    if "doing" in q or qt.startswith("what sport") or "playing" in q:
        return "action"
    if qt.startswith(("what type", "what kind")):
        return "type"
    if qt.startswith(("what brand", "what animal", "what room", "which", "what is the name",
                      "who")):
        return "subcategory"
    if answer_type == "yes/no" or _JUDGE.match(qt) or _JUDGE.match(q):
        return "judge"
    if any(w in q for w in ("made of", "season", "what time", "weather", "used for", "purpose")):
        return "commonsense"
    return "recognition"


def gqa_skill(types: dict, question: str) -> str:
    """VQACL skill of a GQA question (from ``types`` and its words)."""
    detailed = (types.get("detailed") or "").lower()
    semantic = (types.get("semantic") or "").lower()
    structural = (types.get("structural") or "").lower()
    q = question.lower()
    if "color" in detailed or "color" in q or "colour" in q:
        return "color"
    if q.startswith("how many"):
        return "count"
    if "position" in detailed or "place" in detailed or q.startswith("where") or "which side" in q:
        return "location"
    if "material" in detailed or "made of" in q or "weather" in detailed:
        return "commonsense"
    if "activity" in detailed or "doing" in q:
        return "action"
    if structural in ("verify", "logical") or "exist" in detailed:
        return "judge"
    if semantic == "cat" or "category" in detailed or q.startswith(("what kind", "what type")):
        return "type"
    if structural in ("choose", "compare") or semantic == "attr":
        return "subcategory"
    if q.startswith("why"):
        return "causal"
    return "recognition"


def _image_index(folder) -> dict[str, Path]:
    """{image id as written (and without leading zeros): path} for an image folder."""
    index = {}
    for p in sorted(Path(folder).iterdir()):
        if p.suffix.lower() not in IMAGE_EXTS:
            continue
        index[p.stem] = p
        m = re.search(r"(\d+)$", p.stem)
        if m:
            index.setdefault(str(int(m.group(1))), p)
    return index


def load_vqa_v2(questions_json, annotations_json, image_dir) -> list[Record]:
    """Records of a VQA v2 split; questions whose image is missing are skipped."""
    qs = json.loads(Path(questions_json).read_text())["questions"]
    anns = {a["question_id"]: a for a in json.loads(Path(annotations_json).read_text())["annotations"]}
    images = _image_index(image_dir)
    out = []
    for q in qs:
        a = anns.get(q["question_id"])
        img = images.get(str(int(q["image_id"])))
        if a is None or img is None:
            continue
        skill = vqa_skill(a.get("question_type", ""), q["question"], a.get("answer_type", ""))
        out.append(Record(str(q["question_id"]), img, q["question"], a["multiple_choice_answer"], skill))
    return out


def load_gqa(questions_json, image_dir) -> list[Record]:
    """Records of a GQA split; questions whose image is missing are skipped."""
    qs = json.loads(Path(questions_json).read_text())
    images = _image_index(image_dir)
    out = []
    for qid, q in qs.items():
        img = images.get(str(q["imageId"]))
        if img is None:
            continue
        out.append(Record(str(qid), img, q["question"], q["answer"],
                          gqa_skill(q.get("types", {}), q["question"])))
    return out


def tokenize(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def build_vocab(records, specials=("<pad>", "<bos>", "<eos>", "<unk>")) -> dict[str, int]:
    """Word -> id over questions and answers (answers are single tokens: spaces -> '_')."""
    vocab = {w: i for i, w in enumerate(specials)}
    for r in records:
        for w in tokenize(r.question) + [answer_token(r.answer)]:
            vocab.setdefault(w, len(vocab))
    return vocab


def answer_token(answer: str) -> str:
    return "_".join(tokenize(answer)) or "<unk>"


def encode(records, vocab: dict[str, int], image_size: int = 32, question_len: int = 12):
    """{skill: data.Split} of uint8 images resized to ``image_size``, left-padded question
    ids of ``question_len`` tokens and one-token answers; candidates = the skill's answers."""
    from PIL import Image

    from .data import Split
    unk, pad = vocab["<unk>"], vocab["<pad>"]
    by_skill: dict[str, list[Record]] = {}
    for r in records:
        by_skill.setdefault(r.skill, []).append(r)
    out = {}
    for skill in [s for s in VQACL_SKILLS if s in by_skill]:
        rs = by_skill[skill]
        imgs, qs, ans = [], [], []
        for r in rs:
            with Image.open(r.image) as im:
                im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                imgs.append(np.asarray(im).transpose(2, 0, 1).copy())
            ids = [vocab.get(w, unk) for w in tokenize(r.question)][-question_len:]
            qs.append([pad] * (question_len - len(ids)) + ids)
            ans.append(vocab.get(answer_token(r.answer), unk))
        answers = torch.tensor(ans)
        out[skill] = Split(skill, torch.from_numpy(np.stack(imgs)), torch.tensor(qs), answers,
                           torch.unique(answers))
    return out
