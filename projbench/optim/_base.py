"""What SGDP and AdamP share: gathering a group's parameters, the choice between the multi-tensor
step (`fused`, multi_tensor.py) and the eager one, the cached projector, the projection decision
and decay factors of the eager step, and the record of which weights were projected at the last
step (for diagnostics, kept as tensors)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor
from torch.optim import Optimizer

from projbench.optim import multi_tensor
from projbench.optim.projection import Projector, _compute_dtype

# Devices whose foreach ops are a loop over the tensors (no multi-tensor kernel). There one
# per-tensor op doing the work of two foreach ops is faster: one pass over memory instead of two
# (results/bench_optim.md). Elsewhere (CUDA) a foreach op is one launch for many tensors, and the
# eager step keeps the foreach form. Tests empty this set to run the foreach form on the CPU.
PER_TENSOR_DEVICES = {"cpu"}


def per_tensor(tensors: list[Tensor]) -> bool:
    """Whether the eager step should loop over `tensors` with fused per-tensor ops."""
    return tensors[0].device.type in PER_TENSOR_DEVICES


def uniform(values: list[float]) -> float | list[float]:
    """One scalar when all values agree (the common case: one foreach scalar, no list)."""
    return values[0] if all(v == values[0] for v in values) else values


@dataclass
class ProjectionRecord:
    """Which of a group's multi-dimensional weights were projected at the last step.

    `projected` is a bool tensor on the parameters' device (one entry per weight in `params`);
    nothing has been read to the host, so reading it is the caller's choice of sync point.
    """

    params: list[Tensor]
    projected: Tensor
    numel: Tensor


class ProjectedOptimizer(Optimizer):
    """Base class. Subclasses implement the eager step `_update(group, params, grads, index)` and,
    for the multi-tensor step, name their state buffers (`state_names`) and give the kernel's
    hyperparameters (`_hyper`) and per-parameter step factors (`_step_factors`)."""

    state_names: tuple[str, ...]

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        self._projectors: dict[int, Projector] = {}
        self._plans: dict[int, multi_tensor.Plan] = {}
        self.last_projection: list[ProjectionRecord] = []

    def __setstate__(self, state):
        super().__setstate__(state)
        self._projectors = {}
        self._plans = {}
        self.last_projection = []

    def load_state_dict(self, state_dict):
        """As torch's, but keeps the float32 state of float16/bfloat16 weights float32.

        torch.optim casts every floating-point state tensor to its parameter's dtype on load, which
        would turn that state into half precision; the saved values are put back instead.
        """
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for param_id, p in zip(saved_ids, params):
            dtype = _compute_dtype(p)
            if dtype == p.dtype or param_id not in state_dict["state"]:
                continue
            for key, value in state_dict["state"][param_id].items():
                if torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_projection = []
        for index, group in enumerate(self.param_groups):
            params = params_with_grad(group, type(self).__name__)
            if not params:
                continue
            plan = self._fused_plan(group, params, index)
            if plan is not None:
                self._fused_step(group, plan, index)
            else:
                self._update(group, params, [p.grad for p in params], index)
        return loss

    def _fused_plan(self, group: dict, params: list[Tensor], index: int) -> multi_tensor.Plan | None:
        """The multi-tensor plan of this group, or None when it steps eagerly: `fused` False, or
        None (the default) off multi_tensor.FUSED_BY_DEFAULT or where the kernel is unavailable,
        or a parameter that does not qualify (multi_tensor.fusable). `fused=True` where the
        kernel is unavailable is an error."""
        choice = group.get("fused")
        device = params[0].device
        if choice is False or (choice is None and device.type not in multi_tensor.FUSED_BY_DEFAULT):
            return None
        if any(p.device != device for p in params):
            reason = "parameters on several devices"
        else:
            reason = multi_tensor.available(device)
        if reason is not None:
            if choice:
                raise RuntimeError(f"{type(self).__name__}(fused=True): {reason}")
            multi_tensor.warn_unavailable(reason)
            return None
        plan = self._plans.get(index)
        if plan is None or plan.key != multi_tensor.plan_key(params):
            plan = self._plans[index] = multi_tensor.plan_for(params)
        return plan if plan.fusable else None

    def _fused_step(self, group: dict, plan: multi_tensor.Plan, index: int) -> None:
        """The multi-tensor step of one group (multi_tensor.py)."""
        hyper = self._hyper(group)
        weights = plan.params[: plan.n_multi]

        def decide(stats: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            projector, coef, decay, projected = self._decide(group, index, weights, row_stats=stats,
                                                             decay_divisor=hyper["decay_divisor"])
            return coef, decay, projected, projector.layout.row_param

        factors = self._step_factors(group, plan.params)
        projected = multi_tensor.step(plan, hyper, self.state, self.state_names, factors, decide)
        if plan.n_multi:
            self.last_projection.append(ProjectionRecord(weights, projected, plan.numel))

    def _hyper(self, group: dict) -> dict:
        """The multi-tensor kernels' hyperparameters (the fields of cpu_kernel.Hyper but threads)."""
        raise NotImplementedError

    def _step_factors(self, group: dict, params: list[Tensor]) -> list[tuple[float, float]]:
        """Per parameter (in `params` order): the step size and Adam's k (multi_tensor.cpu_step);
        advances step counters where the optimizer keeps them."""
        raise NotImplementedError

    def _projector(self, index: int, group: dict, weights: list[Tensor]) -> Projector:
        """The projector for this group's current set of multi-dimensional weights."""
        return cached_projector(self._projectors, index, weights, group["delta"], group["eps"])

    def _state(self, p: Tensor, name: str) -> Tensor:
        """A state buffer shaped and laid out like `p`; float32 for float16/bfloat16 weights."""
        state = self.state[p]
        if name not in state:
            state[name] = multi_tensor.zeros_state(p)
        return state[name]

    def _decide(self, group: dict, index: int, weights: list[Tensor], row_stats: Tensor | None = None,
                grads: list[Tensor] | None = None, updates: list[Tensor] | None = None,
                decay_divisor: float = 1.0) -> tuple[Projector, Tensor, Tensor, Tensor]:
        """The projector, per-row projection coefficients `c`, per-row decay factors
        `1 - lr * wd * ratio / decay_divisor` and the projected mask of `weights`.

        The row statistics come from `row_stats` (the Triton kernels' (4, rows) g.w, ||g||^2,
        ||w||^2, w.u) or are computed here from `grads` and `updates`.
        """
        lr, wd = group["lr"], group["weight_decay"]
        projector = self._projector(index, group, weights)
        if row_stats is not None:
            gw, gg, ww, wu = row_stats
            coef, projected = projector.decide(gw, gg.sqrt(), ww.sqrt(), wu)
        else:
            coef, projected = projector.coefficients(weights, grads, updates)
        decay = decay_factors(projector, coef, projected, lr, wd, group["wd_ratio"], decay_divisor)
        return projector, coef, decay, projected

    def _apply(
        self,
        group: dict,
        index: int,
        params: list[Tensor],
        grads: list[Tensor],
        updates: list[Tensor],
        step_sizes: list[float],
        decay_divisor: float,
        project_updates_in_place: bool,
    ) -> None:
        """Project `updates` of the multi-dimensional weights, decay, and step (eager).

        `w <- w * (1 - lr * wd * ratio / decay_divisor) - step_size * (u - c * w)`, with
        `c` and `ratio` from the projector. When `project_updates_in_place` is set (the official
        SGDP without Nesterov, where the update is the momentum buffer itself), the projection is
        written into `updates` too.
        """
        lr, wd = group["lr"], group["weight_decay"]
        multi = [i for i, p in enumerate(params) if p.dim() > 1]
        if multi:
            weights = [params[i] for i in multi]
            projector, coef, decay, projected = self._decide(group, index, weights, grads=[grads[i] for i in multi],
                                                             updates=[updates[i] for i in multi],
                                                             decay_divisor=decay_divisor)
            self.last_projection.append(ProjectionRecord(weights, projected, projector.layout.numel))
            for k, i in enumerate(multi):
                c = projector.broadcast(coef, k, params[i])
                d = projector.broadcast(decay, k, params[i])
                if project_updates_in_place:
                    updates[i].addcmul_(params[i], c, value=-1)
                    if wd > 0:  # d is 1 otherwise: skip a pass over the weight
                        params[i].mul_(d)
                else:
                    # w * d - s * (u - c * w) == w * (d + s * c) - s * u
                    params[i].mul_(d + step_sizes[i] * c)
        single = [i for i, p in enumerate(params) if p.dim() <= 1]
        if single and wd > 0:
            torch._foreach_mul_([params[i] for i in single], 1 - lr * wd / decay_divisor)
        _add_scaled(params, updates, step_sizes)


