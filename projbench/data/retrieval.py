"""Readers for the official on-disk layouts of the four image-retrieval benchmarks, and writers of
tiny fixtures in those same layouts.

Each reader returns {"train": [...], "test": [...]} lists of `Sample`s. Retrieval trains and tests
on disjoint classes; the split is the benchmarks' standard one:

  CUB-200-2011 (CUB_200_2011/)          images.txt + image_class_labels.txt + images/;
                                        first half of the classes (1-100) train, 101-200 test
  Cars-196 (cars196/)                   cars_annos.mat (struct array `annotations`) + car_ims/;
                                        classes 1-98 train, 99-196 test (the mat's `test`
                                        field is the classification split and is not used)
  Stanford Online Products              Ebay_train.txt / Ebay_test.txt:
    (Stanford_Online_Products/)         `image_id class_id super_class_id path`, after a header
  In-Shop (Inshop_Clothes/)             list_eval_partition.txt (or Eval/list_eval_partition.txt):
                                        a count line, a header line, then
                                        `image_name item_id evaluation_status` with status
                                        train / query / gallery; images under Img/ or the root
                                        (whichever holds them)

Every listed image is checked to exist before training (check_images_exist).

A missing or malformed file is a DataError naming the file (and `file:line` for a bad line).
The fixture writers lay out tiny data sets (images from projbench.data.fixtures) the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

from projbench.data.fixtures import write_class_images, write_once
from projbench.errors import DataError

QUERY, GALLERY = 1, 2
BOTH = QUERY | GALLERY  # every test image is a query against all the others (CUB, Cars, SOP)


class Sample(NamedTuple):
    path: Path
    label: int  # the class id (In-Shop: the item's index); only equality matters at test time
    role: int = BOTH  # test images: QUERY and/or GALLERY bits


Splits = dict[str, list[Sample]]


# -- reading ----------------------------------------------------------------------------------
def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(path, f"not found; expected {what}",
                        "Point task.data.root at the data set's directory (README.md, \"Image retrieval (Table 6)\","
                        " Data) or set task.data.fixture=true")
    return path


def _rows(path: Path, columns: list[str], skip: int = 0) -> Iterator[tuple[str, list[str]]]:
    """(`file:line`, fields) of each non-empty line after `skip` lines, exactly len(columns) fields."""
    _require(path, "a text file with columns " + " ".join(columns))
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if number <= skip or not fields:
                continue
            where = f"{path}:{number}"
            if len(fields) != len(columns):
                raise DataError(where, f"expected {len(columns)} columns ({' '.join(columns)}), got {line.strip()!r}")
            yield where, fields


def _int(where: str, value: str, column: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(where, f"{column} must be an integer, got {value!r}") from None


def _expect_header(path: Path, header: list[str], line: int = 1) -> None:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    got = lines[line - 1].split() if len(lines) >= line else []
    if got != header:
        raise DataError(f"{path}:{line}", f"expected the header {' '.join(header)!r}, got {' '.join(got)!r}")


def split_by_class(samples: list[Sample], source: Path) -> Splits:
    """Train on the first half of the sorted class ids, test on the rest (CUB: 1-100 / 101-200,
    Cars-196: 1-98 / 99-196)."""
    classes = sorted({s.label for s in samples})
    if len(classes) < 4:
        raise DataError(source, f"found {len(classes)} classes; retrieval needs at least 4 (2 train, 2 test)")
    first_test = classes[len(classes) // 2]
    return {"train": [s for s in samples if s.label < first_test],
            "test": [s for s in samples if s.label >= first_test]}


def read_cub(root: Path) -> Splits:
    root = Path(root)
    images_dir = _require(root / "images", "the images/ directory of CUB_200_2011")
    paths = {}
    for where, (image_id, rel) in _rows(root / "images.txt", ["<image_id>", "<relative path>"]):
        paths[_int(where, image_id, "image_id")] = images_dir / rel
    samples = []
    for where, (image_id, label) in _rows(root / "image_class_labels.txt", ["<image_id>", "<class_id>"]):
        key = _int(where, image_id, "image_id")
        if key not in paths:
            raise DataError(where, f"image_id {key} is not listed in {root / 'images.txt'}")
        samples.append(Sample(paths[key], _int(where, label, "class_id")))
    if len(samples) != len(paths):
        raise DataError(root / "image_class_labels.txt", f"labels {len(samples)} images, images.txt lists {len(paths)}")
    return split_by_class(samples, root / "image_class_labels.txt")


CARS_FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")


def read_cars196(root: Path) -> Splits:
    import scipy.io

    root = Path(root)
    path = _require(root / "cars_annos.mat", "the Cars-196 annotation file (with car_ims/ beside it)")
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as exc:  # noqa: BLE001 - scipy raises several types for a corrupt file
        raise DataError(path, f"cannot be read as a MATLAB file ({exc})") from None
    if "annotations" not in mat:
        raise DataError(path, "has no 'annotations' struct array")
    annotations = np.atleast_1d(mat["annotations"])
    names = annotations.dtype.names or ()
    missing = [f for f in ("relative_im_path", "class") if f not in names]
    if missing:
        raise DataError(path, f"'annotations' lacks the field(s) {missing}; has {list(names)}")
    samples = []
    for number, entry in enumerate(annotations, start=1):
        rel, label = entry["relative_im_path"], entry["class"]
        if not isinstance(rel, str) or np.ndim(label) != 0:
            raise DataError(f"{path}: annotation {number}", f"expected a relative_im_path string and a scalar class, "
                            f"got {rel!r} and {label!r}")
        samples.append(Sample(root / rel, int(label)))
    return split_by_class(samples, path)


SOP_COLUMNS = ["image_id", "class_id", "super_class_id", "path"]


def read_sop(root: Path) -> Splits:
    root = Path(root)
    splits = {}
    for split, name in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        path = _require(root / name, "a text file with columns " + " ".join(SOP_COLUMNS))
        _expect_header(path, SOP_COLUMNS)
        splits[split] = [Sample(root / rel, _int(where, class_id, "class_id"))
                         for where, (_, class_id, _, rel) in _rows(path, SOP_COLUMNS, skip=1)]
    return splits


INSHOP_COLUMNS = ["image_name", "item_id", "evaluation_status"]
INSHOP_ROLES = {"query": QUERY, "gallery": GALLERY}


def _inshop_image_root(root: Path, first: str, listing: Path) -> Path:
    """Where the In-Shop images are: the download's Img/ (Img/img/...) or the root itself, where
    unzipping Img/img.zip in place puts img/; the folder that holds the first listed image."""
    candidates = [root / "Img", root]
    for folder in candidates:
        if (folder / first).is_file():
            return folder
    raise DataError(root, f"the images of {listing.name} (the first: {first}) are in neither "
                          f"{candidates[0]}/ nor {candidates[1]}/",
                    "Unzip the download's Img/img.zip so that its img/ folder sits in one of them")


def read_inshop(root: Path) -> Splits:
    root = Path(root)
    path = root / "list_eval_partition.txt"
    if not path.exists() and (root / "Eval" / "list_eval_partition.txt").exists():
        path = root / "Eval" / "list_eval_partition.txt"  # the layout of the DeepFashion download
    _require(path, "the In-Shop partition file (a count line, a header, then " + " ".join(INSHOP_COLUMNS) + ")")
    _expect_header(path, INSHOP_COLUMNS, line=2)
    rows = list(_rows(path, INSHOP_COLUMNS, skip=2))
    if not rows:
        raise DataError(path, "lists no images")
    image_root = _inshop_image_root(root, rows[0][1][0], path)
    items: dict[str, int] = {}  # item id -> label shared by train, query and gallery
    splits: Splits = {"train": [], "test": []}
    for where, (name, item, status) in rows:
        if status not in ("train", *INSHOP_ROLES):
            raise DataError(where, f"evaluation_status must be train, query or gallery, got {status!r}")
        sample = Sample(image_root / name, items.setdefault(item, len(items)), INSHOP_ROLES.get(status, BOTH))
        splits["train" if status == "train" else "test"].append(sample)
    with open(path, encoding="utf-8") as f:
        declared = f.readline().strip()
    total = len(splits["train"]) + len(splits["test"])
    if declared != str(total):
        raise DataError(f"{path}:1", f"declares {declared!r} entries but lists {total}")
    return splits


def check_images_exist(splits: Splits) -> None:
    """Every listed image is a file (a stat each, no decoding): a missing one stops the run before
    training rather than in the middle of an epoch."""
    for split, samples in splits.items():
        missing = [s.path for s in samples if not os.path.isfile(s.path)]
        if missing:
            raise DataError(missing[0], f"listed for the {split} split but missing ({len(missing)} of the "
                                        f"{len(samples)} images of that split are missing)")


# -- fixtures ---------------------------------------------------------------------------------
def _lines(path: Path, rows: list[str]) -> None:
    path.write_text("\n".join(rows) + "\n")


def _fixture_files(classes: int, per_class: int, root: Path, pattern: str) -> list[tuple[Path, int]]:
    """(path, class id from 1) for `classes` x `per_class` images; pattern formats c (class), i (global index)."""
    out = []
    for c in range(1, classes + 1):
        for k in range(per_class):
            i = (c - 1) * per_class + k + 1
            out.append((root / pattern.format(c=c, i=i), c))
    return out


def write_cub_fixture(root: Path, classes: int, per_class: int, size: int) -> None:
    files = _fixture_files(classes, per_class, root / "images", "{c:03d}.Class_{c}/Class_{c}_{i:04d}.jpg")
    write_class_images(files, size)
    _lines(root / "images.txt", [f"{i} {p.relative_to(root / 'images')}" for i, (p, _) in enumerate(files, 1)])
    _lines(root / "image_class_labels.txt", [f"{i} {c}" for i, (_, c) in enumerate(files, 1)])


def write_cars196_fixture(root: Path, classes: int, per_class: int, size: int) -> None:
    import scipy.io

    files = _fixture_files(classes, per_class, root / "car_ims", "{i:06d}.jpg")
    write_class_images(files, size)
    annotations = np.zeros((1, len(files)), dtype=[(name, object) for name in CARS_FIELDS])
    for n, (path, c) in enumerate(files):
        annotations[0, n] = (str(path.relative_to(root)), 0, 0, size - 1, size - 1, c, n % 2)
    class_names = np.array([[f"Make Model {c}" for c in range(1, classes + 1)]], dtype=object)
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})


def write_sop_fixture(root: Path, classes: int, per_class: int, size: int) -> None:
    files = _fixture_files(classes, per_class, root, "category_final/{c}_{i}.JPG")
    write_class_images(files, size)
    half = classes // 2 * per_class
    for name, part, start in (("Ebay_train.txt", files[:half], 0), ("Ebay_test.txt", files[half:], half)):
        rows = [f"{start + n} {c} {1 + c % 2} {p.relative_to(root)}" for n, (p, c) in enumerate(part, 1)]
        _lines(root / name, [" ".join(SOP_COLUMNS)] + rows)


def write_inshop_fixture(root: Path, classes: int, per_class: int, size: int) -> None:
    """Train items on the first half; each test item's images alternate query / gallery."""
    files = _fixture_files(classes, per_class, root, "img/WOMEN/Dresses/id_{c:08d}/{i:02d}_front.jpg")
    write_class_images(files, size)
    half, rows = classes // 2, []
    for n, (path, c) in enumerate(files):
        status = "train" if c <= half else ("query", "gallery")[n % 2]
        rows.append(f"{path.relative_to(root)} id_{c:08d} {status}")
    _lines(root / "list_eval_partition.txt", [str(len(rows)), " ".join(INSHOP_COLUMNS)] + rows)


READERS: dict[str, Callable[[Path], Splits]] = {
    "cub": read_cub, "cars196": read_cars196, "sop": read_sop, "inshop": read_inshop}
FIXTURE_WRITERS: dict[str, Callable[..., None]] = {
    "cub": write_cub_fixture, "cars196": write_cars196_fixture, "sop": write_sop_fixture,
    "inshop": write_inshop_fixture}


def ensure_fixture(layout: str, root: Path, classes: int, per_class: int, size: int) -> Path:
    """The fixture of `layout` at `root`, written unless it is there (atomically: see write_once)."""
    return write_once(Path(root), lambda tmp: FIXTURE_WRITERS[layout](tmp, classes, per_class, size))
