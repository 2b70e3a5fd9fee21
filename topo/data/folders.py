"""Image folder trees (``train/`` and ``val/`` of class folders): checks and reading.

``check_tree`` validates the layout before anything is scanned, so every common
mistake (a wrong path, a missing split, ImageNet's flat validation folder,
classes that differ between splits) becomes a one-line :class:`DataError`.
``ImageTree`` is torchvision's ``ImageFolder`` made robust: it converts every
image to RGB and skips unreadable files (counted in the log), or, with
``strict=True``, refuses them. ``take_skipped(dataset)`` tells how many reads
were skipped since it was last asked, over all loader worker processes.
"""
from __future__ import annotations

import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from topo.common.errors import DataError

log = logging.getLogger(__name__)

#: What PIL raises for a file that is not a readable image (truncated, corrupt, not an image).
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

#: Folder names accepted for the evaluation split, in order of preference.
VAL_NAMES = ("val", "validation")

#: Slots of an ImageTree's skip counter: one for the main process, one per loader worker (up to 63).
SKIP_SLOTS = 64


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _list_dir(path: Path) -> tuple[list[str], list[str]]:
    """Class folders (sorted, hidden ones ignored) and image files directly inside ``path``."""
    classes, images = [], []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                classes.append(entry.name)
            elif _is_image(entry.name):
                images.append(entry.name)
    return sorted(classes), images


def check_split(path: Path, split: str) -> list[str]:
    """Check one split folder and return its sorted class names."""
    if not path.is_dir():
        raise DataError(f"{path} is not a directory; the {split} split needs a folder of class folders")
    classes, images = _list_dir(path)
    if not classes and images and split == "val":
        raise DataError(
            f"{path} holds {len(images)} images but no class folders; move each image into a folder "
            f"named after its class (for ImageNet run the standard valprep.sh script, which does "
            f"exactly this) and rerun"
        )
    if not classes and images:
        raise DataError(
            f"{path} holds {len(images)} images but no class folders; "
            f"move each image into a folder named after its class"
        )
    if not classes:
        raise DataError(f"{path} is empty; it needs one folder of images per class")
    return classes


