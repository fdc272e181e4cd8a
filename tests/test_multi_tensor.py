"""The multi-tensor step (`fused`, projbench/optim/multi_tensor.py): what tests/test_optim.py does
not reach through the small test model: weights split over threads, every view on large weights,
mixed dtypes in a group, checkpoints moving between the paths, a machine without a compiler, and
the CUDA (Triton) kernels, run here on the CPU by Triton's interpreter.
(tests/test_optim.py runs the official comparison, layouts and half weights on the CPU path too.)"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_optim import CL, make_net, max_diff, roundtrip, train

from projbench.optim import SGDP, AdamP, cpu_kernel
from projbench.optim import _base as optim_base

INTERPRETED = Path(__file__).with_name("triton_interpreted.py")

KINDS = [(SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
         (SGDP, dict(lr=0.1, momentum=0.9, nesterov=True, dampening=0.1, weight_decay=1e-2)),
         (AdamP, dict(lr=1e-2, weight_decay=1e-2)),
         (AdamP, dict(lr=1e-2, nesterov=True, weight_decay=1e-2))]
KIND_IDS = ["SGDP", "SGDP-nesterov-dampening", "AdamP", "AdamP-nesterov"]


def orthogonal(g: torch.Tensor, w: torch.Tensor, rows: int) -> torch.Tensor:
    """`g` without its component along `w`, per row (rows = w.size(0)) or whole (rows = 1): what
    a weight followed by BatchNorm (per row) or LayerNorm (whole) gets."""
    g2, w2 = g.reshape(rows, -1), w.reshape(rows, -1)
    return (g2 - w2 * (g2 * w2).sum(1, keepdim=True) / (w2 * w2).sum(1, keepdim=True)).reshape(g.shape)


def large_params(dtype=torch.float64) -> list[torch.Tensor]:
    """Weights of 90000 elements in each view, a 1-D parameter of 100000, and small ones: with
    six threads the large ones are above the kernel's split threshold (a thread's fair share of
    the group's elements, at least 65536), the small ones are shared out over the threads."""
    g = torch.Generator().manual_seed(0)
    shapes = [(300, 300), (300, 300), (300, 300), (100_000,), (16, 8, 3, 3), (16, 8, 3, 3), (16,)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def set_grads(params: list[torch.Tensor], step: int) -> None:
    """Channel-view gradients for weights 0 and 4, layer view for 1, random for the rest."""
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * 1e-2
        w = p.detach().double()
        if i in (0, 4):
            grad = orthogonal(grad, w, p.size(0))
        elif i == 1:
            grad = orthogonal(grad, w, 1)
        p.grad = grad.to(p.dtype)


@pytest.fixture
def six_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(6)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cls, kw", KINDS, ids=KIND_IDS)
def test_split_weights_match_the_eager_step(cls, kw, six_threads):
    """With six threads the large weights are split by rows over all of them: same numbers as
    eager, and the same decision (channel, layer, none) for every weight."""
    runs = []
    for fused in (False, True):
        params = large_params()
        opt = cls(params, fused=fused, **kw)
        records = []
        for step in range(4):
            set_grads(params, step)
            opt.step()
            records.append(opt.last_projection[0].projected.tolist())
        runs.append((params, records))
    (eager, eager_records), (fused, fused_records) = runs
    assert fused_records == eager_records
    assert fused_records[-1] == [True, True, False, True, False]  # channel, layer, none; the 1-D ones have none
    for p, q in zip(eager, fused):
        assert (p - q).abs().max() < 1e-12


@pytest.mark.parametrize("cls, kw", KINDS[::2], ids=KIND_IDS[::2])
def test_mixed_dtypes_in_one_group(cls, kw):
    """float32, float64 and bfloat16 parameters in one group, each stepped in its own dtype: the
    numbers of the eager step with one group per dtype (the eager step needs one dtype a group)."""
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float64, torch.bfloat16, torch.float32]
    runs = []
    for fused in (False, True):
        params = [p.detach().to(dt).requires_grad_() for p, dt in zip(large_params(), dtypes)]
        groups = [{"params": [p for p in params if p.dtype == dt]} for dt in set(dtypes)] if not fused else params
        opt = cls(groups, fused=fused, **kw)
        for step in range(3):
            set_grads(params, step)
            opt.step()
        runs.append(params)
    for p, q in zip(*runs):
        assert p.dtype == q.dtype
        tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[p.dtype]
        assert (p.double() - q.double()).abs().max() < tol * p.abs().max()


@pytest.mark.parametrize("dtype, memory_format", [(torch.float64, torch.contiguous_format), (torch.bfloat16, CL)],
                         ids=["float64", "bfloat16-channels_last"])
