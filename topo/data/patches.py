"""``patches``: which of eleven photographs a small grey patch was cut from (embedded, never downloads).

The images are eleven files that ship inside scikit-image's wheel
(``skimage/data/``), read straight from the installed package with Pillow, so
loading never touches the network (scikit-image's own loaders may fetch
through ``pooch``; this module does not call them):

    astronaut, brick, chelsea, coffee, coins, grass, gravel, ihc,
    motorcycle_left, page, text

They are every photograph, micrograph, scan and texture in the wheel of which
at most a quarter of the 32-pixel windows (on a grid of step 8) are flat
(standard deviation below :data:`MIN_STD`). Left out: the synthetic images
(chessboard, color, horse, logo, phantom), the mostly flat ones (camera, cell,
clock_motion, hubble_deep_field, moon, retina, rocket), motorcycle_right (the
other half of a stereo pair), the tiny ones (microaneurysms, the GIF) and
``lfw_subset.npy`` (not an image file). Class ``k`` is the ``k``-th image.

Split by region. Each image (converted to grey with Pillow's ITU-R 601-2 luma)
is cut into a grid of :data:`TILE` x :data:`TILE` tiles (the right and bottom
remainders are unused); a seeded permutation (:data:`PATCHES_SPLIT_SEED`) gives
:data:`VAL_FRACTION` of each image's tiles (at least one) to validation and the
rest to training. A patch lies wholly inside one tile, so no validation patch
shares a pixel with a training patch.

Patches. Inside each tile the candidate corners lie on a grid of step
:data:`STRIDE`; candidates whose :data:`PATCH` x :data:`PATCH` window is flat
(standard deviation below :data:`MIN_STD` on the [0, 1] scale, mostly
quantisation noise: its source cannot be told from its content) are dropped;
:data:`TRAIN_PER_CLASS` and :data:`VAL_PER_CLASS` distinct corners per image
are drawn with the same generator (NumPy's ``RandomState``, whose streams never
change, seeded per image by :data:`PATCHES_SPLIT_SEED` and the class index). So the data set is 11 x 200 = 2200
training and 11 x 100 = 1100 validation patches, balanced, fixed forever.

Normalisation. Each patch is resized (bilinear, antialiased) from 32 pixels to
``image_size`` (default :data:`DEFAULT_SIZE` = 20: the default skeleton's
Inception stages then see 20x20, 10x10 and 5x5 maps, so a 5x5 window fits in
every stage) and then standardised on its own, to mean 0 and standard
deviation 1: neither brightness nor contrast gives the class away, only
structure. Grey rather than RGB: six of the eleven images are grey, and
colour alone would tell them from the other five.

Tensors are ``(1, image_size, image_size)`` float32 in memory (``TensorDataset``).
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from torch.utils.data import TensorDataset

from topo.common.errors import DataError
from topo.data.bundle import DataBundle, image_hw

#: The constant that fixes the tiles' split and the patches' positions forever (never change it).
PATCHES_SPLIT_SEED = 0
VAL_FRACTION = 0.2
TILE = 64
PATCH = 32
STRIDE = 4
MIN_STD = 0.04
TRAIN_PER_CLASS = 200
VAL_PER_CLASS = 100
DEFAULT_SIZE = 20

#: File name in ``skimage/data/`` -> SHA-256 of its bytes (as in scikit-image's own registry).
IMAGES: dict[str, str] = {
    "astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    "brick.png": "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
    "chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
    "coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
    "coins.png": "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba",
    "grass.png": "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
    "gravel.png": "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
    "ihc.png": "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef",
    "motorcycle_left.png": "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
    "page.png": "341a6f0a61557662b02734a9b6e56ec33a915b2c41886b97509dedf2a43b47a3",
    "text.png": "bd84aa3a6e3c9887850d45d606c96b2e59433fbef50338570b63c319e668e6d1",
}
CLASS_NAMES = [name.rsplit(".", 1)[0] for name in IMAGES]


def image_dir() -> Path:
    """The ``data/`` folder of the installed scikit-image (found without importing it)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the patches data set needs scikit-image: pip install scikit-image")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def read_grey(name: str) -> np.ndarray:
    """One shipped image as a float64 grey array in [0, 1], after checking its bytes' SHA-256."""
    path = image_dir() / name
    if not path.is_file():
        raise DataError(f"{path} is missing: reinstall scikit-image (pip install --force-reinstall scikit-image)")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != IMAGES[name]:
        raise DataError(f"{path} differs from the file the patches data set was defined on: reinstall scikit-image")
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float64) / 255.0


