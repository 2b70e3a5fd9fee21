"""Data sources, tree validation, unreadable images and deterministic loaders."""
from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from topo.data import DATASETS, ImageTree, ShardSampler, load, make_loader, take_skipped
from topo.data.folders import read_rgb
from topo.data.sample_tree import add_broken_images
from topo.common.errors import DataError, UserError


def _one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert isinstance(excinfo.value, UserError)
    for fragment in fragments:
        assert fragment in message, message
    return message


# ----------------------------------------------------------------------------- image folders


def test_imagenet_tree_loads_with_sorted_shared_classes(image_tree: Path) -> None:
    bundle = load("imagenet", image_tree, image_size=32)
    assert bundle.name == "imagenet"
    assert bundle.class_names == ["china", "flower"]
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (2, 3, (32, 32))
    assert bundle.train.class_to_idx == bundle.val.class_to_idx == {"china": 0, "flower": 1}
    assert len(bundle.train) == 2 * 6 + 3  # plus the grayscale, palette and CMYK images
    assert len(bundle.val) == 2 * 3
    assert Counter(bundle.val.targets) == {0: 3, 1: 3}
    x, y = bundle.val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    torch.testing.assert_close(bundle.val[0][0], x)  # evaluation preprocessing is deterministic
    # ImageNet normalisation: values leave [0, 1] on both sides for real photographs
    assert x.min() < 0 and x.max() > 1


def test_imagenet_training_augmentation_is_random_and_seeded(image_tree: Path) -> None:
    train = load("imagenet", image_tree, image_size=32).train
    torch.manual_seed(0)
    a = train[0][0]
    torch.manual_seed(0)
    b = train[0][0]
    c = train[0][0]
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def test_imagenet_pipelines_follow_the_recipe() -> None:
    from torchvision.transforms import v2

    from topo.data.transforms import imagenet_eval, imagenet_train

    steps = {type(t): t for t in imagenet_train(224).transforms}
    crop = steps[v2.RandomResizedCrop]
    assert list(crop.size) == [224, 224] and list(crop.scale) == [0.08, 1.0]
    assert list(crop.ratio) == pytest.approx([3 / 4, 4 / 3])
    assert steps[v2.RandomHorizontalFlip].p == 0.5
    normalize = steps[v2.Normalize]
    assert list(normalize.mean) == [0.485, 0.456, 0.406] and list(normalize.std) == [0.229, 0.224, 0.225]
    steps = {type(t): t for t in imagenet_eval(224).transforms}
    assert list(steps[v2.Resize].size) == [256] and list(steps[v2.CenterCrop].size) == [224, 224]


def test_imagenet_default_size_is_224(image_tree: Path) -> None:
    bundle = load("imagenet", image_tree)
    assert bundle.image_size == (224, 224)
    assert bundle.train[0][0].shape == bundle.val[0][0].shape == (3, 224, 224)


def test_folder_has_its_own_size_and_accepts_validation_folder(copy_tree) -> None:
    root = copy_tree()
    (root / "val").rename(root / "validation")
    bundle = load("folder", root, image_size=24)
    assert bundle.name == "folder" and bundle.image_size == (24, 24)
    assert bundle.train[3][0].shape == bundle.val[5][0].shape == (3, 24, 24)


def test_grayscale_palette_and_cmyk_become_rgb(image_tree: Path) -> None:
    from PIL import Image

    folder = image_tree / "train" / "china"
    modes = {name: Image.open(folder / name).mode for name in ("gray.png", "palette.png", "cmyk.jpg")}
    assert modes == {"gray.png": "L", "palette.png": "P", "cmyk.jpg": "CMYK"}
    gray = np.asarray(read_rgb(str(folder / "gray.png")))
    assert gray.shape == (40, 48, 3)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    palette = read_rgb(str(folder / "palette.png"))
    cmyk = read_rgb(str(folder / "cmyk.jpg"))
    assert palette.mode == cmyk.mode == "RGB"
    # the three were written from the same crop: their colours agree roughly
    reference = np.asarray(Image.open(folder / "gray.png"), dtype=float)
    for image in (palette, cmyk):
        luma = np.asarray(image.convert("L"), dtype=float)
        assert np.abs(luma - reference).mean() < 12
    tree = ImageTree(image_tree / "train")  # no transform: PIL images straight from the loader
    indices = [i for i, (p, _) in enumerate(tree.samples) if Path(p).name in modes]
    assert len(indices) == 3 and all(tree[i][0].mode == "RGB" for i in indices)


