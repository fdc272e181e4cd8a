"""SGDP: momentum SGD with the update projected off scale-invariant weights (Heo et al., 2021)."""

from __future__ import annotations

import torch
from torch.optim.optimizer import required

from projbench.optim._base import ProjectedOptimizer


class SGDP(ProjectedOptimizer):
    """Drop-in for `adamp.SGDP` 0.3.0: same arguments, same defaults, same numbers.

    Differences from the official code are only in how it runs: channels_last and other
    non-contiguous weights work, float16/bfloat16 weights are projected in float32 with float32
    state, the projection decision stays on the device (no host sync), and the per-element work
    uses foreach kernels across all parameters of a group.
    """

    def __init__(self, params, lr=required, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, eps=1e-8, delta=0.1, wd_ratio=0.1):
        if lr is not required and lr <= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0 or momentum >= 1.0:
            raise ValueError(f"Invalid momentum (SGDP divides weight decay by 1 - momentum): {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio)
        super().__init__(params, defaults)

    def _update(self, group, params, grads, index):
        momentum, nesterov = group["momentum"], group["nesterov"]
        bufs = [self._state(p, "momentum") for p in params]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads, alpha=1 - group["dampening"])
        updates = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
        lr = group["lr"]
        self._apply(group, index, params, grads, updates, [lr] * len(params),
                    decay_divisor=1 - momentum, project_updates_in_place=not nesterov)
