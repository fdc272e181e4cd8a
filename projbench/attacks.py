"""Projected gradient descent (PGD, Madry et al. 2018): the attack of adversarial training and
of its robust-accuracy evaluation, in the l_inf and l_2 threat models.

Everything is in the [0, 1] pixel space of the images the model takes: `eps` and `step_size` are
fractions of the pixel range (4/255 = 0.0157), and input normalisation belongs inside the model,
so the ball is measured in pixels whatever the normalisation. One PGD run:

    start     delta uniform in [-eps, eps] (l_inf), or a uniformly random direction scaled to a
              radius drawn uniformly from [0, eps] (l_2), as locuslab/robust_overfitting's
              attack_pgd; zero with random_start=False
    steps x   g = the gradient of the summed cross-entropy at x + delta
              l_inf: delta <- clip(delta + step_size * sign(g), -eps, eps)
              l_2:   delta <- project_eps(delta + step_size * g / ||g||), per image
              then delta <- clip(x + delta, 0, 1) - x, so the image stays in [0, 1]
    restarts  with restarts > 1, each image keeps the perturbation of highest loss

The gradient is taken with torch.autograd.grad with respect to delta only: the model's
parameters get no .grad from an attack. The model runs in whatever mode the caller left it in
(training-time attacks in train mode use batch statistics and move BatchNorm's running
statistics, as Madry et al.'s and robust_overfitting's code do). The summed (not averaged) loss
keeps per-image gradients of the same size at any batch size, which keeps half-precision
gradients from underflowing; sign and l_2 direction do not depend on the scale.

No library from PyPI is used: torchattacks 3.5.1 pins requests~=2.25.1, so installing it
downgrades requests, urllib3 (to 1.26) and idna (to 2.10, below what httpx2 here needs: `pip
install --dry-run torchattacks==3.5.1`); foolbox wants models in eval mode and brings eagerpy and
GitPython; adversarial-robustness-toolbox attacks numpy arrays through its own classifier
wrapper (a copy to the host per call, no use inside a GPU training step); and advertorch has had
no release since 2020.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

NORMS = ("linf", "l2")


def _per_image_norm(x: torch.Tensor) -> torch.Tensor:
    """The l_2 norm of each image, shaped to broadcast against the batch."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def random_start(images: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """A random perturbation inside the eps-ball of `norm`."""
    if norm == "linf":
        return torch.empty_like(images).uniform_(-eps, eps)
    direction = torch.randn_like(images)
    direction = direction / _per_image_norm(direction).clamp_min(1e-12)
    radius = torch.rand(images.shape[0], *([1] * (images.dim() - 1)), device=images.device, dtype=images.dtype)
    return direction * radius * eps


def pgd_step(delta: torch.Tensor, grad: torch.Tensor, norm: str, eps: float, step_size: float) -> torch.Tensor:
    """One ascent step on the loss, projected back onto the eps-ball of `norm`."""
    if norm == "linf":
        return (delta + step_size * grad.sign()).clamp(-eps, eps)
    delta = delta + step_size * grad / _per_image_norm(grad).clamp_min(1e-12)
    return delta * (eps / _per_image_norm(delta).clamp_min(1e-12)).clamp(max=1.0)


def pgd(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, targets: torch.Tensor, *,
        norm: str, eps: float, step_size: float, steps: int, random_init: bool = True,
        restarts: int = 1) -> torch.Tensor:
    """Adversarial versions of `images` (in [0, 1]) within `eps` of them in `norm` (see the module
    docstring), detached. Works under torch.no_grad() (evaluation) too."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    images = images.detach()
    best, best_loss = images, None
    with torch.enable_grad():
        for _ in range(restarts):
            delta = random_start(images, norm, eps) if random_init else torch.zeros_like(images)
            delta = (images + delta).clamp(0, 1) - images
            for _ in range(steps):
                delta.requires_grad_(True)
                loss = F.cross_entropy(model(images + delta), targets, reduction="sum")
                (grad,) = torch.autograd.grad(loss, delta)
                delta = pgd_step(delta.detach(), grad, norm, eps, step_size)
                delta = (images + delta).clamp(0, 1) - images
            adversarial = (images + delta).clamp(0, 1)
            if restarts == 1:
                return adversarial
            with torch.no_grad():
                loss = F.cross_entropy(model(adversarial), targets, reduction="none")
            if best_loss is None:
                best, best_loss = adversarial, loss
            else:
                better = (loss >= best_loss).view(-1, *([1] * (images.dim() - 1)))
                best, best_loss = torch.where(better, adversarial, best), torch.maximum(loss, best_loss)
    return best
