"""Data sets by name: ``load("digits")``, ``load("imagenet", "/data/imagenet")``, ..."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from topo.common import distributed as dist_info
from topo.common.errors import DataError
from topo.data import transforms as T
from topo.data.bundle import DataBundle, image_hw
from topo.data.folders import ImageTree, check_tree
from topo.data.patches import patches
from topo.data.tensors import load_npz, planted_data

#: The constant that fixes the digits train/val split forever (never change it).
DIGITS_SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.2


def default_data_dir() -> Path:
    """``$TOPO_DATA_DIR``, else ``~/.cache/topo/data``: where downloadable data sets go."""
    return Path(os.environ.get("TOPO_DATA_DIR", Path.home() / ".cache" / "topo" / "data")).expanduser()


def _square(size: tuple[int, int], name: str) -> int:
    if size[0] != size[1]:
        raise DataError(f"image size {size} for {name} must be square; pass a single number")
    return size[0]


def digits(image_size: int | tuple[int, int] | None = None) -> DataBundle:
    """scikit-learn's 1797 handwritten 8x8 digits, a fixed stratified 80/20 split.

    Pixels are scaled to [0, 1], then standardised with the training split's
    mean and standard deviation. ``image_size`` other than 8 resizes bilinearly.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = data.images.astype(np.float32) / 16.0
    labels = data.target.astype(np.int64)
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_VAL_FRACTION, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    x = torch.from_numpy((images - mean) / std).unsqueeze(1)
    size = image_hw(image_size, 8)
    if size != (8, 8):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    y = torch.from_numpy(labels)
    return DataBundle(
        train=TensorDataset(x[train_idx], y[train_idx]),
        val=TensorDataset(x[val_idx], y[val_idx]),
        num_classes=10,
        in_channels=1,
        image_size=size,
        class_names=[str(d) for d in range(10)],
        name="digits",
    )


def image_folders(
    data_dir: str | os.PathLike | None,
    name: str = "folder",
    *,
    image_size: int | tuple[int, int] | None = None,
    strict: bool = False,
    verify: bool = True,
) -> DataBundle:
    """``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` (``validation/`` also accepted).

    Training: random-resized crops (8-100% of the area, aspect 3/4-4/3) and
    flips; evaluation: resize to ``size * 256/224`` then centre crop. ImageNet
    mean and std. Class indices come from the sorted folder names.
    """
    if data_dir is None:
        raise DataError(f"the {name} data set needs a directory; pass --data-dir with train/ and val/ class folders")
    train_dir, val_dir, classes = check_tree(data_dir)
    size = _square(image_hw(image_size, 224), name)
    train = ImageTree(train_dir, T.imagenet_train(size), strict=strict, verify=verify)
    val = ImageTree(val_dir, T.imagenet_eval(size), strict=strict, verify=verify, evaluation=True)
    return DataBundle(train, val, len(classes), 3, (size, size), classes, name)