def test_unreadable_images_are_skipped_and_counted(broken_image_tree: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="topo.data"):
        train = load("imagenet", broken_image_tree, image_size=16).train
    # the garbled file's header gives it away at once
    assert len(train) == 16 and {Path(p).name for p in train.skipped} == {"garbled.jpg"}
    assert "skipped 1 of 17 images" in caplog.text
    # the truncated JPEG only fails to decode; reading substitutes the next sample
    with caplog.at_level(logging.WARNING, logger="topo.data"):
        shapes = {tuple(train[i][0].shape) for i in range(len(train))}
    assert shapes == {(3, 16, 16)}
    assert {Path(p).name for p in train.skipped} == {"garbled.jpg", "truncated.jpg"}
    assert "truncated.jpg" in caplog.text and "2 skipped so far" in caplog.text


def test_unreadable_images_found_while_reading_are_skipped(broken_image_tree: Path) -> None:
    tree = ImageTree(broken_image_tree / "train", verify=False)
    assert len(tree) == 17
    images = [tree[i] for i in range(len(tree))]
    assert all(image.mode == "RGB" for image, _ in images)  # every index still yields an image
    assert {Path(p).name for p in tree.skipped} == {"garbled.jpg", "truncated.jpg"}
    names = [Path(p).name for p, _ in tree.samples]
    bad = names.index("garbled.jpg")
    stand_in = np.asarray(read_rgb(tree.samples[bad + 1][0]))  # the next sample stands in
    assert np.array_equal(np.asarray(images[bad][0]), stand_in) and images[bad][1] == tree.samples[bad + 1][1]


def test_strict_makes_unreadable_images_an_error(broken_image_tree: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load("imagenet", broken_image_tree, strict=True)
    _one_line_error(excinfo, "garbled.jpg", "cannot be read")
    tree = ImageTree(broken_image_tree / "train", strict=True, verify=False)
    bad = next(i for i, (p, _) in enumerate(tree.samples) if p.endswith("truncated.jpg"))
    with pytest.raises(DataError) as excinfo:
        tree[bad]
    _one_line_error(excinfo, "truncated.jpg")


def test_skipped_reads_are_totalled_over_loader_workers(broken_image_tree: Path) -> None:
    train = load("imagenet", broken_image_tree, image_size=16, verify=False).train
    names = [Path(p).name for p, _ in train.samples]
    bad = [names.index("garbled.jpg"), names.index("truncated.jpg")]
    # one bad image per batch, and DataLoader hands batches to its two workers in turn
    loader = torch.utils.data.DataLoader(train, batch_size=1, sampler=bad, num_workers=2)
    assert [x.shape for x, _ in loader] == [(1, 3, 16, 16)] * 2
    assert not train.skipped  # each worker kept its own set of skipped paths
    assert take_skipped(train) == 2 and take_skipped(train) == 0  # taking resets
    train[bad[0]]  # reads in this process count too
    assert take_skipped(train) == 1
    assert take_skipped(TensorDataset(torch.zeros(3))) == 0  # data sets that never skip


def test_training_logs_the_unreadable_images_of_each_epoch(copy_tree, caplog) -> None:
    from topo.train.config import TrainConfig
    from topo.train.trainer import train

    root = copy_tree()
    add_broken_images(root / "train" / "china")
    add_broken_images(root / "val" / "flower")
    bundle = load("folder", root, image_size=16)  # the header check drops the garbled files
    assert (len(bundle.train), len(bundle.val)) == (16, 7)
    bundle.train[[Path(p).name for p, _ in bundle.train.samples].index("truncated.jpg")]  # not the run's
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 2))
    config = TrainConfig(epochs=2, batch_size=4, workers=2, device="cpu", ema_decay=0.9, progress=False)
    with caplog.at_level(logging.WARNING, logger="topo.train"):
        train(model, bundle.train, bundle.val, config, name="cnn")
    totals = [r.getMessage() for r in caplog.records if r.name == "topo.train.trainer"]
    # every image is read once per epoch by one of the workers; the EMA's evaluation does not count twice
    assert totals == [f"cnn epoch {e}: skipped unreadable images, 1 in training and 1 in validation" for e in (1, 2)]


