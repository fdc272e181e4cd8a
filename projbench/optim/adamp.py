"""AdamP: Adam with the update projected off scale-invariant weights (Heo et al., 2021)."""

from __future__ import annotations

import math

import torch

from projbench.optim._base import ProjectedOptimizer


class AdamP(ProjectedOptimizer):
    """Drop-in for `adamp.AdamP` 0.3.0: same arguments, same defaults, same numbers.

    Weight decay is decoupled (`w *= 1 - lr * wd * ratio`), as in the official code. See `SGDP`
    for what differs in how it runs.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 delta=0.1, wd_ratio=0.1, nesterov=False):
        if lr <= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        delta=delta, wd_ratio=wd_ratio, nesterov=nesterov)
        super().__init__(params, defaults)

    def _update(self, group, params, grads, index):
        beta1, beta2 = group["betas"]
        exp_avgs = [self._state(p, "exp_avg") for p in params]
        exp_avg_sqs = [self._state(p, "exp_avg_sq") for p in params]
        steps = []
        for p in params:
            state = self.state[p]
            state["step"] = state.get("step", 0) + 1
            steps.append(state["step"])

        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**s) for s in steps])
        torch._foreach_add_(denom, group["eps"])
        if group["nesterov"]:
            numer = torch._foreach_mul(exp_avgs, beta1)
            torch._foreach_add_(numer, grads, alpha=1 - beta1)
            torch._foreach_div_(numer, denom)
            perturb = numer
        else:
            perturb = torch._foreach_div(exp_avgs, denom)
        step_sizes = [group["lr"] / (1 - beta1**s) for s in steps]
        self._apply(group, index, params, grads, perturb, step_sizes,
                    decay_divisor=1.0, project_updates_in_place=False)
