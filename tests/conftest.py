"""Shared pytest set-up: `cuda`-marked tests skip without a GPU; quiet transformers."""
import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing is ever downloaded


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to PyTorch)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
