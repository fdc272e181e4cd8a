"""The projection shared by SGDP and AdamP, batched over a list of parameters.

The official `adamp` 0.3.0 code loops over parameters in Python, reshapes with `.view` (which
fails on channels_last weights) and decides `if cos.max() < delta / sqrt(n)` on the host, which
synchronises with the device once per parameter per step. Here the decision is a boolean tensor:

* per-row statistics (g.w, ||g||, ||w||, w.u) of every eligible parameter are written by
  `vector_norm` and by a product-and-row-sum into slices of one preallocated vector (zero-copy row
  views, also for channels_last weights),
* the channel-view test (max over a parameter's rows) and the layer-view test (sums over its
  rows) are a handful of batched ops on those vectors,
* the result is a per-row coefficient `c` such that the projected update is `u - c * w`
  (`c = (w.u) / (||w|| + eps)^2` in the view that passed, 0 where none did), plus a per-parameter
  weight-decay ratio (`wd_ratio` where projected, 1 elsewhere).

Nothing here reads a tensor value on the host, so a step never waits for the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def row_view(x: Tensor, like: Tensor | None = None) -> Tensor:
    """`x` as a 2-D (out_channels, rest) tensor whose rows hold the same elements as
    `x.reshape(x.size(0), -1)`, without a copy when the memory layout allows it.

    Row sums do not depend on the order of elements inside a row, so a dense tensor whose first
    dimension is outermost in memory (contiguous or channels_last) is permuted to memory order
    and viewed. Two tensors reduced together must use the same order: pass `like=` the tensor
    whose order `x` must follow (the weight, for gradients and updates).
    """
    ref = x if like is None else like
    order = _memory_order(ref)
    if order is not None and x.stride() == ref.stride():
        return x.permute(order).reshape(x.size(0), -1)
    permuted = x.permute(order) if order is not None else x
    return permuted.reshape(x.size(0), -1)  # copies: x's layout differs from ref's


def _memory_order(x: Tensor) -> tuple[int, ...] | None:
    """The dim permutation that makes `x` contiguous with dim 0 outermost, if there is one."""
    if x.is_contiguous():
        return tuple(range(x.dim()))
    rest = sorted(range(1, x.dim()), key=lambda d: x.stride(d), reverse=True)
    order = (0, *rest)
    if x.permute(order).is_contiguous():
        return order
    return None


@dataclass
class _Layout:
    """Row bookkeeping for one fixed list of parameter shapes (built once, reused every step)."""

    shapes: tuple[tuple[int, ...], ...]
    row_slices: list[slice]  # each parameter's rows in the per-row vectors
    row_param: Tensor  # (R,) index of the parameter owning each row
    thr_channel: Tensor  # (P,) delta / sqrt(row length)
    thr_layer: Tensor  # (P,) delta / sqrt(numel)
    numel: Tensor  # (P,) elements per parameter (float, for diagnostics)
    stats: Tensor  # (4, R) workspace: g.w, ||g||, ||w||, w.u per row
    max_numel: int  # elements of the largest parameter


def _build_layout(params: list[Tensor], delta: float) -> _Layout:
    device, dtype = params[0].device, _compute_dtype(params[0])
    rows = [p.size(0) for p in params]
    starts = [0]
    for r in rows:
        starts.append(starts[-1] + r)
    row_param = torch.repeat_interleave(torch.arange(len(params)), torch.tensor(rows))
    row_len = [p.numel() // p.size(0) for p in params]
    return _Layout(
        shapes=tuple(tuple(p.shape) for p in params),
        row_slices=[slice(a, b) for a, b in zip(starts[:-1], starts[1:])],
        row_param=row_param.to(device),
        thr_channel=torch.tensor([delta / math.sqrt(n) for n in row_len], dtype=dtype, device=device),
        thr_layer=torch.tensor([delta / math.sqrt(p.numel()) for p in params], dtype=dtype, device=device),
        numel=torch.tensor([float(p.numel()) for p in params], device=device),
        stats=torch.empty(4, starts[-1], dtype=dtype, device=device),
        max_numel=max(p.numel() for p in params),
    )


def _compute_dtype(p: Tensor) -> torch.dtype:
    """float16/bfloat16 weights are projected in float32; float32/float64 in their own dtype."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