def params_with_grad(group: dict, optimizer: str) -> list[Tensor]:
    """The group's parameters that have a gradient; sparse gradients are refused."""
    params = [p for p in group["params"] if p.grad is not None]
    if any(p.grad.is_sparse for p in params):
        raise RuntimeError(f"{optimizer} does not support sparse gradients")
    return params


def cached_projector(cache: dict[int, Projector], index: int, weights: list[Tensor], delta: float,
                     eps: float) -> Projector:
    """The projector of param group `index` for its current set of multi-dimensional weights,
    from `cache` (rebuilt, and cached, when that set or delta / eps changed)."""
    key = tuple(id(p) for p in weights) + (delta, eps)
    projector = cache.get(index)
    if projector is None or projector.key != key:
        projector = Projector(weights, delta, eps)
        cache[index] = projector
    return projector


def decay_factors(projector: Projector, coef: Tensor, projected: Tensor, lr: float, wd: float,
                  wd_ratio: float, divisor: float = 1.0) -> Tensor:
    """Per-row decoupled decay factors `1 - lr * wd * ratio / divisor`, ratio `wd_ratio` for the
    weights in `projected` and 1 for the others (ones when `wd` is 0), in `coef`'s dtype and device."""
    if wd <= 0:
        return torch.ones_like(coef)
    # new_full fills on the device; new_tensor would be a blocking host-to-device copy
    ratio = torch.where(projected, coef.new_full((), wd_ratio), 1.0)
    return (1 - lr * wd * ratio / divisor)[projector.layout.row_param]


def _add_scaled(params: list[Tensor], updates: list[Tensor], step_sizes: list[float]) -> None:
    """`p -= step_size * u` for each pair, in one foreach call when the step sizes agree."""
    step_size = uniform(step_sizes)
    if not isinstance(step_size, list):
        torch._foreach_add_(params, updates, alpha=-step_size)
    else:
        for p, u, s in zip(params, updates, step_sizes):
            p.add_(u, alpha=-s)
