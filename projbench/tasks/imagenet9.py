"""`task=imagenet9`: ReBias on 9-class ImageNet, the paper's Table 4c.

Data (projbench/data/imagenet9.py): the 42 ImageNet classes of `task.superclasses` regrouped into
9 super-classes, read from the ImageNet class-folder layout under `task.data.root` (train/ and
val/, the same tree as `task=imagenet`; the other class folders are ignored), with ImageNet's
transforms (timm's: random-resized crop + flip for training, resize + centre crop for
evaluation). The test split is the 2,100 validation images of those classes, and, when
`task.data.imagenet_a` names an ImageNet-A folder, its images of the mapped classes.
`task.data.fixture=true` writes a tiny tree of all of it (train, val, imagenet-a, the cluster csv)
and reads it through the same readers.

Model: f = ResNet-18 (timm), g = BagNet-18 (projbench/models/rebias.py), trained by the ReBias
objective of projbench/tasks/rebias.py with median-heuristic kernel bandwidths.
Metrics of f on the test split, x 100 (torchmetrics, reduced over DDP ranks):
  unbiased_top1    ReBias's unbiased accuracy (upstream evaluator.py): per texture clustering of
                   the validation images (`task.data.clusters`), the mean accuracy over the
                   (class, cluster) cells holding at least `task.unbiased_min_images` images,
                   each cell weighted equally; averaged over the clusterings. The primary metric.
  biased_top1      plain accuracy on the validation images
  imagenet_a_top1  plain accuracy on the ImageNet-A images of the mapped classes
  g_*              the same for g
  hsic             HSIC(f, g) on the validation batches
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from projbench.data.imagenet9 import (EvalImages, class_of_wnid, clusters_of_samples, read_texture_clusters,
                                      write_imagenet9_fixture)
from projbench.data.image_folder import ON_BAD_IMAGE, ImageFolderSplit, read_class_subset
from projbench.distributed import DistInfo
from projbench.errors import ConfigError
from projbench.tasks.imagenet import HINT, imagenet_transforms
from projbench.tasks.rebias import ReBiasTask

IMAGENET_A_HINT = ("Unpack ImageNet-A (github.com/hendrycks/natural-adv-examples: imagenet-a/<wnid>/*.jpg) and set "
                   "task.data.imagenet_a=/path/to/imagenet-a, or task.data.imagenet_a=null to skip its accuracy")
VAL, IMAGENET_A = 0, 1  # EvalImages sources


class ClusterBalancedAccuracy(Metric):
    """ReBias's unbiased accuracy (upstream evaluator.py, `imagenet_unbiased_accuracy` and
    `evaluate_rebias`): for each clustering, the accuracy in every (class, cluster) cell with at
    least `min_images` images, averaged over those cells with equal weight; then the mean over the
    clusterings. A fraction in [0, 1]; NaN when a clustering has no such cell."""

    full_state_update = False

    def __init__(self, num_classes: int, num_clusters: int, clusterings: int, min_images: int):
        super().__init__()
        self.num_clusters = num_clusters
        self.min_images = min_images
        cells = num_classes * num_clusters
        self.add_state("correct", torch.zeros(clusterings, cells), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(clusterings, cells), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, targets: torch.Tensor, clusters: torch.Tensor) -> None:
        """preds, targets: class indices [n]; clusters: [n, clusterings]."""
        hit = (preds == targets).float()
        for r in range(self.correct.shape[0]):
            cell = targets * self.num_clusters + clusters[:, r]
            self.correct[r].index_add_(0, cell, hit)
            self.count[r].index_add_(0, cell, torch.ones_like(hit))

    def compute(self) -> torch.Tensor:
        kept = self.count >= self.min_images
        accuracy = torch.where(kept, self.correct / self.count.clamp_min(1), 0.0)
        return (accuracy.sum(1) / kept.sum(1)).mean()


class ImageNet9Task(ReBiasTask):
    metrics = {"unbiased_top1": "max", "biased_top1": "max", "imagenet_a_top1": "max",
               "g_unbiased_top1": "max", "g_biased_top1": "max", "g_imagenet_a_top1": "max", "hsic": "min"}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.train: ImageFolderSplit | None = None
        self.test: Dataset | None = None
        self.cluster_shape: tuple[int, int] | None = None  # (clusterings, clusters) when clusters are read

    @property
    def num_classes(self) -> int:
        return len(self.cfg.superclasses)

    def setup(self, dist: DistInfo) -> None:
        data = self.cfg.data
        if data.on_bad_image not in ON_BAD_IMAGE:
            raise ConfigError("task.data.on_bad_image",
                              f"got {data.on_bad_image!r}; choose one of {list(ON_BAD_IMAGE)}")
        superclasses = {name: list(wnids) for name, wnids in self.cfg.superclasses.items()}
        class_of = class_of_wnid(superclasses)
        if len(class_of) != sum(map(len, superclasses.values())):
            raise ConfigError("task.superclasses", "a wnid is listed under two super-classes")
        root = self.prepare_fixture(dist, lambda tmp: write_imagenet9_fixture(tmp, superclasses))
        train_tf, eval_tf = imagenet_transforms(data)
        self.train = read_class_subset(root / "train", class_of, train_tf, data.on_bad_image, HINT)
        val = read_class_subset(root / "val", class_of, eval_tf, data.on_bad_image, HINT)
        clusters = None
        if data.clusters is not None:
            csv_path = Path(data.clusters)
            clusters = clusters_of_samples(val, read_texture_clusters(csv_path, superclasses), csv_path)
            self.cluster_shape = (clusters.shape[1], int(clusters.max()) + 1)
        clusterings = clusters.shape[1] if clusters is not None else 0
        parts = [EvalImages(val, VAL, clusters, clusterings)]
        if data.imagenet_a is not None:
            imagenet_a = read_class_subset(Path(data.imagenet_a), class_of, eval_tf, data.on_bad_image,
                                           IMAGENET_A_HINT, require_all=False)
            parts.append(EvalImages(imagenet_a, IMAGENET_A, None, clusterings))
        self.test = ConcatDataset(parts)

    def train_dataset(self) -> Dataset:
        return self.train

    def eval_datasets(self) -> dict[str, Dataset]:
        return {"test": self.test}

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        nets = ("", "g_")
        # Which metrics exist follows the config, so every DDP rank computes (and syncs) the same ones.
        splits = ("biased_top1", "imagenet_a_top1") if self.cfg.data.imagenet_a is not None else ("biased_top1",)
        accuracy = {f"{net}{name}": MulticlassAccuracy(self.num_classes, average="micro").to(device)
                    for net in nets for name in splits}
        unbiased = {}
        if self.cluster_shape is not None:
            unbiased = {f"{net}unbiased_top1": ClusterBalancedAccuracy(
                self.num_classes, self.cluster_shape[1], self.cluster_shape[0],
                int(self.cfg.unbiased_min_images)).to(device) for net in nets}
        hsic = self.hsic_metric(device)
        for images, targets, clusters, source in loader:
            f_logits, f_features, g_logits, g_features = model(images.to(device, non_blocking=True))
            targets, clusters = targets.to(device), clusters.to(device)
            in_val = source.to(device) == VAL
            hsic.update(f_features[in_val], g_features[in_val])
            for net, logits in zip(nets, (f_logits, g_logits)):
                for name, mask in zip(splits, (in_val, ~in_val)):
                    if mask.any():
                        accuracy[f"{net}{name}"].update(logits[mask], targets[mask])
                if unbiased and in_val.any():
                    unbiased[f"{net}unbiased_top1"].update(logits[in_val].argmax(1), targets[in_val], clusters[in_val])
        results = {name: 100 * metric.compute().item() for name, metric in {**unbiased, **accuracy}.items()}
        return {**results, "hsic": hsic.compute().item()}
