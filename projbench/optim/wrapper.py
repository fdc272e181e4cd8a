"""`Projected`: the paper's projection applied to the step of any torch optimizer.

The paper argues that its projection helps every momentum optimizer on scale-invariant weights,
but builds it into SGD and Adam only (SGDP, AdamP). `Projected(params, inner=timm.optim.Lion,
lr=1e-4, weight_decay=1.0)` lets the inner optimizer do its own math, untouched, and treats the
step it took:

1. copy every weight `w` it will step (into buffers kept between steps);
2. `inner.step()`, with the inner optimizer's own weight decay at 0;
3. `u = w_new - w`: the step taken (exact in floating point wherever `w_new` is within a factor
   2 of `w`, i.e. for every ordinary step);
4. for each multi-dimensional weight, the paper's scale-invariance test on the gradient and the
   weight before the step (channel view, then layer view; projbench.optim.projection.Projector,
   shared with SGDP / AdamP, no host sync), and where it passes, the projection of the step
   off the weight: `u - c w`, `c = (w.u) / (||w|| + eps)^2`;
5. decoupled weight decay, owned by the wrapper: `w <- w (1 - lr * wd * ratio) + u_projected`,
   `ratio = wd_ratio` for projected weights and 1 for every other parameter.

Why the wrapper owns the decay: an inner optimizer's decay is either coupled (L2 added to the
gradient, which then passes through its moments: nothing after the step can tell it apart from
the gradient) or part of its step (decoupled: the projection would remove it from projected
weights entirely, where the paper keeps `wd_ratio` of it). So the inner optimizer runs with
`weight_decay=0` and the wrapper applies the paper's decay, in torch AdamW's convention
(`decoupled_lr` in projbench/decay.py), to every parameter.

What this reproduces (tests/test_wrapper.py, float64): `Projected(inner=torch.optim.Adam)` is
AdamP; `Projected(inner=torch.optim.SGD, momentum=m)` with `weight_decay = wd / (1 - m)` is SGDP
in the paper's Algorithm 1 form (the update projected, the momentum buffer kept), and with
`nesterov=True` the official SGDP itself. It is not the official SGDP without Nesterov, which
projects the momentum buffer in place: the wrapper never touches the inner optimizer's state.

The shared param-group dicts: the wrapper's param groups are the inner optimizer's (an lr
scheduler, GradScaler or `zero_grad` acting on either acts on both); the wrapper's own values live
in them under `proj_*` keys, so that they never collide with the inner optimizer's arguments.
A group given with `weight_decay`, `delta`, `wd_ratio` or `projection_eps` (e.g. the no-decay
group of `no_decay_bias_norm`) sets the wrapper's value for that group.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from projbench.optim._base import ProjectionRecord, cached_projector, decay_factors, params_with_grad

# constructor argument -> its key in the shared param-group dicts
GROUP_KEYS = {"weight_decay": "proj_weight_decay", "delta": "proj_delta", "wd_ratio": "proj_wd_ratio",
              "projection_eps": "proj_eps"}


def resolve_optimizer(inner: str | Callable[..., Optimizer]) -> Callable[..., Optimizer]:
    """An optimizer class (or factory) given as itself or as a dotted path, e.g. "timm.optim.Lion"."""
    if not isinstance(inner, str):
        return inner
    module, _, name = inner.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"inner optimizer {inner!r} cannot be imported: {exc}") from exc


class Projected(Optimizer):
    """The paper's projection and decay ratio on the steps of the optimizer `inner`.

    `inner`: an optimizer class (or its dotted path); `**inner_kwargs` go to it unchanged (lr,
    betas, momentum, ...), with `weight_decay=0`. `weight_decay` is the wrapper's decoupled
    decay, `w *= 1 - lr * wd * ratio` per step; `delta`, `wd_ratio`: the paper's test threshold
    and decay ratio; `projection_eps`: the eps of the test and the projection (the official
    code's `eps`, which SGDP and AdamP share with the base optimizer).

    `last_projection` records which weights were projected at the last step, as SGDP / AdamP do.
    State: the inner optimizer's (`state_dict()` is its, with the `proj_*` group keys), plus one
    buffer per stepped weight for the copy of step 1 (not saved: it is rewritten every step).
    The inner optimizer must leave `p.grad` unchanged (torch's and timm's do): the test reads the
    gradient after its step.
    """

    def __init__(self, params, inner: str | Callable[..., Optimizer], weight_decay: float = 0.0,
                 delta: float = 0.1, wd_ratio: float = 0.1, projection_eps: float = 1e-8, **inner_kwargs: Any):
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= wd_ratio <= 1.0:
            raise ValueError(f"Invalid wd_ratio (a share of the weight decay): {wd_ratio}")
        self._own = {GROUP_KEYS["weight_decay"]: weight_decay, GROUP_KEYS["delta"]: delta,
                     GROUP_KEYS["wd_ratio"]: wd_ratio, GROUP_KEYS["projection_eps"]: projection_eps}
        groups = list(params)
        if not groups or not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.inner = resolve_optimizer(inner)([self._claim(g) for g in groups], weight_decay=0.0, **inner_kwargs)
        if "wd_ratio" in self.inner.defaults or "delta" in self.inner.defaults:
            raise ValueError(f"{type(self.inner).__name__} projects its updates itself: wrap its base optimizer instead")
        super().__init__(self.inner.param_groups, {**self.inner.defaults, **self._own})
        self.state = self.inner.state
        self._projectors: dict = {}
        self._copies: dict[Tensor, Tensor] = {}
        self.last_projection: list[ProjectionRecord] = []

    def _claim(self, group: dict) -> dict:
        """A copy of `group` with the wrapper's values under their `proj_*` keys."""
        group = dict(group)
        for arg, key in GROUP_KEYS.items():
            group[key] = group.pop(arg) if arg in group else group.get(key, self._own[key])
        return group

    def add_param_group(self, param_group: dict) -> None:
        """Adds the group to the inner optimizer and shares its dict (torch's Optimizer.__init__
        adds the inner optimizer's own groups through here too)."""
        if not any(param_group is g for g in self.inner.param_groups):
            self.inner.add_param_group(self._claim(param_group))
            param_group = self.inner.param_groups[-1]
        super().add_param_group(param_group)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict)
        # the inner optimizer rebuilt its group dicts: share the new ones
        self.param_groups = list(self.inner.param_groups)
        self.state = self.inner.state
        self._projectors.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = []
        for group in self.param_groups:
            params = params_with_grad(group, "Projected")
            # 1-D parameters are never projected: their step needs no change without decay
            tracked = [p for p in params if p.dim() > 1 or group[GROUP_KEYS["weight_decay"]] > 0]
            copies = [self._copy_buffer(p) for p in tracked]
            if tracked:
                torch._foreach_copy_(copies, tracked)
            stepped.append((tracked, copies))
        self.inner.step()
        self.last_projection = []
        for index, (group, (tracked, copies)) in enumerate(zip(self.param_groups, stepped)):
            if tracked:
                self._treat_step(index, group, tracked, copies)
        return loss

    def _copy_buffer(self, p: Tensor) -> Tensor:
        """The buffer that holds `p` before the step: same dtype and memory layout, reused."""
        buf = self._copies.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.stride() != p.stride():
            buf = torch.empty_like(p, memory_format=torch.preserve_format)
            self._copies[p] = buf
        return buf

    def _treat_step(self, index: int, group: dict, params: list[Tensor], before: list[Tensor]) -> None:
        """Project and decay the step the inner optimizer took from `before` to `params`."""
        lr, wd = group["lr"], group[GROUP_KEYS["weight_decay"]]
        torch._foreach_sub_(params, before)  # each parameter now holds its step u
        multi = [i for i, p in enumerate(params) if p.dim() > 1]
        if multi:
            weights = [params[i] for i in multi]
            projector = cached_projector(self._projectors, index, weights, group[GROUP_KEYS["delta"]],
                                         group[GROUP_KEYS["projection_eps"]])
            coef, projected = projector.coefficients([before[i] for i in multi], [p.grad for p in weights], weights)
            self.last_projection.append(ProjectionRecord(weights, projected, projector.layout.numel))
            decay = decay_factors(projector, coef, projected, lr, wd, group[GROUP_KEYS["wd_ratio"]])
            factor = decay - coef  # w d + (u - c w) == u + (d - c) w
            for k, i in enumerate(multi):
                params[i].addcmul_(before[i], projector.broadcast(factor, k, params[i]))
        single = [i for i, p in enumerate(params) if p.dim() <= 1]
        if single:
            torch._foreach_add_([params[i] for i in single], [before[i] for i in single], alpha=1 - lr * wd)
