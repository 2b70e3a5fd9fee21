"""Shared fixtures: small ImageFolder trees of real photographs, and GPU test skipping."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from topo.data.sample_tree import add_broken_images, write_sample_tree


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread (bitwise-reproducible CPU training), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train/`` and ``val/`` with classes ``china`` and ``flower`` (48x40 crops of scikit-learn's
    sample photos, JPEG and PNG), plus a grayscale, a palette and a CMYK image in ``train/china``.
    Session-scoped: do not modify it; copy it (see ``copy_tree``) first."""
    return write_sample_tree(tmp_path_factory.mktemp("image_tree"))


@pytest.fixture
def copy_tree(image_tree: Path, tmp_path: Path):
    """A function returning a fresh, modifiable copy of ``image_tree`` under ``tmp_path``."""

    def copy(name: str = "tree") -> Path:
        return Path(shutil.copytree(image_tree, tmp_path / name))

    return copy


@pytest.fixture(scope="session")
def broken_image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``image_tree``'s layout with a garbled file and a truncated JPEG added to ``train/china``."""
    root = write_sample_tree(tmp_path_factory.mktemp("broken_image_tree"))
    add_broken_images(root / "train" / "china")
    return root
