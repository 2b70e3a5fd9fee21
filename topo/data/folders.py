"""Image folder trees (``train/`` and ``val/`` of class folders): checks and reading.

``check_tree`` validates the layout before anything is scanned, so every common
mistake (a wrong path, a missing split, ImageNet's flat validation folder,
classes that differ between splits) becomes a one-line :class:`DataError`.
``ImageTree`` is torchvision's ``ImageFolder`` made robust: it reads each
file once (symlinked folders that lead back into the tree are not followed,
hidden folders and files are ignored at every depth, only regular files are
images), turns every image upright (EXIF orientation) and into 8-bit RGB, and
skips unreadable files (counted in the log), or, with ``strict=True``, refuses
them. ``take_skipped(dataset)`` tells how many reads were skipped since it was
last asked, over all loader worker processes.
"""
from __future__ import annotations

import logging
import os
import struct
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, get_worker_info
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from topo.common.errors import DataError
from topo.data.transforms import eight_bit

log = logging.getLogger(__name__)

#: What PIL raises for a file that is not a readable image (truncated, corrupt, not an image).
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

#: Folder names accepted for the evaluation split, in order of preference.
VAL_NAMES = ("val", "validation")

#: Slots of an ImageTree's skip counter: one for the main process, one per loader worker (up to 63).
SKIP_SLOTS = 64

#: The target an evaluation ImageTree gives an unreadable image's slot: cross-entropy's default
#: ``ignore_index``, and no class, so evaluation leaves the slot out (``topo.train.evaluate``).
IGNORED_TARGET = -100


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
        raise DataError(_class_mismatch(train, val, train_classes, val_classes))
    return train, val, train_classes


def _form(name: str) -> str:
    """The Unicode normalisation form ``name`` is written in: NFC, NFD, or mixed."""
    return next((form for form in ("NFC", "NFD") if unicodedata.normalize(form, name) == name), "mixed")


def _class_mismatch(train: Path, val: Path, train_classes: list[str], val_classes: list[str]) -> str:
    """Why the class folders of ``train`` and ``val`` differ, in one line; only the non-empty sides are named.

    Names are compared after NFC normalisation, so that two folders spelled alike but stored in different
    Unicode normalisation forms (a tree copied from macOS: ``café`` as NFD in one split, NFC in the other)
    are reported as such. They are not accepted as one class: the folder names are the class names, and
    a rename makes both splits agree.
    """
    nfc_train = {unicodedata.normalize("NFC", name): name for name in train_classes}
    nfc_val = {unicodedata.normalize("NFC", name): name for name in val_classes}
    forms = sorted(key for key in nfc_train.keys() & nfc_val.keys() if nfc_train[key] != nfc_val[key])
    only_train = sorted(nfc_train[key] for key in nfc_train.keys() - nfc_val.keys())
    only_val = sorted(nfc_val[key] for key in nfc_val.keys() - nfc_train.keys())
    parts, fixes = [], []
    if forms:
        first = forms[0]
        parts.append(f"{_few(forms)} differ only in Unicode normalisation ({first} is {_form(nfc_train[first])} "
                     f"in train, {_form(nfc_val[first])} in val)")
        fixes.append(f"rename the folders to one form (to NFC: convmv -r -f utf8 -t utf8 --nfc --notest {train} {val})")
    parts += [f"only in {split} {_few(names)}" for split, names in (("train", only_train), ("val", only_val)) if names]
    if only_train or only_val:
        fixes.append("every class needs a folder in both splits")
    return f"classes differ between {train} and {val}: {', '.join(parts)}; {'; '.join(fixes)}"


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return f"[{shown}{more}]"


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image (grayscale, palette, CMYK, 16-bit, 32-bit integer or float, alpha) to 8-bit RGB.

    Images of more than 8 bits are scaled by their values' range (floats in [0, 1] times 255, 16-bit
    integers from 0-65535), never clipped: the rule is :func:`topo.data.transforms.eight_bit`'s.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return eight_bit(image).convert("RGB")


def read_rgb(path: str) -> Image.Image:
    """Fully decode the image at ``path``, upright (its EXIF orientation applied), as RGB.

    Raises one of ``UNREADABLE`` if it is broken.
    """
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()  # decodes everything, so a truncated file fails here and not later
    return to_rgb(_upright(image))


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation tag says (a photo taken sideways is stored sideways, and
    tagged); as stored where the tag is absent or the EXIF data cannot be parsed."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except UNREADABLE as exc:
        log.debug("EXIF orientation of %s not applied: %s", image, exc)
    return image


def _header_problem(path: str) -> str | None:
    """Why the file at ``path`` is not an image, judged from its header (cheap), or None."""
    try:
        with Image.open(path) as image:
            image.verify()
    except UNREADABLE as exc:
        return str(exc) or type(exc).__name__
    return None


