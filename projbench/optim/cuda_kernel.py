"""The multi-tensor step on CUDA: two Triton launches for all parameters of a group.

1. `_moments_rows`: one program per segment (up to SEGMENT elements) of each row of every
   multi-dimensional weight updates the moments and writes the segment's g.w, ||g||^2, ||w||^2
   and w.u; a row's segments are summed in a fixed order (deterministic, no atomics);
2. the decision (projection.Projector.decide, a handful of batched torch ops on those rows) gives
   each row its coefficient c and decay d, on the device;
3. `_step`: the same programs step each segment (`w <- w * (d + s * c) - s * u`, or for the
   official SGDP without Nesterov the momentum buffer projected in place first); one program per
   SEGMENT elements of every 1-D parameter does its moments, decay and step.

The programs find their tensors through a table of addresses and their hyperparameters and step
factors in a float64 table (both uploaded each step from pinned memory, without waiting:
gradients move and the learning rate changes between steps; Triton would pass Python floats as
float32), and their rows through a work table built once per set of parameters. Nothing is read back to the host. One dtype per group (else the
group steps eagerly). Triton compiles each variant (dtype, Adam or SGD, Nesterov, buffer
projection) on first use and caches it on disk.

Checked in Triton's interpreter on the CPU (tests/test_multi_tensor.py); not yet run or timed on a
GPU, hence not the default on CUDA (multi_tensor.FUSED_BY_DEFAULT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024  # elements a program handles at a time
BLOCKS = 4  # blocks per program: a program covers up to SEGMENT elements
SEGMENT = BLOCK * BLOCKS

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
              torch.float16: tl.float16}


@triton.jit
def _update(g, m, v, k, momentum, beta1, eps, ADAM: tl.constexpr, NESTEROV: tl.constexpr):
    """The update u from the new moments (SGD: m is the momentum buffer)."""
    if ADAM:
        if NESTEROV:
            u = (beta1 * m + (1 - beta1) * g) / (tl.sqrt(v) * k + eps)
        else:
            u = m / (tl.sqrt(v) * k + eps)
    else:
        if NESTEROV:
            u = g + momentum * m
        else:
            u = m
    return u


@triton.jit
def _moments(g, s0_ptr, s1_ptr, idx, mask, momentum, dampening, beta1, beta2, ADAM: tl.constexpr):
    """Update and store the moments of elements `idx`; returns them (SGD: the buffer twice)."""
    if ADAM:
        m = beta1 * tl.load(s0_ptr + idx, mask=mask, other=0.0) + (1 - beta1) * g
        v = beta2 * tl.load(s1_ptr + idx, mask=mask, other=0.0) + (1 - beta2) * g * g
        tl.store(s0_ptr + idx, m, mask=mask)
        tl.store(s1_ptr + idx, v, mask=mask)
    else:
        m = momentum * tl.load(s0_ptr + idx, mask=mask, other=0.0) + (1 - dampening) * g
        tl.store(s0_ptr + idx, m, mask=mask)
        v = m
    return m, v


# The float64 table: these hyperparameters, then (step size, k) per parameter.
HYPER = ("momentum", "dampening", "beta1", "beta2", "eps", "plain_decay")


@triton.jit
def _hyper(table, S_DTYPE: tl.constexpr):
    return (tl.load(table).to(S_DTYPE), tl.load(table + 1).to(S_DTYPE), tl.load(table + 2).to(S_DTYPE),
            tl.load(table + 3).to(S_DTYPE), tl.load(table + 4).to(S_DTYPE), tl.load(table + 5).to(S_DTYPE))


@triton.jit
def _program(work, ptrs, table, W_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr):
    """This program's work-table entry: its row (or -1), statistics slot, first element and
    elements, its parameter's tensors and step factors (step size, k)."""
    pid = tl.program_id(0)
    param = tl.load(work + pid * 5)
    row = tl.load(work + pid * 5 + 1)
    slot = tl.load(work + pid * 5 + 2)
    start = tl.load(work + pid * 5 + 3)
    n = tl.load(work + pid * 5 + 4)
    w_ptr = tl.load(ptrs + param * 4).to(tl.pointer_type(W_DTYPE))
    g_ptr = tl.load(ptrs + param * 4 + 1).to(tl.pointer_type(W_DTYPE))
    s0_ptr = tl.load(ptrs + param * 4 + 2).to(tl.pointer_type(S_DTYPE))
    s1_ptr = tl.load(ptrs + param * 4 + 3).to(tl.pointer_type(S_DTYPE))
    s = tl.load(table + 6 + param * 2).to(S_DTYPE)
    k = tl.load(table + 6 + param * 2 + 1).to(S_DTYPE)
    return row, slot, start, n, w_ptr, g_ptr, s0_ptr, s1_ptr, s, k


