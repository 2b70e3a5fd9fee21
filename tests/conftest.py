"""Shared fixtures: one intra-op thread for a test or a module, scikit-learn's digits, a GoogLeNet trained on
them for the export tests, small ImageFolder trees of real photographs, and GPU test skipping.

Plain helper functions shared by test modules are in checks.py and gloo_group.py: conftest.py is not
importable by name."""
from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from topo.data import load
from topo.data.sample_tree import add_broken_images, write_sample_tree


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """``n`` intra-op threads inside the block; the count before it restored after it, also on an error."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread (bitwise-reproducible CPU training), then restore."""
    with _threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """One intra-op thread from the first request in a module to the module's end, then the count before it
    restored: request it from a module-scoped fixture that computes on one thread (module-scoped fixtures
    are set up before the function-scoped ``one_thread``), so that later modules keep their threads."""
    with _threads(1):
        yield


@pytest.fixture(scope="module")
def digits():
    """``topo.data.load("digits")``: scikit-learn's digits, split into train and val."""
    return load("digits")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits, one_thread_module) -> tuple[nn.Module, Path]:
    """GoogLeNet's small-input variant at width 0.25 trained for two epochs on digits, and its run directory
    (the export tests, test_export.py and test_cli_results.py)."""
    # imported here: a test session that does not train need not import the training stack (about 1 s)
    import builders
    from topo.common.writing import atomic_write_text
    from topo.run.config import RunConfig
    from topo.run.rundir import RunDir
    from topo.train.config import TrainConfig
    from topo.train.trainer import train

    run = RunDir(tmp_path_factory.mktemp("runs") / "run")
    config = RunConfig(data="digits", controls=False, train=TrainConfig(epochs=2, batch_size=64, workers=0, progress=False))
    run.write_config(config.to_dict())
    spec = builders.googlenet_spec("small", num_classes=10, width_mult=0.25, in_channels=1, input_size=8)
    atomic_write_text(run.topology, spec.to_json() + "\n")
    torch.manual_seed(0)
    result = train(builders.build(spec), digits.train, digits.val, config.train, run_dir=run.training.root,
                   name="discovered")
    return result.model, run.root


@pytest.fixture(scope="module")
def images(digits) -> torch.Tensor:
    """50 validation digits: a batch size other than the export's example batch of 2."""
    return torch.stack([digits.val[i][0] for i in range(50)])


@pytest.fixture(scope="module")
def want(trained, images) -> torch.Tensor:
    """The trained network's logits on ``images``, which exported files must reproduce (``checks.close``)."""
    model, _ = trained
    with torch.no_grad():
        logits = model.eval()(images)
    assert logits.abs().max() > 1.0  # a trained network: a comparison at ATOL means something
    return logits


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
