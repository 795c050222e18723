"""Shared fixtures: tiny Gemma 4 checkpoints built once per test session (no hub, no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _deterministic():
    """Every test starts from the same default dtype and seed; CPU thread count kept small for CI."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny-model training: its ops are too small to split, so extra threads only fight over CI cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_ONE_THREAD_DIRS = ("tests/train/", "tests/memory/test_activation_offload.py", "tests/memory/test_tiled_mlp.py")


def pytest_collection_modifyitems(items):
    for item in items:
        if any(d in item.nodeid for d in _ONE_THREAD_DIRS):
            item.add_marker(pytest.mark.usefixtures("one_thread"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: tiny_dir(variant="e2b", text_only=False) → path of a tiny checkpoint folder (cached)."""
    from slimtune.models.tiny import write_tiny_model

    cache: dict = {}

    def make(variant: str = "e2b", text_only: bool = False, size: str = "test"):
        key = (variant, text_only, size)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{variant}-{'text' if text_only else 'mm'}-{size}") / "model"
            cache[key] = write_tiny_model(out, variant=variant, text_only=text_only, seed=0, size=size)
        return cache[key]

    return make


def requires_cuda():
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
