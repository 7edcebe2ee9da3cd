"""``compare --data`` end to end (a LLaVA-format folder, VQA v2 and GQA files), the
``--model`` presets' decoder / projector asymmetry, and ``--lora`` groups through PEFT."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("PIL")
import aim_kernels as ak  # noqa: E402
from aim_kernels import cli  # noqa: E402
from aim_kernels.continual.model import MODELS, build_llava, make_model, model_spec, param_counts  # noqa: E402
from aim_kernels.continual.taskfolder import write_photo_tasks  # noqa: E402
from aim_kernels.groups import assign, resolve_groups  # noqa: E402

FAST = ["--steps", "2", "--batch", "4", "--pretrain-steps", "2", "--no-progress", "--joint-factor", "1"]


@pytest.mark.slow
def test_compare_on_a_llava_folder_four_methods_two_jobs(tmp_path):
    folder = write_photo_tasks(tmp_path / "tasks", n_train=12, n_test=6, tasks=("colour", "count", "where"),
                               n_captions=4)
    out = tmp_path / "out"
    assert cli.main(["compare", "--data", str(folder), "--methods", "naive,mm-ewc,aim,joint", "--seeds", "1",
                     "--jobs", "2", "--cache", str(tmp_path / "c"), "--out", str(out)] + FAST) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["methods"]) == {"naive", "mm-ewc", "aim"} and "joint" in s
    assert s["config"]["skills"] == ["colour", "count", "where"]
    assert s["config"]["task_orders"] == [["colour", "count", "where"]] and s["config"]["seeds"] == [1]
    assert s["data"]["source"].startswith("manifest:") and len(s["data"]["hash"]) == 16
    assert s["config"]["model"]["name"] == "tiny" and s["versions"]["torch"] and "CPU" in s["device"]
    assert set(s["paired_vs_naive"]) == {"mm-ewc", "aim"}
    assert set(s["learnt_check"]["chance"]) == {"colour", "count", "where"}
    assert np.array(s["methods"]["aim"]["acc_matrix"]).shape == (3, 3)
    report = (out / "report.md").read_text()
    assert "## Learnt-task check" in report and "## Against naive" in report
    for png in ("acc_matrices.png", "ap_af.png", "drift.png"):
        assert (out / png).stat().st_size > 1000


def _vqa_files(d):
    from PIL import Image
    (d / "val2014").mkdir(parents=True)
    for i, c in ((1, (255, 0, 0)), (2, (0, 0, 255))):
        Image.new("RGB", (40, 40), c).save(d / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    rows = [(q, 1 + q % 2, f"What color is the {w}?", "what color is the", "other", ("red", "blue")[q % 2])
            for q, w in enumerate(("bus", "car", "cup", "sky"))]
    rows += [(10 + q, 1 + q % 2, f"How many {w} are there?", "how many", "number", ("one", "2")[q % 2])
             for q, w in enumerate(("dogs", "cats", "cups", "cars"))]
    (d / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(
        {"questions": [{"question_id": q, "image_id": i, "question": t} for q, i, t, *_ in rows]}))
    (d / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(
        {"annotations": [{"question_id": q, "image_id": i, "question_type": qt, "answer_type": at,
                          "multiple_choice_answer": a} for q, i, _, qt, at, a in rows]}))
    return d


def _gqa_files(d):
    from PIL import Image
    (d / "images").mkdir(parents=True)
    Image.new("RGB", (40, 40), (0, 255, 0)).save(d / "images" / "n1.jpg")
    qs = {f"c{k}": {"imageId": "n1", "question": "What color is the car?", "answer": ("green", "red")[k % 2],
                    "types": {"structural": "query", "semantic": "attr", "detailed": "colorQuery"}}
          for k in range(4)}
    qs.update({f"j{k}": {"imageId": "n1", "question": "Is there a dog?", "answer": ("yes", "no")[k % 2],
                         "types": {"structural": "verify", "semantic": "obj", "detailed": "existVerify"}}
               for k in range(4)})
    (d / "val_balanced_questions.json").write_text(json.dumps(qs))
    return d


@pytest.mark.slow
@pytest.mark.parametrize("scheme, make, tasks", [("vqa-v2", _vqa_files, ["count", "color"]),
                                                 ("gqa", _gqa_files, ["judge", "color"])])
def test_compare_on_vqa_v2_and_gqa_files(tmp_path, scheme, make, tasks):
    d = make(tmp_path / "raw")
    out = tmp_path / "out"
    assert cli.main(["compare", "--data", f"{scheme}:{d}", "--methods", "naive,aim,joint", "--seeds", "1",
                     "--cache", str(tmp_path / "c"), "--out", str(out)] + FAST) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["skills"] == tasks and s["data"]["source"].startswith(scheme)
    assert all(a >= 1 and b >= 1 for a, b in s["data"]["examples"].values())


def test_asym_decoder_is_50x_the_projector():
    asym = param_counts(build_llava(MODELS["asym"], 0))
    assert asym["decoder_over_projector"] >= 50
    assert asym["decoder"]["all"] >= 50 * asym["projector"]["trainable"]
    assert param_counts(build_llava(MODELS["tiny"], 0))["decoder_over_projector"] < 15
    with pytest.raises(ValueError, match="--model 'huge'"):
        model_spec("huge")


def test_lora_groups_come_out_right_through_peft_names(tmp_path):
    pytest.importorskip("peft")
    spec = model_spec("tiny", lora=2, hidden=16, layers=1, vision_layers=1, heads=2, pretrain_steps=0)
    model, _ = make_model(spec, 0, cache=str(tmp_path))
    groups = assign(model, resolve_groups(model, ak.preset("aim")), user_groups=False)
    names = {g: [n for n, _ in ps] for g, ps in groups.items()}
    assert names["vision"] == []
    assert names["projector"] and all("multi_modal_projector" in n for n in names["projector"])
    assert names["language"] and all("lora_" in n and "language_model" in n for n in names["language"])
    n = param_counts(model)
    assert n["projector"]["trainable"] == n["projector"]["all"]          # projector trained fully
    assert 0 < n["decoder"]["trainable"] < n["decoder"]["all"] / 5
    ak.attach(model, ak.preset("aim"))
    ak.detach(model)


def test_lora_vocab_trains_embeddings_and_head_in_the_language_group(tmp_path):
    """--lora-vocab: the word embeddings and the output head train with the adapters (they are
    frozen, at their random init for the benchmark's new words, under plain --lora)."""
    pytest.importorskip("peft")
    kw = dict(hidden=16, layers=1, vision_layers=1, heads=2, pretrain_steps=0)
    plain, _ = make_model(model_spec("tiny", lora=2, **kw), 0, cache=str(tmp_path))
    vocab, _ = make_model(model_spec("tiny", lora=2, lora_vocab=True, **kw), 0, cache=str(tmp_path))
    def trainable(m):
        return {n for n, p in m.named_parameters() if p.requires_grad}
    extra = trainable(vocab) - trainable(plain)
    assert extra and all("lm_head" in n or "embed_tokens" in n for n in extra)
    assert any("lm_head" in n for n in extra) and any("embed_tokens" in n for n in extra)
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable(plain))
    groups = assign(vocab, resolve_groups(vocab, ak.preset("aim")), user_groups=False)
    assert extra <= {n for n, _ in groups["language"]}
    with pytest.raises(ValueError, match="--lora-vocab needs --lora"):
        model_spec("tiny", lora_vocab=True)
