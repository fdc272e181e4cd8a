"""The CUDA path of the multi-tensor step (multi_tensor.triton_step and its Triton kernels,
cuda_kernel.py) on CPU tensors, run by Triton's interpreter. Run by
tests/test_multi_tensor.py::test_cuda_kernels_in_the_triton_interpreter in a process started with
TRITON_INTERPRET=1 (not collected on its own: the interpreter must be on before Triton loads)."""

from __future__ import annotations

import copy
import os

import adamp
import pytest
import timm.optim
import torch
from test_optim import CL, INVARIANT_VIEW, backward, make_net, max_diff, official_view

from projbench.optim import SGDP, AdamP, multi_tensor
from projbench.optim import _base as optim_base

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 from the start of the process", allow_module_level=True)


@pytest.fixture(autouse=True)
def triton_on_the_cpu(monkeypatch):
    """CPU tensors take the CUDA path; small segments (32 elements), so rows span programs."""
    kernels = multi_tensor.cuda_kernel()
    monkeypatch.setattr(kernels, "BLOCK", 16)
    monkeypatch.setattr(kernels, "BLOCKS", 2)
    monkeypatch.setattr(kernels, "SEGMENT", 32)
    monkeypatch.setitem(multi_tensor.BACKENDS, "cpu", multi_tensor.triton_step)
    return kernels


def _forbid_eager(*args, **kwargs):
    raise AssertionError("the eager step ran where the multi-tensor step should have")


# The official forms against adamp 0.3.0; SGDP's Algorithm 1 form (project_buffer=False) against
# timm's SGDP, as in tests/test_optim.py.
CASES = [(SGDP, adamp.SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
         (SGDP, adamp.SGDP, dict(lr=0.1, momentum=0.9, dampening=0.3, nesterov=True, weight_decay=1e-2)),
         (SGDP, timm.optim.SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
         (AdamP, adamp.AdamP, dict(lr=1e-2, nesterov=True, weight_decay=1e-2))]


@pytest.mark.parametrize("cls, official_cls, kw", CASES,
                         ids=["SGDP", "SGDP-nesterov-dampening", "SGDP-alg1", "AdamP-nesterov"])
def test_triton_kernels_match_the_official_code(cls, official_cls, kw, monkeypatch):
    monkeypatch.setattr(optim_base.ProjectedOptimizer, "_apply", _forbid_eager)
    model = make_net()
    ref = copy.deepcopy(model)
    form = dict(project_buffer=False) if official_cls is timm.optim.SGDP else {}
    opt, ref_opt = cls(model.parameters(), fused=True, **form, **kw), official_cls(ref.parameters(), **kw)
    multi = [n for n, p in model.named_parameters() if p.dim() > 1]
    for step in range(2):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            backward(m, step)
        views = {n: official_view(p, p.grad) for n, p in model.named_parameters() if p.dim() > 1}
        assert {n: views[n] for n in INVARIANT_VIEW} == INVARIANT_VIEW
        opt.step()
        ref_opt.step()
        assert opt.last_projection[0].projected.tolist() == [views[n] is not None for n in multi]
    assert max(p[0].numel() for p in model.parameters() if p.dim() > 1) > 32  # rows of two segments or more
    assert max_diff(model, ref) < 1e-8


def test_triton_kernels_step_half_channels_last_weights_as_the_cpu_kernel():
    """float16 weights (channels_last, rows of several segments, 1-D) with float32 state, the
    same gradients: the Triton and the C++ kernels agree to within a rounding or two. (float16,
    not bfloat16: the interpreter rounds float32 to bfloat16 toward zero, a GPU to nearest even.)"""
    runs = []
    for backend in (multi_tensor.triton_step, multi_tensor.cpu_step):
        multi_tensor.BACKENDS["cpu"] = backend
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(16, 8, 3, 3, generator=g).to(torch.float16, memory_format=CL),
                  torch.randn(40, 50, generator=g).half(), torch.randn(100, generator=g).half()]
        params = [p.requires_grad_() for p in params]
        opt = AdamP(params, fused=True, lr=1e-2, weight_decay=1e-2)
        for _ in range(2):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=g) * 1e-2).half()
            opt.step()
        runs.append((params, opt))
    (triton_params, triton_opt), (cpu_params, cpu_opt) = runs
    assert triton_opt.last_projection[0].projected.tolist() == cpu_opt.last_projection[0].projected.tolist()
    for p, q in zip(triton_params, cpu_params):
        assert p.dtype == torch.float16 and p.stride() == q.stride()
        assert (p.float() - q.float()).abs().max() <= 2**-8 * q.abs().max()
        assert all(s.dtype == torch.float32 for s in triton_opt.state[p].values() if torch.is_tensor(s))
