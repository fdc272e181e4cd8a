"""`task=dcase`: DCASE 2017 Task 4 sound event tagging (subtask A, audio tagging) with a Harmonic
CNN: the DCASE column of the paper's Table 5.

Data: the official layout under `task.data.root` (projbench/data/audio.py says which files):
the weak-label training set trains, the testing set is the "val" split and the evaluation set
the "test" split. Clips are read with soundfile, averaged to mono, resampled to
`task.data.sample_rate`; training takes a random `crop_seconds` crop of each clip, evaluation a
centred `eval_seconds` crop (the whole 10 s clip by default), zero-padded when the clip is shorter.
`task.data.fixture=true` writes a tiny data set in the same layout (rank 0, once, under
`task.data.fixture_root`) and reads it through the same reader.

Model: projbench/models/harmonic_cnn.py, 17 sigmoid outputs; loss: binary cross-entropy.
Metrics (x 100, reduced over DDP ranks by torchmetrics):
  f1       instance-level micro F1 over clips x classes at `task.threshold`, as DCASE 2017
           Task 4 subtask A ranks systems (sed_eval's tagging F-score); the primary metric
  roc_auc  ROC-AUC, macro over the classes that have positive and negative clips in the split
  pr_auc   average precision, macro over the same classes
  loss     binary cross-entropy per clip (mean over classes)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric
from torchmetrics.classification import (MultilabelAUROC, MultilabelAveragePrecision, MultilabelF1Score,
                                         MultilabelStatScores)

from projbench.data.audio import DCASE2017_CLASSES, Clip, ClipDataset, read_dcase, write_dcase_fixture
from projbench.data.fixtures import write_once
from projbench.distributed import DistInfo, barrier
from projbench.errors import ConfigError
from projbench.models.harmonic_cnn import HarmonicCNN
from projbench.tasks.base import Task


class DcaseTask(Task):
    metrics = {"f1": "max", "roc_auc": "max", "pr_auc": "max", "loss": "min"}
    classes = DCASE2017_CLASSES

    def __init__(self, cfg):
        super().__init__(cfg)
        self.splits: dict[str, list[Clip]] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def data_root(self) -> Path:
        data = self.cfg.data
        return Path(data.fixture_root if data.fixture else data.root)

    def setup(self, dist: DistInfo) -> None:
        data = self.cfg.data
        for key in ("sample_rate", "crop_seconds", "eval_seconds"):
            if data[key] <= 0:
                raise ConfigError(f"task.data.{key}", f"must be > 0, got {data[key]}")
        if not 0 < self.cfg.threshold < 1:
            raise ConfigError("task.threshold", f"must be between 0 and 1, got {self.cfg.threshold}")
        root = self.data_root()
        if data.fixture:
            if dist.is_main:
                write_once(root, write_dcase_fixture)
            barrier()
        self.splits = read_dcase(root, OmegaConf.to_container(data.label_files),
                                 OmegaConf.to_container(data.audio_dirs), self.classes)

    def build_model(self) -> nn.Module:
        kwargs = OmegaConf.to_container(self.cfg.model, resolve=True)
        kwargs.pop("arch")
        try:
            return HarmonicCNN(self.num_classes, sample_rate=int(self.cfg.data.sample_rate), **kwargs)
        except ValueError as exc:
            raise ConfigError("task.model", str(exc)) from None

    def _dataset(self, split: str, seconds: float, random_crop: bool) -> Dataset:
        return ClipDataset(self.splits[split], self.num_classes, int(self.cfg.data.sample_rate), float(seconds),
                           random_crop)

    def train_dataset(self) -> Dataset:
        return self._dataset("train", self.cfg.data.crop_seconds, random_crop=True)

    def eval_datasets(self) -> dict[str, Dataset]:
        return {split: self._dataset(split, self.cfg.data.eval_seconds, random_crop=False) for split in ("val", "test")}

    def training_loss(self, model: nn.Module, batch) -> torch.Tensor:
        waves, targets = batch
        return F.binary_cross_entropy_with_logits(model(waves).float(), targets)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        n, threshold = self.num_classes, float(self.cfg.threshold)
        f1 = MultilabelF1Score(n, threshold=threshold, average="micro").to(device)
        counts = MultilabelStatScores(n, threshold=threshold, average=None).to(device)  # per class: tp fp tn fn support
        roc_auc = MultilabelAUROC(n, average=None).to(device)
        pr_auc = MultilabelAveragePrecision(n, average=None).to(device)
        loss = MeanMetric().to(device)
        for waves, targets in loader:
            waves = waves.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            logits = model(waves).float()
            probs, labels = logits.sigmoid(), targets.long()
            for metric in (f1, counts, roc_auc, pr_auc):
                metric.update(probs, labels)
            loss.update(F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1))
        tp, fp, tn, fn, _ = counts.compute().unbind(dim=1)
        ranked = (tp + fn > 0) & (tn + fp > 0)  # AUCs are defined only where a class has both
        with warnings.catch_warnings():  # torchmetrics warns about each class without positives
            warnings.simplefilter("ignore", UserWarning)
            roc, ap = roc_auc.compute(), pr_auc.compute()
        return {"f1": 100 * f1.compute().item(), "roc_auc": 100 * roc[ranked].mean().item(),
                "pr_auc": 100 * ap[ranked].mean().item(), "loss": loss.compute().item()}
