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
`rbf_sigma_x=1`), or `median`, the median heuristic per batch on each network's detached
features (9-class ImageNet; upstream takes the median over a quarter of the training set once per
epoch). As upstream, both terms use (sigma_f, sigma_g) in that argument order, so g's own term
applies f's bandwidth to g's features (trainer.py passes one sigma pair to both criteria and
criterions/hsic.py applies sigma_x to the first argument).
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torchmetrics import MeanMetric

from projbench.errors import ConfigError
from projbench.hsic import median_sigma, rbf_hsic
from projbench.models.rebias import ReBiasPair, build_network
from projbench.tasks.base import Task

MEDIAN = "median"


def kernel_bandwidths(f_features: torch.Tensor, g_features: torch.Tensor,
                      sigma: float | str) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(sigma_f, sigma_g): the configured number for both, or each one's median heuristic."""
    if sigma == MEDIAN:
        return median_sigma(f_features), median_sigma(g_features)
    return float(sigma), float(sigma)


def rebias_objective(f_logits: torch.Tensor, f_features: torch.Tensor, g_logits: torch.Tensor,
                     g_features: torch.Tensor, targets: torch.Tensor, f_lambda: float, g_lambda: float,
                     sigma: float | str) -> torch.Tensor:
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

    def training_loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, targets = batch
        rebias = self.cfg.rebias
        return rebias_objective(*model(images), targets, float(rebias.f_lambda), float(rebias.g_lambda),
                                rebias.sigma)

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
