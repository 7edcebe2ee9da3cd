"""The answer-free visual warm-up (``--data``) leaves image features that differ between
images and tell apart what the tasks ask about, on a tiny photo-like folder."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")
from aim_kernels.continual import taskdata  # noqa: E402
from aim_kernels.continual.model import build_llava, make_model, model_spec, vision_tower  # noqa: E402
from aim_kernels.continual.taskfolder import write_photo_tasks  # noqa: E402


def _features(model, images):
    """Patch features the projector reads, flattened per image (the test's own reading, so
    it holds for any warm-up behind ``make_model``)."""
    vc = model.config.vision_config
    n_patch = (vc.image_size // vc.patch_size) ** 2
    with torch.no_grad():
        return vision_tower(model)(pixel_values=images.float() / 255).last_hidden_state[:, -n_patch:]


def _probe(model, train, test) -> float:
    """Test accuracy (%) of a ridge-regression probe on frozen features (closed form)."""
    xtr, xte = _features(model, train.images).flatten(1), _features(model, test.images).flatten(1)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    classes, ytr = torch.unique(train.answers, return_inverse=True)
    onehot = torch.nn.functional.one_hot(ytr, len(classes)).float()
    w = torch.linalg.solve(xtr.T @ xtr + 10.0 * torch.eye(xtr.shape[1]), xtr.T @ onehot)
    return 100.0 * float((classes[(xte @ w).argmax(-1)] == test.answers).float().mean())


@pytest.fixture
def one_thread():
    # this small a model runs 4x slower on two threads of a shared machine than on one
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    folder = write_photo_tasks(tmp_path_factory.mktemp("warm"), n_train=160, n_test=80, seed=3,
                               tasks=("size", "where"))
    return taskdata.load(str(folder))


@pytest.mark.slow
def test_warm_up_features_separate_images_and_read_size_and_position(photo, tmp_path, one_thread):
    spec = model_spec("tiny", pretrain_steps=600, pretrain_batch=32)
    cold = build_llava(spec, 0, photo.vocab_size, photo.bos)
    model, info = make_model(spec, 0, cache=str(tmp_path), bench=photo)
    spread0 = float(_features(cold, photo.pretrain_images).std(0).mean())
    spread = float(_features(model, photo.pretrain_images).std(0).mean())
    # the image tokens must keep differing between images (the old warm-up: 0.008 from 0.255)
    assert spread > 0.5 * spread0, (spread, spread0)
    # measured (seeds 3 / 4): size 68 -> 95 / 74 -> 88, position 81 -> 100 / 88 -> 100; the
    # old warm-up lost position (96 -> 70 on 400 images a task)
    probes = {t: (_probe(cold, photo.train[t], photo.test[t]), _probe(model, photo.train[t], photo.test[t]))
              for t in ("size", "where")}
    assert probes["where"][1] >= 95 and probes["size"][1] >= max(80.0, probes["size"][0] + 10), probes
    assert not any(p.requires_grad for p in vision_tower(model).parameters())
    assert info["warmup_spread"] > 0.5 * info["warmup_spread_before"]
