"""What image-classification tasks share: a timm model, cross-entropy, top-1/top-5 metrics."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from projbench.tasks.base import Task


class ClassificationTask(Task):
    """Subclasses provide datasets of (image tensor, class index) and `num_classes`."""

    metrics = {"top1": "max", "top5": "max", "loss": "min"}
    in_chans = 3

    @property
    def num_classes(self) -> int:
        return int(self.cfg.num_classes)

    def build_model(self) -> nn.Module:
        model_cfg = self.cfg.model
        kwargs = OmegaConf.to_container(model_cfg.get("kwargs", {}), resolve=True)
        return timm.create_model(model_cfg.arch, pretrained=False, num_classes=self.num_classes,
                                 in_chans=self.in_chans, **kwargs)

    def training_loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, targets = batch
        return F.cross_entropy(model(images), targets, label_smoothing=self.cfg.get("label_smoothing", 0.0))

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        top1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro").to(device)
        top5 = MulticlassAccuracy(self.num_classes, top_k=min(5, self.num_classes), average="micro").to(device)
        loss = MeanMetric().to(device)
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            logits = model(images)
            top1.update(logits, targets)
            top5.update(logits, targets)
            loss.update(F.cross_entropy(logits, targets, reduction="none"))
        return {"top1": 100 * top1.compute().item(), "top5": 100 * top5.compute().item(),
                "loss": loss.compute().item()}
