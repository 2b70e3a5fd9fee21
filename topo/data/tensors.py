"""Data sets from arrays: ``load("tensors", "FILE.npz")`` and ``load("planted")``.

An ``.npz`` file (``numpy.savez``) holds

* ``x``: (N, C, H, W) floating point inputs (H may be 1: sequences of length W);
* ``y``: (N,) integer class labels, >= 0;
* optionally ``x_val`` and ``y_val``: the validation split, same layout;
  without them a fixed stratified 80/20 split of ``x`` is used (seed
  :data:`TENSORS_SPLIT_SEED`, never changed);
* optionally ``class_names``: (num_classes,) strings.

``num_classes`` is the largest label + 1 (over both splits), so a label is its
output's index; label values with no sample are allowed (a warning says so).
Inputs are standardised per channel with the training split's mean and
standard deviation (a constant channel is only centred), and stored as float32.

``load("planted")`` is the planted deep network of :func:`topo.planted.generator.generate_deep`
with its default configuration (:data:`PLANTED_DATA`: 512 samples of 16
channels of 16 x 16, 4 classes; 409 training, 103 validation samples) and the
``seed`` of ``load``, served through the same split and standardisation, so
``topo.planted.generator.save_npz`` then ``load("tensors", ...)`` gives the same bundle.
"""
from __future__ import annotations

import os
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from topo.common.errors import DataError
from topo.data.bundle import DataBundle, image_hw
from topo.planted.generator import DeepPlantedConfig, generate_deep

#: The constant that fixes the train/val split of tensors without ``x_val`` forever (never change it).
TENSORS_SPLIT_SEED = 0
TENSORS_VAL_FRACTION = 0.2
REQUIRED_KEYS = ("x", "y")
OPTIONAL_KEYS = ("x_val", "y_val", "class_names")
#: The configuration of ``load("planted")`` (its seed comes from ``load``).
PLANTED_DATA = DeepPlantedConfig()

_LAYOUT = "x (N, C, H, W) float and y (N,) int"


def load_npz(path: str | os.PathLike | None, *, image_size: int | tuple[int, int] | None = None) -> DataBundle:
    """The data set in the ``.npz`` file ``path`` (see the module docstring)."""
    if path is None:
        raise DataError(f"the tensors data set needs a file; pass --data-dir FILE.npz holding {_LAYOUT}")
    arrays = _read_npz(Path(path).expanduser())
    return bundle_from_arrays(**arrays, name="tensors", where=str(path), image_size=image_size)


