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


def _records(optimizer: torch.optim.Optimizer) -> list[tuple[list[torch.Tensor], torch.Tensor, float]]:
    """(weights, projected mask, lr) per param group."""
    own = getattr(optimizer, "last_projection", None)
    if own is not None:
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        return [(r.params, r.projected, lr_of[id(r.params[0])]) for r in own]
    out = []
    for group in optimizer.param_groups:
        weights = [p for p in group["params"] if p.dim() > 1 and p.grad is not None]
        if weights:
            grads = [p.grad for p in weights]
            _, mask = Projector(weights, DELTA, EPS).coefficients(weights, grads, grads)
            out.append((weights, mask, group["lr"]))
    return out


@torch.no_grad()
def scale_invariance(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The figure's quantities at this step (reads a few scalars to the host)."""
    numel_all = numel_si = count = 0.0
    norm_sum = eff_sum = 0.0
    for weights, mask, lr in _records(optimizer):
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
