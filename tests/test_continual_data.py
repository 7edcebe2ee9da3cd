"""The procedural continual-VQA benchmark: determinism, held-out compositions, answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from aim_kernels.continual import data


@pytest.fixture(scope="module")
def bench():
    return data.make_benchmark(seed=3, n_train=300, n_test=60, n_novel=40)


def test_at_least_five_tasks_one_skill_each(bench):
    assert len(bench.skills) >= 5 and len(set(bench.skills)) == len(bench.skills)
    assert set(bench.novel) == set(data.HELD_OUT) and len(data.HELD_OUT) >= 3


def test_deterministic_by_seed():
    a = data.make_split("colour", "train", 50, seed=7)
    b = data.make_split("colour", "train", 50, seed=7)
    c = data.make_split("colour", "train", 50, seed=8)
    assert torch.equal(a.images, b.images) and torch.equal(a.answers, b.answers)
    assert not torch.equal(a.images, c.images)
    assert a.images.dtype == torch.uint8 and a.images.shape[1:] == (3, 32, 32)


def test_answers_are_in_the_skill_candidates_and_every_answer_occurs(bench):
    for skill in bench.skills:
        split = bench.train[skill]
        cands = set(split.candidates.tolist())
        assert set(split.answers.tolist()) <= cands
        assert set(split.answers.tolist()) == cands, skill      # balanced enough to see all
        assert split.candidates.tolist() == [data.WORD_ID[w] for w in data.ANSWERS[skill]]
        assert (split.questions < data.IMAGE_TOKEN).all()


def test_held_out_compositions_never_in_training():
    for skill, (kind, concept) in data.HELD_OUT.items():
        rng = np.random.default_rng(0)
        for split, expect in (("train", False), ("test", False), ("novel", True)):
            for _ in range(200):
                objs, q, a = data.make_example(skill, split, rng)
                ref = objs[0]                                   # the referent object comes first
                value = data.COLOURS[ref[0]] if kind == "colour" else data.SHAPES[ref[1]]
                assert (value == concept) is expect, (skill, split, objs)
                assert ref[2] == 1 and all(o[2] == 0 for o in objs[1:])   # the only large one


def test_scenes_have_one_to_four_objects_and_correct_count_answers():
    rng = np.random.default_rng(1)
    for _ in range(200):
        objs, q, a = data.make_example("count", "train", rng)
        assert 1 <= len(objs) <= 4 and len({o[3] for o in objs}) == len(objs)
        assert a == data.COUNTS[len(objs) - 1]
        objs, q, a = data.make_example("size", "train", rng)
        assert a == data.NUMBERS[sum(o[2] == 0 for o in objs)]


def test_renderer_draws_the_colour_where_the_object_is():
    rng = np.random.default_rng(0)
    img = data.render([(0, 0, 1, 3)], rng).astype(float) / 255    # large red square, bottom-right
    br, tl = img[:, 16:, 16:], img[:, :16, :16]
    assert br[0].mean() > 0.3 and br[1].mean() < 0.2 and tl.mean() < 0.1


def test_inputs_layout():
    s = data.make_split("shape", "test", 4, seed=0)
    pix, ids = data.to_inputs(s.images, s.questions, num_patches=4)
    assert pix.shape == (4, 3, 32, 32) and 0 <= pix.min() and pix.max() <= 1
    assert ids.shape == (4, 1 + 4 + 4) and (ids[:, 1:5] == data.IMAGE_TOKEN).all()
