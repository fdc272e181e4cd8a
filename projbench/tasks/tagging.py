"""What the multi-label audio tagging tasks share (DCASE sound events, MagnaTagATune music tags):
a Harmonic CNN with one sigmoid output per class, binary cross-entropy on random training crops,
and ROC-AUC / PR-AUC evaluation.

A subclass reads its data set into `self.splits` ({"train", "val", "test"} -> clips) and
`self.classes` in `read_splits`, and says how it evaluates in `eval_datasets`: an evaluation
item is a clip's waveform (samples,) or a clip cut into crops (crops, samples), whose sigmoid
outputs are averaged into the clip's scores. Metrics (x 100 but the loss, reduced over DDP ranks
by torchmetrics):
  roc_auc  ROC-AUC, macro over the classes that have positive and negative clips in the split
  pr_auc   average precision, macro over the same classes
  loss     binary cross-entropy per clip (mean over classes and crops)
  + `extra_metrics`, updated with the clip scores and labels (e.g. DCASE's F1)
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MultilabelAUROC, MultilabelAveragePrecision, MultilabelStatScores

from projbench.data.audio import ChunkedClipDataset, Clip, ClipDataset
from projbench.distributed import DistInfo
from projbench.errors import ConfigError
from projbench.models.harmonic_cnn import HarmonicCNN
from projbench.tasks.base import Task


def build_harmonic_cnn(cfg, num_classes: int) -> HarmonicCNN:
    """The Harmonic CNN of an audio task's config: `task.model`'s keys (but `arch`) are its
    arguments, at `task.data.sample_rate`; an impossible combination is a ConfigError."""
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    kwargs.pop("arch")
    try:
        return HarmonicCNN(num_classes, sample_rate=int(cfg.data.sample_rate), **kwargs)
    except ValueError as exc:
        raise ConfigError("task.model", str(exc)) from None


class TaggingTask(Task):
    metrics = {"roc_auc": "max", "pr_auc": "max", "loss": "min"}
    classes: tuple[str, ...] = ()
    #: task.data keys that must be > 0
    positive_keys: tuple[str, ...] = ("sample_rate", "crop_seconds")
    #: those of positive_keys that may also be null (a documented choice, e.g. DCASE's eval_chunks)
    nullable_keys: tuple[str, ...] = ()

    def __init__(self, cfg):
        super().__init__(cfg)
        self.splits: dict[str, list[Clip]] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def setup(self, dist: DistInfo) -> None:
        data = self.cfg.data
        for key in self.positive_keys:
            if data[key] is None and key in self.nullable_keys:
                continue
            if data[key] is None or data[key] <= 0:
                raise ConfigError(f"task.data.{key}", f"must be > 0, got {data[key]}")
        self.check_config()
        self.read_splits(self.prepare_fixture(dist, self.write_fixture))

    def check_config(self) -> None:
        """Task-specific config checks (ConfigError), before any data is read."""

    @abstractmethod
    def write_fixture(self, root: Path) -> None:
        """Write the task's tiny data set at `root` (task.data.fixture=true)."""

    @abstractmethod
    def read_splits(self, root: Path) -> None:
        """Read the data set at `root` into self.splits (and self.classes where the data decides them)."""

    def build_model(self) -> nn.Module:
        return build_harmonic_cnn(self.cfg, self.num_classes)

    def train_dataset(self) -> Dataset:
        data = self.cfg.data
        return ClipDataset(self.splits["train"], self.num_classes, int(data.sample_rate), float(data.crop_seconds),
                           random_crop=True)

    def chunked_eval_datasets(self) -> dict[str, Dataset]:
        """val and test clips, each cut into `task.data.eval_chunks` crops of `crop_seconds` spread
        over the clip, whose outputs evaluation averages (the Harmonic CNN code's eval.py)."""
        data = self.cfg.data
        return {split: ChunkedClipDataset(self.splits[split], self.num_classes, int(data.sample_rate),
                                          float(data.crop_seconds), int(data.eval_chunks))
                for split in ("val", "test")}

    def training_loss(self, model: nn.Module, batch) -> torch.Tensor:
        waves, targets = batch
        return F.binary_cross_entropy_with_logits(model(waves).float(), targets)

    def extra_metrics(self) -> dict[str, Metric]:
        """Further metrics, each updated with (clip scores, integer labels) and reported x 100."""
        return {}

    @staticmethod
    def clip_logits(model: nn.Module, waves: torch.Tensor) -> torch.Tensor:
        """(clips, crops, classes) logits of (clips, samples) or (clips, crops, samples) waveforms.
        The crops go through the model one position at a time, a batch of `clips` each (the
        training batch's memory); a crop equal to the one before (a clip shorter than a crop)
        reuses its logits."""
        if waves.dim() == 2:
            return model(waves).float()[:, None]
        logits = []
        for k in range(waves.shape[1]):
            same = k > 0 and torch.equal(waves[:, k], waves[:, k - 1])
            logits.append(logits[-1] if same else model(waves[:, k]).float())
        return torch.stack(logits, dim=1)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        n = self.num_classes
        counts = MultilabelStatScores(n, average=None).to(device)  # per class: tp fp tn fn support
        roc_auc = MultilabelAUROC(n, average=None).to(device)
        pr_auc = MultilabelAveragePrecision(n, average=None).to(device)
        extra = {name: metric.to(device) for name, metric in self.extra_metrics().items()}
        loss = MeanMetric().to(device)
        for waves, targets in loader:
            waves = waves.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            logits = self.clip_logits(model, waves)
            scores, labels = logits.sigmoid().mean(dim=1), targets.long()
            for metric in (counts, roc_auc, pr_auc, *extra.values()):
                metric.update(scores, labels)
            per_crop = F.binary_cross_entropy_with_logits(logits, targets[:, None].expand_as(logits), reduction="none")
            loss.update(per_crop.mean(dim=(1, 2)))
        tp, fp, tn, fn, _ = counts.compute().unbind(dim=1)
        ranked = (tp + fn > 0) & (tn + fp > 0)  # AUCs are defined only where a class has both
        with warnings.catch_warnings():  # torchmetrics warns about each class without positives
            warnings.simplefilter("ignore", UserWarning)
            roc, ap = roc_auc.compute(), pr_auc.compute()
        return {**{name: 100 * metric.compute().item() for name, metric in extra.items()},
                "roc_auc": 100 * roc[ranked].mean().item(), "pr_auc": 100 * ap[ranked].mean().item(),
                "loss": loss.compute().item()}
