"""The multi-tensor step (`fused=`): every parameter of a group stepped by one kernel call.

The eager step runs a dozen PyTorch ops per weight (moments, two norms, two row dot products,
the decision, decay, step), each a pass over memory and, on CUDA, a launch. Here one call per
group does it all (projected_step.cpp on the CPU): per weight, one pass updates the moments and
accumulates the row statistics, and a second pass, right after it on the same thread while the
weight is still in cache, writes the projected, decayed step. 1-D parameters get one pass.

A parameter qualifies when its elements can be walked as rows in memory order: float32/float64/
bfloat16/float16, dense, with dim 0 outermost (contiguous and channels_last weights; not e.g. a
transposed matrix). Its gradient and state buffers are brought to its layout first when they
differ (a copy, only then). The same state as the eager step, under the same names, so a
checkpoint moves between the paths.
"""

from __future__ import annotations

import ctypes
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from projbench.optim import cpu_kernel
from projbench.optim.projection import _compute_dtype, _memory_order

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def fusable(p: Tensor) -> bool:
    """Whether `p` can be stepped by the kernel: a supported dtype, walkable as rows in memory order."""
    if p.dtype not in DTYPE_CODES:
        return False
    return p.is_contiguous() if p.dim() <= 1 else _memory_order(p) is not None


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether `a` and `b` (same shape) put every element at the same offset (size-1 dims aside)."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def in_layout_of(x: Tensor, p: Tensor) -> Tensor:
    """`x` with `p`'s memory layout: `x` itself when it has it, else a copy."""
    return x if same_layout(x, p) else torch.empty_like(p, dtype=x.dtype).copy_(x)


def available(device: torch.device) -> str | None:
    """None when the multi-tensor step runs on `device`, else why not."""
    if device.type != "cpu":
        return f"no multi-tensor kernel for {device.type} tensors"
    try:
        cpu_kernel.load()
    except cpu_kernel.KernelUnavailable as exc:
        return str(exc)
    return None


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
    structs: ctypes.Array | None = None  # cpu_kernel.Param per parameter; pointers and factors set per step


def plan_for(params: list[Tensor]) -> Plan:
    if not all(fusable(p) for p in params):
        return Plan(plan_key(params), False, params)
    multi = [p for p in params if p.dim() > 1]
    ordered = multi + [p for p in params if p.dim() <= 1]
    structs = (cpu_kernel.Param * len(ordered))()
    for s, p in zip(structs, ordered):
        s.rows = p.size(0) if p.dim() > 1 else 1
        s.cols = p.numel() // s.rows if s.rows else 0
        s.dtype = DTYPE_CODES[p.dtype]
        s.project = p.dim() > 1
    numel = torch.tensor([float(p.numel()) for p in multi], device=params[0].device)
    return Plan(plan_key(params), True, ordered, len(multi), numel, structs)


def plan_key(params: list[Tensor]) -> tuple:
    return tuple((id(p), p.shape, p.dtype) for p in params)


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


def cpu_step(plan: Plan, hyper: cpu_kernel.Hyper, state: dict, names: tuple[str, ...],
             factors: list[tuple[float, float]]) -> Tensor:
    """Step every parameter of `plan` (CPU); `factors[i]`: parameter i's (step size, k).
    Returns which of the multi-dimensional weights were projected (bool tensor)."""
    lib = cpu_kernel.load()
    keep = []  # gradients copied into their parameter's layout: alive until the call returns
    for s, p, (step_size, k) in zip(plan.structs, plan.params, factors):
        g = p.grad
        if not same_layout(g, p):
            g = in_layout_of(g, p)
            keep.append(g)
        buffers = state_buffers(state[p], p, names)
        s.w, s.g = p.data_ptr(), g.data_ptr()
        s.s0 = buffers[0].data_ptr()
        s.s1 = buffers[1].data_ptr() if len(buffers) > 1 else None
        s.step_size, s.k = step_size, k
    hyper.threads = torch.get_num_threads()
    projected = torch.empty(len(plan.params), dtype=torch.bool)
    if lib.projected_step(ctypes.byref(hyper), plan.structs, len(plan.params), projected.data_ptr()):
        raise RuntimeError("projected_step: unsupported dtype")  # fusable() admits none
    return projected[: plan.n_multi]


def adam_factors(lr: float, beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """Adam's step size lr / (1 - beta1^t) and k = 1 / sqrt(1 - beta2^t) at step t."""
    return lr / (1 - beta1**step), 1 / math.sqrt(1 - beta2**step)
