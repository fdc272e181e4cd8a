"""COCO 2017 object detection: the reader of the official layout, the detection dataset with its
box-aware transforms (torchvision.transforms.v2), and a tiny fixture in the same layout.

Layout under the root (as the official archives unpack):

    annotations/instances_train2017.json     118,287 images, 860,001 boxes, 80 categories
    annotations/instances_val2017.json         5,000 images
    train2017/<12-digit image id>.jpg
    val2017/<12-digit image id>.jpg

A split name (`train2017`) gives both the annotation file and the image folder. The json is read
once and checked; an evaluation split is also indexed by pycocotools (`COCO`), the ground truth
COCOeval scores against.

Checks (each a DataError naming the file, raised before training starts):
  - the annotation file and the image folder exist, and the json parses;
  - the json has `images`, `annotations` and `categories`; every image has `id`, `file_name`,
    `width`, `height`; every annotation has `id`, `image_id`, `category_id`, `bbox` (4 numbers)
    and `area`; every category has `id`; ids are unique;
  - every annotation refers to a listed image and a listed category;
  - every listed image file is in the image folder (one directory listing), and the first one
    decodes. A file that fails to decode later, or whose size differs from its json entry,
    raises a DataError naming it when it is loaded (also from a DataLoader worker).

Filtering (documented, counted; the task logs the counts once):
  - crowd annotations (`iscrowd` 1) are not training targets (as the torchvision reference
    detection code and COCOeval, which treats them as regions where detections are ignored);
  - boxes are converted from COCO's [x, y, width, height] to [x1, y1, x2, y2], clipped to the
    image ("clipped"), and dropped when they have no area left ("degenerate");
  - training only: images left without a box are dropped ("images without boxes"), as the
    torchvision reference removes images without usable annotations. Evaluation keeps every
    image, since COCOeval scores against the whole json.

Category ids are COCO's (1..90 with gaps); training uses contiguous labels 0..C-1 in increasing
id order, and `CocoSplit.category_ids[label]` maps a label back.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from projbench.data.image_folder import DECODE_ERRORS, open_rgb
from projbench.errors import DataError

HINT = ("Lay COCO 2017 out as the official archives unpack (annotations/instances_<split>.json, "
        "<split>/<id>.jpg; see projbench/data/coco.py) and set task.data.root=/path/to/coco, "
        "or set task.data.fixture=true for a tiny stand-in")
IMAGE_KEYS = ("id", "file_name", "width", "height")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox", "area")


@dataclass(frozen=True)
class CocoImage:
    id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray   # (N, 4) float32 [x1, y1, x2, y2] in the image's pixels: clipped, positive area, no crowd
    labels: np.ndarray  # (N,) int64 contiguous labels


@dataclass
class CocoSplit:
    annotation_file: Path
    coco: COCO | None           # evaluation splits: the json indexed by pycocotools, what COCOeval scores against
    images: list[CocoImage]     # what the split trains or evaluates on (see the filtering above)
    category_ids: list[int]     # label -> COCO category id
    category_names: list[str]
    filtered: Counter           # "crowd boxes", "clipped boxes", "degenerate boxes", "images without boxes"


# -- reading ------------------------------------------------------------------------------------
def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(path, "not found; expected a COCO instances annotation file", HINT)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(path, f"holds a {type(data).__name__}; expected a COCO json object")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise DataError(path, f"lacks the list(s) {missing}; a COCO instances file has 'images', "
                              f"'annotations' and 'categories'")
    return data


def _check_entries(path: Path, entries: list, section: str, keys: Sequence[str]) -> None:
    """Every entry of `section` is an object with `keys` and a unique id; the first offender is named."""
    seen = set()
    for i, entry in enumerate(entries):
        lacking = [k for k in keys if not isinstance(entry, dict) or k not in entry]
        if lacking:
            bad = sum(1 for e in entries if not isinstance(e, dict) or any(k not in e for k in keys))
            raise DataError(path, f"{section}[{i}] lacks {lacking} ({bad} of {len(entries)} {section} lack "
                                  f"one of {list(keys)})")
        if entry["id"] in seen:
            raise DataError(path, f"{section}[{i}] repeats the id {entry['id']!r}")
        seen.add(entry["id"])


def _boxes(anns: list[dict], index: dict[int, int], width: int, height: int,
           counts: Counter) -> tuple[np.ndarray, np.ndarray]:
    """The training boxes of one image's annotations: no crowd, xyxy, clipped, positive area."""
    boxes, labels = [], []
    for ann in anns:
        if ann.get("iscrowd", 0):
            counts["crowd boxes"] += 1
            continue
        x, y, w, h = ann["bbox"]
        x1, x2 = min(max(x, 0), width), min(max(x + w, 0), width)
        y1, y2 = min(max(y, 0), height), min(max(y + h, 0), height)
        if x2 <= x1 or y2 <= y1:
            counts["degenerate boxes"] += 1
            continue
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            counts["clipped boxes"] += 1
        boxes.append((x1, y1, x2, y2))
        labels.append(index[ann["category_id"]])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)


