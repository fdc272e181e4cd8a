"""9-class ImageNet as ReBias builds it, its texture clusters, and ImageNet-A, from their official
layouts; and a fixture in those layouts.

9-class ImageNet (Bahng et al., ICML 2020; clovaai/rebias datasets/imagenet.py): 42 ImageNet
classes regrouped into 9 super-classes (dog, cat, frog, turtle, bird, monkey, fish, crab, insect),
read from the ImageNet class-folder layout (projbench/data/image_folder.py) with every other class
folder ignored. The mapping (wnid -> super-class) is `task.superclasses`.

Texture clusters: ReBias's "unbiased" accuracy needs, for every validation image, its cluster
under 3 k-means clusterings (k = 9) of Gram-matrix texture features; the clusters come from the
ReBias repository, `clusters/9class_imagenet_val.csv`, a csv with a header
`path,category,cluster1,cluster2,cluster3` and one line per validation image, e.g.
`n01641577/ILSVRC2012_val_00001652.JPEG,frog,1,5,3` (2,100 lines: 50 a class).

ImageNet-A (Hendrycks et al. 2021, github.com/hendrycks/natural-adv-examples): `imagenet-a/`
with 200 wnid folders of .jpg images (and a README.txt); the folders of wnids in the mapping
(21 of the 42) are read, with the same super-class labels, as upstream reads it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from projbench.data.fixtures import write_class_images
from projbench.data.image_folder import ImageFolderSplit
from projbench.errors import DataError

CLUSTERS_HINT = ("Download clusters/9class_imagenet_val.csv of github.com/clovaai/rebias and set "
                 "task.data.clusters=/path/to/9class_imagenet_val.csv, or task.data.clusters=null to skip the "
                 "unbiased accuracy")


def class_of_wnid(superclasses: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """wnid -> index of its super-class, in the order of `superclasses`."""
    return {wnid: index for index, wnids in enumerate(superclasses.values()) for wnid in wnids}


def read_texture_clusters(path: Path, superclasses: Mapping[str, Sequence[str]]) -> dict[str, tuple[int, ...]]:
    """"<wnid>/<file name>" -> its cluster in each clustering, from ReBias's cluster csv. The
    header, every field and each line's category (the super-class of its wnid) are checked."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "not found; expected ReBias's texture cluster csv (path,category,cluster1,...)",
                        CLUSTERS_HINT)
    names = list(superclasses)
    class_of = class_of_wnid(superclasses)
    clusters: dict[str, tuple[int, ...]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = next(rows, [])
        columns = header[2:]
        if header[:2] != ["path", "category"] or not columns or any(not c.startswith("cluster") for c in columns):
            raise DataError(f"{path}:1", f"header {header}; expected path,category,cluster1,cluster2,...",
                            CLUSTERS_HINT)
        for line, row in enumerate(rows, start=2):
            if len(row) != len(header):
                raise DataError(f"{path}:{line}", f"{len(row)} fields; the header has {len(header)}")
            image, category, *values = row
            wnid = image.split("/")[0]
            if wnid not in class_of or category != names[class_of[wnid]]:
                raise DataError(f"{path}:{line}", f"{image} is labelled {category!r}; task.superclasses puts "
                                                  f"{wnid} in {names[class_of[wnid]] if wnid in class_of else 'none'}")
            if not all(v.isdigit() for v in values):
                raise DataError(f"{path}:{line}", f"cluster labels {values} are not integers >= 0")
            clusters[image] = tuple(int(v) for v in values)
    if not clusters:
        raise DataError(path, "holds no images", CLUSTERS_HINT)
    return clusters


def clusters_of_samples(folder: ImageFolderSplit, clusters: dict[str, tuple[int, ...]],
                        csv_path: Path) -> torch.Tensor:
    """long [n, clusterings]: the clusters of every image of `folder`, each found by its
    "<wnid>/<file name>"; an image without a line in the csv is a DataError."""
    rows = []
    for image_path, _ in folder.samples:
        key = "/".join(Path(image_path).parts[-2:])
        if key not in clusters:
            raise DataError(csv_path, f"has no line for {key} of {folder.root}; is it the cluster file of this "
                                      "validation set?", CLUSTERS_HINT)
        rows.append(clusters[key])
    return torch.tensor(rows, dtype=torch.long)


class EvalImages(Dataset):
    """Item i: (image, super-class, clusters [clusterings] (-1 for none), source): the evaluation
    items of 9-class ImageNet (source 0) and ImageNet-A (source 1), one loader over both."""

    def __init__(self, folder: ImageFolderSplit, source: int, clusters: torch.Tensor | None, clusterings: int):
        self.folder = folder
        self.source = source
        self.clusters = clusters if clusters is not None else torch.full((len(folder), clusterings), -1)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        image, target, used = self.folder.load(index)
        return image, target, self.clusters[used], self.source


# -- the fixture ------------------------------------------------------------------------------
OTHER_WNIDS = ("n01440764", "n01443537")  # tench, goldfish: ImageNet classes outside the 9, to be ignored
IMAGENET_A_OTHER = "n01498041"            # stingray: an ImageNet-A class outside the 9


def write_imagenet9_fixture(root: Path, superclasses: Mapping[str, Sequence[str]], train_per_wnid: int = 3,
                            val_per_wnid: int = 2, imagenet_a_per_wnid: int = 2, size: int = 64,
                            clusterings: int = 3, clusters: int = 9, seed: int = 0) -> None:
    """A tiny tree in the official layouts under `root`: train/ and val/ with every wnid of
    `superclasses` plus two other ImageNet classes, imagenet-a/ with every other mapped wnid plus
    one unmapped class and its README.txt, and 9class_imagenet_val.csv with random clusters for
    every validation image of the mapped wnids. Images of one super-class share a pattern."""
    root = Path(root)
    class_of = class_of_wnid(superclasses)
    labels = {**class_of, **{w: len(superclasses) + k for k, w in enumerate(OTHER_WNIDS)}}
    files = [(root / "train" / w / f"{w}_{k}.JPEG", c) for w, c in labels.items() for k in range(train_per_wnid)]
    val = [(root / "val" / w / f"ILSVRC2012_val_{i * val_per_wnid + k + 1:08d}.JPEG", c)
           for i, (w, c) in enumerate(labels.items()) for k in range(val_per_wnid)]
    a_wnids = {**{w: c for w, c in list(class_of.items())[::2]}, IMAGENET_A_OTHER: len(labels)}
    imagenet_a = [(root / "imagenet-a" / w / f"0.{k:06d}_fixture_{w}.jpg", c)
                  for w, c in a_wnids.items() for k in range(imagenet_a_per_wnid)]
    write_class_images(files + val + imagenet_a, size, seed)
    (root / "imagenet-a" / "README.txt").write_text("ImageNet-A stand-in: wnid folders of .jpg images\n")
    rng = np.random.default_rng(seed)
    names = list(superclasses)
    with (root / "9class_imagenet_val.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "category"] + [f"cluster{k + 1}" for k in range(clusterings)])
        for path, c in sorted(val, key=lambda item: str(item[0])):
            wnid = path.parent.name
            if wnid in class_of:
                writer.writerow([f"{wnid}/{path.name}", names[c], *rng.integers(0, clusters, clusterings)])
