"""Fused per-weight kernels for `SGDP(..., compiled=True)` and `AdamP(..., compiled=True)`.

In eager mode a step makes many passes over each multi-dimensional weight and its buffers: the
moment updates (foreach kernels, as torch's own optimizers), two norms and two row dot products
for the projection test (each dot a product written out, then a row sum), the decay and the step.
Here torch.compile (Inductor: C++ on CPU, Triton on CUDA) fuses them into two kernels a weight:

* `*_rows`: update the moment buffers and return the row statistics g.w, ||g||^2, ||w||^2 and
  w.u of the update u they give, reading the gradient, the weight and the buffers once;
* `*_step`: the projected, decayed step `w <- w * a + u * b` with per-row `a` and `b` (SGDP in
  its official form without Nesterov first projects its momentum buffer in place, as the official
  code does; with `project_buffer=False` the buffer is kept, as in the paper's Algorithm 1).

The decision (channel view, layer view or none) stays in projection.py, on the row vectors of the
whole group at once. Shapes are dynamic, and everything that changes from step to step (learning
rate, bias corrections) arrives in per-row tensors, so a run compiles each kernel about twice per
dtype, not per weight shape or per step; changing momentum, betas or eps during a run recompiles
(torch._dynamo falls back to eager, with a warning, after its recompile limit). The first step pays
for the compilation (seconds) and needs what Inductor needs: a C++ compiler on CPU, Triton on CUDA.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from projbench.optim.projection import row_view

_HALF = (torch.float16, torch.bfloat16)


def _stats(g: Tensor, w: Tensor, u: Tensor) -> Tensor:
    return torch.stack([(g * w).sum(1), (g * g).sum(1), (w * w).sum(1), (w * u).sum(1)])


def _f(x: Tensor, like: Tensor) -> Tensor:
    """x in the compute dtype: float32 for half weights (as `like`, a float32 state buffer)."""
    return x if x.dtype == like.dtype else x.to(like.dtype)


def _sgd_rows(g: Tensor, w: Tensor, buf: Tensor, momentum: float, dampening: float, nesterov: bool) -> Tensor:
    g, w = _f(g, buf), _f(w, buf)
    new_buf = buf * momentum + g * (1 - dampening)
    buf.copy_(new_buf)
    return _stats(g, w, g + new_buf * momentum if nesterov else new_buf)


def _sgd_step(p: Tensor, g: Tensor, buf: Tensor, c: Tensor, a: Tensor, b: Tensor, momentum: float,
              nesterov: bool, project_buffer: bool) -> None:
    w = _f(p, buf)
    if project_buffer:  # the official code without Nesterov projects the momentum buffer itself
        projected = buf - c * w
        buf.copy_(projected)
        p.copy_(w * a + projected * b)
    else:  # a = decay + lr * c: the projection is folded into a, the buffer is kept
        p.copy_(w * a + ((_f(g, buf) + buf * momentum) if nesterov else buf) * b)


def _adam_update(g: Tensor, m: Tensor, v: Tensor, k: Tensor, beta1: float, eps: float, nesterov: bool) -> Tensor:
    """Adam's update direction from the new moments; k = 1 / sqrt(1 - beta2^step) per row."""
    denom = v.sqrt() * k + eps
    return (m * beta1 + g * (1 - beta1)) / denom if nesterov else m / denom


def _adam_rows(g: Tensor, w: Tensor, m: Tensor, v: Tensor, k: Tensor, beta1: float, beta2: float, eps: float,
               nesterov: bool) -> Tensor:
    g, w = _f(g, m), _f(w, m)
    new_m = m * beta1 + g * (1 - beta1)
    new_v = v * beta2 + g * g * (1 - beta2)
    m.copy_(new_m)
    v.copy_(new_v)
    return _stats(g, w, _adam_update(g, new_m, new_v, k, beta1, eps, nesterov))


def _adam_step(p: Tensor, g: Tensor, m: Tensor, v: Tensor, k: Tensor, a: Tensor, b: Tensor, beta1: float,
               eps: float, nesterov: bool) -> None:
    p.copy_(_f(p, m) * a + _adam_update(_f(g, m), m, v, k, beta1, eps, nesterov) * b)


_KERNELS = {"sgd_rows": _sgd_rows, "sgd_step": _sgd_step, "adam_rows": _adam_rows, "adam_step": _adam_step}


@functools.cache
def kernel(name: str):
    """The compiled kernel `name` (compiled lazily, once per process and dtype)."""
    return torch.compile(_KERNELS[name], dynamic=True)


def alias_rows(x: Tensor, like: Tensor) -> Tensor | None:
    """`x` as a 2-D (rows, rest) tensor over the same memory, in `like`'s element order, or None
    when that needs a copy (projection.row_view says which layouts do not).

    The result shares x's storage but is not a view in autograd's sense (no `_base`): compiled
    code guards on a view's base (its rank, its 1-sized dims, its strides), which would compile
    again for every kind of layer; a plain 2-D tensor compiles once per dtype.
    """
    rows = row_view(x, like=like)
    if rows.data_ptr() != x.data_ptr() or not rows.is_contiguous():
        return None
    return plain(rows)


def read_rows(x: Tensor, like: Tensor) -> Tensor:
    """A plain 2-D tensor of x's rows for reading: an alias when possible, else a copy."""
    rows = alias_rows(x, like)
    return rows if rows is not None else row_view(x, like=like).contiguous()


def plain(x: Tensor) -> Tensor:
    """A tensor over x's memory with x's shape and strides, but no autograd base (see alias_rows)."""
    return x.new_empty(0).set_(x.untyped_storage(), x.storage_offset(), x.shape, x.stride())


def per_row(like: Tensor, rows: list[slice], values: list[float]) -> Tensor:
    """A per-row vector holding values[i] on parameter i's rows, filled on the device (a tensor
    built from a host list would be a blocking copy on CUDA)."""
    if all(v == values[0] for v in values):
        return like.new_full(like.shape, values[0])
    out = torch.empty_like(like)
    for sl, v in zip(rows, values):
        out[sl].fill_(v)
    return out


def column(x: Tensor, rows: slice) -> Tensor:
    """Rows `rows` of a per-row vector as a plain (n, 1) column, to broadcast over a row view."""
    return plain(x[rows].unsqueeze(1))
