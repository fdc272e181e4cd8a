"""The quantities of the paper's ResNet18 figure, for any optimizer.

Every `trainer.diagnostics_every` steps the loop logs, over the scale-invariant weights:
  projected_fraction  share of multi-dimensional weight elements detected as scale-invariant
  weight_norm         mean ||w|| over those weights
  effective_step      mean lr / ||w||^2 over those weights (the effective step size)

Which weights count as scale-invariant: for SGDP / AdamP, exactly those the optimizer projected
at its last step (`optimizer.last_projection`); for any other optimizer, the same test run on the
current gradients (projbench.optim.projection), so SGD and SGDP runs are measured alike.
"""

from __future__ import annotations

import torch

from projbench.optim.projection import Projector

DELTA, EPS = 0.1, 1e-8  # the paper's defaults, for optimizers that have no projection of their own


Records = list[tuple[list[torch.Tensor], torch.Tensor]]


@torch.no_grad()
def detect(optimizer: torch.optim.Optimizer) -> Records | None:
    """Call before `optimizer.step()`: for optimizers without a projection, which weights pass
    the scale-invariance test on the current gradients (the test needs the pre-step weights).
    None for SGDP / AdamP, which record what they projected themselves."""
    if getattr(optimizer, "last_projection", None) is not None:
        return None
    out = []
    for group in optimizer.param_groups:
        weights = [p for p in group["params"] if p.dim() > 1 and p.grad is not None]
        if weights:
            grads = [p.grad for p in weights]
            _, mask = Projector(weights, DELTA, EPS).coefficients(weights, grads, grads)
            out.append((weights, mask))
    return out


def _records(optimizer: torch.optim.Optimizer, detected: Records | None) -> list:
    """(weights, mask, lr) per param group."""
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    if detected is None:
        detected = [(r.params, r.projected) for r in optimizer.last_projection]
    return [(weights, mask, lr_of[id(weights[0])]) for weights, mask in detected]


@torch.no_grad()
def scale_invariance(optimizer: torch.optim.Optimizer, detected: Records | None = None) -> dict[str, float]:
    """Call after `optimizer.step()`, with what `detect` returned before it: the figure's
    quantities at this step (reads a few scalars to the host)."""
    numel_all = numel_si = count = 0.0
    norm_sum = eff_sum = 0.0
    for weights, mask, lr in _records(optimizer, detected):
        norms = torch.stack(torch._foreach_norm(weights)).float()
        numel = torch.tensor([float(w.numel()) for w in weights], device=norms.device)
        m = mask.to(norms.device).float()
        stats = torch.stack([(numel * m).sum(), numel.sum(), m.sum(), (norms * m).sum(),
                             (lr / norms.square().clamp_min(1e-30) * m).sum()]).tolist()
        numel_si += stats[0]
        numel_all += stats[1]
        count += stats[2]
        norm_sum += stats[3]
        eff_sum += stats[4]
    if numel_all == 0:
        return {}
    values = {"projected_fraction": numel_si / numel_all}
    if count:
        values.update(weight_norm=norm_sum / count, effective_step=eff_sum / count)
    return values