def read_coco_split(root: Path | str, split: str, training: bool) -> CocoSplit:
    """The split `split` (e.g. "train2017") under `root`, checked and filtered as the module
    docstring says. A training split drops images without a box and keeps no pycocotools index
    (only evaluation needs one; the json is not held in memory, where loader workers would copy
    it); an evaluation split keeps every image and the index."""
    root = Path(root)
    path = root / "annotations" / f"instances_{split}.json"
    image_dir = root / split
    data = _load_json(path)
    _check_entries(path, data["images"], "images", IMAGE_KEYS)
    _check_entries(path, data["annotations"], "annotations", ANNOTATION_KEYS)
    _check_entries(path, data["categories"], "categories", ("id",))
    categories = sorted(data["categories"], key=lambda c: c["id"])
    if not categories:
        raise DataError(path, "lists no categories")
    index = {c["id"]: label for label, c in enumerate(categories)}
    images = {img["id"]: img for img in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}] (id {ann['id']})"
        if ann["category_id"] not in index:
            raise DataError(path, f"{where} has the category_id {ann['category_id']!r}, which is not among the "
                                  f"categories {sorted(index)[:10]}{' ...' if len(index) > 10 else ''}")
        if ann["image_id"] not in images:
            raise DataError(path, f"{where} has the image_id {ann['image_id']!r}, which is not among the images")
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
            raise DataError(path, f"{where} has the bbox {box!r}; expected [x, y, width, height]")
    _check_image_files(path, image_dir, data["images"])

    by_image: dict[Any, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    counts: Counter = Counter()
    records = []
    for img in data["images"]:
        width, height = int(img["width"]), int(img["height"])
        boxes, labels = _boxes(by_image.get(img["id"], []), index, width, height, counts)
        if training and not len(boxes):
            counts["images without boxes"] += 1
            continue
        records.append(CocoImage(img["id"], image_dir / img["file_name"], width, height, boxes, labels))
    if not records:
        raise DataError(path, "leaves no image to use" + (" (none has a non-crowd box)" if training else ""))
    coco = None
    if not training:
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
    return CocoSplit(path, coco, records, [c["id"] for c in categories],
                     [str(c.get("name", c["id"])) for c in categories], counts)


def _check_image_files(path: Path, image_dir: Path, images: list[dict]) -> None:
    """Every listed file is in `image_dir` (one listing, not one stat per file); the first decodes."""
    if not image_dir.is_dir():
        raise DataError(image_dir, f"not found; expected the images of {path.name}", HINT)
    present = set(os.listdir(image_dir))
    missing = [img["file_name"] for img in images if img["file_name"] not in present]
    if missing:
        raise DataError(image_dir, f"{len(missing)} of the {len(images)} images listed in {path.name} are missing, "
                                   f"e.g. {missing[0]}")
    if images:
        load_image(image_dir / images[0]["file_name"], (images[0]["width"], images[0]["height"]))


def load_image(path: Path, size: tuple[int, int]) -> tv_tensors.Image:
    """The uint8 (3, H, W) image at `path`, which must be `size` = (width, height) as its json says."""
    try:
        pil = open_rgb(str(path))
    except DECODE_ERRORS as exc:
        raise DataError(path, f"cannot be decoded as an image ({exc})", "Replace the file") from None
    if pil.size != tuple(size):
        raise DataError(path, f"is {pil.size[0]}x{pil.size[1]} pixels, but its annotation file says "
                              f"{size[0]}x{size[1]}; its boxes would not fit it")
    return v2.functional.to_image(pil)


# -- the dataset --------------------------------------------------------------------------------
# The window of an image the model sees: (left, top, right, bottom) in the image's pixels, resized
# to the input square; it may reach past the image, which is then padded with zeros.
Window = tuple[int, int, int, int]


def full_window(width: int, height: int) -> Window:
    """The whole image, stretched to the square (SSD's resize, which ignores the aspect ratio)."""
    return 0, 0, width, height


def letterbox_window(width: int, height: int) -> Window:
    """The square of side max(width, height) centred on the image: the image at its own aspect
    ratio, padded (CenterNet's test input at a fixed resolution, base_detector.py pre_process:
    centre (w/2, h/2), scale max(h, w))."""
    side = max(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


CENTERNET_SCALES = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)  # np.arange(0.6, 1.4, 0.1) in its ctdet.py


def _centernet_border(size: int, border: int = 128) -> int:
    """CenterNet's _get_border: 128 pixels, halved until the image is more than twice as wide."""
    while size - border <= border:
        border //= 2
    return border


def centernet_crop_window(width: int, height: int) -> Window:
    """CenterNet's random crop (datasets/sample/ctdet.py, the default "rand_crop" branch): a
    square of side max(width, height) times a scale drawn from 0.6, 0.7, ..., 1.3, centred on a
    random point at least a border (128 px, less for small images) inside the image."""
    side = round(max(width, height) * CENTERNET_SCALES[int(torch.randint(len(CENTERNET_SCALES), ()))])
    bx, by = _centernet_border(width), _centernet_border(height)
    cx, cy = int(torch.randint(bx, width - bx, ())), int(torch.randint(by, height - by, ()))
    left, top = cx - side // 2, cy - side // 2
    return left, top, left + side, top + side


class WindowResize(v2.Transform):
    """The image's `window(width, height)` (a Window) resized to size x size, zero-padded where
    the window leaves the image; boxes follow (clipped to the window)."""

    def __init__(self, size: int, window: Callable[[int, int], Window]):
        super().__init__()
        self.size, self.window = size, window

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        image = next(x for x in flat_inputs if isinstance(x, tv_tensors.Image))
        height, width = v2.functional.get_size(image)
        left, top, right, bottom = self.window(width, height)
        return {"top": top, "left": left, "height": bottom - top, "width": right - left}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(v2.functional.resized_crop, inpt, **params, size=[self.size, self.size])


class PCALighting(v2.Transform):
    """AlexNet-style lighting noise on a float image: adds eigvec @ (eigval * alpha) to every
    pixel, alpha ~ N(0, alpha_std) per principal component of the data set's RGB colours."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, alpha_std: float, eigval: Sequence[float], eigvec: Sequence[Sequence[float]]):
        super().__init__()
        self.alpha_std = alpha_std
        self.eigval, self.eigvec = torch.tensor(eigval), torch.tensor(eigvec)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        alpha = torch.randn(3) * self.alpha_std
        return {"shift": (self.eigvec @ (self.eigval * alpha)).view(3, 1, 1)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not inpt.is_floating_point():
            raise TypeError("PCALighting needs a float image; put it after ToDtype(float32, scale=True)")
        return tv_tensors.wrap(inpt + params["shift"].to(inpt.dtype), like=inpt)


# CenterNet's COCO colour statistics (datasets/dataset/coco.py _eig_val / _eig_vec), whose rows
# are in OpenCV's BGR channel order there; here the rows are reversed to RGB.
COCO_EIGVAL = (0.2141788, 0.01817699, 0.00341571)
COCO_EIGVEC_RGB = ((-0.56089297, 0.71832671, 0.41158938),
                   (-0.5832747, 0.00994535, -0.81221408),
                   (-0.58752847, -0.69563484, 0.41340352))

SSD_FILL = (123, 117, 104)  # the zoom-out canvas: the ImageNet mean in uint8, as the SSD reference


def _augment_ssd(size: int) -> list:
    """The torchvision reference's "ssd" policy: photometric distortion, zoom out (up to 4x on a
    mean-coloured canvas), a random crop that keeps boxes at a random minimum IoU, flip."""
    return [v2.RandomPhotometricDistort(), v2.RandomZoomOut(fill={tv_tensors.Image: SSD_FILL, "others": 0}),
            v2.RandomIoUCrop(), v2.RandomHorizontalFlip(), v2.Resize((size, size))]


def _augment_centernet(size: int) -> list:
    """CenterNet's training augmentation (datasets/sample/ctdet.py with its defaults): the random
    square crop of centernet_crop_window (the aspect ratio kept, zero padding where it leaves the
    image), flip with probability 0.5, then colour: brightness, contrast and saturation each by a
    factor in [0.6, 1.4] in random order (its color_aug, var 0.4), and PCA lighting noise of
    standard deviation 0.1 (its lighting_ with the COCO eigenvectors). torchvision clips the
    colour steps to [0, 1], which CenterNet's float arithmetic does not."""
    return [WindowResize(size, centernet_crop_window), v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
            v2.ToDtype(torch.float32, scale=True), PCALighting(0.1, COCO_EIGVAL, COCO_EIGVEC_RGB)]


