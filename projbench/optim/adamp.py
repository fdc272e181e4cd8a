"""AdamP: Adam with the update projected off scale-invariant weights (Heo et al., 2021)."""

from __future__ import annotations

import math

import torch

from projbench.optim._base import ProjectedOptimizer, per_tensor, uniform
from projbench.optim.multi_tensor import adam_factors


class AdamP(ProjectedOptimizer):
    """Drop-in for `adamp.AdamP` 0.3.0: same arguments, same defaults, same numbers.

    Weight decay is decoupled (`w *= 1 - lr * wd * ratio`), as in the official code. See `SGDP`
    for what differs in how it runs and for `fused`.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 delta=0.1, wd_ratio=0.1, nesterov=False, *, fused=None):
        if lr <= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        delta=delta, wd_ratio=wd_ratio, nesterov=nesterov, fused=fused)
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

        # lerp wants the gradient in the state's dtype (float32 for float16/bfloat16 weights);
        # the cast is made once here and serves the moments and the projection statistics.
        grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)  # beta1 * m + (1 - beta1) * g, one pass
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

        # The official perturb m / (sqrt(v) / r + eps), with r = sqrt(1 - beta2^t), equals
        # r * m / (sqrt(v) + eps * r): r moves into the step size (the projection is linear in
        # the update), which saves a pass over the denominators.
        roots = [math.sqrt(1 - beta2**s) for s in steps]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, uniform([group["eps"] * r for r in roots]))
        if group["nesterov"]:
            perturb = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
            torch._foreach_div_(perturb, denom)
        elif per_tensor(denom):
            for m, d in zip(exp_avgs, denom):
                torch.div(m, d, out=d)  # into the denominator: no third buffer, one pass
            perturb = denom
        else:
            perturb = torch._foreach_div(exp_avgs, denom)
        step_sizes = [group["lr"] * r / (1 - beta1**s) for s, r in zip(steps, roots)]
        self._apply(group, index, params, grads, perturb, step_sizes,
                    decay_divisor=1.0, project_updates_in_place=False)

    state_names = ("exp_avg", "exp_avg_sq")

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return dict(lr=group["lr"], momentum=0.0, dampening=0.0, weight_decay=group["weight_decay"],
                    wd_ratio=group["wd_ratio"], decay_divisor=1.0, delta=group["delta"], eps=group["eps"],
                    beta1=beta1, beta2=beta2, adam=True, nesterov=group["nesterov"], project_buffer=False)

    def _step_factors(self, group, params):
        beta1, beta2 = group["betas"]
        factors, cache = [], {}
        for p in params:
            state = self.state[p]
            step = state["step"] = state.get("step", 0) + 1
            if step not in cache:
                cache[step] = adam_factors(group["lr"], beta1, beta2, step)
            factors.append(cache[step])
        return factors
