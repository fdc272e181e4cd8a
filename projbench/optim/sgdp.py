"""SGDP: momentum SGD with the update projected off scale-invariant weights (Heo et al., 2021)."""

from __future__ import annotations

import torch
from torch.optim.optimizer import required

from projbench.optim._base import ProjectedOptimizer, per_tensor


class SGDP(ProjectedOptimizer):
    """Drop-in for `adamp.SGDP` 0.3.0: same arguments, same defaults, same numbers.

    `project_buffer` (keyword-only, not in the official code) chooses between the two forms of
    SGDP that exist. True (the default): the official code, where without Nesterov the update is
    the momentum buffer itself and the projection is written into it, so the buffer loses its
    radial part every step; the paper's numbers come from that code. False: the paper's
    Algorithm 1 (and timm's `SGDP`), which projects only the update and keeps the buffer. With
    `nesterov=True` the update is a new tensor and both forms are the same. On the project page's
    2-D toy the two end at different norms (README, "The toy").

    Differences from the official code are only in how it runs: channels_last and other
    non-contiguous weights work, float16/bfloat16 weights are projected in float32 with float32
    state, the projection decision stays on the device (no host sync), and the per-element work
    is done for all parameters of a group at once.

    `fused` (not in the official code, named as torch's): the multi-tensor step, all parameters of
    a group in one kernel call on the CPU, two Triton launches on CUDA (multi_tensor.py). None (the
    default): on the CPU where a C++ compiler builds the kernel (once per machine), eager on CUDA
    until its kernels have run on a GPU (multi_tensor.FUSED_BY_DEFAULT); True: required (an error
    where unavailable); False: the eager step, PyTorch ops (foreach kernels on CUDA; on the CPU,
    where foreach is a loop anyway, per-tensor ops that do two foreach passes' work in one). Same
    numbers either way (results/bench_optim.md for the speed).
    """

    def __init__(self, params, lr=required, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, eps=1e-8, delta=0.1, wd_ratio=0.1, *, project_buffer=True, fused=None):
        if lr is not required and lr <= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0 or momentum >= 1.0:
            raise ValueError(f"Invalid momentum (SGDP divides weight decay by 1 - momentum): {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio,
                        project_buffer=project_buffer, fused=fused)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # state dicts saved before the option existed: the official form
            group.setdefault("project_buffer", True)

    def _update(self, group, params, grads, index):
        momentum, nesterov = group["momentum"], group["nesterov"]
        bufs = [self._state(p, "momentum") for p in params]
        _momentum_(bufs, grads, momentum, group["dampening"])
        updates = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
        lr = group["lr"]
        self._apply(group, index, params, grads, updates, [lr] * len(params),
                    decay_divisor=1 - momentum, project_updates_in_place=_projects_buffer(group))

    state_names = ("momentum",)

    def _hyper(self, group):
        return dict(lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                    weight_decay=group["weight_decay"], wd_ratio=group["wd_ratio"],
                    decay_divisor=1 - group["momentum"], delta=group["delta"], eps=group["eps"], beta1=0.0,
                    beta2=0.0, adam=False, nesterov=group["nesterov"], project_buffer=_projects_buffer(group))

    def _step_factors(self, group, params):
        return [(group["lr"], 1.0)] * len(params)


def _projects_buffer(group: dict) -> bool:
    """Whether this step writes the projection into the momentum buffer: the official form
    without Nesterov, where the update is the buffer itself."""
    return group["project_buffer"] and not group["nesterov"]


def _momentum_(bufs, grads, momentum: float, dampening: float) -> None:
    """`buf = momentum * buf + (1 - dampening) * grad` for each pair (the official `mul_` then
    `add_`): one pass over each buffer on the CPU when there is no dampening, two foreach
    kernels otherwise."""
    if dampening == 0 and per_tensor(bufs):
        for buf, grad in zip(bufs, grads):
            torch.add(grad, buf, alpha=momentum, out=buf)
    else:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads, alpha=1 - dampening)