@triton.jit
def _block(w_ptr, g_ptr, start, b, n, S_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Block b of a program's elements: indices, mask, weights and gradients (compute dtype)."""
    lane = b * BLOCK + tl.arange(0, BLOCK)
    mask = lane < n
    idx = start + lane
    w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(S_DTYPE)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(S_DTYPE)
    return idx, mask, w, g


@triton.jit
def _moments_rows(ptrs, table, work, stats, n_slots, W_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                  ADAM: tl.constexpr, NESTEROV: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    _, slot, start, n, w_ptr, g_ptr, s0_ptr, s1_ptr, _, k = _program(work, ptrs, table, W_DTYPE, S_DTYPE)
    momentum, dampening, beta1, beta2, eps, _ = _hyper(table, S_DTYPE)
    gw = tl.zeros([BLOCK], S_DTYPE)
    gg = tl.zeros([BLOCK], S_DTYPE)
    ww = tl.zeros([BLOCK], S_DTYPE)
    wu = tl.zeros([BLOCK], S_DTYPE)
    for b in range(BLOCKS):
        if b * BLOCK < n:
            idx, mask, w, g = _block(w_ptr, g_ptr, start, b, n, S_DTYPE, BLOCK)
            m, v = _moments(g, s0_ptr, s1_ptr, idx, mask, momentum, dampening, beta1, beta2, ADAM)
            u = _update(g, m, v, k, momentum, beta1, eps, ADAM, NESTEROV)
            gw += g * w
            gg += g * g
            ww += w * w
            wu += tl.where(mask, w * u, 0.0)
    tl.store(stats + slot, tl.sum(gw, 0))
    tl.store(stats + n_slots + slot, tl.sum(gg, 0))
    tl.store(stats + 2 * n_slots + slot, tl.sum(ww, 0))
    tl.store(stats + 3 * n_slots + slot, tl.sum(wu, 0))


@triton.jit
def _step(ptrs, table, work, coef, scale, W_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, ADAM: tl.constexpr,
          NESTEROV: tl.constexpr, PROJECT_BUFFER: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    row, _, start, n, w_ptr, g_ptr, s0_ptr, s1_ptr, s, k = _program(work, ptrs, table, W_DTYPE, S_DTYPE)
    momentum, dampening, beta1, beta2, eps, plain_decay = _hyper(table, S_DTYPE)
    if row >= 0:  # a segment of a multi-dimensional weight's row: moments updated by _moments_rows
        c = tl.load(coef + row)
        a = tl.load(scale + row)  # the decay (buffer projection) or decay + s * c
        for b in range(BLOCKS):
            if b * BLOCK < n:
                idx, mask, w, g = _block(w_ptr, g_ptr, start, b, n, S_DTYPE, BLOCK)
                m = tl.load(s0_ptr + idx, mask=mask, other=0.0)
                if ADAM:
                    v = tl.load(s1_ptr + idx, mask=mask, other=0.0)
                else:
                    v = m
                u = _update(g, m, v, k, momentum, beta1, eps, ADAM, NESTEROV)
                if PROJECT_BUFFER:
                    u = u - c * w
                    tl.store(s0_ptr + idx, u, mask=mask)
                tl.store(w_ptr + idx, (w * a - s * u).to(W_DTYPE), mask=mask)
    else:  # a segment of a 1-D parameter: moments, decay and step
        for b in range(BLOCKS):
            if b * BLOCK < n:
                idx, mask, w, g = _block(w_ptr, g_ptr, start, b, n, S_DTYPE, BLOCK)
                m, v = _moments(g, s0_ptr, s1_ptr, idx, mask, momentum, dampening, beta1, beta2, ADAM)
                u = _update(g, m, v, k, momentum, beta1, eps, ADAM, NESTEROV)
                tl.store(w_ptr + idx, (w * plain_decay - s * u).to(W_DTYPE), mask=mask)


@dataclass
class Work:
    """A group's programs, one row of `table` each: (parameter, row or -1, statistics slot or -1,
    first element, elements); those of the multi-dimensional weights' rows first."""

    table: Tensor  # (programs, 5) int64 on the device
    n_segment_programs: int  # programs of _moments_rows
    n_rows: int
    segments: int  # statistics slots per row (the most segments of any row)


def work_for(params: list[Tensor], n_multi: int) -> Work:
    cols = [p.numel() // p.size(0) for p in params[:n_multi]]
    segments = max([-(-c // SEGMENT) for c in cols], default=1)
    entries, row = [], 0
    for i, (p, c) in enumerate(zip(params, cols)):
        for r in range(p.size(0)):
            entries += [(i, row, row * segments + k, r * c + start, min(SEGMENT, c - start))
                        for k, start in enumerate(range(0, c, SEGMENT))]
            row += 1
    n_segment_programs = len(entries)
    for i, p in enumerate(params[n_multi:], n_multi):
        entries += [(i, -1, -1, start, min(SEGMENT, p.numel() - start)) for start in range(0, p.numel(), SEGMENT)]
    table = torch.tensor(entries, dtype=torch.int64).view(-1, 5).to(params[0].device)
    return Work(table, n_segment_programs, row, segments)


def upload(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host list on the device without waiting for it (pinned memory, asynchronous copy)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def moments_rows(work: Work, ptrs: Tensor, table: Tensor, flags: dict, dtype: torch.dtype,
                 state_dtype: torch.dtype) -> Tensor:
    """Pass 1: the moments of every multi-dimensional weight and its (4, rows) statistics."""
    slots = torch.zeros(4, work.n_rows * work.segments, dtype=state_dtype, device=ptrs.device)
    if work.n_segment_programs:
        _moments_rows[(work.n_segment_programs,)](
            ptrs, table, work.table, slots, slots.size(1), W_DTYPE=_TL_DTYPES[dtype],
            S_DTYPE=_TL_DTYPES[state_dtype], ADAM=flags["adam"], NESTEROV=flags["nesterov"], BLOCK=BLOCK,
            BLOCKS=BLOCKS)
    return slots if work.segments == 1 else slots.view(4, work.n_rows, work.segments).sum(2)


def step(work: Work, ptrs: Tensor, table: Tensor, coef: Tensor, scale: Tensor, flags: dict, dtype: torch.dtype,
         state_dtype: torch.dtype) -> None:
    """Pass 2: every row segment and every 1-D segment (`coef`, `scale`: per row, see _step)."""
    _step[(work.table.size(0),)](ptrs, table, work.table, coef, scale, W_DTYPE=_TL_DTYPES[dtype],
                                 S_DTYPE=_TL_DTYPES[state_dtype], ADAM=flags["adam"], NESTEROV=flags["nesterov"],
                                 PROJECT_BUFFER=flags["project_buffer"], BLOCK=BLOCK, BLOCKS=BLOCKS)
