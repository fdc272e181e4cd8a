"""What the ReBias tasks share (Bahng et al., "Learning De-biased Representations with Biased
Representations", ICML 2020; github.com/clovaai/rebias): the Table 4b / 4c objective.

A network f is trained to classify while staying statistically independent (small HSIC,
projbench/hsic.py) of a network g that is biased by design (it can only see colour or local
texture), and g is trained to classify while staying as dependent on f as it can:

    f minimises  CE(f) + f_lambda * HSIC(f features, g features)
    g minimises  CE(g) - g_lambda * HSIC(g features, f features)

(upstream trainer.py, `outer_criterion` RbfHSIC and `inner_criterion` MinusRbfHSIC, both lambdas 1).

How it runs here, with the one optimizer of the shared loop: f and g are one module
(projbench.models.rebias.ReBiasPair) and `training_loss` returns the sum of both objectives,
with the other network's features detached in each HSIC term. The gradient of that sum is f's
objective's gradient for f's weights and g's objective's for g's, so one optimizer step over the
pair takes both networks' steps. Upstream keeps two optimizers of the same kind and settings
(f_optim_config = g_optim_config in main_*.py) and one schedule each; Adam and AdamP work per
weight, so one optimizer over both is the same thing. What differs: upstream steps g first and
then computes f's loss against the updated g (alternating updates, three forward passes per
batch); here both step from the same forward (simultaneous updates), so f meets g one step
older. The task never touches the optimizer; an alternating scheme would need the loop to step
twice per batch.

The kernel bandwidths (`task.rebias.sigma`): a number (Biased-MNIST: 1, upstream's default
`rbf_sigma_x=1`), or `median`, the median heuristic on each network's detached features. With
`task.rebias.median_over: epoch` (9-class ImageNet, as upstream's `update_sigma_per_epoch`) it is
taken at the start of every epoch over the first `median_fraction` of a shuffled pass over the
training set (upstream criterions/sigma_utils.py `median_distance`: batches while idx <=
len * 0.25, the model in train mode, so BatchNorm's running statistics move too) and held for the
epoch; with `batch`, on each training batch. As upstream, both terms use (sigma_f, sigma_g) in that argument order, so g's own term
applies f's bandwidth to g's features (trainer.py passes one sigma pair to both criteria and
criterions/hsic.py applies sigma_x to the first argument).
"""

from __future__ import annotations

import logging
from abc import abstractmethod

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from projbench.distributed import all_gather_list, current_rank
from projbench.errors import ConfigError
from projbench.hsic import median, median_sigma, rbf_hsic, squared_distances
from projbench.models.rebias import ReBiasPair, build_network
from projbench.tasks.base import Task

log = logging.getLogger("projbench")
MEDIAN = "median"
MEDIAN_OVER = ("batch", "epoch")


