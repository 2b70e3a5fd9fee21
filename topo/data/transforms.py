"""Training augmentation and evaluation preprocessing for each kind of data set."""
from __future__ import annotations

import torch
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