# ----------------------------------------------------------------------------- bad data


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load("imagenet", tmp_path / "nowhere")
    _one_line_error(excinfo, "nowhere", "does not exist", "--data-dir")
    with pytest.raises(DataError) as excinfo:
        load("folder")
    _one_line_error(excinfo, "--data-dir")


def test_a_file_as_data_directory_says_it_is_a_file(image_tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "imagenet.tar"
    archive.write_bytes(b"not a folder")
    with pytest.raises(DataError) as excinfo:
        load("imagenet", archive)
    message = _one_line_error(excinfo, str(archive), "is a file, not a folder", "--data-dir", "train/ and val/")
    assert "does not exist" not in message
    with pytest.raises(DataError) as excinfo:  # an image inside the tree, not the tree
        load("folder", next((image_tree / "train" / "china").iterdir()))
    _one_line_error(excinfo, "is a file, not a folder")


def test_missing_train_or_val(copy_tree) -> None:
    root = copy_tree("no_train")
    shutil.rmtree(root / "train")
    with pytest.raises(DataError) as excinfo:
        load("imagenet", root)
    _one_line_error(excinfo, "no train/", str(root))
    root = copy_tree("no_val")
    shutil.rmtree(root / "val")
    with pytest.raises(DataError) as excinfo:
        load("imagenet", root)
    _one_line_error(excinfo, "no val/ (or validation/)", str(root))


def test_flat_val_folder_says_how_to_fix(copy_tree) -> None:
    root = copy_tree()
    for image in list((root / "val").rglob("*.*")):
        image.rename(root / "val" / image.name)
    for folder in [p for p in (root / "val").iterdir() if p.is_dir()]:
        folder.rmdir()
    with pytest.raises(DataError) as excinfo:
        load("imagenet", root)
    _one_line_error(excinfo, "holds 6 images but no class folders", "valprep", "folder named after its class")


def test_empty_val_and_empty_class_folder(copy_tree) -> None:
    root = copy_tree("empty_val")
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    with pytest.raises(DataError) as excinfo:
        load("imagenet", root)
    _one_line_error(excinfo, "is empty")
    root = copy_tree("empty_class")
    for image in (root / "val" / "flower").iterdir():
        image.unlink()
    with pytest.raises(DataError) as excinfo:
        load("imagenet", root)
    _one_line_error(excinfo, "flower", "holds no readable images")


def test_classes_differ_between_splits(copy_tree) -> None:
    root = copy_tree()
    (root / "val" / "flower").rename(root / "val" / "tulip")
    with pytest.raises(DataError) as excinfo:
        load("imagenet", root)
    _one_line_error(excinfo, "classes differ", "only in train [flower]", "only in val [tulip]")


def test_hidden_folders_are_not_classes(copy_tree) -> None:
    root = copy_tree()
    (root / "val" / ".ipynb_checkpoints").mkdir()
    assert load("folder", root, image_size=16).class_names == ["china", "flower"]


def test_unknown_data_set_name() -> None:
    with pytest.raises(DataError) as excinfo:
        load("mnist")
    _one_line_error(excinfo, "'mnist'", "digits")


# ----------------------------------------------------------------------------- other sources


@pytest.mark.parametrize("name, archive", [("cifar10", "cifar-10-python.tar.gz"), ("cifar100", "cifar-100-python.tar.gz")])
def test_cifar_not_found_without_download_says_where(tmp_path: Path, name: str, archive: str) -> None:
    with pytest.raises(DataError) as excinfo:
        load(name, tmp_path, download=False)
    _one_line_error(excinfo, str(tmp_path), archive, "https://www.cs.toronto.edu/~kriz/")
    assert not any(tmp_path.iterdir())  # nothing was downloaded or created


def test_fake_is_deterministic_per_seed() -> None:
    bundle = load("fake", image_size=16, num_classes=3, fake_sizes=(20, 10))
    assert (len(bundle.train), len(bundle.val), bundle.num_classes, bundle.image_size) == (20, 10, 3, (16, 16))
    x, y = bundle.train[4]
    assert x.shape == (3, 16, 16) and 0 <= int(y) < 3
    torch.testing.assert_close(load("fake", image_size=16, num_classes=3, fake_sizes=(20, 10)).train[4][0], x)
    assert not torch.equal(bundle.val[4][0], x)
    assert not torch.equal(load("fake", image_size=16, num_classes=3, fake_sizes=(20, 10), seed=1).train[4][0], x)


def test_digits_split_is_fixed_stratified_and_normalised() -> None:
    torch.manual_seed(123)
    np.random.seed(123)
    bundle = load("digits", seed=7)  # neither the global RNGs nor the seed move the split
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, (8, 8))
    assert bundle.class_names == [str(d) for d in range(10)]
    x_train, y_train = bundle.train.tensors
    x_val, y_val = bundle.val.tensors
    assert x_train.shape == (1437, 1, 8, 8) and x_val.shape == (360, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    total = Counter(y_train.tolist()) + Counter(y_val.tolist())
    for digit, count in Counter(y_val.tolist()).items():
        assert abs(count - 0.2 * total[digit]) <= 1  # stratified
    assert abs(float(x_train.mean())) < 1e-5 and abs(float(x_train.std()) - 1) < 1e-3
    # pinned: the split must never change between versions
    assert y_val[:12].tolist() == PINNED_VAL_LABELS
    assert int(y_val.sum()) == PINNED_VAL_LABEL_SUM
    again = load("digits")
    assert torch.equal(again.val.tensors[0], x_val) and torch.equal(again.train.tensors[1], y_train)
    assert load("digits", image_size=16).train.tensors[0].shape == (1437, 1, 16, 16)


PINNED_VAL_LABELS = [1, 4, 8, 6, 5, 9, 9, 1, 3, 2, 2, 2]
PINNED_VAL_LABEL_SUM = 1618


def test_every_named_data_set_is_registered() -> None:
    assert set(DATASETS) == {"imagenet", "folder", "cifar10", "cifar100", "digits", "fake", "tensors", "planted",
                             "patches"}


# ----------------------------------------------------------------------------- loaders


def _labels(loader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


def test_training_order_depends_only_on_seed_and_epoch() -> None:
    data = TensorDataset(torch.arange(50).float(), torch.arange(50))
    loader = make_loader(data, batch_size=8, train=True, seed=3, device="cpu")
    assert loader.num_workers == 0 and not loader.pin_memory
    assert len(loader) == 6  # 50 // 8: the incomplete batch is dropped
    epochs = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        epochs.append(_labels(loader))
    assert all(len(e) == 48 and len(set(e)) == 48 for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    fresh = make_loader(data, batch_size=8, train=True, seed=3, device="cpu")
    fresh.set_epoch(2)
    assert _labels(fresh) == epochs[2]  # no dependence on the epochs before
    other = make_loader(data, batch_size=8, train=True, seed=4, device="cpu")
    other.set_epoch(2)
    assert _labels(other) != epochs[2]


def test_evaluation_loader_keeps_every_sample_in_order() -> None:
    data = TensorDataset(torch.zeros(21), torch.arange(21))
    loader = make_loader(data, batch_size=8, train=False, device="cpu")
    assert _labels(loader) == list(range(21))


def test_worker_augmentation_is_reproducible_per_epoch(image_tree: Path) -> None:
    train = load("imagenet", image_tree, image_size=16).train

    def epoch_batches(epoch: int) -> list[torch.Tensor]:
        loader = make_loader(train, batch_size=5, train=True, seed=0, workers=1, device="cpu")
        loader.set_epoch(epoch)
        return [x for x, _ in loader]

    first, again, other = epoch_batches(1), epoch_batches(1), epoch_batches(2)
    assert len(first) == 3
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b)
    assert not torch.equal(first[0], other[0])


def test_shard_sampler_never_pads() -> None:
    shards = [list(ShardSampler(11, 3, rank)) for rank in range(3)]
    assert [len(ShardSampler(11, 3, rank)) for rank in range(3)] == [len(s) for s in shards] == [4, 4, 3]
    assert sorted(i for s in shards for i in s) == list(range(11))