def _inside(path: str, folder: str) -> bool:
    """Whether the (real) path ``path`` is ``folder`` or lies inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclass
class _Walk:
    """What a walk over one split's class folders found and left out (see :meth:`ImageTree.make_dataset`)."""

    tree: str  #: the split folder's real path
    folders: set[str] = field(default_factory=set)  #: real paths of the folders read
    links: list[str] = field(default_factory=list)  #: symlinked folders not followed
    twice: list[str] = field(default_factory=list)  #: second names of an image already listed
    not_files: list[str] = field(default_factory=list)  #: image names that are not regular files

    def _follows(self, entry: os.DirEntry, real: str) -> bool:
        """Whether to read the folder ``entry`` (real path ``real``): not twice, and not a symlink that
        leads into the split or to a folder holding it (a loop)."""
        loop = _inside(real, self.tree) or _inside(self.tree, real)
        if real in self.folders or (entry.is_symlink() and loop):
            self.links.append(entry.path)
            return False
        self.folders.add(real)
        return True

    def folder(self, path: str, real: str) -> tuple[list[tuple[str, str, bool]], list[tuple[str, str]]]:
        """(name, real path, whether a symlink) of the images and (path, real path) of the folders to read
        inside the folder ``path`` (real path ``real``)."""
        images, folders = [], []
        with os.scandir(path) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name.startswith("."):
                    continue  # hidden: .ipynb_checkpoints, macOS's ._ files
                link = entry.is_symlink()
                target = os.path.realpath(entry.path) if link else os.path.join(real, entry.name)
                if entry.is_dir():
                    if self._follows(entry, target):
                        folders.append((entry.path, target))
                elif _is_image(entry.name) and entry.is_file():
                    images.append((entry.name, target, link))
                elif _is_image(entry.name):
                    self.not_files.append(entry.path)
        return images, folders

    def images(self, top: str) -> list[tuple[str, str, bool]]:
        """(path, real path, whether a symlink) of the images under class folder ``top``, in torchvision's
        order (by folder path, then name)."""
        real = os.path.realpath(top)
        if _inside(self.tree, real):  # a class folder that is a link to the split, or to a folder above it
            self.links.append(top)
            return []
        self.folders.add(real)
        listed, stack = [], [(top, real)]
        while stack:
            path, real = stack.pop()
            images, folders = self.folder(path, real)
            listed.append((path, images))
            stack.extend(folders)
        return [(os.path.join(path, name), target, link) for path, images in sorted(listed)
                for name, target, link in images]

    def once(self, listed: list[tuple[str, str, bool, int]]) -> list[tuple[str, int]]:
        """(path, class) of ``listed`` (path, real path, symlink, class), each file once: under its own
        name where the walk found it, else under its first symlink."""
        own = {target for _, target, link, _ in listed if not link}
        kept: set[str] = set()
        samples = []
        for path, target, link, index in listed:
            if target in kept or (link and target in own):
                self.twice.append(path)
                continue
            kept.add(target)
            samples.append((path, index))
        return samples

    def warning(self) -> str | None:
        """One line on what was left out, or None."""
        kinds = (
            (self.links, "symlinked folders that lead back into the tree or to a folder already read"),
            (self.twice, "second names of an image already listed"),
            (self.not_files, "entries named like images that are not a regular file (a pipe, a device, a broken link)"),
        )
        parts = [f"{len(found)} {what} (first: {found[0]})" for found, what in kinds if found]
        return f"ignored in {self.tree}: " + "; ".join(parts) if parts else None


class ImageTree(ImageFolder):
    """``ImageFolder`` that reads each image file once, upright and in RGB, and copes with unreadable files.

    The class folders are walked without torchvision's ``followlinks=True``: a symlinked folder is
    followed only when it leads out of the split (a subset built from links to another tree), never back
    into it or to a folder holding it (``loop -> ..``), and never to a folder already read; a symlinked
    image file is kept, but no file is listed twice. Hidden folders and files (``.ipynb_checkpoints``)
    are ignored at every depth, and only regular files are images (a named pipe would block the reader).
    What is left out, except hidden names, is counted in one warning and listed in ``left_out``.

    With ``verify=True`` every file's header is checked once at construction
    (non-images, empty and garbled files); files that only fail to decode
    (e.g. truncated JPEGs) are found when read. Either way an unreadable file
    is skipped and counted in the log, or, with ``strict=True``, raises
    :class:`DataError`. Reading one substitutes the next readable sample, so
    batches keep their size; with ``evaluation=True`` the substitute's target is
    :data:`IGNORED_TARGET`, which :func:`topo.train.evaluate` does not count, so
    metrics are over the readable images only. Skipped reads are also counted
    in shared memory, which loader workers inherit: :meth:`take_skipped` gives
    their total. ``found`` is the number of image files the walk listed.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Any], Any] | None = None,
        *,
        strict: bool = False,
        verify: bool = True,
        evaluation: bool = False,
    ) -> None:
        super().__init__(str(root), transform=transform, loader=read_rgb, allow_empty=True)
        self.strict = strict
        self.evaluation = evaluation
        self.found = len(self.samples)
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

    def make_dataset(  # type: ignore[override]
        self, directory: str, class_to_idx: dict[str, int], *args: Any, **kwargs: Any
    ) -> list[tuple[str, int]]:
        """(path, class index) of every image file under the class folders, each file once (see the class)."""
        walk = _Walk(os.path.realpath(directory))
        listed = [(path, target, link, index) for name, index in sorted(class_to_idx.items(), key=lambda c: c[1])
                  for path, target, link in walk.images(os.path.join(directory, name))]
        samples = walk.once(listed)
        warning = walk.warning()
        if warning:
            log.warning("%s", warning)
        self.left_out = {"links": walk.links, "twice": walk.twice, "not_files": walk.not_files}
        return samples

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
            return image, IGNORED_TARGET if offset and self.evaluation else target
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


def unreadable_note(dataset: Dataset, evaluated: int) -> str | None:
    """One line saying how many image files of ``dataset`` (an :class:`ImageTree`) were unreadable and so
    left out of an evaluation over ``evaluated`` images, or None when none was."""
    found = getattr(dataset, "found", None)
    if found is None or evaluated >= found:
        return None
    return (f"{found - evaluated} of {found} images in {dataset.root} are unreadable: skipped, not counted "
            f"({evaluated} evaluated)")


def take_skipped(dataset: Dataset) -> int:
    """``dataset.take_skipped()`` for data sets that skip unreadable samples (:class:`ImageTree`), else 0."""
    take = getattr(dataset, "take_skipped", None)
    return take() if callable(take) else 0
