"""`task=digits`: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes),
upsampled to 32x32, with a BatchNorm ResNet from timm. Needs no download: the quick proof that
the whole pipeline (configs, loop, optimizers, records, tables) works."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, TensorDataset

from projbench.tasks.classification import ClassificationTask


class DigitsTask(ClassificationTask):
    in_chans = 1

    def __init__(self, cfg):
        super().__init__(cfg)
        self._splits: dict[str, Dataset] | None = None

    def _load(self) -> dict[str, Dataset]:
        if self._splits is None:
            digits = load_digits()
            images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
            images = F.interpolate(images, size=int(self.cfg.data.image_size), mode="bilinear", align_corners=False)
            images = (images - 0.5) / 0.5
            labels = torch.tensor(digits.target, dtype=torch.long)
            idx_train, idx_test = train_test_split(
                torch.arange(len(labels)).numpy(), test_size=self.cfg.data.test_fraction,
                stratify=labels.numpy(), random_state=0)  # a fixed split: every run sees the same test set
            self._splits = {
                "train": TensorDataset(images[idx_train], labels[idx_train]),
                "test": TensorDataset(images[idx_test], labels[idx_test]),
            }
        return self._splits

    def train_dataset(self) -> Dataset:
        return self._load()["train"]

    def eval_datasets(self) -> dict[str, Dataset]:
        return {"test": self._load()["test"]}
