"""The quantities of the paper's ResNet18 figure, for any optimizer.

The weights measured are a fixed set: the multi-dimensional weights that pass the paper's
scale-invariance test (projbench.optim.projection: channel view, then layer view, on the gradient
and the weight, with the optimizer's delta and eps or the paper's defaults) at the first step the
run takes (after a resume: the first step after it); a weight without a gradient then (frozen, or
in a branch not yet used), or whose value or gradient is all zero, is classified at the first
diagnostics step where it has both. Averaging over a set that changes from step to step (the
weights some optimizer happened to project at that step) would make the curves jump whenever a
weight enters or leaves it.

The unit measured is what is scale-invariant: each filter (row of the channel view: a conv or
linear weight before BatchNorm) of a weight that passed in the channel view, the whole weight of
one that passed in the layer view only (before GroupNorm(1) or LayerNorm). That is how the project
page's ResNet18 figure averages: its mean norm starts near 1.25, the mean filter norm of a
ResNet18 at Kaiming initialisation (whole conv weights have norms an order of magnitude larger).

Every `trainer.diagnostics_every` steps the loop logs (split "diag" of metrics.jsonl):
  weight_norm         mean ||w|| over the units
  effective_step      mean ||w_{t+1}/||w_{t+1}|| - w_t/||w_t|| || over the units: how far the
                      direction of a unit moved in this step, the "effective step size" of the
                      page's figure (it starts near 0.003 there, with norms near 1.25 at lr 0.1,
                      where lr / ||w||^2 would be 0.06)
  effective_lr        mean lr / ||w||^2 over the units: the effective learning rate of a
                      scale-invariant weight under plain SGD
  projected_fraction  share of the elements of multi-dimensional weights projected at this step
                      (SGDP / AdamP: their own decision; other optimizers: the same test run on
                      the current gradients, so that runs compare alike)

The run's summary.json gets the fixed set's share of the model (`ScaleInvariance.summary`): how
much of it SGDP / AdamP act on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from projbench.optim.projection import Projector, row_view

DELTA, EPS = 0.1, 1e-8  # the paper's defaults, for optimizers that have no projection of their own


Records = list[tuple[list[Tensor], Tensor]]


def _test(group: dict, weights: list[Tensor]) -> Tensor:
    """Bool per weight: passes the scale-invariance test on its current gradient (with the
    group's delta and eps: the projection wrapper's `proj_*` ones, SGDP's / AdamP's own, or the
    paper's defaults)."""
    grads = [p.grad for p in weights]
    delta = group.get("proj_delta", group.get("delta", DELTA))
    projector = Projector(weights, delta, group.get("proj_eps", group.get("eps", EPS)))
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

        monitor = ScaleInvariance(every=cfg.trainer.diagnostics_every)
        pending = monitor.before_step(optimizer, step + 1)   # before optimizer.step()
        optimizer.step()
        values = monitor.after_step(optimizer, pending)      # {} on steps without diagnostics

    Each multi-dimensional weight is classified once, at the first step that has its gradient (a
    weight frozen at first, or in a branch not yet used, joins when it gets one): that is the
    first step, and after it the diagnostics steps. The optimizer is passed at each call because a
    run may change it (trainer.phases). Only the first step and diagnostics steps read values on
    the host.
    """

    def __init__(self, every: int | None):
        self.every = every
        self.weights: list[Tensor] = []
        self.by_filter: list[bool] = []  # per weight: measured per filter (channel view) or whole
        self.detected_at: int | None = None
        self._undecided: dict[int, Tensor] | None = None  # multi-dimensional weights not yet classified
        self._counts = (0, 0)  # trainable tensors and parameters, for the shares

    @torch.no_grad()
    def before_step(self, optimizer: torch.optim.Optimizer, step: int) -> _Pending | None:
        """Call before `optimizer.step()`, with the number the step will have (1-based)."""
        due = bool(self.every) and step % self.every == 0
        if self._undecided is None:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
            self._counts = (len(params), sum(p.numel() for p in params))
            self._undecided = {id(p): p for p in params if p.dim() > 1}
        if self._undecided and (due or self.detected_at is None):
            self._classify(optimizer, step)
        if not due:
            return None
        return _Pending([_measured(w) for w in self.weights], detect(optimizer))

    def _classify(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Classify the undecided weights that have a finite, non-zero gradient and a non-zero
        value at this step. fp16 runs start with a few steps whose gradients are not finite; and
        the test passes trivially on an all-zero weight (a zero-initialised offset convolution) or
        gradient (a detector head whose anchors matched nothing in this batch): cos(g, w) is 0
        there, which says nothing about scale invariance, so such a weight waits for a step that
        tells."""
        for group in optimizer.param_groups:
            weights = [p for p in group["params"] if id(p) in self._undecided and p.grad is not None]
            if not weights:
                continue
            projector = Projector(weights, group.get("delta", DELTA), group.get("eps", EPS))
            by_channel, by_layer = projector.views(weights, [p.grad for p in weights])
            informative = torch.stack([torch.isfinite(p.grad).all() & p.grad.ne(0).any() & p.ne(0).any()
                                       for p in weights])
            for w, ok, channel, layer in zip(weights, informative.tolist(), by_channel.tolist(), by_layer.tolist()):
                if not ok:
                    continue
                del self._undecided[id(w)]
                if channel or layer:
                    self.weights.append(w)
                    self.by_filter.append(channel)
                if self.detected_at is None:
                    self.detected_at = step

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer, pending: _Pending | None) -> dict[str, float]:
        """Call after `optimizer.step()`: the figure's quantities at this step ({} if none due)."""
        if pending is None:
            return {}
        values = {}
        fraction = _projected_fraction(optimizer, pending.detected)
        if fraction is not None:
            values["projected_fraction"] = fraction
        if self.weights:
            lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
            norms, steps, lrs = [], [], []
            for w, before, by_filter in zip(self.weights, pending.before, self.by_filter):
                units = self._units(_measured(w), by_filter)
                units_before = self._units(before, by_filter)
                norm = units.norm(dim=1).clamp_min(1e-30)
                unit_step = units / norm[:, None] - units_before / units_before.norm(dim=1, keepdim=True).clamp_min(1e-30)
                norms.append(norm)
                steps.append(unit_step.norm(dim=1))
                lrs.append(torch.full_like(norm, float(lr_of[id(w)])))
            norm, lr = torch.cat(norms), torch.cat(lrs)
            values.update(weight_norm=norm.mean(), effective_step=torch.cat(steps).mean(),
                          effective_lr=(lr / norm.square()).mean())
        names = list(values)
        return dict(zip(names, torch.stack([v.double().cpu() for v in values.values()]).tolist()))

    @staticmethod
    def _units(w: Tensor, by_filter: bool) -> Tensor:
        """The scale-invariant units of `w` as rows: its filters, or the whole weight as one."""
        return row_view(w) if by_filter else w.reshape(1, -1)

    def state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        """The classification so far, by each weight's position among the optimizer's parameters:
        checkpointed, so that a resumed run measures the same fixed set as an uninterrupted one."""
        index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        undecided = None if self._undecided is None else [index[k] for k in self._undecided]
        return {"weights": [index[id(w)] for w in self.weights], "by_filter": list(self.by_filter),
                "detected_at": self.detected_at, "undecided": undecided, "counts": list(self._counts)}

    def load_state_dict(self, state: dict, optimizer: torch.optim.Optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.weights = [params[i] for i in state["weights"]]
        self.by_filter = list(state["by_filter"])
        self.detected_at = state["detected_at"]
        undecided = state["undecided"]
        self._undecided = None if undecided is None else {id(params[i]): params[i] for i in undecided}
        self._counts = tuple(state["counts"])

    def summary(self) -> dict | None:
        """The scale-invariant weights' share of the trainable parameters, by parameter count and
        by tensor count (None before any weight was classified)."""
        if self.detected_at is None:
            return None
        n_tensors, n_params = self._counts
        n_si = sum(w.numel() for w in self.weights)
        return {"tensors": len(self.weights), "tensors_share": len(self.weights) / max(n_tensors, 1),
                "params": n_si, "params_share": n_si / max(n_params, 1), "detected_at_step": self.detected_at}