def kernel_bandwidths(f_features: torch.Tensor, g_features: torch.Tensor,
                      sigma: float | str | tuple[float, float]) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(sigma_f, sigma_g): a given pair, the configured number for both, or each one's median
    heuristic on these features."""
    if isinstance(sigma, tuple):
        return sigma
    if sigma == MEDIAN:
        return median_sigma(f_features), median_sigma(g_features)
    return float(sigma), float(sigma)


def rebias_objective(f_logits: torch.Tensor, f_features: torch.Tensor, g_logits: torch.Tensor,
                     g_features: torch.Tensor, targets: torch.Tensor, f_lambda: float, g_lambda: float,
                     sigma: float | str | tuple[float, float]) -> torch.Tensor:
    """f's objective plus g's; each HSIC term sees the other network's features detached, so the
    gradient of the sum is f's objective's for f and g's objective's for g."""
    sigma_f, sigma_g = kernel_bandwidths(f_features, g_features, sigma)
    f_loss = F.cross_entropy(f_logits, targets)
    g_loss = F.cross_entropy(g_logits, targets)
    if f_lambda:
        f_loss = f_loss + f_lambda * rbf_hsic(f_features, g_features.detach(), sigma_f, sigma_g)
    if g_lambda:
        g_loss = g_loss - g_lambda * rbf_hsic(g_features, f_features.detach(), sigma_f, sigma_g)
    return f_loss + g_loss


@torch.no_grad()
def epoch_median_sigmas(model: nn.Module, loader: DataLoader, fraction: float, seed: int,
                        device: torch.device) -> tuple[float, float]:
    """(sigma_f, sigma_g) as upstream's `median_distance`: the sqrt of the median of the squared
    pairwise feature distances within each batch (diagonal zeros included) over the batches of a
    shuffled pass over `loader`'s data set while batch index <= len * fraction; the model in train
    mode. The batches have `loader`'s global size (per-rank batch x world size) and the order comes
    from `seed`, so every rank sees the same batches; under DDP the ranks take turns and share
    their distances (the median needs all of them)."""
    rank = current_rank()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    batch_size = loader.batch_size * world
    data = DataLoader(loader.dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed), num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)
    last = min(int(len(data) * fraction), len(data) - 1)
    model.train()
    f_dist, g_dist = [], []
    for index, (images, _targets) in enumerate(data):
        if index > last:
            break
        if index % world != rank:
            continue
        _, f_features, _, g_features = model(images.to(device, non_blocking=True))
        f_dist.append(squared_distances(f_features.float()).flatten().cpu())
        g_dist.append(squared_distances(g_features.float()).flatten().cpu())
    parts = all_gather_list([torch.cat(f_dist or [torch.empty(0)]), torch.cat(g_dist or [torch.empty(0)])])
    return float(median(torch.cat(parts[0::2])).sqrt()), float(median(torch.cat(parts[1::2])).sqrt())


class ReBiasTask(Task):
    """A task whose model is a ReBiasPair of `task.model.f` and `task.model.g` (each an `arch`
    for projbench.models.rebias.build_network and its `kwargs`); subclasses give the data and
    evaluate."""

    def __init__(self, cfg):
        super().__init__(cfg)
        rebias = cfg.rebias
        for key in ("f_lambda", "g_lambda"):
            if not isinstance(rebias[key], (int, float)) or rebias[key] < 0:
                raise ConfigError(f"task.rebias.{key}", f"must be a number >= 0, got {rebias[key]!r}")
        sigma = rebias.sigma
        if sigma != MEDIAN and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or sigma <= 0):
            raise ConfigError("task.rebias.sigma", f"must be a kernel bandwidth > 0 or {MEDIAN!r}, got {sigma!r}")
        over = rebias.get("median_over", "batch")
        if over not in MEDIAN_OVER:
            raise ConfigError("task.rebias.median_over", f"must be one of {', '.join(MEDIAN_OVER)}, got {over!r}")
        fraction = rebias.get("median_fraction", 0.25)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ConfigError("task.rebias.median_fraction", f"must be between 0 and 1, got {fraction!r}")
        self.epoch_medians = sigma == MEDIAN and over == "epoch"
        self.sigmas: tuple[float, float] | None = None  # this epoch's (sigma_f, sigma_g) when epoch_medians

    @property
    @abstractmethod
    def num_classes(self) -> int: ...

    def build_model(self) -> ReBiasPair:
        def network(node) -> nn.Module:
            kwargs = OmegaConf.to_container(node.get("kwargs", {}), resolve=True)
            return build_network(node.arch, self.num_classes, **kwargs)

        return ReBiasPair(network(self.cfg.model.f), network(self.cfg.model.g))

    def model_name(self) -> str:
        return f"{self.cfg.model.f.arch}_vs_{self.cfg.model.g.arch}"

    def epoch_start(self, model: nn.Module, epoch: int, loader: DataLoader, device: torch.device, seed: int) -> None:
        if self.epoch_medians:
            self.sigmas = epoch_median_sigmas(model, loader, float(self.cfg.rebias.median_fraction),
                                              seed * 1_000_003 + epoch + 7919, device)
            log.info("epoch %d: kernel bandwidths sigma_f %.4g, sigma_g %.4g (median heuristic)", epoch, *self.sigmas)

    def state_dict(self) -> dict:
        return {} if self.sigmas is None else {"sigmas": list(self.sigmas)}

    def load_state_dict(self, state: dict) -> None:
        if "sigmas" in state:
            self.sigmas = tuple(state["sigmas"])

    def training_loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, targets = batch
        rebias = self.cfg.rebias
        if self.epoch_medians and self.sigmas is None:
            raise RuntimeError("median_over: epoch, but no epoch_start computed the bandwidths")
        return rebias_objective(*model(images), targets, float(rebias.f_lambda), float(rebias.g_lambda),
                                self.sigmas if self.epoch_medians else rebias.sigma)

    def hsic_metric(self, device: torch.device) -> "BatchHSIC":
        return BatchHSIC(self.cfg.rebias.sigma).to(device)


class BatchHSIC(MeanMetric):
    """HSIC(f features, g features) per evaluation batch of at least 4 samples, averaged with the
    batch sizes as weights: how far from independent the two networks still are."""

    def __init__(self, sigma: float | str):
        super().__init__()
        self.sigma = sigma

    def update(self, f_features: torch.Tensor, g_features: torch.Tensor) -> None:  # type: ignore[override]
        if len(f_features) >= 4:
            value = rbf_hsic(f_features, g_features, *kernel_bandwidths(f_features, g_features, self.sigma))
            super().update(value, weight=len(f_features))
