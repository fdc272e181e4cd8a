"""`task=imagenet`: ImageNet-1k classification, the paper's Tables 1 and 2.

Data: the official class-folder layout, `<task.data.root>/{train,val}/<wnid>/*.JPEG`, read by
projbench/data/image_folder.py (torchvision's ImageFolder, checked before training; unreadable
files skipped or raised per `task.data.on_bad_image`). Transforms are timm's `create_transform`:
train = random-resized crop + horizontal flip (+ colour jitter with `task.data.color_jitter`, and
AlexNet's PCA lighting noise before normalisation with `task.data.lighting`, as the CutMix
recipe), eval = resize to image_size / crop_pct (256 for 224) and centre crop. `task.data.fixture=true` writes a tiny tree in the same layout (rank 0,
once, under `task.data.fixture_root`) and reads it through the same reader.

Model, loss and metrics are ClassificationTask's (a timm model, cross-entropy with optional
label smoothing, top-1 / top-5 with torchmetrics). With `task.cutmix=true` every training batch
goes through timm's Mixup helper in CutMix-only mode, and the loss is timm's soft-target
cross-entropy on the mixed (and smoothed) targets. The class count is the number of class
folders under train/, checked against `task.num_classes` on real data.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from timm.data import Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import Compose, Normalize

from projbench.data.fixtures import write_imagenet_fixture
from projbench.data.image_folder import ON_BAD_IMAGE, ImageFolderSplit, read_split
from projbench.data.transforms import PCALighting
from projbench.distributed import DistInfo
from projbench.errors import ConfigError, DataError
from projbench.tasks.classification import ClassificationTask

# The fixture: 4 classes x (24 train + 8 val) JPEGs of 64x64, wnid-named class folders.
FIXTURE = dict(classes=4, train_per_class=24, val_per_class=8, size=64)
HINT = ("Prepare ImageNet-1k in that layout (train/<wnid>/*.JPEG and val/<wnid>/*.JPEG; the official "
        "val archive is flat and must be sorted into class folders) and set task.data.root=/path/to/imagenet "
        "(or paths.data_dir=<dir holding imagenet/>), or set task.data.fixture=true for a tiny stand-in")


def imagenet_transforms(data: DictConfig):
    """(train, eval) transforms from timm for `task.data`'s image_size, crop_scale, hflip,
    color_jitter, interpolation and crop_pct: random-resized crop + flip (+ colour jitter, + PCA
    lighting with `lighting` > 0 on the [0, 1] tensor just before normalisation); resize + centre
    crop."""
    size, interpolation = int(data.image_size), str(data.interpolation)
    train = create_transform(size, is_training=True, scale=tuple(data.crop_scale), hflip=float(data.hflip),
                             color_jitter=data.color_jitter, interpolation=interpolation)
    lighting = float(data.get("lighting") or 0.0)
    if lighting:
        steps = list(train.transforms)
        at = next(i for i, step in enumerate(steps) if isinstance(step, Normalize))
        train = Compose(steps[:at] + [PCALighting(lighting)] + steps[at:])
    evaluation = create_transform(size, is_training=False, crop_pct=float(data.crop_pct), interpolation=interpolation)
    return train, evaluation


class ImageNetTask(ClassificationTask):
    def __init__(self, cfg):
        super().__init__(cfg)
        self._splits: dict[str, ImageFolderSplit] = {}
        self._mixup: Mixup | None = None
        self._soft_target_loss = SoftTargetCrossEntropy()

    def setup(self, dist: DistInfo) -> None:
        data = self.cfg.data
        if data.on_bad_image not in ON_BAD_IMAGE:
            raise ConfigError("task.data.on_bad_image",
                              f"got {data.on_bad_image!r}; choose one of {list(ON_BAD_IMAGE)}")
        root = self.prepare_fixture(dist, lambda tmp: write_imagenet_fixture(tmp, **FIXTURE))
        train_tf, eval_tf = imagenet_transforms(data)
        train = read_split(root, "train", train_tf, data.on_bad_image, hint=HINT)
        val = read_split(root, "val", eval_tf, data.on_bad_image, train.class_to_idx, HINT)
        expected = self.cfg.get("num_classes")
        if not data.fixture and expected is not None and len(train.classes) != int(expected):
            raise DataError(root / "train",
                            f"holds {len(train.classes)} class folders; task.num_classes expects {expected}",
                            "Set task.num_classes=null to train on the classes found (e.g. an ImageNet subset)")
        self._splits = {"train": train, "val": val}
        if self.cfg.cutmix:
            # CutMix only (mixup_alpha 0): one box and one lambda per batch, lambda corrected to
            # the box's clipped area, targets mixed and smoothed by the same helper.
            self._mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=float(self.cfg.cutmix_alpha),
                                prob=float(self.cfg.cutmix_prob), mode="batch",
                                label_smoothing=float(self.cfg.label_smoothing), num_classes=self.num_classes)

    @property
    def num_classes(self) -> int:
        if "train" not in self._splits:
            raise RuntimeError("ImageNetTask.setup() reads the class folders; call it first")
        return len(self._splits["train"].classes)

    def train_dataset(self) -> Dataset:
        return self._splits["train"]

    def eval_datasets(self) -> dict[str, Dataset]:
        return {"val": self._splits["val"]}

    def train_loader(self, batch_size: int, dist: DistInfo, seed: int) -> DataLoader:
        if self._mixup is not None and batch_size % 2:
            raise ConfigError("task.data.batch_size", f"CutMix pairs each image with another of its batch, so the "
                                                      f"per-rank batch must be even; got {batch_size}")
        return super().train_loader(batch_size, dist, seed)

    def training_loss(self, model: nn.Module, batch) -> torch.Tensor:
        if self._mixup is None:
            return super().training_loss(model, batch)
        images, targets = self._mixup(*batch)
        return self._soft_target_loss(model(images), targets)
