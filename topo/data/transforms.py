"""Training augmentation and evaluation preprocessing for each kind of data set, and the rule that turns
images of more than 8 bits per pixel into 8-bit ones (:func:`eight_bit`)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

#: The paper's crop recommendation: 8% to 100% of the area, aspect ratio 3/4 to 4/3.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)

#: Pillow's modes of 16-bit integer pixels.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _stretch(values: np.ndarray) -> np.ndarray:
    """``values`` linearly mapped from their own [min, max] onto [0, 255] (a constant image onto 0)."""
    low, high = values.min(), values.max()
    return (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)


def _integer_scale(values: np.ndarray, mode: str) -> np.ndarray:
    low, high = values.min(), values.max()
    if mode in SIXTEEN_BIT_MODES or (low >= 0 and 255 < high <= 65535):
        return values / 257.0  # the 16-bit range 0-65535 onto 0-255
    return values if low >= 0 and high <= 255 else _stretch(values)


def _float_scale(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = values.min(), values.max()
    if low >= 0 and high <= 1:
        return values * 255.0
    if low >= -1 and high <= 1:
        return (values + 1) * 127.5
    return values if low >= 0 and high <= 255 else _stretch(values)


def eight_bit(image: Image.Image) -> Image.Image:
    """A single-band image of 16-bit or 32-bit integers or 32-bit floats as 8-bit grey (mode ``"L"``).

    The rule, by mode and then by the range of the values (scaled, never clipped):

    - 16-bit integers (``"I;16"``, 16-bit PNG and TIFF): the type's range 0-65535 onto 0-255, whatever the
      values, so that a dark 16-bit image stays dark;
    - 32-bit integers (``"I"``): values within 0-255 kept as they are, within 0-65535 read as 16-bit (as
      above), any other range stretched from its own minimum and maximum onto 0-255;
    - floats (``"F"``): values within [0, 1] times 255, within [-1, 1] (some negative) from -1..1 onto
      0-255, within [0, 255] kept, any other range stretched from its minimum and maximum; NaN and
      infinities become 0.

    Any other mode is returned unchanged.
    """
    if image.mode not in ("F", "I", *SIXTEEN_BIT_MODES):
        return image
    values = np.asarray(image, dtype=np.float64)
    if values.size == 0:
        return Image.new("L", image.size)
    scaled = _float_scale(values) if image.mode == "F" else _integer_scale(values, image.mode)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _to_normalised_tensor(mean: tuple[float, ...], std: tuple[float, ...]) -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def imagenet_train(size: int = 224) -> v2.Compose:
    """Random-resized crop (8-100% of the area, aspect 3/4-4/3) to ``size``, horizontal flip."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
            v2.RandomHorizontalFlip(),
            *_to_normalised_tensor(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def imagenet_eval(size: int = 224) -> v2.Compose:
    """Resize the short side to ``size * 256/224`` (256 for 224), centre crop ``size``."""
    return v2.Compose(
        [
            v2.Resize(round(size * 256 / 224), antialias=True),
            v2.CenterCrop(size),
            *_to_normalised_tensor(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def cifar_train(mean: tuple[float, ...], std: tuple[float, ...], size: int = 32) -> v2.Compose:
    """The usual CIFAR augmentation: 4-pixel padded random crop and horizontal flip."""
    resize = [v2.Resize(size, antialias=True)] if size != 32 else []
    return v2.Compose(
        [*resize, v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip(), *_to_normalised_tensor(mean, std)]
    )


def cifar_eval(mean: tuple[float, ...], std: tuple[float, ...], size: int = 32) -> v2.Compose:
    resize = [v2.Resize(size, antialias=True)] if size != 32 else []
    return v2.Compose([*resize, *_to_normalised_tensor(mean, std)])


def plain() -> v2.Compose:
    """No augmentation: tensor normalised with ImageNet's statistics (FakeData)."""
    return v2.Compose(_to_normalised_tensor(IMAGENET_MEAN, IMAGENET_STD))
