"""VQA v2 and GQA loaders on tiny files written here; VQACL skill mapping."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aim_kernels.continual import realdata

PIL = pytest.importorskip("PIL.Image")


def _image(path, colour):
    PIL.fromarray(np.full((48, 40, 3), colour, dtype=np.uint8)).save(path)


@pytest.fixture()
def vqa(tmp_path):
    img = tmp_path / "val2014"
    img.mkdir()
    _image(img / "COCO_val2014_000000000042.jpg", (255, 0, 0))
    _image(img / "COCO_val2014_000000000007.jpg", (0, 0, 255))
    rows = [(1, 42, "What color is the bus?", "what color is the", "other", "red"),
            (2, 42, "How many dogs are there?", "how many", "number", "2"),
            (3, 7, "Is the sky blue?", "is the", "yes/no", "yes"),
            (4, 7, "Where is the cat?", "where is the", "other", "on the bed"),
            (5, 7, "Why is the man smiling?", "why", "other", "happy"),
            (6, 7, "What is the man doing?", "what is the man", "other", "surfing"),
            (7, 99, "What is this?", "what is this", "other", "missing image")]
    qs = {"questions": [{"question_id": q, "image_id": i, "question": t} for q, i, t, *_ in rows]}
    anns = {"annotations": [{"question_id": q, "image_id": i, "question_type": qt, "answer_type": at,
                             "multiple_choice_answer": a, "answers": [{"answer": a}]}
                            for q, i, _, qt, at, a in rows]}
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(anns))
    return tmp_path / "q.json", tmp_path / "a.json", img


def test_vqa_v2_loader_and_skills(vqa):
    records = realdata.load_vqa_v2(*vqa)
    assert [r.qid for r in records] == ["1", "2", "3", "4", "5", "6"]      # image 99 is missing
    assert [r.skill for r in records] == ["color", "count", "judge", "location", "causal", "action"]
    assert records[0].image.name == "COCO_val2014_000000000042.jpg" and records[3].answer == "on the bed"
    vocab = realdata.build_vocab(records)
    splits = realdata.encode(records, vocab, image_size=32, question_len=8)
    assert set(splits) == {"color", "count", "judge", "location", "causal", "action"}
    color = splits["color"]
    assert color.images.shape == (1, 3, 32, 32) and color.images.dtype == torch.uint8
    assert color.images[0, 0].float().mean() > 200 and color.images[0, 2].float().mean() < 50
    assert color.questions.shape == (1, 8) and int(color.answers[0]) == vocab["red"]
    assert int(splits["location"].answers[0]) == vocab["on_the_bed"]
    assert (color.questions[0, :3] == vocab["<pad>"]).all()                # left-padded


def test_gqa_loader_and_skills(tmp_path):
    img = tmp_path / "images"
    img.mkdir()
    _image(img / "n123.jpg", (0, 255, 0))
    qs = {"q1": {"imageId": "n123", "question": "What color is the car?", "answer": "green",
                 "types": {"structural": "query", "semantic": "attr", "detailed": "colorQuery"}},
          "q2": {"imageId": "n123", "question": "Is there a dog?", "answer": "no",
                 "types": {"structural": "verify", "semantic": "obj", "detailed": "existVerify"}},
          "q3": {"imageId": "n123", "question": "On which side is the cup?", "answer": "left",
                 "types": {"structural": "query", "semantic": "rel", "detailed": "positionQuery"}},
          "q4": {"imageId": "n123", "question": "What kind of animal is it?", "answer": "cat",
                 "types": {"structural": "query", "semantic": "cat", "detailed": "categoryQuery"}},
          "q5": {"imageId": "gone", "question": "?", "answer": "x", "types": {}}}
    (tmp_path / "gqa.json").write_text(json.dumps(qs))
    records = realdata.load_gqa(tmp_path / "gqa.json", img)
    assert [(r.qid, r.skill) for r in records] == [("q1", "color"), ("q2", "judge"),
                                                   ("q3", "location"), ("q4", "type")]
    splits = realdata.encode(records, realdata.build_vocab(records))
    assert splits["color"].images[0, 1].float().mean() > 200


def test_every_skill_is_a_vqacl_skill():
    assert len(realdata.VQACL_SKILLS) == 10
    for qt, q, at in [("what", "What is on the table?", "other"), ("what brand", "What brand?", "other"),
                      ("what type of", "What type of food?", "other"),
                      ("what is the", "What is the table made of?", "other")]:
        assert realdata.vqa_skill(qt, q, at) in realdata.VQACL_SKILLS
    assert realdata.vqa_skill("what is the", "What is the table made of?", "other") == "commonsense"
    assert realdata.vqa_skill("what brand", "What brand is it?", "other") == "subcategory"
