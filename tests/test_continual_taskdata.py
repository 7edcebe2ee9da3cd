"""``--data``: LLaVA-conversation manifests and the VQA v2 / GQA loaders' files read into
tasks, VQA-style answer normalisation, and bad input refused -- naming the file and the
record -- before any model is built."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("PIL")
from aim_kernels import cli  # noqa: E402
from aim_kernels.continual import compare as cmp  # noqa: E402
from aim_kernels.continual import taskdata  # noqa: E402
from aim_kernels.continual.taskdata import TaskDataError, normalize_answer  # noqa: E402
from aim_kernels.continual.taskfolder import write_photo_tasks  # noqa: E402


@pytest.mark.parametrize("raw, norm", [("Two", "2"), ("a circle", "circle"), ("Top left.", "top left"),
                                       ("The Red one!", "red 1"), ("3.5", "3.5"), ("yes", "yes"),
                                       ("an apple, please", "apple please")])
def test_vqa_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_photo_tasks(tmp_path_factory.mktemp("photo"), n_train=12, n_test=6,
                             tasks=("colour", "count", "where"), n_captions=4)


def test_manifest_is_read_in_order_with_normalised_answers(folder):
    ts = taskdata.load(str(folder))
    assert list(ts.train) == ["colour", "count", "where"]
    assert ts.train["colour"].images.shape == (12, 3, 32, 32) and ts.train["colour"].images.dtype == torch.uint8
    words = {i: w for w, i in taskdata.WordTokenizer(taskdata.read_manifest(folder)).ids.items()}
    count = {words[int(a)] for a in ts.train["count"].candidates}
    assert count <= {"1", "2", "3"}                          # "Two" -> "2"
    assert {words[int(a)] for a in ts.train["where"].candidates} <= {"top_left", "top_right",
                                                                     "bottom_left", "bottom_right"}
    assert ts.image_token == ts.vocab_size - 1 and len(ts.data_hash) == 16
    assert ts.captions is not None and len(ts.captions) == 4
    assert ts.pretrain_images.shape[0] == 36 and ts.pretrain_questions.shape[0] == 36


def _manifest(tmp_path, tasks, images=("a.png",), **extra):
    from PIL import Image
    (tmp_path / "img").mkdir(exist_ok=True)
    for name in images:
        Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "img" / name)
    entries = []
    for name, (train, test) in tasks.items():
        for split, recs in (("train", train), ("test", test)):
            (tmp_path / f"{name}-{split}.json").write_text(json.dumps(recs))
        entries.append({"name": name, "train": f"{name}-train.json", "test": f"{name}-test.json"})
    (tmp_path / "tasks.json").write_text(json.dumps({"image_folder": "img", "tasks": entries, **extra}))
    return tmp_path


def _rec(rid, image="a.png", q="<image>\nWhat color?", a="red"):
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": q},
                                                         {"from": "gpt", "value": a}]}


@pytest.mark.parametrize("case, message", [
    ("image", r"t-train\.json: record 1 \(id 'r2'\): image not found: .*img/gone\.png"),
    ("empty", r"t-test\.json: task 't' has an empty test split"),
    ("conversation", r"t-train\.json: record 0 \(id 'r1'\): malformed 'conversations'"),
    ("placeholder", r"t-train\.json: record 0 \(id 'r1'\): the human turn has no '<image>'"),
    ("missing", r"task 't' test: file not found: .*t-test\.json"),
    ("json", r"t-train\.json: not valid JSON"),
])
def test_bad_manifests_name_the_file_and_record(tmp_path, case, message):
    train, test = [_rec("r1"), _rec("r2")], [_rec("r3")]
    if case == "image":
        train[1] = _rec("r2", image="gone.png")
    if case == "empty":
        test = []
    if case == "conversation":
        train[0]["conversations"] = [{"from": "gpt", "value": "red"}]
    if case == "placeholder":
        train[0] = _rec("r1", q="What color?")
    d = _manifest(tmp_path, {"t": (train, test)})
    if case == "missing":
        (d / "t-test.json").unlink()
    if case == "json":
        (d / "t-train.json").write_text("[{")
    with pytest.raises(TaskDataError, match=message):
        taskdata.load(str(d))


def test_unknown_scheme_and_missing_manifest(tmp_path):
    with pytest.raises(TaskDataError, match="unknown scheme 'coco'"):
        taskdata.read_source(f"coco:{tmp_path}")
    with pytest.raises(TaskDataError, match="file not found: .*tasks.json"):
        taskdata.read_source(str(tmp_path))


def test_cli_refuses_bad_data_before_building_a_model(tmp_path, monkeypatch):
    d = _manifest(tmp_path, {"t": ([_rec("r1"), _rec("r2", image="gone.png")], [_rec("r3")])})
    built = []
    monkeypatch.setattr(cmp, "make_model", lambda *a, **k: built.append(1))
    with pytest.raises(SystemExit, match="bad --data: .*record 1 \\(id 'r2'\\): image not found"):
        cli.main(["compare", "--data", str(d), "--methods", "naive", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="unknown scheme"):
        cli.main(["compare", "--data", f"vqa:{d}", "--methods", "naive", "--out", str(tmp_path / "o")])
    assert not built


def test_missing_optional_dependency_is_reported_before_training(tmp_path, monkeypatch):
    """Installed without matplotlib, compare used to train for minutes and crash in the plots."""
    import importlib.util

    from aim_kernels.continual import deps
    real = importlib.util.find_spec
    monkeypatch.setattr(deps.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    built = []
    monkeypatch.setattr(cmp, "make_model", lambda *a, **k: built.append(1))
    with pytest.raises(SystemExit, match=r"missing optional dependencies: matplotlib\. .*aim_kernels\[continual\]"):
        cli.main(["compare", "--methods", "naive", "--seeds", "1", "--out", str(tmp_path / "o")])
    assert not built
    monkeypatch.setattr(deps.importlib.util, "find_spec",
                        lambda name, *a: None if name == "peft" else real(name, *a))
    assert deps.missing() == [] and deps.missing(lora=True) == ["peft"]


def test_pyproject_continual_extra_has_everything_compare_imports():
    import re
    from pathlib import Path

    from aim_kernels.continual import deps
    text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    extra = re.search(r"^continual = \[(.*?)\]", text, re.M | re.S).group(1)
    names = {re.match(r'"([A-Za-z0-9_.-]+)', x.strip()).group(1).lower() for x in extra.split(",") if x.strip()}
    assert set(deps.NEEDED.values()) | set(deps.LORA.values()) <= names