@dataclass(frozen=True)
class Augmentation:
    """A training augmentation policy (`train(size)`: the v2 steps for a size x size input) and
    the window evaluation shows the model, so that objects keep the same aspect ratio in both."""

    train: Callable[[int], list]
    window: Callable[[int, int], Window] = full_window


AUGMENTATIONS: dict[str, Augmentation] = {
    "none": Augmentation(lambda size: [v2.Resize((size, size))]),
    "flip": Augmentation(lambda size: [v2.Resize((size, size)), v2.RandomHorizontalFlip()]),
    "ssd": Augmentation(_augment_ssd),
    "centernet": Augmentation(_augment_centernet, window=letterbox_window),
}


def detection_transform(image_size: int, augment: str, training: bool) -> v2.Compose:
    """uint8 image + boxes -> float [0, 1] image of image_size x image_size with its boxes.
    `augment` names a policy of AUGMENTATIONS: its training steps, or (training=False) its
    evaluation window, resized."""
    policy = AUGMENTATIONS[augment]
    if training:  # SanitizeBoundingBoxes drops boxes an augmentation cut to nothing
        steps = policy.train(image_size) + [v2.SanitizeBoundingBoxes()]
    else:
        steps = [WindowResize(image_size, policy.window)]
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True)])


class CocoDetection(Dataset):
    """(image, target) per image. The image is float [0, 1], image_size x image_size (per the
    transform). The target holds `boxes` (N, 4) xyxy in the input's pixels, `labels` (N,)
    contiguous, `image_id`, `orig_size` (height, width) and, given `window` (the evaluation
    transform's), `window`: the region of the original image the input shows, which maps
    detections back to the COCO image. `encode` (picklable; run in the DataLoader workers) turns a
    target into what the detector trains on."""

    def __init__(self, images: Sequence[CocoImage], transform: v2.Compose,
                 encode: Callable[[dict], Any] | None = None, window: Callable[[int, int], Window] | None = None):
        self.images, self.transform, self.encode, self.window = list(images), transform, encode, window

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        record = self.images[i]
        image = load_image(record.path, (record.width, record.height))
        boxes = tv_tensors.BoundingBoxes(torch.from_numpy(record.boxes), format="XYXY",
                                         canvas_size=(record.height, record.width))
        image, target = self.transform(image, {"boxes": boxes, "labels": torch.from_numpy(record.labels)})
        target = {"boxes": target["boxes"].as_subclass(torch.Tensor).float(), "labels": target["labels"],
                  "image_id": torch.tensor(record.id), "orig_size": torch.tensor([record.height, record.width])}
        if self.window is not None:
            target["window"] = torch.tensor(self.window(record.width, record.height), dtype=torch.float32)
        return image.as_subclass(torch.Tensor), (self.encode(target) if self.encode else target)


