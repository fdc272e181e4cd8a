"""Writers of tiny image data sets with learnable class structure, for tests and smoke runs.

Real data sets cannot be downloaded on the machines that run the tests, so each task writes a
fixture in its data set's official layout and reads it through its real reader. The images come
from one generic writer, `write_class_images(files, size)`, which renders a JPEG for each
(path, label) pair; a layout writer only decides the paths (and any index files) and calls it.

What makes the images learnable: every class has its own foreground colour and a crossed stripe
pattern of its own orientation and spatial frequency (in cycles per image, so it survives
resizing and random-resized crops); each image adds a random background colour, a random phase
and pixel noise. The pattern is mirror-symmetric, so a horizontal flip keeps the class. Pixels
depend only on (seed, label, file name), so a fixture is the same wherever it is written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Iterable

import numpy as np


def class_image(label: int, name: str, size: int | tuple[int, int] = 64, seed: int = 0) -> np.ndarray:
    """One (height, width, 3) uint8 image of class `label`; `name` (e.g. the file name) picks the
    per-image variation."""
    height, width = (size, size) if isinstance(size, int) else size
    cls = np.random.default_rng([seed, label])
    img = np.random.default_rng([seed, label, zlib.crc32(name.encode())])
    colour = cls.uniform(0, 1, size=3)
    angle = cls.uniform(0, np.pi / 2)
    cycles = cls.uniform(2.0, 6.0)  # stripe periods across the image
    yy, xx = np.mgrid[0:height, 0:width]
    yy, xx = (yy - height / 2) / height, (xx - width / 2) / width
    phase = img.uniform(0, 2 * np.pi, size=2)
    k = 2 * np.pi * cycles
    waves = (np.sin(k * (np.cos(angle) * xx + np.sin(angle) * yy) + phase[0])
             + np.sin(k * (-np.cos(angle) * xx + np.sin(angle) * yy) + phase[1]))
    ink = (waves > 0)[..., None]
    pixels = np.where(ink, colour, img.uniform(0, 1, size=3)) + img.normal(0, 0.05, (height, width, 3))
    return (np.clip(pixels, 0, 1) * 255).astype(np.uint8)


def write_class_images(files: Iterable[tuple[Path, int]], size: int | tuple[int, int] = 64, seed: int = 0,
                       quality: int = 90) -> list[Path]:
    """Write one JPEG per (path, label) pair (parent folders are created) and return the paths.

    The image of a pair depends on (seed, label, path.name): give images of one class distinct
    file names (train and test images included), and they differ."""
    from PIL import Image

    written = []
    for path, label in files:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(class_image(int(label), path.name, size, seed)).save(path, format="JPEG", quality=quality)
        written.append(path)
    return written


def write_once(root: Path, writer: Callable[[Path], None]) -> Path:
    """Run `writer(tmp)` into a temporary sibling of `root` and rename it into place, unless `root`
    exists. A reader never sees half a fixture, and of two processes racing, one wins and the
    other's copy is discarded."""
    root = Path(root)
    if root.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        writer(tmp)
        os.replace(tmp, root)
    except OSError:
        if not root.exists():  # a real failure, not another process winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def wnid(label: int) -> str:
    """A WordNet-id-like class folder name (n + 8 digits), as ImageNet names its classes."""
    return f"n{label + 1:08d}"


def write_imagenet_fixture(root: Path, classes: int = 4, train_per_class: int = 24, val_per_class: int = 8,
                           size: int = 64) -> None:
    """A tiny ImageNet-1k tree in the official class-folder layout:
    root/train/<wnid>/<wnid>_<k>.JPEG and root/val/<wnid>/ILSVRC2012_val_<n>.JPEG."""
    root = Path(root)
    files = [(root / "train" / wnid(c) / f"{wnid(c)}_{k}.JPEG", c)
             for c in range(classes) for k in range(train_per_class)]
    files += [(root / "val" / wnid(c) / f"ILSVRC2012_val_{c * val_per_class + k + 1:08d}.JPEG", c)
              for c in range(classes) for k in range(val_per_class)]
    write_class_images(files, size)
