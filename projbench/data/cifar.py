"""CIFAR-10 in its official python layout (the `cifar-10-python.tar.gz` archive, extracted):

    cifar-10-batches-py/
        batches.meta                      {"label_names": [10 names], "num_cases_per_batch", "num_vis"}
        data_batch_1 ... data_batch_5     {"data": uint8 (10000, 3072), "labels": [10000 ints],
                                           "filenames", "batch_label"}
        test_batch                        the same, the 10,000 test images

Each file is a pickled dict (written by Python 2's cPickle: read with `encoding="latin1"`, as
torchvision does). A row of `data` is one 32x32 image, its 1,024 red values, then green, then
blue, each row-major. torchvision's CIFAR10 reader would read the same files, but it checks each
file's MD5 against the official archive, so it cannot read a fixture; this reader checks the
structure instead, and every problem is a DataError naming the file.

The files are unpickled with a restricted unpickler that builds only numpy arrays and plain
containers: a pickle can run arbitrary code, and a data set should not.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from projbench.data.fixtures import class_image
from projbench.errors import DataError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{k}" for k in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
NUM_CLASSES = 10
SIDE = 32
ROW = 3 * SIDE * SIDE
# The official class names, in label order (batches.meta of the archive).
LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# What a CIFAR-10 pickle may build: numpy arrays (the module was renamed numpy._core in numpy 2),
# and bytes (Python 3 writes them in protocol 2 as _codecs.encode(text, "latin1")).
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refuses to build {module}.{name}")
        return super().find_class(module, name)


@dataclass
class CifarSplit:
    """Images as uint8 (N, 3, 32, 32), labels as int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray


def find_root(root: Path) -> Path:
    """`root` itself when it holds the batch files, or its `cifar-10-batches-py/` (the folder
    torchvision's `root` argument points above)."""
    root = Path(root)
    nested = root / FOLDER
    return nested if not (root / META_FILE).exists() and nested.is_dir() else root


def _unpickle(path: Path, hint: str | None) -> dict:
    if not path.is_file():
        raise DataError(path, f"not found; expected CIFAR-10's python layout ({FOLDER}/ with "
                              f"{META_FILE}, data_batch_1..5, {TEST_FILE})", hint)
    try:
        with path.open("rb") as f:
            content = _ArraysOnly(f, encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - a corrupt pickle fails in many ways; each is a data error
        raise DataError(path, f"cannot be read as a CIFAR-10 python batch ({type(exc).__name__}: {exc}); "
                              "the file may be truncated or corrupt", hint) from None
    if not isinstance(content, dict):
        raise DataError(path, f"holds a pickled {type(content).__name__}, not the dict of a CIFAR-10 batch", hint)
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}


def read_batch(path: Path, hint: str | None = None) -> CifarSplit:
    """One batch file, checked: `data` is uint8 (N, 3072) and `labels` N ints in 0..9."""
    batch = _unpickle(path, hint)
    for key in ("data", "labels"):
        if key not in batch:
            raise DataError(path, f"has no {key!r} entry (found {sorted(batch)})", hint)
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW:
        shape = getattr(data, "shape", None)
        raise DataError(path, f"'data' must be a uint8 array of shape (N, {ROW}); got "
                              f"{type(data).__name__} {getattr(data, 'dtype', '')} {shape}", hint)
    labels = np.asarray(batch["labels"])
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(path, f"'labels' must be {len(data)} integers, one per row of 'data'; got {labels.shape}", hint)
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(path, f"'labels' must lie in 0..{NUM_CLASSES - 1}; found {labels.min()}..{labels.max()}", hint)
    return CifarSplit(data.reshape(-1, 3, SIDE, SIDE), labels.astype(np.int64))


def read_meta(path: Path, hint: str | None = None) -> list[str]:
    """The class names of batches.meta (ten of them)."""
    meta = _unpickle(path, hint)
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != NUM_CLASSES:
        raise DataError(path, f"'label_names' must list the {NUM_CLASSES} class names; got {names!r}", hint)
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def read_cifar10(root: Path, hint: str | None = None) -> tuple[dict[str, CifarSplit], list[str]]:
    """({"train": the five data batches, "test": test_batch}, class names) under `root`."""
    root = find_root(root)
    names = read_meta(root / META_FILE, hint)
    parts = [read_batch(root / name, hint) for name in TRAIN_FILES]
    train = CifarSplit(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
    return {"train": train, "test": read_batch(root / TEST_FILE, hint)}, names


def write_cifar10_fixture(root: Path, train_per_batch: int = 64, test: int = 100, seed: int = 0) -> None:
    """A tiny CIFAR-10 in the official layout: five data batches of `train_per_batch` images and a
    test batch of `test`, 32x32 images of the ten classes in turn (projbench.data.fixtures'
    learnable class patterns), pickled as the archive's dicts."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    def batch(label: str, names: list[str], count: int, offset: int) -> dict:
        labels = [(offset + i) % NUM_CLASSES for i in range(count)]
        filenames = [f"{names[y]}_s_{offset + i:06d}.png" for i, y in enumerate(labels)]
        pixels = [class_image(y, f, SIDE, seed).transpose(2, 0, 1).reshape(-1) for y, f in zip(labels, filenames)]
        return {"batch_label": label, "labels": labels, "data": np.stack(pixels).astype(np.uint8),
                "filenames": filenames}

    names = list(LABEL_NAMES)
    files = {META_FILE: {"label_names": names, "num_cases_per_batch": train_per_batch, "num_vis": ROW}}
    for k, name in enumerate(TRAIN_FILES):
        files[name] = batch(f"training batch {k + 1} of 5", names, train_per_batch, k * train_per_batch)
    files[TEST_FILE] = batch("testing batch 1 of 1", names, test, len(TRAIN_FILES) * train_per_batch)
    for name, content in files.items():
        with (root / name).open("wb") as f:
            pickle.dump(content, f, protocol=2)