def check_tree(root: str | os.PathLike) -> tuple[Path, Path, list[str]]:
    """Validate ``root/{train,val}/<class>/`` and return the split folders and the class names.

    ``validation/`` is accepted in place of ``val/``. Classes must be the same
    in both splits, so that class indices (from the sorted folder names) agree.
    """
    root = Path(root).expanduser()
    if root.is_file():
        raise DataError(
            f"data directory {root} is a file, not a folder (extract it first if it is an archive); pass "
            f"--data-dir pointing at the folder that holds train/ and val/ class folders"
        )
    if not root.is_dir():
        raise DataError(
            f"data directory {root} does not exist; pass --data-dir pointing at a folder "
            f"that holds train/ and val/ class folders"
        )
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"no train/ folder in {root}; put the training images in {train}/<class>/")
    val = next((root / n for n in VAL_NAMES if (root / n).is_dir()), None)
    if val is None:
        raise DataError(
            f"no val/ (or validation/) folder in {root}; put the validation images in {root / 'val'}/<class>/"
        )
    train_classes = check_split(train, "train")
    val_classes = check_split(val, "val")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"classes differ between {train} and {val}: only in train {_few(only_train)}, "
            f"only in val {_few(only_val)}; every class needs a folder in both splits"
        )
    return train, val, train_classes


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return f"[{shown}{more}]"


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image (grayscale, palette, CMYK, 16-bit, alpha) to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        if values.max(initial=0) > 255:
            values = values / 257.0  # 16-bit range onto 8 bits
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def read_rgb(path: str) -> Image.Image:
    """Fully decode the image at ``path`` as RGB; raises one of ``UNREADABLE`` if it is broken."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()  # decodes everything, so a truncated file fails here and not later
    return to_rgb(image)


def _header_problem(path: str) -> str | None:
    """Why the file at ``path`` is not an image, judged from its header (cheap), or None."""
    try:
        with Image.open(path) as image:
            image.verify()
    except UNREADABLE as exc:
        return str(exc) or type(exc).__name__
    return None


class ImageTree(ImageFolder):
    """``ImageFolder`` that returns RGB images and copes with unreadable files.

    With ``verify=True`` every file's header is checked once at construction
    (non-images, empty and garbled files); files that only fail to decode
    (e.g. truncated JPEGs) are found when read. Either way an unreadable file
    is skipped and counted in the log (reading one substitutes the next
    readable sample, so batches keep their size), or, with ``strict=True``,
    raises :class:`DataError`. Skipped reads are also counted in shared memory,
    which loader workers inherit: :meth:`take_skipped` gives their total.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Any], Any] | None = None,
        *,
        strict: bool = False,
        verify: bool = True,
    ) -> None:
        super().__init__(str(root), transform=transform, loader=read_rgb, allow_empty=True)
        self.strict = strict
        self.skipped: set[str] = set()
        self._skip_counts = torch.zeros(SKIP_SLOTS, dtype=torch.int64).share_memory_()
        if verify:
            self._drop_unreadable()
        counts = np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=len(self.classes))
        empty = [self.classes[i] for i in np.flatnonzero(counts == 0)]
        if empty:
            raise DataError(
                f"class folder {Path(root) / empty[0]} holds no readable images "
                f"({len(empty)} such class folders in {root}); add images ({', '.join(IMG_EXTENSIONS)}) or remove it"
            )

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """Sorted class folders, ignoring hidden ones such as ``.ipynb_checkpoints``."""
        classes = check_split(Path(directory), "val" if Path(directory).name in VAL_NAMES else "train")
        return classes, {name: i for i, name in enumerate(classes)}

    def _drop_unreadable(self) -> None:
        paths = [path for path, _ in self.samples]
        with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
            problems = list(pool.map(_header_problem, paths))
        bad = [(p, why) for p, why in zip(paths, problems) if why is not None]
        if not bad:
            return
        if self.strict:
            path, why = bad[0]
            raise DataError(
                f"image {path} cannot be read ({why}); {len(bad)} unreadable images in {self.root}: "
                f"remove or replace them, or run without strict to skip them"
            )
        bad_paths = {p for p, _ in bad}
        self.samples = [s for s in self.samples if s[0] not in bad_paths]
        self.imgs = self.samples
        self.targets = [t for _, t in self.samples]
        self.skipped |= bad_paths
        log.warning(
            "skipped %d of %d images in %s that cannot be read (first: %s: %s); strict mode makes this an error",
            len(bad), len(paths), self.root, bad[0][0], bad[0][1],
        )

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = read_rgb(path)
            except UNREADABLE as exc:
                if self.strict:
                    raise DataError(f"image {path} cannot be read ({exc}); remove or replace it") from None
                if path not in self.skipped:
                    self.skipped.add(path)
                    log.warning(
                        "skipped unreadable image %s (%s); %d skipped so far in this process",
                        path, exc, len(self.skipped),
                    )
                self._count_skip()
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, target
        raise DataError(f"no readable image in {self.root}; check the files")

    def _count_skip(self) -> None:
        """Count one skipped read in this process's own slot of the shared counter, so writers never race."""
        worker = get_worker_info()
        slot = 0 if worker is None else 1 + worker.id % (SKIP_SLOTS - 1)
        self._skip_counts[slot] += 1

    def take_skipped(self) -> int:
        """Reads of unreadable images skipped since the last call, in this process and its loader
        workers (an image read twice counts twice), and reset the count. Call it from the main process."""
        total = int(self._skip_counts.sum())
        self._skip_counts.zero_()
        return total


def take_skipped(dataset: Dataset) -> int:
    """``dataset.take_skipped()`` for data sets that skip unreadable samples (:class:`ImageTree`), else 0."""
    take = getattr(dataset, "take_skipped", None)
    return take() if callable(take) else 0