def planted_data(*, seed: int = 0, image_size: int | tuple[int, int] | None = None) -> DataBundle:
    """:data:`PLANTED_DATA` generated with ``seed``; ``image_size`` sets the maps' height and width."""
    height, width = (PLANTED_DATA.height, PLANTED_DATA.width) if image_size is None else image_hw(image_size, 0)
    sample = generate_deep(PLANTED_DATA, seed=seed, height=height, width=width)
    return bundle_from_arrays(sample.activations, sample.labels, name="planted", where=f"planted data (seed {seed})")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of the archive, checked for the expected keys."""
    fix = f"write one with numpy.savez(path, x=..., y=...) holding {_LAYOUT}"
    if not path.exists():
        raise DataError(f"{path}: no such file; {fix}")
    if not path.is_file():
        raise DataError(f"{path}: not a file; pass the .npz file itself, not a directory")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not an .npz archive ({_reason(exc)}); {fix}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: a single .npy array, not an .npz archive; {fix}")
    with archive:
        keys = sorted(archive.files)
        _check_keys(path, keys)
        try:
            return {key: archive[key] for key in keys}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"{path}: a corrupt .npz archive ({_reason(exc)}); {fix}") from None


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_keys(path: Path, keys: list[str]) -> None:
    found = ", ".join(keys) or "none"
    missing = [k for k in REQUIRED_KEYS if k not in keys]
    unknown = [k for k in keys if k not in REQUIRED_KEYS + OPTIONAL_KEYS]
    if missing or unknown:
        problem = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}"
        raise DataError(f"{path}: {problem} (found: {found}); save arrays named x and y, optionally x_val, "
                        "y_val and class_names")
    if ("x_val" in keys) != ("y_val" in keys):
        raise DataError(f"{path}: x_val and y_val come together (found: {found}); save both or neither")


def bundle_from_arrays(
    x: np.ndarray,
    y: np.ndarray,
    *,
    name: str,
    where: str,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    class_names: np.ndarray | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> DataBundle:
    """A :class:`DataBundle` from checked arrays; ``where`` names their source in errors."""
    _check_inputs(x, "x", where)
    _check_labels(y, "y", len(x), where)
    if x_val is None:
        train_idx, val_idx = _split(y, where)
        x, y, x_val, y_val = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
    else:
        _check_inputs(x_val, "x_val", where, like=x)
        _check_labels(y_val, "y_val", len(x_val), where)
    size = tuple(int(s) for s in x.shape[2:])
    requested = image_hw(image_size, 0)
    if image_size is not None and requested != size:
        raise DataError(f"{where}: holds maps of {size[0]} x {size[1]}, not {requested[0]} x {requested[1]}; "
                        "tensors keep their stored size, so drop --image-size")
    num_classes = int(max(y.max(), y_val.max())) + 1
    _check_classes(y, y_val, num_classes, where)
    names = _class_names(class_names, num_classes, where)
    mean, std = _channel_moments(x, where)
    return DataBundle(
        train=_dataset(x, y, mean, std),
        val=_dataset(x_val, y_val, mean, std),
        num_classes=num_classes,
        in_channels=int(x.shape[1]),
        image_size=size,
        class_names=names,
        name=name,
    )


def _dataset(x: np.ndarray, y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> TensorDataset:
    """Standardised float32 inputs and int64 labels."""
    return TensorDataset(torch.from_numpy(((x - mean) / std).astype(np.float32)),
                         torch.from_numpy(y.astype(np.int64)))


def _check_inputs(x: np.ndarray, key: str, where: str, like: np.ndarray | None = None) -> None:
    if x.ndim != 4:
        hint = f"; for sequences add H = 1: {key}[:, :, None, :]" if x.ndim == 3 else ""
        raise DataError(f"{where}: {key} has shape {x.shape}, expected (N, C, H, W){hint}")
    if like is not None and x.shape[1:] != like.shape[1:]:
        raise DataError(f"{where}: {key} has (C, H, W) = {x.shape[1:]} but x has {like.shape[1:]}; "
                        "save both splits with the same channels and size")
    if 0 in x.shape[1:]:
        raise DataError(f"{where}: {key} has shape {x.shape} with an empty dimension; save non-empty maps")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: {key} has dtype {x.dtype}, expected floating point; "
                        f"save {key}.astype(numpy.float32)")
    if not np.isfinite(x).all():
        raise DataError(f"{where}: {key} contains NaN or Inf ({int((~np.isfinite(x)).sum())} values); "
                        "replace or drop those samples")


def _check_labels(y: np.ndarray, key: str, n: int, where: str) -> None:
    if y.ndim != 1:
        raise DataError(f"{where}: {key} has shape {y.shape}, expected (N,) class indices")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: {key} has dtype {y.dtype}, expected integer class indices; "
                        f"save {key}.astype(numpy.int64)")
    inputs = "x" if key == "y" else "x_val"
    if len(y) != n:
        raise DataError(f"{where}: {inputs} has {n} samples but {key} has {len(y)} labels; save one label per sample")
    if n == 0:
        raise DataError(f"{where}: {inputs} and {key} are empty; save at least one sample per split")
    if y.min() < 0:
        raise DataError(f"{where}: {key} has negative labels (smallest {int(y.min())}); use class indices 0, 1, ...")


def _split(y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified 80/20 split, sorted indices."""
    from sklearn.model_selection import train_test_split

    classes, counts = np.unique(y, return_counts=True)
    fix = "add samples or save an explicit split as x_val and y_val"
    if len(classes) < 2:
        raise DataError(f"{where}: y holds a single class ({int(classes[0])}); a classifier needs at least 2")
    if counts.min() < 2:
        raise DataError(f"{where}: class {int(classes[counts.argmin()])} has only 1 sample, too few for a "
                        f"stratified train/val split; {fix}")
    n_val = int(np.ceil(TENSORS_VAL_FRACTION * len(y)))
    if n_val < len(classes) or len(y) - n_val < len(classes):
        raise DataError(f"{where}: {len(y)} samples of {len(classes)} classes are too few for a stratified "
                        f"80/20 split (each split needs one sample per class); {fix}")
    train_idx, val_idx = train_test_split(np.arange(len(y)), test_size=TENSORS_VAL_FRACTION, stratify=y,
                                          random_state=TENSORS_SPLIT_SEED)
    return np.sort(train_idx), np.sort(val_idx)


def _check_classes(y: np.ndarray, y_val: np.ndarray, num_classes: int, where: str) -> None:
    present = np.unique(y)
    if len(present) < 2:
        raise DataError(f"{where}: the training split holds a single class ({int(present[0])}); "
                        "a classifier needs at least 2")
    absent = sorted(set(range(num_classes)) - set(present.tolist()))
    if absent:
        shown = ", ".join(str(c) for c in absent[:10]) + (", ..." if len(absent) > 10 else "")
        warnings.warn(f"{where}: labels run to {num_classes - 1} but the training split has no sample of "
                      f"class(es) {shown}; the network still gets {num_classes} outputs", UserWarning, stacklevel=4)


def _class_names(names: np.ndarray | None, num_classes: int, where: str) -> list[str]:
    if names is None:
        return [str(k) for k in range(num_classes)]
    if names.ndim != 1 or len(names) != num_classes or names.dtype.kind not in "US":
        raise DataError(f"{where}: class_names must be {num_classes} strings (labels 0..{num_classes - 1}), "
                        f"got shape {names.shape} of {names.dtype}; save numpy.array([...], dtype=str)")
    return [str(n.decode() if isinstance(n, bytes) else n) for n in names]


def _channel_moments(x: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of the training inputs (float64), shaped (1, C, 1, 1)."""
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    std = x.std(axis=(0, 2, 3), dtype=np.float64)
    constant = np.flatnonzero(std == 0)
    if len(constant):
        warnings.warn(f"{where}: channel(s) {', '.join(map(str, constant[:10]))} are constant in the training "
                      "split; they are centred, not scaled", UserWarning, stacklevel=4)
        std[constant] = 1.0
    return mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)