_CIFAR = {
    "cifar10": ("CIFAR-10", "cifar-10-python.tar.gz", "cifar-10-batches-py", T.CIFAR10_MEAN, T.CIFAR10_STD),
    "cifar100": ("CIFAR-100", "cifar-100-python.tar.gz", "cifar-100-python", T.CIFAR100_MEAN, T.CIFAR100_STD),
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


def reachable(host: str = "www.cs.toronto.edu", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` can be opened."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def cifar(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | tuple[int, int] | None = None,
    download: bool | None = None,
) -> DataBundle:
    """torchvision's CIFAR-10/100 from ``data_dir`` (default :func:`default_data_dir`).

    ``download=None`` downloads when the files are missing and the host is
    reachable; ``False`` never downloads. Missing files without a download
    raise a :class:`DataError` that says where to put them. Under torchrun only
    rank 0 downloads, while the others wait; a failure raises the same
    :class:`DataError` on every rank.
    """
    from torchvision import datasets

    title, archive, folder, mean, std = _CIFAR[name]
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    size = _square(image_hw(image_size, 32), name)

    def build(fetch: bool) -> tuple[Dataset, Dataset]:
        train = cls(str(root), train=True, transform=T.cifar_train(mean, std, size), download=fetch)
        val = cls(str(root), train=False, transform=T.cifar_eval(mean, std, size), download=fetch)
        return train, val

    missing = (
        f"{title} not found in {root}: download {archive} from {CIFAR_URL} and extract it there "
        f"(it unpacks to {root / folder}/)"
    )
    if dist_info.is_distributed():
        train, val = _open_on_every_rank(build, download, missing)
    else:
        train, val = _open_or_download(build, download, missing)
    return DataBundle(train, val, len(train.classes), 3, (size, size), list(train.classes), name)


def _open_or_download(
    build: Callable[[bool], tuple[Dataset, Dataset]], download: bool | None, missing: str
) -> tuple[Dataset, Dataset]:
    """``build(False)``, else ``build(True)`` where ``download`` allows it (see :func:`cifar`)."""
    try:
        return build(False)
    except RuntimeError:
        pass
    if download is False:
        raise DataError(f"{missing}, or allow downloading")
    if download is None and not reachable():
        raise DataError(f"{missing}; the download server is not reachable from here")
    try:
        return build(True)
    except (OSError, RuntimeError) as exc:
        raise DataError(f"{missing}; downloading failed ({exc})") from None


def _open_on_every_rank(
    build: Callable[[bool], tuple[Dataset, Dataset]], download: bool | None, missing: str
) -> tuple[Dataset, Dataset]:
    """Under torchrun: rank 0 opens or downloads the files while the others wait, then they open them.

    Every rank learns rank 0's outcome and then which ranks could not open the files, so a
    failure anywhere raises the same DataError on every rank rather than leaving some in a collective.
    """
    splits = None
    failure: str | None = f"{missing}; rank 0 failed to open or download it (see its error)"
    try:
        if dist_info.rank() == 0:
            splits = _open_or_download(build, download, missing)
        failure = None
    except DataError as error:
        failure = str(error)
    finally:  # also when rank 0 fails unexpectedly: the others must not wait for it forever
        failure = dist_info.same_on_all_ranks(failure)
    if failure is not None:
        raise DataError(failure)
    if splits is None:
        try:
            splits = build(False)
        except RuntimeError:
            pass
    blind = [str(rank) for rank, opened in enumerate(dist_info.every_rank(splits is not None)) if not opened]
    if blind:
        raise DataError(
            f"{missing}; rank 0 has the files but rank(s) {', '.join(blind)} cannot open them: give every process "
            "the same data directory (a shared file system) or put the files there on every machine"
        )
    return splits


def fake(
    image_size: int | tuple[int, int] | None = None,
    *,
    num_classes: int = 10,
    sizes: tuple[int, int] = (1000, 200),
    seed: int = 0,
) -> DataBundle:
    """torchvision's FakeData (random images, deterministic per index and seed): smoke tests, throughput."""
    from torchvision.datasets import FakeData

    size = image_hw(image_size, 224)
    shape = (3, *size)
    offset = seed * (sizes[0] + sizes[1])
    train = FakeData(sizes[0], shape, num_classes, transform=T.plain(), random_offset=offset)
    val = FakeData(sizes[1], shape, num_classes, transform=T.plain(), random_offset=offset + sizes[0])
    return DataBundle(train, val, num_classes, 3, size, [str(i) for i in range(num_classes)], "fake")


DATASETS: dict[str, Callable[..., DataBundle]] = {
    "imagenet": lambda data_dir, **kw: image_folders(data_dir, "imagenet", **kw),
    "folder": lambda data_dir, **kw: image_folders(data_dir, "folder", **kw),
    "cifar10": lambda data_dir, **kw: cifar("cifar10", data_dir, **kw),
    "cifar100": lambda data_dir, **kw: cifar("cifar100", data_dir, **kw),
    "digits": lambda data_dir, **kw: digits(**kw),
    "patches": lambda data_dir, **kw: patches(**kw),
    "fake": lambda data_dir, **kw: fake(**kw),
    "tensors": lambda data_dir, **kw: load_npz(data_dir, **kw),
    "planted": lambda data_dir, **kw: planted_data(**kw),
}


def load(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | tuple[int, int] | None = None,
    strict: bool = False,
    seed: int = 0,
    download: bool | None = None,
    verify: bool = True,
    num_classes: int = 10,
    fake_sizes: tuple[int, int] = (1000, 200),
) -> DataBundle:
    """Load the data set ``name`` (one of :data:`DATASETS`).

    - ``imagenet``/``folder``: ``data_dir`` with ``train/`` and ``val/`` class
      folders; ``image_size`` defaults to 224; ``strict`` makes unreadable
      images an error instead of skipping them; ``verify`` checks every file's
      header once at load time (turn off for very large trees).
    - ``cifar10``/``cifar100``: ``data_dir`` holds torchvision's files;
      ``download`` as in :func:`cifar`.
    - ``digits``: no files; ``image_size`` resizes the 8x8 digits.
    - ``patches``: no files (scikit-image's shipped photographs); ``image_size``
      (default 20) resizes the 32-pixel patches.
    - ``fake``: ``num_classes``, ``fake_sizes`` (train, val) and ``seed``
      choose the random images.
    - ``tensors``: ``data_dir`` is an ``.npz`` file with ``x`` (N, C, H, W) and
      ``y`` (N,), see :mod:`topo.data.tensors`; ``image_size`` must match it.
    - ``planted``: no files; the planted deep network's data drawn with ``seed``
      (:func:`topo.data.tensors.planted_data`).
    """
    if name == "imagenet" and image_size is None:
        image_size = 224
    options: dict[str, object] = {"image_size": image_size}
    if name in ("imagenet", "folder"):
        options.update(strict=strict, verify=verify)
    elif name in ("cifar10", "cifar100"):
        options.update(download=download)
    elif name == "fake":
        options.update(num_classes=num_classes, sizes=tuple(fake_sizes), seed=seed)
    elif name == "planted":
        options.update(seed=seed)
    elif name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name](data_dir, **options)