@pytest.mark.parametrize("cls, kw", KINDS[::2], ids=KIND_IDS[::2])
@pytest.mark.parametrize("first, then", [(False, True), (True, False)], ids=["eager-to-fused", "fused-to-eager"])
def test_checkpoint_moves_between_eager_and_fused(cls, kw, dtype, memory_format, first, then):
    """A state dict saved by one path resumes on the other: same keys, dtypes and layouts, and
    the run continues as if it had not switched."""
    fmt = dict(dtype=dtype, memory_format=memory_format)
    model = make_net(**fmt)
    opt = cls(model.parameters(), fused=first, **kw)
    train(model, opt, 4, **fmt)
    resumed = copy.deepcopy(model)
    resumed_opt = cls(resumed.parameters(), fused=then, **kw)
    resumed_opt.load_state_dict(roundtrip(opt.state_dict()))
    assert resumed_opt.param_groups[0]["fused"] is first  # as torch does: the saved settings come back
    resumed_opt.param_groups[0]["fused"] = then
    train(model, opt, 4, start=4, **fmt)
    train(resumed, resumed_opt, 4, start=4, **fmt)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert opt.state[p].keys() == resumed_opt.state[q].keys()
        for key, s in opt.state[p].items():
            t = resumed_opt.state[q][key]
            if torch.is_tensor(s):
                assert t.dtype == s.dtype and t.stride() == s.stride()
            else:
                assert t == s
    assert max_diff(model, resumed) < (1e-10 if dtype == torch.float64 else 0.05)


def test_state_in_another_layout_is_brought_to_the_weights(monkeypatch):
    """A checkpoint saved with contiguous weights, loaded for channels_last ones: the fused step
    lays the state out as the weights (once) and gives the numbers of the contiguous run."""
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    dense, cl = make_net(), make_net(memory_format=CL)
    opt = SGDP(dense.parameters(), fused=True, **kw)
    train(dense, opt, 3)
    cl.load_state_dict(dense.state_dict())
    cl_opt = SGDP(cl.parameters(), fused=True, **kw)
    cl_opt.load_state_dict(roundtrip(opt.state_dict()))
    assert not cl_opt.state[cl.conv1.weight]["momentum"].is_contiguous(memory_format=CL)
    train(dense, opt, 3, start=3)
    train(cl, cl_opt, 3, start=3, memory_format=CL)
    assert cl_opt.state[cl.conv1.weight]["momentum"].is_contiguous(memory_format=CL)
    assert max_diff(dense, cl) < 1e-10


def unavailable(monkeypatch, reason="no C++ compiler found (test)"):
    monkeypatch.setattr(cpu_kernel, "_load", lambda: cpu_kernel.KernelUnavailable(reason))
    monkeypatch.setattr(optim_base.multi_tensor, "_warned", set())


def test_without_a_compiler_the_default_steps_eagerly_and_says_so(monkeypatch):
    unavailable(monkeypatch)
    model = make_net()
    ref = copy.deepcopy(model)
    opt, ref_opt = SGDP(model.parameters(), lr=0.1, momentum=0.9), SGDP(ref.parameters(), lr=0.1, momentum=0.9, fused=False)
    with pytest.warns(RuntimeWarning, match=r"multi-tensor step is unavailable.*no C\+\+ compiler found"):
        train(model, opt, 2)
    train(ref, ref_opt, 2)
    assert max_diff(model, ref) == 0
    with pytest.raises(RuntimeError, match=r"SGDP\(fused=True\): no C\+\+ compiler found"):
        train(model, SGDP(model.parameters(), lr=0.1, fused=True), 1)


def test_a_failing_build_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setenv("PROJBENCH_KERNEL_CACHE", str(tmp_path))
    cxx = cpu_kernel.compiler()
    assert cxx is not None and cxx.endswith("false")
    path = cpu_kernel.library_path(cxx)
    assert path.parent == tmp_path and path.name.startswith("projected_step_")
    with pytest.raises(cpu_kernel.KernelUnavailable, match=r"building projected_step.cpp with .*false failed"):
        cpu_kernel.build(cxx, path)
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert cpu_kernel.compiler() is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_weights_are_rounded_once_to_nearest_even(dtype):
    """The kernel computes in float32 and rounds each new weight once, as torch's casts do."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(100_000, generator=g).to(dtype).requires_grad_()
    w.grad = (torch.randn(100_000, generator=g) * 1e-2).to(dtype)
    expected = (w.detach().float() - 0.1 * w.grad.float()).to(dtype)
    SGDP([w], lr=0.1, fused=True).step()  # no momentum, no decay, 1-D: w - lr * g
    assert torch.equal(w.detach(), expected)



def test_cuda_kernels_in_the_triton_interpreter():
    """The CUDA path (multi_tensor.triton_step, cuda_kernel.py) on CPU tensors, its kernels run
    by Triton's interpreter, which has to be switched on before Triton is first imported: so in
    a process of its own (tests/triton_interpreted.py)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(INTERPRETED)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


def test_a_weight_changing_layout_is_planned_again():
    """`p.data` replaced by a transposed copy (same shape, rows no longer in memory order): the
    group leaves the kernel for the eager step instead of walking the new memory as rows."""
    torch.manual_seed(0)
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
        opt = SGDP([w], lr=0.1, momentum=0.9, weight_decay=1e-2, fused=fused)
        for step in range(4):
            if step == 2:
                w.data = w.data.t().contiguous().t()
            g = torch.randn(6, 5, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
            w.grad = orthogonal(g, w.detach(), 6)  # the channel view: per-row coefficients matter
            opt.step()
            assert opt.last_projection[0].projected.tolist() == [True]
        runs.append(w)
    assert not runs[1].is_contiguous()
    assert (runs[0] - runs[1]).abs().max() < 1e-12
