"""The multi-tensor step (`fused=`): every parameter of a group stepped by a few kernel calls.

The eager step runs a dozen PyTorch ops per weight (moments, two norms, two row dot products,
the decision, decay, step), each a pass over memory and, on CUDA, a launch. Here:

* on the CPU, one call of projected_step.cpp steps the whole group: per weight, a pass for the
  decision's row statistics, then one that updates the moments and steps each row while it is
  in cache (cpu_step);
* on CUDA, two Triton launches (moments and row statistics; the step) around the decision's
  batched torch ops (cuda_kernel.py, triton_step).

Where it is on by default (`fused=None`): FUSED_BY_DEFAULT. On the CPU the kernel is built once
per machine (seconds; cpu_kernel.py) and then loaded from disk, so it pays from the first run.

A parameter qualifies when its elements can be walked as rows in memory order: float32/float64/
bfloat16/float16, dense, with dim 0 outermost (contiguous and channels_last weights; not e.g. a
transposed matrix). Its gradient and state buffers are brought to its layout first when they
differ (a copy, only then). The same state as the eager step, under the same names, so a
checkpoint moves between the paths.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch
from torch import Tensor

from projbench.optim import cpu_kernel
from projbench.optim.projection import _compute_dtype, _memory_order


# Devices where `fused=None` takes the multi-tensor step. CUDA is not among them until its Triton
# kernels have been run and timed on a GPU (scripts/device_checks.sh); `fused=True` runs them.
FUSED_BY_DEFAULT = {"cpu"}


def fusable(p: Tensor) -> bool:
    """Whether `p` can be stepped by the kernel: a supported dtype, walkable as rows in memory order."""
    if p.dtype not in cpu_kernel.DTYPE_CODES:
        return False
    return p.is_contiguous() if p.dim() <= 1 else _memory_order(p) is not None


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether `a` and `b` (same shape) put every element at the same offset (size-1 dims aside)."""
    sa, sb = a.stride(), b.stride()
    return sa == sb or all(x == y for x, y, n in zip(sa, sb, a.shape) if n > 1)


def in_layout_of(x: Tensor, p: Tensor) -> Tensor:
    """`x` with `p`'s memory layout: `x` itself when it has it, else a copy."""
    return x if same_layout(x, p) else torch.empty_like(p, dtype=x.dtype).copy_(x)


def available(device: torch.device) -> str | None:
    """None when the multi-tensor step runs on `device`, else why not."""
    if device.type == "cpu":
        try:
            cpu_kernel.load()
        except cpu_kernel.KernelUnavailable as exc:
            return str(exc)
        return None
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton is not installed"
    return f"no multi-tensor kernel for {device.type} tensors"


_warned: set[str] = set()


def warn_unavailable(reason: str) -> None:
    """Say once per process why the default (fused=None) fell back to the eager step."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"projbench.optim: the multi-tensor step is unavailable, using the eager step ({reason})",
                      RuntimeWarning, stacklevel=4)


@dataclass
class Plan:
    """A group's parameters in kernel order (multi-dimensional first), built once per set."""

    key: tuple
    fusable: bool  # every parameter qualifies; if not, the group steps eagerly and the rest is unset
    params: list[Tensor]
    n_multi: int = 0
    numel: Tensor | None = None  # (n_multi,) float: elements per projected weight, for ProjectionRecord
    kernel_data: object = None  # the backend's own: cpu_kernel.Param array, cuda_kernel.Work


def plan_for(params: list[Tensor]) -> Plan:
    device = params[0].device
    one_dtype = device.type == "cpu" or all(p.dtype == params[0].dtype for p in params)  # Triton: one a group
    if not one_dtype or not all(fusable(p) for p in params):
        return Plan(plan_key(params), False, params)
    multi = [p for p in params if p.dim() > 1]
    numel = torch.tensor([float(p.numel()) for p in multi], device=device)
    return Plan(plan_key(params), True, multi + [p for p in params if p.dim() <= 1], len(multi), numel)


def plan_key(params: list[Tensor]) -> tuple:
    """What a plan depends on: the parameters, their shapes, layouts and dtypes."""
    return tuple((id(p), p.shape, p.stride(), p.dtype) for p in params)


def zeros_state(p: Tensor) -> Tensor:
    """A new state buffer for `p`: zeros in `p`'s layout, float32 for float16/bfloat16 weights."""
    return torch.zeros_like(p, dtype=_compute_dtype(p), memory_format=torch.preserve_format)


def state_buffers(state: dict, p: Tensor, names: tuple[str, ...]) -> list[Tensor]:
    """The named state buffers of `p`, created (zeros, float32 for half weights) or brought to
    `p`'s layout (after loading a checkpoint saved in another layout) as needed."""
    buffers = []
    for name in names:
        buf = state.get(name)
        if buf is None:
            buf = state[name] = zeros_state(p)
        elif not same_layout(buf, p):
            buf = state[name] = in_layout_of(buf, p)
        buffers.append(buf)
    return buffers


