"""Class-folder image data sets (ImageNet-1k's layout), read with torchvision's ImageFolder:

    <root>/train/<wnid>/*.JPEG
    <root>/val/<wnid>/*.JPEG       (the official flat val archive sorted into class folders)

`read_split` checks the layout before anything trains and turns every problem into a DataError
that names the path and what was expected. `read_class_subset` reads only the class folders it is
given (e.g. the 42 ImageNet classes of 9-class ImageNet, several folders to one class) and
ignores the others. A file that cannot be decoded shows up only when it is read; `on_bad_image`
decides what happens then:

  raise  BadImageError (a DataError) naming the file; the run stops with exit code 2.
  skip   a warning naming the file (logged once per file in each loader process), and the next
         readable sample of the split (index + 1, + 2, ...) takes its place, so batches keep
         their size. More than MAX_CONSECUTIVE_BAD unreadable files in a row raise instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from PIL import Image
from torchvision.datasets import ImageFolder

from projbench.errors import DataError

log = logging.getLogger(__name__)

ON_BAD_IMAGE = ("skip", "raise")
MAX_CONSECUTIVE_BAD = 10
# What PIL raises on a truncated, corrupt or vanished file (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class BadImageError(DataError):
    """An image file that cannot be decoded (task.data.on_bad_image=raise)."""

    def __init__(self, path, message: str | None = None):
        # message None: rebuilt from a DataLoader worker's text, which DataError handles.
        hint = "Replace or delete the file, or set task.data.on_bad_image=skip" if message else None
        super().__init__(path, message, hint)


def open_rgb(path: str) -> Image.Image:
    """The decoded RGB image (PIL decodes lazily; convert() forces the whole file to be read)."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


class ImageFolderSplit(ImageFolder):
    """torchvision's ImageFolder with a fixed class -> index map (so val uses train's indices)
    and the `on_bad_image` policy described in the module docstring."""

    def __init__(self, root: Path, transform: Callable | None = None, on_bad_image: str = "skip",
                 class_to_idx: dict[str, int] | None = None):
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        self._fixed_class_to_idx = class_to_idx
        self.on_bad_image = on_bad_image
        self._reported: set[str] = set()
        super().__init__(str(root), transform=transform, loader=open_rgb)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        if self._fixed_class_to_idx is None:
            return super().find_classes(directory)
        mapping = dict(self._fixed_class_to_idx)
        return sorted(mapping, key=mapping.get), mapping

    def __getitem__(self, index: int):
        image, target, _ = self.load(index)
        return image, target

    def load(self, index: int):
        """(image, target, the index of the sample returned): `index`, or with on_bad_image=skip
        the next readable one (so per-sample data kept beside the folder can follow it)."""
        for attempt in range(MAX_CONSECUTIVE_BAD + 1):
            used = (index + attempt) % len(self.samples)
            path, target = self.samples[used]
            try:
                image = self.loader(path)
            except DECODE_ERRORS as exc:
                if self.on_bad_image == "raise":
                    raise BadImageError(path, f"cannot be decoded as an image ({exc})") from None
                if path not in self._reported:
                    self._reported.add(path)
                    log.warning("%s: cannot be decoded as an image (%s); skipped, the next sample is used instead",
                                path, exc)
                continue
            if self.transform is not None:
                image = self.transform(image)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return image, target, used
        raise DataError(self.root, f"{MAX_CONSECUTIVE_BAD + 1} image files in a row, from "
                                   f"{self.samples[index][0]} on, cannot be decoded; is the data set intact?")


def read_split(root: Path, split: str, transform: Callable | None = None, on_bad_image: str = "skip",
               class_to_idx: dict[str, int] | None = None, hint: str | None = None) -> ImageFolderSplit:
    """The class folders under `root/split`, checked: the folder exists, holds class folders, and
    every class has at least one image. With `class_to_idx` (the training split's), the split's
    class folders must be among those classes and get the same indices."""
    directory = Path(root) / split
    expected = f"class folders {directory}/<class>/<image> (e.g. ImageNet's {split}/n01440764/*.JPEG)"
    if not directory.is_dir():
        raise DataError(directory, f"not found; expected {expected}", hint)
    found = sorted(entry.name for entry in directory.iterdir() if entry.is_dir())
    if not found:
        raise DataError(directory, f"holds no class folders; expected {expected}", hint)
    if class_to_idx is not None:
        unknown = sorted(set(found) - set(class_to_idx))
        if unknown:
            raise DataError(directory, f"class folders {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
                                       f"({len(unknown)} in all) are not among the training classes", hint)
    return _open_folder(directory, transform, on_bad_image, class_to_idx, hint)


def read_class_subset(directory: Path, class_of: dict[str, int], transform: Callable | None = None,
                      on_bad_image: str = "skip", hint: str | None = None,
                      require_all: bool = True) -> ImageFolderSplit:
    """The class folders of `directory` that `class_of` names (folder name -> class index; several
    folders may share a class), every other folder ignored: a subset of ImageNet's classes
    regrouped into fewer classes. With `require_all`, every named folder must be there; without,
    those present are read (at least one must be)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(directory, "not found; expected class folders <wnid>/<image>", hint)
    present = {name: index for name, index in class_of.items() if (directory / name).is_dir()}
    missing = sorted(set(class_of) - set(present))
    if not present or (require_all and missing):
        raise DataError(directory, f"lacks {len(missing)} of the {len(class_of)} class folders the task reads "
                                   f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})", hint)
    return _open_folder(directory, transform, on_bad_image, present, hint)


def _open_folder(directory: Path, transform: Callable | None, on_bad_image: str,
                 class_to_idx: dict[str, int] | None, hint: str | None) -> ImageFolderSplit:
    try:
        return ImageFolderSplit(directory, transform, on_bad_image, class_to_idx)
    except FileNotFoundError as exc:  # a class folder without one file of an image extension
        raise DataError(directory, str(exc).strip(), hint) from None
