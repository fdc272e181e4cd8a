"""`task=biased_mnist`: ReBias on colour-biased MNIST, the paper's Table 4b.

Data: MNIST's official IDX files under `task.data.root` (projbench/data/mnist.py), coloured as
ReBias does: the training digits with colour-class correlation `task.data.rho` (0.999, 0.997,
0.995 or 0.990 in the table), the test digits twice, once with colours independent of the class
(rho 0.1: the "unbiased" set) and once with each class's own colour (rho 1: the "biased" set).
The colouring is drawn from `task.data.bias_seed` (the run's seed by default), so Adam and AdamP
runs of one seed see the same data set and each seed its own, as upstream draws it anew per run.
Pixels are scaled to [-1, 1] (upstream: ToTensor, Normalize(0.5, 0.5)); no augmentation.
`task.data.fixture=true` writes a tiny MNIST in the same format (seven-segment digits) and reads
it through the same reader.

Model: f = SimpleConvNet with 7x7 kernels, g = the same with 1x1 kernels
(projbench/models/rebias.py), trained by the ReBias objective of projbench/tasks/rebias.py.
Metrics of f on the test digits, x 100 (torchmetrics, reduced over DDP ranks):
  unbiased_top1    accuracy on the unbiased colouring: Table 4b's number, the primary metric
  biased_top1      accuracy on the biased colouring
  g_unbiased_top1, g_biased_top1   the same for g (a colour-only g: near 10 and 100)
  hsic             HSIC(f, g) on the unbiased test batches
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from projbench.data.mnist import colour_labels, colourise, read_mnist, write_mnist_fixture
from projbench.distributed import DistInfo
from projbench.errors import ConfigError
from projbench.tasks.rebias import ReBiasTask

UNBIASED_RHO = 0.1  # upstream main_biased_mnist.py: val_loaders['unbiased'] at data_label_correlation=0.1
BIASED_RHO = 1.0    # upstream: val_loaders['biased'] at data_label_correlation=1


class ColouredDigits(Dataset):
    """Item i: (rendering_1[i], ..., rendering_k[i], label[i]), each rendering a float image in
    [-1, 1]; the renderings are uint8 [n, 3, rows, cols] tensors held in memory."""

    def __init__(self, renderings: list[torch.Tensor], labels: torch.Tensor):
        self.renderings = renderings
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return (*(r[index].float().div_(127.5).sub_(1) for r in self.renderings), self.labels[index])


class BiasedMNISTTask(ReBiasTask):
    metrics = {"unbiased_top1": "max", "biased_top1": "max", "g_unbiased_top1": "max", "g_biased_top1": "max",
               "hsic": "min"}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.datasets: dict[str, ColouredDigits] = {}

    @property
    def num_classes(self) -> int:
        return len(self.cfg.data.colours)

    def setup(self, dist: DistInfo) -> None:
        data = self.cfg.data
        rho = float(data.rho)
        if not 0 <= rho <= 1:
            raise ConfigError("task.data.rho", f"the share of digits in their class's colour must be in [0, 1], got {rho}")
        palette = np.asarray(data.colours, dtype=np.int64)
        if palette.ndim != 2 or palette.shape[1] != 3 or len(palette) < 2 or palette.min() < 0 or palette.max() > 255:
            raise ConfigError("task.data.colours", f"must be a list of at least 2 RGB triples in 0-255, got {data.colours}")
        root = self.prepare_fixture(dist, write_mnist_fixture)
        rng = np.random.default_rng(int(data.bias_seed))
        train_images, train_labels = read_mnist(root, "train", self.num_classes)
        test_images, test_labels = read_mnist(root, "test", self.num_classes)

        def rendering(images, labels, correlation):
            colours = colour_labels(labels, correlation, self.num_classes, rng)
            return torch.from_numpy(colourise(images, colours, palette.astype(np.uint8)))

        self.datasets = {
            "train": ColouredDigits([rendering(train_images, train_labels, rho)], torch.from_numpy(train_labels)),
            "test": ColouredDigits([rendering(test_images, test_labels, UNBIASED_RHO),
                                    rendering(test_images, test_labels, BIASED_RHO)], torch.from_numpy(test_labels)),
        }

    def train_dataset(self) -> Dataset:
        return self.datasets["train"]

    def eval_datasets(self) -> dict[str, Dataset]:
        return {"test": self.datasets["test"]}

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        accuracy = {name: MulticlassAccuracy(self.num_classes, average="micro").to(device)
                    for name in self.metrics if name.endswith("top1")}
        hsic = self.hsic_metric(device)
        for unbiased, biased, targets in loader:
            targets = targets.to(device, non_blocking=True)
            for colouring, images in (("unbiased", unbiased), ("biased", biased)):
                f_logits, f_features, g_logits, g_features = model(images.to(device, non_blocking=True))
                accuracy[f"{colouring}_top1"].update(f_logits, targets)
                accuracy[f"g_{colouring}_top1"].update(g_logits, targets)
                if colouring == "unbiased":
                    hsic.update(f_features, g_features)
        results = {name: 100 * metric.compute().item() for name, metric in accuracy.items()}
        return {**results, "hsic": hsic.compute().item()}