def collate_detection(batch: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, list]:
    """Images stacked (they share one size); targets kept as a list (their box counts differ)."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


# -- the fixture --------------------------------------------------------------------------------
# Three shapes, each a category with its own (non-contiguous, as COCO's) id and colour.
FIXTURE_CATEGORIES = (
    {"id": 2, "name": "square", "supercategory": "shape", "colour": (215, 45, 40), "corners": 4},
    {"id": 5, "name": "circle", "supercategory": "shape", "colour": (40, 175, 60), "corners": 24},
    {"id": 9, "name": "triangle", "supercategory": "shape", "colour": (45, 80, 215), "corners": 3},
)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A greyish texture: two gratings of random orientation and frequency plus pixel noise."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    grey = rng.uniform(90, 170)
    field = np.zeros((height, width))
    for _ in range(2):
        angle, cycles = rng.uniform(0, np.pi), rng.uniform(2, 8)
        field += np.sin(2 * np.pi * cycles * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi))
    tint = rng.uniform(-12, 12, size=3)
    pixels = grey + 18 * field[..., None] + tint + rng.normal(0, 6, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _polygon(rng: np.random.Generator, corners: int, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    start = -np.pi / 2 if corners == 3 else np.pi / 4 if corners == 4 else 0.0  # upright triangle, axis-aligned square
    angles = start + 2 * np.pi * np.arange(corners) / corners
    return [(float(cx + radius * np.cos(a)), float(cy + radius * np.sin(a))) for a in angles]


def _overlaps(box: tuple, others: list[tuple], limit: float = 0.15) -> bool:
    for o in others:
        iw = max(0.0, min(box[2], o[2]) - max(box[0], o[0]))
        ih = max(0.0, min(box[3], o[3]) - max(box[1], o[1]))
        union = (box[2] - box[0]) * (box[3] - box[1]) + (o[2] - o[0]) * (o[3] - o[1]) - iw * ih
        if iw * ih / union > limit:
            return True
    return False


def _draw_image(path: Path, image_id: int, objects: int, crowd: bool, rng: np.random.Generator,
                next_ann_id: Callable[[], int]) -> tuple[dict, list[dict]]:
    """Render one image with `objects` shapes (and a crowd of small circles if `crowd`); return
    its json entry and annotations."""
    from PIL import Image, ImageDraw

    width, height = int(rng.integers(96, 129)), int(rng.integers(96, 129))
    canvas = Image.fromarray(_background(rng, height, width))
    draw = ImageDraw.Draw(canvas)
    anns, placed = [], []
    for _ in range(objects):
        cat = FIXTURE_CATEGORIES[int(rng.integers(len(FIXTURE_CATEGORIES)))]
        for _attempt in range(20):
            radius = rng.uniform(0.12, 0.24) * min(width, height)
            cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
            points = _polygon(rng, cat["corners"], cx, cy, radius)
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            box = (min(xs), min(ys), max(xs), max(ys))
            if not _overlaps(box, placed):
                break
        placed.append(box)
        colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in cat["colour"])
        draw.polygon(points, fill=colour)
        mask = Image.new("L", (width, height))
        ImageDraw.Draw(mask).polygon(points, fill=1)
        anns.append({"id": next_ann_id(), "image_id": image_id, "category_id": cat["id"], "iscrowd": 0,
                     "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2), round(box[3] - box[1], 2)],
                     "area": float(np.asarray(mask).sum()),
                     "segmentation": [[round(v, 2) for p in points for v in p]]})
    if crowd:  # a cluster of small circles annotated as one crowd region, as COCO does for crowds
        x0, y0 = 4.0, 4.0
        for k in range(6):
            cx, cy = x0 + 5 + 7 * (k % 3), y0 + 5 + 7 * (k // 3)
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=FIXTURE_CATEGORIES[1]["colour"])
        anns.append({"id": next_ann_id(), "image_id": image_id, "category_id": FIXTURE_CATEGORIES[1]["id"],
                     "iscrowd": 1, "bbox": [x0 + 2, y0 + 2, 20.0, 13.0], "area": 6 * 28.0,
                     "segmentation": [[x0 + 2, y0 + 2, x0 + 22, y0 + 2, x0 + 22, y0 + 15, x0 + 2, y0 + 15]]})
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="JPEG", quality=92)
    return {"id": image_id, "file_name": path.name, "width": width, "height": height}, anns


def write_coco_fixture(root: Path | str, train_images: int = 36, val_images: int = 12, seed: int = 0) -> None:
    """A tiny COCO 2017 tree under `root`: coloured squares, circles and triangles (1-4 per image)
    on textured backgrounds, 96-128 px images, instances json with categories, boxes, areas,
    polygons and iscrowd. The first image of each split has no annotation, and the second training
    image has a crowd annotation too, so the reader's filtering has something to do."""
    root = Path(root)
    ann_id = iter(range(1, 10**9))
    for split, count, first_id in (("train2017", train_images, 100), ("val2017", val_images, 900)):
        rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
        images, annotations = [], []
        for k in range(count):
            image_id = first_id + 7 * k  # non-contiguous ids, as COCO's
            objects = 0 if k == 0 else int(rng.integers(1, 5))
            entry, anns = _draw_image(root / split / f"{image_id:012d}.jpg", image_id, objects,
                                      crowd=split.startswith("train") and k == 1, rng=rng,
                                      next_ann_id=lambda: next(ann_id))
            images.append(entry)
            annotations += anns
        categories = [{k: c[k] for k in ("id", "name", "supercategory")} for c in FIXTURE_CATEGORIES]
        data = {"info": {"description": "projbench COCO fixture", "version": "1.0"}, "licenses": [],
                "images": images, "annotations": annotations, "categories": categories}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