@dataclass(frozen=True)
class Layout:
    """Where one image's patches lie: (row, col) top-left corners of its tiles and patches, per split."""

    train_tiles: np.ndarray
    val_tiles: np.ndarray
    train_corners: np.ndarray
    val_corners: np.ndarray


def tile_split(shape: tuple[int, int], rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """Corners of the training and validation tiles of an image of ``shape`` (``VAL_FRACTION``, at least one)."""
    rows, cols = shape[0] // TILE, shape[1] // TILE
    grid = np.meshgrid(np.arange(rows) * TILE, np.arange(cols) * TILE, indexing="ij")
    corners = np.stack(grid, axis=-1).reshape(-1, 2)
    order = rng.permutation(len(corners))
    n_val = max(1, round(VAL_FRACTION * len(corners)))
    return corners[np.sort(order[n_val:])], corners[np.sort(order[:n_val])]


def candidate_corners(image: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    """Patch corners on a ``STRIDE`` grid inside ``tiles`` whose window is not flat (std >= ``MIN_STD``)."""
    offsets = np.arange(0, TILE - PATCH + 1, STRIDE)
    steps = np.stack(np.meshgrid(offsets, offsets, indexing="ij"), axis=-1).reshape(-1, 2)
    corners = (tiles[:, None, :] + steps[None, :, :]).reshape(-1, 2)
    return corners[crop(image, corners).std(axis=(1, 2)) >= MIN_STD]


def crop(image: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """The ``PATCH`` x ``PATCH`` windows of ``image`` at ``corners``, shape (n, PATCH, PATCH)."""
    return sliding_window_view(image, (PATCH, PATCH))[corners[:, 0], corners[:, 1]]


def _draw(corners: np.ndarray, count: int, rng: np.random.RandomState, where: str) -> np.ndarray:
    if len(corners) < count:
        raise DataError(f"patches: {where} has {len(corners)} usable positions, fewer than the {count} it needs")
    return corners[np.sort(rng.choice(len(corners), size=count, replace=False))]


def layout(index: int, image: np.ndarray) -> Layout:
    """The fixed layout of image ``index``, from its own generator seeded by ``PATCHES_SPLIT_SEED`` and ``index``.

    NumPy's legacy ``RandomState``: its streams are frozen across NumPy versions (``Generator``'s are not).
    """
    rng = np.random.RandomState([PATCHES_SPLIT_SEED, index])
    train_tiles, val_tiles = tile_split(image.shape, rng)
    name = CLASS_NAMES[index]
    train = _draw(candidate_corners(image, train_tiles), TRAIN_PER_CLASS, rng, f"{name} (training)")
    val = _draw(candidate_corners(image, val_tiles), VAL_PER_CLASS, rng, f"{name} (validation)")
    return Layout(train_tiles, val_tiles, train, val)


def standardise(windows: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Resize (n, PATCH, PATCH) windows to ``size`` (height, width), then give each mean 0 and std 1 (float32)."""
    x = torch.from_numpy(np.ascontiguousarray(windows)).unsqueeze(1)
    if size != (PATCH, PATCH):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True, correction=0)
    return ((x - mean) / std).float()


def patches(image_size: int | tuple[int, int] | None = None) -> DataBundle:
    """Grey patches of eleven scikit-image photographs, labelled by photograph (see the module docstring)."""
    size = image_hw(image_size, DEFAULT_SIZE)
    if min(size) < 2:
        raise DataError(f"image size {size} for patches is too small to standardise a patch; use at least 2")
    splits: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {"train": ([], []), "val": ([], [])}
    for label, name in enumerate(IMAGES):
        image = read_grey(name)
        plan = layout(label, image)
        for split, corners in (("train", plan.train_corners), ("val", plan.val_corners)):
            xs, ys = splits[split]
            xs.append(standardise(crop(image, corners), size))
            ys.append(torch.full((len(corners),), label, dtype=torch.int64))
    train, val = (TensorDataset(torch.cat(xs), torch.cat(ys)) for xs, ys in splits.values())
    return DataBundle(train, val, len(IMAGES), 1, size, list(CLASS_NAMES), "patches")
