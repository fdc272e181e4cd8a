"""`task=cifar10_adv`: PGD adversarial training (Madry et al. 2018) of a Wide-ResNet on CIFAR-10,
the paper's Table 4a, in the l_inf (eps 4/255) and l_2 (eps 80/255) threat models.

Each training step replaces the batch by its PGD adversarial examples (task.attack: PGD-10 from
a random start) and minimises their cross-entropy; evaluation reports, on the test set, the
standard accuracy (`top1`) and the accuracy under PGD (`pgd<steps>_top1`, task.eval_attack:
PGD-10 by default, hence `test/pgd10_top1`), with both losses. The attack itself is
projbench/attacks.py. Images stay in [0, 1] up to the model, whose first layer normalises them
(task.data.mean / std), so eps is measured in pixels.

Data: CIFAR-10's official python layout (projbench/data/cifar.py). Training images are
randomly cropped from a 4-pixel padded copy and flipped; test images are used as they are.
`task.data.fixture=true` writes a tiny set in the same layout (rank 0, once) and reads it
through the same reader; the task file's `${fixture:A,B}` values then give a WRN-10-1 (a
WRN-34-10 under PGD-10 does not fit a CPU smoke run), and the run's `model` says what ran.
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2

from projbench.attacks import NORMS, pgd
from projbench.data.cifar import NUM_CLASSES, CifarSplit, read_cifar10, write_cifar10_fixture
from projbench.distributed import DistInfo
from projbench.errors import ConfigError
from projbench.models.wide_resnet import WideResNet
from projbench.tasks.base import Task

HINT = ("Extract the official cifar-10-python.tar.gz and set task.data.root=/path/to/cifar-10-batches-py "
        "(or paths.data_dir=<dir holding cifar-10-batches-py/>), or set task.data.fixture=true for a tiny stand-in")
BN_MODES = ("train", "eval")
# The fixture: five data batches of 64 images and a test batch of 100 (2 steps an epoch at batch 128).
FIXTURE = dict(train_per_batch=64, test=100)


def pixel_fraction(value, key: str) -> float:
    """A size in the [0, 1] pixel range, given as a number or a fraction string ("4/255")."""
    try:
        number = float(Fraction(str(value).replace(" ", "")))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(key, f"must be a number or a fraction such as 4/255; got {value!r}") from None
    if number < 0:
        raise ConfigError(key, f"must be >= 0; got {value!r}")
    return number


class Attack:
    """A PGD configuration (a task.attack / task.eval_attack node), checked, with eps and the
    step size in pixels."""

    def __init__(self, cfg: DictConfig, key: str):
        if cfg.norm not in NORMS:
            raise ConfigError(f"{key}.norm", f"got {cfg.norm!r}; choose one of {list(NORMS)}")
        for name in ("steps", "restarts"):
            if int(cfg[name]) < 1:
                raise ConfigError(f"{key}.{name}", f"must be >= 1; got {cfg[name]}")
        self.norm = str(cfg.norm)
        self.eps = pixel_fraction(cfg.eps, f"{key}.eps")
        self.step_size = pixel_fraction(cfg.step_size, f"{key}.step_size")
        if self.norm == "linf" and self.eps > 1:  # e.g. 8 meant as robust_overfitting's --epsilon 8
            raise ConfigError(f"{key}.eps", f"{cfg.eps} exceeds the whole [0, 1] pixel range; write 8/255 for 8 levels")
        self.steps, self.restarts = int(cfg.steps), int(cfg.restarts)
        self.random_init = bool(cfg.random_start)

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return pgd(model, images, targets, norm=self.norm, eps=self.eps, step_size=self.step_size,
                   steps=self.steps, random_init=self.random_init, restarts=self.restarts)


class Normalize(nn.Module):
    """(x - mean) / std per channel: the model's first layer, so that attacks work on pixels."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class CifarImages(Dataset):
    """(float image in [0, 1] of shape (3, 32, 32), label) pairs, with an optional transform."""

    def __init__(self, split: CifarSplit, transform=None):
        self.images = torch.from_numpy(split.images)
        self.labels = torch.from_numpy(split.labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image.float().div_(255), self.labels[index]


class Cifar10AdvTask(Task):
    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        self.train_attack = Attack(cfg.attack, "task.attack")
        self.eval_attack = Attack(cfg.eval_attack, "task.eval_attack")
        if cfg.attack.bn_mode not in BN_MODES:
            raise ConfigError("task.attack.bn_mode", f"got {cfg.attack.bn_mode!r}; choose one of {list(BN_MODES)}")
        # Metrics of the attacked test images carry the attack's name: pgd10_top1, pgd10_loss.
        self.attacked = f"pgd{self.eval_attack.steps}_"
        self.metrics = {"top1": "max", f"{self.attacked}top1": "max", "loss": "min", f"{self.attacked}loss": "min"}
        self._splits: dict[str, CifarSplit] = {}

    def setup(self, dist: DistInfo) -> None:
        root = self.prepare_fixture(dist, lambda tmp: write_cifar10_fixture(tmp, **FIXTURE))
        self._splits, _ = read_cifar10(root, HINT)

    def model_name(self) -> str:
        model = self.cfg.model
        return f"wrn-{model.depth}-{model.width}"

    def build_model(self) -> nn.Module:
        data, model = self.cfg.data, self.cfg.model
        try:
            network = WideResNet(int(model.depth), int(model.width), NUM_CLASSES, float(model.dropout))
        except ValueError as exc:
            raise ConfigError("task.model", str(exc)) from None
        return nn.Sequential(Normalize(data.mean, data.std), network)

    def train_dataset(self) -> Dataset:
        data = self.cfg.data
        augment = v2.Compose([v2.RandomCrop(32, padding=int(data.crop_padding), padding_mode=str(data.padding_mode)),
                              v2.RandomHorizontalFlip(float(data.hflip))])
        return CifarImages(self._splits["train"], augment)

    def eval_datasets(self) -> dict[str, Dataset]:
        return {"test": CifarImages(self._splits["test"])}

    def training_loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, targets = batch
        if self.cfg.attack.bn_mode == "eval":
            model.eval()
            adversarial = self.train_attack(model, images, targets)
            model.train()
        else:
            adversarial = self.train_attack(model, images, targets)
        return F.cross_entropy(model(adversarial), targets)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        prefixes = ("", self.attacked)
        top1 = {prefix: MulticlassAccuracy(NUM_CLASSES, average="micro").to(device) for prefix in prefixes}
        loss = {prefix: MeanMetric().to(device) for prefix in prefixes}
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            inputs = {"": images, self.attacked: self.eval_attack(model, images, targets)}
            for prefix, batch in inputs.items():
                logits = model(batch)
                top1[prefix].update(logits, targets)
                loss[prefix].update(F.cross_entropy(logits.float(), targets, reduction="none"))
        results = {f"{prefix}top1": 100 * metric.compute().item() for prefix, metric in top1.items()}
        return results | {f"{prefix}loss": metric.compute().item() for prefix, metric in loss.items()}
