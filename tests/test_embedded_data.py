"""The embedded ``patches`` data set: real shipped photographs, fixed region split, no network."""
from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import builders
from topo.data import DATASETS, load
from topo.data import patches as P
from topo.common.errors import DataError


@pytest.fixture(scope="module")
def bundle():
    return load("patches")


@pytest.fixture(scope="module")
def layouts() -> list[P.Layout]:
    return [P.layout(k, P.read_grey(name)) for k, name in enumerate(P.IMAGES)]


def _labels(dataset) -> np.ndarray:
    return dataset.tensors[1].numpy()


def test_shapes_classes_and_registry(bundle) -> None:
    assert "patches" in DATASETS
    assert (bundle.name, bundle.num_classes, bundle.in_channels, bundle.image_size) == ("patches", 11, 1, (20, 20))
    assert bundle.class_names == ["astronaut", "brick", "chelsea", "coffee", "coins", "grass", "gravel", "ihc",
                                  "motorcycle_left", "page", "text"]
    x, y = bundle.train.tensors
    assert x.shape == (11 * 200, 1, 20, 20) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert bundle.val.tensors[0].shape == (11 * 100, 1, 20, 20)


def test_labels_are_balanced(bundle) -> None:
    np.testing.assert_array_equal(np.bincount(_labels(bundle.train)), [200] * 11)
    np.testing.assert_array_equal(np.bincount(_labels(bundle.val)), [100] * 11)


def test_each_patch_is_standardised_on_its_own(bundle) -> None:
    x = bundle.train.tensors[0].numpy().astype(np.float64).reshape(len(bundle.train), -1)
    np.testing.assert_allclose(x.mean(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(x.std(axis=1), 1.0, atol=1e-5)


def test_loading_twice_gives_the_same_tensors(bundle) -> None:
    again = load("patches")
    for a, b in ((bundle.train, again.train), (bundle.val, again.val)):
        assert all(torch.equal(s, t) for s, t in zip(a.tensors, b.tensors))


def test_patches_are_the_photographs_pixels_at_the_layout(layouts) -> None:
    """At the native size each patch is its window of the grey photograph, standardised (numpy reference)."""
    native = load("patches", image_size=P.PATCH)
    x, y = (t.numpy() for t in native.val.tensors)
    for k in (0, 6, 10):  # a photograph, a texture, a scan
        image = np.asarray(Image.open(P.image_dir() / list(P.IMAGES)[k]).convert("L"), dtype=np.float64) / 255
        for (row, col), got in zip(layouts[k].val_corners, x[y == k][:, 0]):
            window = image[row : row + P.PATCH, col : col + P.PATCH]
            np.testing.assert_allclose(got, (window - window.mean()) / window.std(), atol=1e-5)


def test_no_validation_patch_overlaps_a_training_patch(layouts) -> None:
    for plan in layouts:
        train, val = plan.train_corners, plan.val_corners
        gap = np.abs(train[:, None, :] - val[None, :, :])  # two windows overlap iff both gaps are < PATCH
        assert not np.any((gap[..., 0] < P.PATCH) & (gap[..., 1] < P.PATCH))
        assert not set(map(tuple, plan.train_tiles)) & set(map(tuple, plan.val_tiles))
        n_tiles = len(plan.train_tiles) + len(plan.val_tiles)
        assert len(plan.val_tiles) == max(1, round(P.VAL_FRACTION * n_tiles))
        for tiles, corners in ((plan.train_tiles, train), (plan.val_tiles, val)):
            tile_of = corners // P.TILE * P.TILE  # each window lies wholly inside its own tile of that split
            assert set(map(tuple, tile_of)) <= set(map(tuple, tiles))
            assert np.all(corners - tile_of <= P.TILE - P.PATCH)
            assert len(np.unique(corners, axis=0)) == len(corners)


def test_the_layout_never_changes(layouts) -> None:
    """The tiles and patch corners are pinned: a change of seed, constants or generator shows here."""
    digest = hashlib.sha256()
    for plan in layouts:
        for corners in (plan.train_tiles, plan.val_tiles, plan.train_corners, plan.val_corners):
            digest.update(np.ascontiguousarray(corners, dtype=np.int64).tobytes())
    assert digest.hexdigest() == "f5b2959dc03abc3c398ba2186b0dbcfebe85bd4567e7df3cd59798877a4836c4"
    brick = layouts[list(P.IMAGES).index("brick.png")]
    assert (len(brick.train_tiles), len(brick.val_tiles)) == (51, 13)  # 8 x 8 tiles of 64 in 512 x 512, 20%


def test_flat_windows_are_left_out(layouts) -> None:
    for name, plan in zip(P.IMAGES, layouts):
        windows = P.crop(P.read_grey(name), np.concatenate([plan.train_corners, plan.val_corners]))
        assert windows.std(axis=(1, 2)).min() >= P.MIN_STD


def test_images_are_real_photographs_not_noise(bundle) -> None:
    """Neighbouring pixels of natural images are strongly correlated (0.83 measured); noise gives about 0."""
    x = bundle.train.tensors[0].numpy()[:, 0]
    assert np.corrcoef(x[:, :, :-1].ravel(), x[:, :, 1:].ravel())[0, 1] > 0.5


def test_loads_with_the_network_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the patches data set tried to open a network connection")

    class Refused(socket.socket):  # a class, so that modules subclassing socket.socket still import
        __init__ = refuse

    monkeypatch.setattr(socket, "socket", Refused)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    bundle = load("patches", image_size=8)
    assert len(bundle.train) == 2200


def test_default_size_fits_a_5x5_window_in_every_stage(bundle) -> None:
    """With the small GoogLeNet stem and the default skeleton's two poolings every Inception map is >= 5x5."""
    model = builders.googlenet(variant="small", in_channels=1, num_classes=11, width_mult=0.125).eval()
    sizes = {}
    for name, module in model.named_modules():
        if name.startswith("inception") and "." not in name:
            module.register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, i[0].shape[-2:]))
    with torch.no_grad():
        model(bundle.val.tensors[0][:2])
    assert len(sizes) == 9 and min(min(hw) for hw in sizes.values()) == 5
    assert tuple(sizes["inception3a"]) == (20, 20) and tuple(sizes["inception5b"]) == (5, 5)


