"""`DataBundle`: a data set ready for training, and the image-size argument every source takes."""
from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset


@dataclass
class DataBundle:
    """A data set ready for training: both splits and what the network needs to know.

    ``image_size`` is the (height, width) of the tensors the network receives.
    """

    train: Dataset
    val: Dataset
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    class_names: list[str]
    name: str


def image_hw(image_size: int | tuple[int, int] | None, default: int) -> tuple[int, int]:
    """``image_size`` (a side, or (height, width)) as (height, width); ``default`` x ``default`` when None."""
    if image_size is None:
        return (default, default)
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = image_size
    return (int(height), int(width))
