"""`task=coco`: MS-COCO 2017 object detection with CenterNet or SSD300, the paper's Table 3.

Data: the official layout under `task.data.root`, read and checked by projbench/data/coco.py
(what is filtered and why is said there): `task.data.splits.train` (train2017) trains, the "val"
split (val2017) evaluates. Training augments each image per `task.data.augment` (a policy of
projbench.data.coco.AUGMENTATIONS) into a `task.data.image_size` square, with the boxes following
through torchvision.transforms.v2; evaluation shows the model the policy's window of each image
(the whole image stretched, or for CenterNet's policy the image letterboxed at its own aspect
ratio) and maps the detections back through it. `task.data.fixture=true` writes a tiny set in
the same layout (rank 0, once, under `task.data.fixture_root`) and reads it the same way.

Detectors (`task.model.detector`; conf/task/model/<file>.yaml holds each one's recipe):
  centernet  projbench/models/centernet.py: a ResNet, an up-sampling path with modulated
             deformable convolutions (`task.model.deformable`; false: plain ones), a heatmap
             focal loss with size and offset regression, peak decoding, CenterNet's flip test
             (`task.model.flip_test`). Its input is ImageNet-normalised here; its training targets
             (heatmaps, ...) are built in the DataLoader workers.
  ssd        projbench/models/ssd.py on torchvision's SSD: `task.model.backbone=vgg16_bn`, SSD300
             with BatchNorm after every convolution (ScratchDet's design), or `vgg16`,
             torchvision's ssd300_vgg16; SSD's own normalisation, resize to 300 x 300, MultiBox
             loss and NMS; C + 1 classes (0 is its background).
Both answer `model(images, targets)` with the training loss and `model(images)` with detections
(boxes xyxy in the input's pixels, scores, contiguous labels), so the task does not care which
it runs. `task.model.pretrained` is null (from scratch) or a local torchvision state dict of the
backbone (ImageNet initialisation; nothing is downloaded).

Metrics (x 100): COCOeval bbox AP (IoU .50:.95, the primary metric), AP50 and AP75 on val2017.
Detections are mapped back to the original image and to COCO category ids, gathered from every
DDP rank, scored on rank 0 by pycocotools and broadcast.
"""

from __future__ import annotations

import contextlib
import io
import logging
from functools import partial
from typing import Any, Callable, Iterable, Sequence

import torch
from omegaconf import DictConfig
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import DataLoader, Dataset

from projbench.data.coco import (AUGMENTATIONS, CocoDetection, CocoSplit, collate_detection, detection_transform,
                                 read_coco_split, write_coco_fixture)
from projbench.distributed import DistInfo, all_gather_list, broadcast_object, current_rank
from projbench.errors import ConfigError, DataError
from projbench.models.centernet import (CenterNet, centernet_decode, centernet_loss, centernet_targets,
                                        flip_test_decode, stack_targets)
from projbench.models.ssd import SSD_VARIANTS, SSDVariant
from projbench.tasks.base import Task

log = logging.getLogger(__name__)

METRICS = ("ap", "ap50", "ap75")  # COCOeval.stats[0:3]


# -- evaluation ---------------------------------------------------------------------------------
def coco_results(detections: dict[str, torch.Tensor], image_id: int, window: Sequence[float], input_size: int,
                 category_ids: Sequence[int]) -> list[dict]:
    """One image's detections (boxes xyxy in the model input's pixels, scores, contiguous labels)
    as COCO results: bbox [x, y, width, height] in the original image, which the input showed as
    `window` (left, top, right, bottom in its pixels; see projbench.data.coco.Window) resized to
    input_size squared (not clipped: CenterNet's post-processing does not clip, SSD's clips to its
    input itself); category ids from `category_ids[label]`."""
    left, top, right, bottom = (float(v) for v in window)
    scale = torch.tensor([right - left, bottom - top] * 2) / input_size
    boxes = detections["boxes"].detach().float().cpu() * scale + torch.tensor([left, top] * 2)
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    return [{"image_id": image_id, "category_id": category_ids[label], "bbox": box, "score": score}
            for box, score, label in zip(xywh.tolist(), detections["scores"].float().tolist(),
                                         detections["labels"].tolist())]