def test_image_size_resizes() -> None:
    resized = load("patches", image_size=(24, 16))
    assert resized.image_size == (24, 16) and resized.val.tensors[0].shape == (1100, 1, 24, 16)
    with pytest.raises(DataError, match="too small"):
        load("patches", image_size=1)


def test_a_changed_or_missing_image_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in P.IMAGES:
        shutil.copy(P.image_dir() / name, tmp_path / name)
    (tmp_path / "brick.png").write_bytes((tmp_path / "brick.png").read_bytes() + b"\0")
    (tmp_path / "text.png").unlink()
    monkeypatch.setattr(P, "image_dir", lambda: tmp_path)
    with pytest.raises(DataError, match="brick.png differs") as changed:
        load("patches")
    with pytest.raises(DataError, match="text.png is missing") as missing:
        P.read_grey("text.png")
    assert "\n" not in str(changed.value) + str(missing.value)


def _flat_share(name: str) -> float:
    """The share of 32-pixel windows (grid of step 8) of a shipped image below the contrast floor."""
    image = np.asarray(Image.open(P.image_dir() / name).convert("L"), dtype=np.float64) / 255
    windows = np.lib.stride_tricks.sliding_window_view(image, (P.PATCH, P.PATCH))[::8, ::8]
    return float((windows.std(axis=(-1, -2)) < P.MIN_STD).mean())


def test_the_images_are_chosen_by_the_documented_rule() -> None:
    """Kept: at most a quarter of the windows flat; left out as mostly flat: more than a quarter."""
    assert max(_flat_share(name) for name in P.IMAGES) <= 0.25
    left_out = ("camera.png", "cell.png", "clock_motion.png", "hubble_deep_field.jpg", "moon.png", "retina.jpg",
                "rocket.jpg")
    assert min(_flat_share(name) for name in left_out) > 0.25
