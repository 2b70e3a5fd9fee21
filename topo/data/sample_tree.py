"""Write a small ImageFolder tree of real photographs: for tests, demos and benchmarks.

The images are random crops of scikit-learn's two sample photographs
(``china.jpg`` and ``flower.jpg``, shipped with scikit-learn), one class per
photograph, so a network can learn to tell the classes apart.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from topo.common.writing import atomic_path

CLASSES = ("china", "flower")


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def _crop(photo: np.ndarray, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A random crop of 40-100% of the photo's side, resized to ``size`` (width, height)."""
    height, width = photo.shape[:2]
    frac = rng.uniform(0.4, 1.0)
    h, w = int(height * frac), int(width * frac)
    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    return Image.fromarray(photo[top : top + h, left : left + w]).resize(size, Image.BILINEAR)


def _save(image: Image.Image, path: Path) -> None:
    options = {"format": "JPEG", "quality": 90} if path.suffix == ".jpg" else {"format": "PNG"}
    with atomic_path(path) as tmp:
        image.save(tmp, **options)


def write_sample_tree(
    root: str | os.PathLike,
    *,
    train_per_class: int = 6,
    val_per_class: int = 3,
    size: tuple[int, int] = (48, 40),
    special: bool = True,
    suffixes: tuple[str, ...] = (".jpg", ".png"),
    seed: int = 0,
) -> Path:
    """Write ``root/{train,val}/{china,flower}/`` and return ``root``.

    Images cycle through ``suffixes`` (JPEG and PNG), ``size`` is (width, height). With
    ``special`` the training split also holds a grayscale PNG, a palette PNG
    and a CMYK JPEG (one each, in the first class).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    photos = _photos()
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name, photo in zip(CLASSES, photos):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                suffix = suffixes[i % len(suffixes)]
                _save(_crop(photo, rng, size), folder / f"{name}_{i:04d}{suffix}")
    if special:
        folder = root / "train" / CLASSES[0]
        image = _crop(photos[0], rng, size)
        _save(image.convert("L"), folder / "gray.png")
        _save(image.convert("P", palette=Image.ADAPTIVE, colors=32), folder / "palette.png")
        _save(image.convert("CMYK"), folder / "cmyk.jpg")
    return root


def add_broken_images(folder: str | os.PathLike) -> tuple[Path, Path]:
    """Add a garbled file and a truncated JPEG to ``folder``; return their paths.

    The garbled file is not an image at all (its header says so); the JPEG
    keeps its header and loses the second half of its compressed data, so
    only decoding it finds the fault.
    """
    folder = Path(folder)
    garbled = folder / "garbled.jpg"
    with atomic_path(garbled) as tmp:
        tmp.write_bytes(b"this is not an image\n" * 20)
    source = next(p for p in sorted(folder.glob("*.jpg")) if p.name != "garbled.jpg")
    data = source.read_bytes()
    scan = data.index(b"\xff\xda")  # start of the compressed scan
    truncated = folder / "truncated.jpg"
    with atomic_path(truncated) as tmp:
        tmp.write_bytes(data[: scan + (len(data) - scan) // 2])
    return garbled, truncated
