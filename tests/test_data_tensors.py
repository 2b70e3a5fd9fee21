"""``load("tensors", FILE.npz)``: happy paths, one-line errors that name the file, and ``load("planted")``."""
from __future__ import annotations

import io
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from topo.data import load
from topo.data.tensors import PLANTED_DATA, TENSORS_SPLIT_SEED, TENSORS_VAL_FRACTION
from topo.common.errors import DataError
from topo.planted.generator import generate_deep, save_npz


def _arrays(n: int = 60, c: int = 3, h: int = 4, w: int = 5, classes: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 3.0, size=(n, c, h, w)).astype(np.float32) * np.arange(1, c + 1)[None, :, None, None]
    return {"x": x, "y": (np.arange(n) % classes).astype(np.int64)}


def _write(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _error(path, *fragments: str, **kw) -> str:
    with pytest.raises(DataError) as excinfo:
        load("tensors", path, **kw)
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ----------------------------------------------------------------------------- happy paths


def test_npz_loads_with_a_fixed_stratified_split_and_train_standardisation(tmp_path: Path) -> None:
    from sklearn.model_selection import train_test_split

    arrays = _arrays()
    path = _write(tmp_path / "data.npz", **arrays)
    bundle = load("tensors", str(path))
    assert (bundle.name, bundle.num_classes, bundle.in_channels, bundle.image_size) == ("tensors", 3, 3, (4, 5))
    assert bundle.class_names == ["0", "1", "2"]
    x_train, y_train = bundle.train.tensors
    x_val, y_val = bundle.val.tensors
    assert x_train.shape == (48, 3, 4, 5) and x_val.shape == (12, 3, 4, 5)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert Counter(y_val.tolist()) == {0: 4, 1: 4, 2: 4}  # stratified
    # the split is sklearn's with the fixed seed; the moments are the training split's, per channel
    train_idx, val_idx = train_test_split(np.arange(60), test_size=TENSORS_VAL_FRACTION, stratify=arrays["y"],
                                          random_state=TENSORS_SPLIT_SEED)
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    x = arrays["x"].astype(np.float64)
    mean = x[train_idx].mean(axis=(0, 2, 3), keepdims=True)
    std = x[train_idx].std(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(x_train.numpy(), (x[train_idx] - mean) / std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x_val.numpy(), (x[val_idx] - mean) / std, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y_val.numpy(), arrays["y"][val_idx])
    again = load("tensors", path)
    assert torch.equal(again.train.tensors[0], x_train) and torch.equal(again.val.tensors[1], y_val)


def test_explicit_validation_split_sequences_and_class_names(tmp_path: Path) -> None:
    train, val = _arrays(n=30, h=1, w=12), _arrays(n=9, h=1, w=12, seed=1)
    path = _write(tmp_path / "seq.npz", x=train["x"].astype(np.float64), y=train["y"].astype(np.int32),
                  x_val=val["x"], y_val=val["y"], class_names=np.array(["a", "b", "c"]))
    bundle = load("tensors", path)
    assert bundle.image_size == (1, 12) and bundle.class_names == ["a", "b", "c"]
    assert len(bundle.train) == 30 and len(bundle.val) == 9  # kept as given
    assert bundle.train.tensors[0].dtype == torch.float32 and bundle.train.tensors[1].dtype == torch.int64
    x = train["x"].astype(np.float64)
    mean, std = x.mean(axis=(0, 2, 3), keepdims=True), x.std(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(bundle.val.tensors[0].numpy(), (val["x"] - mean) / std, rtol=1e-5, atol=1e-6)
    assert load("tensors", path, image_size=(1, 12)).image_size == (1, 12)


def test_num_classes_is_the_largest_label_plus_one_and_gaps_warn(tmp_path: Path) -> None:
    arrays = _arrays(n=40, classes=2)
    arrays["y"] = np.where(arrays["y"] == 1, 4, 0)  # labels 0 and 4
    path = _write(tmp_path / "gaps.npz", **arrays)
    with pytest.warns(UserWarning, match=r"no sample of class\(es\) 1, 2, 3"):
        bundle = load("tensors", path)
    assert bundle.num_classes == 5 and bundle.class_names == ["0", "1", "2", "3", "4"]


def test_constant_channel_is_centred_with_a_warning(tmp_path: Path) -> None:
    arrays = _arrays()
    arrays["x"][:, 1] = 7.0
    path = _write(tmp_path / "flat.npz", **arrays)
    with pytest.warns(UserWarning, match="channel\\(s\\) 1 are constant"):
        bundle = load("tensors", path)
    assert torch.equal(bundle.train.tensors[0][:, 1], torch.zeros(48, 4, 5))
    assert torch.isfinite(bundle.train.tensors[0]).all()


# ----------------------------------------------------------------------------- bad input


def _bad_npz(tmp_path: Path, case: str) -> Path:
    """A file that is wrong in the way ``case`` names."""
    path = tmp_path / f"{case}.npz"
    a = _arrays()
    builders = {
        "missing y": lambda: _write(path, x=a["x"]),
        "unknown key": lambda: _write(path, x=a["x"], y=a["y"], labels=a["y"]),
        "x_val alone": lambda: _write(path, **a, x_val=a["x"]),
        "x 3-D": lambda: _write(path, x=a["x"][:, :, 0], y=a["y"]),
        "y 2-D": lambda: _write(path, x=a["x"], y=a["y"][:, None]),
        "x integer": lambda: _write(path, x=(a["x"] * 10).astype(np.int16), y=a["y"]),
        "y float": lambda: _write(path, x=a["x"], y=a["y"].astype(np.float32)),
        "x NaN": lambda: _write(path, x=np.where(a["x"] > 5, np.nan, a["x"]), y=a["y"]),
        "x_val Inf": lambda: _write(path, **a, x_val=np.full((3, 3, 4, 5), np.inf, np.float32), y_val=a["y"][:3]),
        "lengths": lambda: _write(path, x=a["x"], y=a["y"][:-1]),
        "negative": lambda: _write(path, x=a["x"], y=a["y"] - 1),
        "one class": lambda: _write(path, x=a["x"], y=np.zeros(60, np.int64)),
        "lonely class": lambda: _write(path, x=a["x"], y=np.r_[np.zeros(59, np.int64), [1]]),
        "too few": lambda: _write(path, x=a["x"][:4], y=np.array([0, 0, 1, 1])),
        "x_val shape": lambda: _write(path, **a, x_val=a["x"][:6, :2], y_val=a["y"][:6]),
        "empty": lambda: _write(path, x=a["x"][:0], y=a["y"][:0]),
        "class names": lambda: _write(path, **a, class_names=np.array(["a", "b"])),
        "object array": lambda: _write(path, x=a["x"], y=np.array([object()] * 60, dtype=object)),
    }
    return builders[case]()


BAD_CASES = {
    "missing y": ("missing y", "found: x"),
    "unknown key": ("unknown labels", "found: labels, x, y"),
    "x_val alone": ("x_val and y_val come together", "found: x, x_val, y"),
    "x 3-D": ("x has shape (60, 3, 5)", "x[:, :, None, :]"),
    "y 2-D": ("y has shape (60, 1)", "(N,)"),
    "x integer": ("x has dtype int16", "astype(numpy.float32)"),
    "y float": ("y has dtype float32", "astype(numpy.int64)"),
    "x NaN": ("x contains NaN or Inf",),
    "x_val Inf": ("x_val contains NaN or Inf", "180 values"),
    "lengths": ("x has 60 samples but y has 59 labels",),
    "negative": ("negative labels (smallest -1)",),
    "one class": ("single class (0)", "at least 2"),
    "lonely class": ("class 1 has only 1 sample", "x_val and y_val"),
    "too few": ("4 samples of 2 classes are too few",),
    "x_val shape": ("x_val has (C, H, W) = (2, 4, 5) but x has (3, 4, 5)",),
    "empty": ("are empty",),
    "class names": ("class_names must be 3 strings",),
    "object array": ("corrupt .npz archive", "allow_pickle"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_arrays_give_one_line_errors_naming_the_file(tmp_path: Path, case: str) -> None:
    _error(_bad_npz(tmp_path, case), *BAD_CASES[case])


def test_missing_file_directory_and_no_path(tmp_path: Path) -> None:
    _error(tmp_path / "absent.npz", "no such file", "numpy.savez")
    _error(tmp_path, "not a file", "not a directory")
    with pytest.raises(DataError, match="--data-dir FILE.npz"):
        load("tensors")


def test_files_that_are_not_npz_archives(tmp_path: Path) -> None:
    text = tmp_path / "notes.npz"
    text.write_text("x, y\n1, 2\n", encoding="utf-8")
    _error(text, "not an .npz archive")
    single = tmp_path / "single.npy"
    np.save(single, _arrays()["x"])
    _error(single, "a single .npy array, not an .npz archive")
    good = _write(tmp_path / "good.npz", **_arrays())
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _error(truncated, "not an .npz archive")


def test_a_damaged_member_is_a_corrupt_archive(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **_arrays())
    data = bytearray(buffer.getvalue())
    start = data.index(b"x.npy") + 200  # inside the compressed bytes of x
    data[start:start + 64] = bytes(64)
    path = tmp_path / "damaged.npz"
    path.write_bytes(bytes(data))
    _error(path, "corrupt .npz archive")


def test_image_size_other_than_the_stored_one(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.npz", **_arrays())
    _error(path, "holds maps of 4 x 5, not 8 x 8", "drop --image-size", image_size=8)


# ----------------------------------------------------------------------------- planted


def test_planted_is_seeded_and_of_the_documented_size() -> None:
    bundle = load("planted", seed=3)
    assert (bundle.name, bundle.num_classes, bundle.in_channels, bundle.image_size) == ("planted", 4, 16, (16, 16))
    assert len(bundle.train) + len(bundle.val) == PLANTED_DATA.num_samples == 512
    assert (len(bundle.train), len(bundle.val)) == (409, 103)
    again, other = load("planted", seed=3), load("planted", seed=4)
    assert torch.equal(again.train.tensors[0], bundle.train.tensors[0])
    assert not torch.equal(other.train.tensors[0], bundle.train.tensors[0])
    assert load("planted", seed=3, image_size=12).train.tensors[0].shape[2:] == (12, 12)


def test_save_npz_round_trips_through_tensors(tmp_path: Path) -> None:
    sample = generate_deep(PLANTED_DATA, seed=3)
    path = tmp_path / "out" / "planted.npz"
    save_npz(sample, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["planted.npz"]  # no temporary file left
    with np.load(path) as archive:
        np.testing.assert_array_equal(archive["x"], sample.activations)
        np.testing.assert_array_equal(archive["y"], sample.labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_file = load("tensors", path)
    direct = load("planted", seed=3)
    for a, b in ((from_file.train, direct.train), (from_file.val, direct.val)):
        for ta, tb in zip(a.tensors, b.tensors):
            assert torch.equal(ta, tb)
    assert (from_file.num_classes, from_file.in_channels, from_file.image_size, from_file.class_names) == (
        direct.num_classes, direct.in_channels, direct.image_size, direct.class_names)