def coco_ap(coco_gt: COCO, results: list[dict], image_ids: Iterable[int]) -> dict[str, float]:
    """COCOeval bbox AP (IoU .50:.95), AP50 and AP75, x 100, of `results` (COCO result dicts:
    image_id, category_id, bbox [x, y, w, h], score) on the images `image_ids` of `coco_gt`.
    No detections score 0 (pycocotools cannot load an empty result list); so do images without
    any ground truth (where COCOeval reports -1). COCOeval's summary goes to the log."""
    image_ids = sorted(set(image_ids))
    if not results or not image_ids:
        return dict.fromkeys(METRICS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # progress prints
        detections = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys to what it gets
        evaluator = COCOeval(coco_gt, detections, iouType="bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
    with contextlib.redirect_stdout(io.StringIO()) as summary:
        evaluator.summarize()
    log.info("COCOeval bbox, %d images, %d detections:\n%s", len(image_ids), len(results), summary.getvalue().rstrip())
    return {name: 100 * max(float(value), 0.0) for name, value in zip(METRICS, evaluator.stats)}


# -- detectors ----------------------------------------------------------------------------------
def _encode_centernet(target: dict, num_classes: int, out_size: int, max_objects: int) -> dict[str, torch.Tensor]:
    return centernet_targets(target["boxes"], target["labels"], num_classes, out_size, CenterNet.stride, max_objects)


class CenterNetDetector(nn.Module):
    """CenterNet on ImageNet-normalised [0, 1] images; `model(images, targets)` -> loss with
    targets from `target_encoder`, `model(images)` -> top-k peak detections per image, with
    CenterNet's flip test when `task.model.flip_test` (twice the evaluation compute)."""

    size_multiple = 32  # the backbone's stride

    def __init__(self, cfg: DictConfig, num_classes: int):
        super().__init__()
        self.net = CenterNet(num_classes, backbone=cfg.backbone, pretrained=cfg.pretrained,
                             head_channels=int(cfg.head_channels), deconv_channels=tuple(cfg.deconv_channels),
                             deformable=bool(cfg.deformable))
        self.register_buffer("mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)
        self.max_detections, self.flip_test = int(cfg.max_detections), bool(cfg.flip_test)
        self.size_weight, self.offset_weight = float(cfg.size_weight), float(cfg.offset_weight)

    @staticmethod
    def arch(cfg: DictConfig) -> str:
        return f"centernet_{cfg.backbone}" + ("_dcn" if cfg.deformable else "")

    @staticmethod
    def min_batch(cfg: DictConfig) -> int:
        return 1

    @staticmethod
    def target_encoder(cfg: DictConfig, num_classes: int, image_size: int) -> Callable[[dict], dict]:
        """Per-image CenterNet targets (heatmap, ...) from the dataset's boxes, in the loader workers."""
        return partial(_encode_centernet, num_classes=num_classes, out_size=image_size // CenterNet.stride,
                       max_objects=int(cfg.max_objects))

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        images = (images - self.mean) / self.std
        if targets is not None:
            loss, _ = centernet_loss(self.net(images), stack_targets(targets), self.size_weight, self.offset_weight)
            return loss
        if not self.flip_test:
            return centernet_decode(self.net(images), k=self.max_detections, stride=CenterNet.stride)
        both = self.net(torch.cat([images, images.flip(-1)]))
        n = len(images)
        return flip_test_decode({k: v[:n] for k, v in both.items()}, {k: v[n:] for k, v in both.items()},
                                k=self.max_detections, stride=CenterNet.stride)


class SSDDetector(nn.Module):
    """SSD300 (projbench/models/ssd.py: `task.model.backbone` vgg16_bn or vgg16) on [0, 1]
    images; `model(images, targets)` (train mode) -> the sum of its MultiBox losses,
    `model(images)` (eval mode) -> its post-NMS detections."""

    size_multiple = 1  # SSD resizes its input to 300 x 300 itself

    def __init__(self, cfg: DictConfig, num_classes: int):
        super().__init__()
        self.ssd = self.variant(cfg).build(num_classes + 1, cfg.pretrained, int(cfg.trainable_backbone_layers),
                                           int(cfg.max_detections))

    @staticmethod
    def variant(cfg: DictConfig) -> SSDVariant:
        if cfg.backbone not in SSD_VARIANTS:
            raise ConfigError("task.model.backbone", f"SSD300 is built on {sorted(SSD_VARIANTS)}, not {cfg.backbone!r}")
        return SSD_VARIANTS[cfg.backbone]

    @staticmethod
    def arch(cfg: DictConfig) -> str:
        return f"ssd300_{cfg.backbone}"

    @staticmethod
    def min_batch(cfg: DictConfig) -> int:
        return SSDDetector.variant(cfg).min_batch

    @staticmethod
    def target_encoder(cfg: DictConfig, num_classes: int, image_size: int) -> None:
        return None  # SSD matches boxes to its anchors itself

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        if targets is None:
            return [{"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"] - 1}
                    for d in self.ssd(list(images))]
        losses = self.ssd(list(images), [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets])
        return sum(losses.values())


DETECTORS: dict[str, type[CenterNetDetector] | type[SSDDetector]] = {"centernet": CenterNetDetector, "ssd": SSDDetector}


# -- the task -----------------------------------------------------------------------------------
class CocoTask(Task):
    metrics = {"ap": "max", "ap50": "max", "ap75": "max"}

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        if cfg.model.detector not in DETECTORS:
            raise ConfigError("task.model.detector", f"unknown detector {cfg.model.detector!r}; "
                                                     f"choose one of {sorted(DETECTORS)}")
        if cfg.data.augment not in AUGMENTATIONS:
            raise ConfigError("task.data.augment", f"unknown policy {cfg.data.augment!r}; "
                                                   f"choose one of {sorted(AUGMENTATIONS)}")
        self.detector = DETECTORS[cfg.model.detector]
        self.splits: dict[str, CocoSplit] = {}

    @property
    def num_classes(self) -> int:
        return len(self.splits["train"].category_ids)

    @property
    def image_size(self) -> int:
        return int(self.cfg.data.image_size)

    def model_name(self) -> str:
        return self.detector.arch(self.cfg.model)

    def setup(self, dist: DistInfo) -> None:
        multiple = self.detector.size_multiple
        if self.image_size <= 0 or self.image_size % multiple:
            raise ConfigError("task.data.image_size", f"{self.cfg.model.detector} needs a positive multiple of "
                                                      f"{multiple}, got {self.image_size}")
        per_rank, least = int(self.cfg.data.batch_size) // dist.world_size, self.detector.min_batch(self.cfg.model)
        if per_rank < least:
            raise ConfigError("task.data.batch_size", f"{self.detector.arch(self.cfg.model)} trains on at least "
                                                      f"{least} images per rank (its BatchNorm at a 1 x 1 feature "
                                                      f"map), got {per_rank}")
        root = self.prepare_fixture(dist, write_coco_fixture)
        names = self.cfg.data.splits
        self.splits = {"train": read_coco_split(root, names.train, training=True),
                       "val": read_coco_split(root, names.val, training=False)}
        train, val = self.splits["train"], self.splits["val"]
        if val.category_ids != train.category_ids:
            raise DataError(val.annotation_file, f"lists the category ids {val.category_ids[:10]}..., "
                                                 f"but {train.annotation_file.name} lists {train.category_ids[:10]}...")
        if dist.is_main:
            for split in self.splits.values():
                if split.filtered:
                    log.warning("%s: %s (see projbench/data/coco.py)", split.annotation_file,
                                ", ".join(f"{n} {what}" for what, n in sorted(split.filtered.items())))

    def build_model(self) -> nn.Module:
        return self.detector(self.cfg.model, self.num_classes)

    def train_dataset(self) -> Dataset:
        encode = self.detector.target_encoder(self.cfg.model, self.num_classes, self.image_size)
        return CocoDetection(self.splits["train"].images,
                             detection_transform(self.image_size, self.cfg.data.augment, training=True), encode)

    def eval_datasets(self) -> dict[str, Dataset]:
        augment = self.cfg.data.augment
        transform = detection_transform(self.image_size, augment, training=False)
        return {"val": CocoDetection(self.splits["val"].images, transform, window=AUGMENTATIONS[augment].window)}

    def loader_kwargs(self) -> dict:
        return {**super().loader_kwargs(), "collate_fn": collate_detection}

    def training_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, targets = batch
        return model(images, targets)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        val = self.splits["val"]
        results, image_ids = [], []
        for images, targets in loader:
            for detections, target in zip(model(images.to(device, non_blocking=True)), targets):
                image_id = int(target["image_id"])
                image_ids.append(image_id)
                results += coco_results(detections, image_id, target["window"].tolist(), self.image_size,
                                        val.category_ids)
        results, image_ids = all_gather_list(results), all_gather_list(image_ids)
        return broadcast_object(coco_ap(val.coco, results, image_ids) if current_rank() == 0 else None)