def kernel_inputs(plan: Plan, state: dict, names: tuple[str, ...]) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Each parameter's gradient and state buffers in its layout (copies only where they differ)."""
    grads = [in_layout_of(p.grad, p) for p in plan.params]
    return grads, [state_buffers(state[p], p, names) for p in plan.params]


def cpu_step(plan: Plan, hyper: dict, state: dict, names: tuple[str, ...],
             factors: list[tuple[float, float]], decide: Callable) -> Tensor:
    """Step every parameter of `plan` on the CPU (projected_step.cpp, which also decides);
    `factors[i]`: parameter i's (step size, Adam's k). Returns which of the multi-dimensional
    weights were projected (bool tensor)."""
    lib = cpu_kernel.load()
    if plan.kernel_data is None:
        plan.kernel_data = cpu_kernel.params_array(plan.params)
    grads, buffers = kernel_inputs(plan, state, names)
    for s, p, g, bufs, (step_size, k) in zip(plan.kernel_data, plan.params, grads, buffers, factors):
        s.w, s.g, s.s0 = p.data_ptr(), g.data_ptr(), bufs[0].data_ptr()
        s.s1 = bufs[1].data_ptr() if len(bufs) > 1 else None
        s.step_size, s.k = step_size, k
    projected = torch.empty(len(plan.params), dtype=torch.bool)
    lib.projected_step(ctypes.byref(cpu_kernel.Hyper(**hyper, threads=torch.get_num_threads())),
                       plan.kernel_data, len(plan.params), projected.data_ptr())
    return projected[: plan.n_multi]


def cuda_kernel() -> ModuleType:
    """cuda_kernel.py, imported on first use (importing Triton takes a moment)."""
    from projbench.optim import cuda_kernel as module
    return module


def triton_step(plan: Plan, hyper: dict, state: dict, names: tuple[str, ...],
                factors: list[tuple[float, float]], decide: Callable) -> Tensor:
    """Step every parameter of `plan` with the Triton kernels (cuda_kernel.py). `decide(stats)`
    gives per-row coefficients and decay factors and the projected mask from the (4, rows) row
    statistics (the optimizer's eager decision, on the device)."""
    kernels = cuda_kernel()
    device, dtype = plan.params[0].device, plan.params[0].dtype
    state_dtype = _compute_dtype(plan.params[0])
    if plan.kernel_data is None:
        plan.kernel_data = kernels.work_for(plan.params, plan.n_multi)
    work = plan.kernel_data
    grads, buffers = kernel_inputs(plan, state, names)
    ptrs = []
    for p, g, bufs in zip(plan.params, grads, buffers):
        ptrs += [p.data_ptr(), g.data_ptr(), bufs[0].data_ptr(), bufs[-1].data_ptr()]
    plain_decay = decay_factor(hyper, projected=False)
    values = [hyper[name] for name in kernels.HYPER[:-1]] + [plain_decay] + [x for f in factors for x in f]
    table = kernels.upload(values, torch.float64, device)
    ptr_table = kernels.upload(ptrs, torch.int64, device)
    stats = kernels.moments_rows(work, ptr_table, table, hyper, dtype, state_dtype)
    if plan.n_multi:
        coef, decay, projected, row_param = decide(stats)
        if hyper["project_buffer"]:
            scale = decay  # the buffer is projected in place, then w * d - s * b
        else:
            step_size = table[len(kernels.HYPER)::2].to(state_dtype)
            scale = decay + step_size[row_param] * coef
    else:
        coef = scale = stats.new_zeros(0)
        projected = torch.zeros(0, dtype=torch.bool, device=device)
    kernels.step(work, ptr_table, table, coef, scale, hyper, dtype, state_dtype)
    return projected


def decay_factor(hyper: dict, projected: bool) -> float:
    """`1 - lr * wd * ratio / decay_divisor` (ratio wd_ratio for projected weights), 1 without decay."""
    if hyper["weight_decay"] <= 0:
        return 1.0
    ratio = hyper["wd_ratio"] if projected else 1.0
    return 1 - hyper["lr"] * hyper["weight_decay"] * ratio / hyper["decay_divisor"]


BACKENDS = {"cpu": cpu_step, "cuda": triton_step}


def step(plan: Plan, hyper: dict, state: dict, names: tuple[str, ...], factors: list[tuple[float, float]],
         decide: Callable) -> Tensor:
    """The multi-tensor step of one group on its device's backend; which weights were projected."""
    return BACKENDS[plan.params[0].device.type](plan, hyper, state, names, factors, decide)


def adam_factors(lr: float, beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """Adam's step size lr / (1 - beta1^t) and k = 1 / sqrt(1 - beta2^t) at step t."""
    return lr / (1 - beta1**step), 1 / math.sqrt(1 - beta2**step)
