"""The quantities of the paper's ResNet18 figure, for any optimizer.

The weights measured are a fixed set: the multi-dimensional weights that pass the paper's
scale-invariance test (projbench.optim.projection: channel view, then layer view, on the gradient
and the weight, with the optimizer's delta and eps or the paper's defaults) at the first step the
run takes (after a resume: the first step after it). Averaging over a set that changes from step
to step (the weights some optimizer happened to project at that step) would make the curves jump
whenever a weight enters or leaves it.

Every `trainer.diagnostics_every` steps the loop logs (split "diag" of metrics.jsonl):
  weight_norm         mean ||w|| over the fixed set
  effective_step      mean ||w_{t+1}/||w_{t+1}|| - w_t/||w_t|| || over the fixed set: how far the
                      direction of a weight moved in this step, the "effective step size" of the
                      project page's ResNet18 figure (it starts near 0.003 there, with norms near
                      1.3 at lr 0.1, where lr / ||w||^2 would be 0.06)
  effective_lr        mean lr / ||w||^2 over the fixed set: the effective learning rate of a
                      scale-invariant weight under plain SGD
  projected_fraction  share of the elements of multi-dimensional weights projected at this step
                      (SGDP / AdamP: their own decision; other optimizers: the same test run on
                      the current gradients, so that runs compare alike)

Means are over tensors, each weight counting once. The run's summary.json gets the fixed set's
share of the model (`ScaleInvariance.summary`): how much of it SGDP / AdamP act on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from projbench.optim.projection import Projector

DELTA, EPS = 0.1, 1e-8  # the paper's defaults, for optimizers that have no projection of their own


Records = list[tuple[list[Tensor], Tensor]]


def _test(group: dict, weights: list[Tensor]) -> Tensor:
    """Bool per weight: passes the scale-invariance test on its current gradient."""
    grads = [p.grad for p in weights]
    projector = Projector(weights, group.get("delta", DELTA), group.get("eps", EPS))
    return projector.coefficients(weights, grads, grads)[1]


def _with_grads(group: dict) -> list[Tensor]:
    return [p for p in group["params"] if p.dim() > 1 and p.grad is not None]


@torch.no_grad()
def detect(optimizer: torch.optim.Optimizer) -> Records | None:
    """Call before `optimizer.step()`: for optimizers without a projection, which weights pass
    the scale-invariance test on the current gradients (the test needs the pre-step weights).
    None for SGDP / AdamP, which record what they projected themselves."""
    if getattr(optimizer, "last_projection", None) is not None:
        return None
    return [(weights, _test(group, weights)) for group in optimizer.param_groups if (weights := _with_grads(group))]


def _projected_fraction(optimizer: torch.optim.Optimizer, detected: Records | None) -> Tensor | None:
    """Share of multi-dimensional weight elements projected at this step, as a 0-d tensor."""
    if detected is None:
        detected = [(r.params, r.projected) for r in optimizer.last_projection]
    parts = [(torch.tensor([float(w.numel()) for w in weights]), mask.cpu().double()) for weights, mask in detected]
    if not parts:
        return None
    numel = torch.cat([n for n, _ in parts]).double()
    mask = torch.cat([m for _, m in parts])
    return (numel * mask).sum() / numel.sum()


@dataclass
class _Pending:
    """What `before_step` keeps for `after_step`: the weights before the step, and the
    projection test of optimizers that do not record their own."""

    before: list[Tensor]
    detected: Records | None


def _measured(w: Tensor) -> Tensor:
    """A detached copy of `w` in at least float32 (half weights are measured in float32)."""
    return w.detach().to(torch.promote_types(w.dtype, torch.float32), copy=True)


class ScaleInvariance:
    """The fixed set of scale-invariant weights of one run, and the figure's quantities over it.

        monitor = ScaleInvariance(optimizer, every=cfg.trainer.diagnostics_every)
        pending = monitor.before_step(step + 1)   # before optimizer.step()
        optimizer.step()
        values = monitor.after_step(pending)      # {} on steps without diagnostics

    Only diagnostics steps read values on the host (plus one read at the first step, which fixes
    the set).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, every: int | None):
        self.optimizer = optimizer
        self.every = every
        self.weights: list[Tensor] | None = None
        self.detected_at: int | None = None

    @torch.no_grad()
    def before_step(self, step: int) -> _Pending | None:
        """Call before `optimizer.step()`, with the number the step will have (1-based)."""
        if self.weights is None:
            self._fix(step)
        if not (self.every and step % self.every == 0):
            return None
        return _Pending([_measured(w) for w in self.weights or []], detect(self.optimizer))

    def _fix(self, step: int) -> None:
        """Fix the set at this step: the weights passing the test on their gradients. Waits for
        a step whose gradients are all finite (fp16 runs start with a few that are not)."""
        candidates, masks = [], []
        for group in self.optimizer.param_groups:
            if weights := _with_grads(group):
                candidates += weights
                masks.append(_test(group, weights))
        if not candidates:
            return
        finite = torch.stack([torch.isfinite(w.grad).all() for w in candidates]).all()
        if not bool(finite):
            return
        passed = torch.cat(masks).tolist()
        self.weights = [w for w, ok in zip(candidates, passed) if ok]
        self.detected_at = step

    @torch.no_grad()
    def after_step(self, pending: _Pending | None) -> dict[str, float]:
        """Call after `optimizer.step()`: the figure's quantities at this step ({} if none due)."""
        if pending is None:
            return {}
        values = {}
        fraction = _projected_fraction(self.optimizer, pending.detected)
        if fraction is not None:
            values["projected_fraction"] = fraction
        if self.weights:
            lr_of = {id(p): g["lr"] for g in self.optimizer.param_groups for p in g["params"]}
            after = [_measured(w) for w in self.weights]
            norms = torch.stack(torch._foreach_norm(after)).clamp_min(1e-30)
            before_norms = torch.stack(torch._foreach_norm(pending.before)).clamp_min(1e-30)
            torch._foreach_div_(after, list(norms.unbind()))
            torch._foreach_div_(pending.before, list(before_norms.unbind()))
            torch._foreach_sub_(after, pending.before)
            steps = torch.stack(torch._foreach_norm(after))
            lrs = torch.tensor([float(lr_of[id(w)]) for w in self.weights], dtype=norms.dtype, device=norms.device)
            values.update(weight_norm=norms.mean(), effective_step=steps.mean(), effective_lr=(lrs / norms.square()).mean())
        names = list(values)
        return dict(zip(names, torch.stack([v.double().cpu() for v in values.values()]).tolist()))

    def summary(self) -> dict | None:
        """The fixed set's share of the trainable parameters, by parameter count and by tensor
        count (None until the set is fixed)."""
        if self.weights is None:
            return None
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        n_all = sum(p.numel() for p in params)
        n_si = sum(w.numel() for w in self.weights)
        return {"tensors": len(self.weights), "tensors_share": len(self.weights) / max(len(params), 1),
                "params": n_si, "params_share": n_si / max(n_all, 1), "detected_at_step": self.detected_at}