class Projector:
    """Computes the projection coefficients for a fixed list of parameters.

    One instance per (param group, set of parameters with gradients); the optimizer rebuilds it
    when that set changes.
    """

    def __init__(self, params: list[Tensor], delta: float, eps: float):
        self.key = tuple(id(p) for p in params) + (delta, eps)
        self.layout = _build_layout(params, delta)
        self.eps = eps

    def coefficients(
        self, weights: list[Tensor], grads: list[Tensor], updates: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Per-row coefficients `c` (so that the projected update is `u - c * w`) and the boolean
        per-parameter mask of parameters that were projected (channel or layer view)."""
        return self.decide(*self._row_stats(weights, grads, updates))

    def _row_stats(self, weights: list[Tensor], grads: list[Tensor], updates: list[Tensor]) -> Tensor:
        lay = self.layout
        gw, g_norm, w_norm, wu = lay.stats
        # Row dot products are a product then a row sum (as in torch.linalg.vecdot); the products
        # go to one scratch buffer per step instead of a fresh tensor per parameter and dot.
        scratch = lay.stats.new_empty(lay.max_numel)
        for w, g, u, rows in zip(weights, grads, updates, lay.row_slices):
            w2 = _rows_in(w, w)
            g2 = _rows_in(g, w)
            prod = scratch[: w2.numel()].view(w2.shape)
            torch.linalg.vector_norm(g2, dim=1, out=g_norm[rows])
            torch.linalg.vector_norm(w2, dim=1, out=w_norm[rows])
            torch.sum(torch.mul(g2, w2, out=prod), dim=1, out=gw[rows])
            torch.sum(torch.mul(w2, _rows_in(u, w), out=prod), dim=1, out=wu[rows])
        return lay.stats

    def decide(self, gw: Tensor, g_norm: Tensor, w_norm: Tensor, wu: Tensor) -> tuple[Tensor, Tensor]:
        """The coefficients and projected mask from the per-row g.w, ||g||, ||w|| and w.u."""
        lay, eps = self.layout, self.eps
        idx = lay.row_param
        use_channel, use_layer, (_, _, ww_l, wu_l) = self._views(gw, g_norm, w_norm, wu)
        coef_channel = wu / (w_norm + eps).square()
        coef_layer = (wu_l / (ww_l.sqrt() + eps).square())[idx]
        coef = torch.where(
            use_channel[idx], coef_channel, torch.where(use_layer[idx], coef_layer, 0.0)
        )
        return coef, use_channel | use_layer

    def views(self, weights: list[Tensor], grads: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per weight, whether it passes the test in the channel view, and whether it passes in
        the layer view only (a weight passes in at most one: the channel view is tried first)."""
        return self._views(*self._row_stats(weights, grads, grads))[:2]

    def _views(self, gw: Tensor, g_norm: Tensor, w_norm: Tensor, wu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Channel-view and layer-view-only masks per weight, and the per-weight sums of g.w,
        ||g||^2, ||w||^2 and w.u (the layer view's statistics)."""
        lay, eps = self.layout, self.eps
        n_params = lay.thr_layer.numel()
        idx = lay.row_param
        # Channel view: cosine per row, then its maximum over each parameter's rows.
        cos_rows = gw.abs() / (g_norm.clamp_min(eps) * w_norm.clamp_min(eps))
        cos_channel = torch.zeros(n_params, dtype=gw.dtype, device=gw.device)
        cos_channel.scatter_reduce_(0, idx, cos_rows, reduce="amax", include_self=False)
        # Layer view: the same quantities summed over all rows of a parameter.
        squares = torch.stack([gw, g_norm.square(), w_norm.square(), wu])
        sums = torch.zeros(4, n_params, dtype=gw.dtype, device=gw.device)
        sums.index_add_(1, idx, squares)
        gw_l, gg_l, ww_l, _ = sums
        cos_layer = gw_l.abs() / (gg_l.sqrt().clamp_min(eps) * ww_l.sqrt().clamp_min(eps))
        use_channel = cos_channel < lay.thr_channel
        use_layer = ~use_channel & (cos_layer < lay.thr_layer)
        return use_channel, use_layer, sums

    def broadcast(self, coef: Tensor, index: int, like: Tensor) -> Tensor:
        """Parameter `index`'s slice of a per-row vector, shaped to broadcast over `like`."""
        rows = coef[self.layout.row_slices[index]]
        return rows.view(-1, *([1] * (like.dim() - 1)))


def _rows_in(x: Tensor, weight: Tensor) -> Tensor:
    """Row view of `x` in `weight`'s memory order, in the projection's compute dtype."""
    rows = row_view(x, like=weight)
    dtype = _compute_dtype(weight)
    return rows if rows.dtype == dtype else rows.to(dtype)
