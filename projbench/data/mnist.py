"""MNIST in its official IDX files, and Biased-MNIST built from it as ReBias builds it.

Layout (the four files of the official distribution, gzipped as downloaded or unpacked; torchvision's
download folder `MNIST/raw/` under the root is found too):

    <root>/train-images-idx3-ubyte[.gz]   60,000 images of 28 x 28, uint8
    <root>/train-labels-idx1-ubyte[.gz]   60,000 labels 0-9
    <root>/t10k-images-idx3-ubyte[.gz]    10,000 test images
    <root>/t10k-labels-idx1-ubyte[.gz]

IDX: a big-endian header (two zero bytes, the element type 0x08 = unsigned byte, the number of
dimensions), one big-endian int32 per dimension, then the data. Every problem (a missing file, a
wrong header, a short file, a broken gzip stream, labels outside 0-9, counts that disagree) is a
DataError naming the file.

Biased-MNIST (Bahng et al., ICML 2020; clovaai/rebias datasets/colour_mnist.py, written here
from its description): every class has a colour; the digit is drawn white on a background of
some colour. Of each class's n images, int(n * rho) (chosen at random) get the class's own colour;
the rest are cut into chunks of ceil(rest / 9) and each chunk gets one of the other 9 colours, the
colours taken in a random order. So rho = 0.1 makes the colour independent of the class (the
"unbiased" test set) and rho = 1 ties it to the class (the "biased" one).
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from projbench.errors import DataError

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
UBYTE = 0x08
HINT = ("Put MNIST's four official files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; gzipped or not) in one folder and set "
        "task.data.root=/path/to/it, or set task.data.fixture=true for a tiny stand-in")


def find_idx_file(root: Path, name: str) -> Path:
    """`name` or `name.gz` in `root` or in torchvision's `root/MNIST/raw`; the unpacked file wins."""
    for folder in (root, root / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise DataError(root / name, "not found (nor .gz, nor under MNIST/raw/)", HINT)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file (gzipped or not) with `ndim` dimensions."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(path, f"cannot be read ({exc})", HINT) from None
    header = 4 + 4 * ndim
    if len(data) < header or data[:2] != b"\0\0" or data[2] != UBYTE or data[3] != ndim:
        raise DataError(path, f"is not an IDX file of unsigned bytes with {ndim} dimension(s) "
                              f"(header {data[:4].hex() or 'empty'}; expected 0000080{ndim})", HINT)
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = math.prod(shape)
    if len(data) - header != size:
        raise DataError(path, f"holds {len(data) - header:,} bytes of data; its header {shape} needs {size:,} "
                              "(truncated or corrupt?)", HINT)
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_mnist(root: Path, split: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, rows, cols], labels int64 [n]) of the "train" or "test" split."""
    root = Path(root)
    image_name, label_name = IDX_FILES[split]
    images_path, labels_path = find_idx_file(root, image_name), find_idx_file(root, label_name)
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise DataError(labels_path, f"holds {len(labels):,} labels for the {len(images):,} images of {images_path}")
    if len(labels) and labels.max() >= num_classes:
        raise DataError(labels_path, f"holds label {labels.max()}; MNIST's labels are 0-{num_classes - 1}")
    return images, labels.astype(np.int64)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, UBYTE, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    opener = gzip.open if Path(path).suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


# -- Biased-MNIST ------------------------------------------------------------------------------
def colour_labels(labels: np.ndarray, rho: float, num_colours: int, rng: np.random.Generator) -> np.ndarray:
    """The colour index of every sample: per class, int(n * rho) random samples get the class's
    colour, the rest go in chunks of ceil(rest / (num_colours - 1)) to the other colours in a
    random order (so a class can miss some of them when few samples are left)."""
    colours = np.empty_like(labels)
    for label in range(num_colours):
        members = rng.permutation(np.flatnonzero(labels == label))
        own = int(len(members) * rho)
        colours[members[:own]] = label
        rest = members[own:]
        others = rng.permutation([(label + k) % num_colours for k in range(1, num_colours)])
        chunk = max(math.ceil(len(rest) / (num_colours - 1)), 1)
        for k, start in enumerate(range(0, len(rest), chunk)):
            colours[rest[start:start + chunk]] = others[k]
    return colours


def colourise(images: np.ndarray, colour_index: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """uint8 [n, 3, rows, cols]: every non-zero pixel of the digit white (255), every zero pixel
    the sample's colour, as upstream (`_binary_to_colour`): the grey levels of the strokes are
    dropped."""
    digit = images[:, None] != 0
    background = palette[colour_index].astype(np.uint8)[:, :, None, None]
    return np.where(digit, np.uint8(255), background)


# -- the fixture ------------------------------------------------------------------------------
# Seven-segment glyphs (a top, b top right, c bottom right, d bottom, e bottom left, f top left,
# g middle): ten shapes a small CNN tells apart, drawn with random size, place, stroke and ink.
SEGMENTS = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc", 7: "abc",
            8: "abcdefg", 9: "abcdfg"}
FIXTURE_COUNTS = {"train": 64, "test": 20}  # images per class


def glyph(digit: int, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """One (size, size) uint8 digit: strokes of grey level 128-255 on an exact-zero background."""
    image = np.zeros((size, size), np.uint8)
    width, height = int(rng.integers(9, 14)), int(rng.integers(16, 21))
    stroke = int(rng.integers(2, 4))
    top = int(rng.integers(2, size - height - 1))
    left = int(rng.integers(3, size - width - 2))
    mid, bottom, right = top + height // 2, top + height, left + width
    boxes = {"a": (top, top + stroke, left, right), "d": (bottom - stroke, bottom, left, right),
             "g": (mid - stroke // 2, mid - stroke // 2 + stroke, left, right),
             "f": (top, mid, left, left + stroke), "e": (mid, bottom, left, left + stroke),
             "b": (top, mid, right - stroke, right), "c": (mid, bottom, right - stroke, right)}
    for segment in SEGMENTS[digit]:
        y0, y1, x0, x1 = boxes[segment]
        image[y0:y1, x0:x1] = rng.integers(128, 256, size=(y1 - y0, x1 - x0))
    return image


def write_mnist_fixture(root: Path, counts: dict[str, int] = FIXTURE_COUNTS, seed: int = 0) -> None:
    """The four IDX files (gzipped, as distributed) of a tiny MNIST: `counts[split]` seven-segment
    digits of 28 x 28 per class, in a shuffled order."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for s, (split, (image_name, label_name)) in enumerate(IDX_FILES.items()):
        rng = np.random.default_rng([seed, s])
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), counts[split]))
        write_idx(root / f"{image_name}.gz", np.stack([glyph(int(d), rng) for d in labels]))
        write_idx(root / f"{label_name}.gz", labels)

