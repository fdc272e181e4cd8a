"""The projection wrapper (projbench.optim.wrapper.Projected): around torch's Adam it is AdamP,
around torch's SGD it is SGDP in the paper's Algorithm 1 form (and the official SGDP with
Nesterov), in float64; and it behaves as SGDP / AdamP do in a training loop (channels_last, half
weights, GradScaler, checkpoints, no host-device sync in `step()`)."""

from __future__ import annotations

import copy
import math

import adamp
import pytest
import timm.optim
import torch
from torch import nn

from projbench.optim import AdamP, SGDP
from projbench.optim.wrapper import Projected
from test_optim import (CL, DELTA, EPS, HALF_TOL, NOISE_ONLY, Branches, _forbid, backward, batch, loss_fn,
                        make_net, max_diff, roundtrip, steps_without_sync, train)

WD = 1e-2


def close(a: nn.Module, b: nn.Module, tol: float = 1e-12, noise_tol: float = 1e-8) -> None:
    """Every parameter of `a` within `tol` of `b`'s (`noise_tol` for the rounding-noise-only bias)."""
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        noise_only = any(name.endswith(n) for n in NOISE_ONLY)
        assert (p - q).abs().max() < (noise_tol if noise_only else tol), name


def projected_flags(opt) -> list[list[bool]]:
    return [r.projected.tolist() for r in opt.last_projection]


@pytest.mark.parametrize("wd", [0.0, WD])
def test_wrapped_adam_is_adamp(wd):
    """Adam's step is `-lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`, AdamP's perturb times its step
    size; projecting the step is projecting the perturb (the projection is linear), and the
    wrapper's decay is AdamP's `w *= 1 - lr * wd * ratio`."""
    model = make_net()
    ours, official = copy.deepcopy(model), copy.deepcopy(model)
    opt = Projected(model.parameters(), inner=torch.optim.Adam, lr=1e-2, weight_decay=wd)
    ours_opt = AdamP(ours.parameters(), lr=1e-2, weight_decay=wd)
    official_opt = adamp.AdamP(official.parameters(), lr=1e-2, weight_decay=wd)
    for step in range(25):
        for m, o in ((model, opt), (ours, ours_opt), (official, official_opt)):
            o.zero_grad()
            backward(m, step)
            o.step()
        assert projected_flags(opt) == projected_flags(ours_opt), f"step {step}"
    close(model, ours)
    close(model, official)
    flags = projected_flags(opt)[0]
    assert any(flags) and not all(flags)


def test_wrapped_nesterov_sgd_is_official_sgdp():
    """With Nesterov the official SGDP projects `g + m * buf`, a new tensor: the buffer is kept,
    as in the wrapper. SGDP's decay `lr * wd / (1 - m)` is the wrapper's `lr * wd'` with
    `wd' = wd / (1 - m)` (projbench/decay.py converts between the two)."""
    m = 0.9
    model = make_net()
    ref = copy.deepcopy(model)
    opt = Projected(model.parameters(), inner=torch.optim.SGD, lr=0.1, momentum=m, nesterov=True,
                    weight_decay=WD / (1 - m))
    ref_opt = adamp.SGDP(ref.parameters(), lr=0.1, momentum=m, nesterov=True, weight_decay=WD)
    train(model, opt, 25)
    train(ref, ref_opt, 25)
    close(model, ref)


def algorithm1_sgdp(params: list[torch.Tensor], lr: float, momentum: float, wd: float):
    """SGDP as the paper's Algorithm 1 writes it, in plain float64 tensor code: the momentum
    buffer takes the raw gradient, and only the update `buf` is projected, for the step, in the
    first view (channel, then layer) where max |cos(g, w)| < delta / sqrt(row length); decay
    `lr * wd * ratio / (1 - momentum)` as the official code (not part of Algorithm 1)."""
    bufs = [torch.zeros_like(p) for p in params]

    def step():
        for p, buf in zip(params, bufs):
            g = p.grad
            buf.mul_(momentum).add_(g)
            update, ratio = buf, 1.0
            for rows in ((p.size(0), 1) if p.dim() > 1 else ()):
                w2, g2, u2 = p.reshape(rows, -1), g.reshape(rows, -1), buf.reshape(rows, -1)
                cos = (w2 * g2).sum(1).abs() / (g2.norm(dim=1).clamp_min(EPS) * w2.norm(dim=1).clamp_min(EPS))
                if cos.max() < DELTA / math.sqrt(w2.size(1)):
                    unit = w2 / (w2.norm(dim=1, keepdim=True) + EPS)
                    update = (u2 - unit * (unit * u2).sum(1, keepdim=True)).reshape(p.shape)
                    ratio = 0.1
                    break
            p.mul_(1 - lr * wd * ratio / (1 - momentum))
            p.sub_(lr * update)
    return step


def test_wrapped_sgd_is_sgdp_algorithm1_not_the_official_form():
    """Without Nesterov the wrapper projects the step `lr * buf` and keeps the buffer: the paper's
    Algorithm 1 (our SGDP with project_buffer=False, optim=sgdp_alg1, and timm's SGDP, which clones
    the buffer first). The official SGDP projects its
    buffer in place; the two agree at the first step and part wherever a weight was projected."""
    m = 0.9
    model = make_net()
    reference, timm_model, ours, official = (copy.deepcopy(model) for _ in range(4))
    opt = Projected(model.parameters(), inner=torch.optim.SGD, lr=0.1, momentum=m, weight_decay=WD / (1 - m))
    with torch.no_grad():
        reference_step = algorithm1_sgdp(list(reference.parameters()), 0.1, m, WD)
    timm_opt = timm.optim.SGDP(timm_model.parameters(), lr=0.1, momentum=m, weight_decay=WD)
    ours_opt = SGDP(ours.parameters(), lr=0.1, momentum=m, weight_decay=WD, project_buffer=False)  # sgdp_alg1
    official_opt = adamp.SGDP(official.parameters(), lr=0.1, momentum=m, weight_decay=WD)
    for step in range(25):
        for mod, step_fn in ((model, opt.step), (reference, reference_step), (timm_model, timm_opt.step),
                             (ours, ours_opt.step), (official, official_opt.step)):
            mod.zero_grad()
            backward(mod, step)
            with torch.no_grad():
                step_fn()
        if step == 0:
            assert max_diff(model, official) < 1e-14
    close(model, reference)
    close(model, timm_model)
    close(model, ours)
    assert (model.conv1.weight - official.conv1.weight).abs().max() > 1e-3


def test_nothing_projected_is_the_inner_optimizer_with_decoupled_decay():
    """delta 0: no weight passes the test; the wrapper is then the inner optimizer with its decay
    applied as `w *= 1 - lr * wd` before the step: timm's Lion, whose own decay is that."""
    model = make_net()
    ref = copy.deepcopy(model)
    opt = Projected(model.parameters(), inner=timm.optim.Lion, lr=1e-3, weight_decay=0.5, delta=0.0)
    ref_opt = timm.optim.Lion(ref.parameters(), lr=1e-3, weight_decay=0.5)
    train(model, opt, 10)
    train(ref, ref_opt, 10)
    assert not any(r.projected.any() for r in opt.last_projection)
    # Lion steps by the sign of its momentum: the noise-only bias moves by +-lr on rounding alone
    close(model, ref, tol=1e-15, noise_tol=math.inf)


def test_param_groups_are_shared_with_the_inner_optimizer():
    """The no-decay group of no_decay_bias_norm, a scheduler's lr and a state-dict round trip
    reach the inner optimizer; the wrapper's values sit beside its own under proj_* keys."""
    model = make_net()
    ref = copy.deepcopy(model)

    def groups(m):
        multi = [p for p in m.parameters() if p.dim() > 1]
        return [{"params": multi}, {"params": [p for p in m.parameters() if p.dim() <= 1], "weight_decay": 0.0}]

    opt = Projected(groups(model), inner=torch.optim.Adam, lr=1e-2, weight_decay=WD)
    ref_opt = AdamP(groups(ref), lr=1e-2, weight_decay=WD)
    assert [g["proj_weight_decay"] for g in opt.param_groups] == [WD, 0.0]
    assert all(g["weight_decay"] == 0.0 for g in opt.inner.param_groups)
    assert all(a is b for a, b in zip(opt.param_groups, opt.inner.param_groups))
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref_opt)]
    for step in range(8):
        if step == 4:  # resume the wrapper from a checkpoint, mid-schedule
            resumed = Projected(groups(model), inner=torch.optim.Adam, lr=1e-2, weight_decay=WD)
            resumed.load_state_dict(roundtrip(opt.state_dict()))
            schedules[0].optimizer = opt = resumed
        for m, o, s in ((model, opt, schedules[0]), (ref, ref_opt, schedules[1])):
            train(m, o, 1, start=step)
            s.step()
    assert opt.inner.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == 1e-2 / 16
    assert [g["proj_weight_decay"] for g in opt.param_groups] == [WD, 0.0]
    assert all(a is b for a, b in zip(opt.param_groups, opt.inner.param_groups))
    close(model, ref)


def test_params_join_later_and_closure():
    torch.manual_seed(0)
    model = Branches().double()
    ref = copy.deepcopy(model)
    opt = Projected(model.parameters(), inner=torch.optim.Adam, lr=1e-2, weight_decay=WD)
    ref_opt = AdamP(ref.parameters(), lr=1e-2, weight_decay=WD)
    for step in range(6):
        for m, o in ((model, opt), (ref, ref_opt)):
            m.use_extra = step >= 3

            def closure(m=m, o=o):
                o.zero_grad()
                return backward(m, step)

            o.step(closure)
    close(model, ref)


def test_channels_last_matches_contiguous():
    dense, cl = make_net(), make_net(memory_format=CL)
    kw = dict(inner=torch.optim.Adam, lr=1e-2, weight_decay=WD)
    opt_dense, opt_cl = Projected(dense.parameters(), **kw), Projected(cl.parameters(), **kw)
    train(dense, opt_dense, 25)
    train(cl, opt_cl, 25, memory_format=CL)
    close(dense, cl, tol=1e-10)
    for p in cl.parameters():
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=CL) and opt_cl._copies[p].is_contiguous(memory_format=CL)
    assert any(r.projected.any() for r in opt_cl.last_projection)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_channels_last_weights_follow_float32(dtype):
    """Half weights in channels_last, given the float32 gradients (cast) of a float32 twin: the
    test and the projection run in float32 on them, and the parameter movement stays within a few
    half-precision roundings of the float32 run's."""
    ref = make_net(torch.float32)
    half = copy.deepcopy(ref).to(dtype=dtype, memory_format=CL)
    start = copy.deepcopy(ref)
    kw = dict(inner=torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=WD)
    ref_opt, opt = Projected(ref.parameters(), **kw), Projected(half.parameters(), **kw)
    for step in range(10):
        ref_opt.zero_grad()
        backward(ref, step, dtype=torch.float32)
        for p, q in zip(half.parameters(), ref.parameters()):
            p.grad = q.grad.to(dtype).contiguous(memory_format=CL) if q.dim() == 4 else q.grad.to(dtype)
        ref_opt.step()
        opt.step()
    assert projected_flags(opt) == projected_flags(ref_opt)
    assert any(r.projected.any() for r in opt.last_projection)
    for (name, p), q, p0 in zip(half.named_parameters(), ref.parameters(), start.parameters()):
        assert p.dtype == dtype and (p.dim() != 4 or p.is_contiguous(memory_format=CL))
        if name in NOISE_ONLY:
            continue
        moved = (q - p0).abs().max()
        assert (p.float() - q).abs().max() < HALF_TOL[dtype] * max(moved, q.abs().max()), name


def test_grad_scaler():
    plain = make_net(torch.float32)
    scaled = copy.deepcopy(plain)
    kw = dict(inner=timm.optim.Lion, lr=1e-3, weight_decay=0.5)
    opt, scaled_opt = Projected(plain.parameters(), **kw), Projected(scaled.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step in range(4):
        train(plain, opt, 1, start=step, dtype=torch.float32)
        scaled_opt.zero_grad()
        scaler.scale(loss_fn(scaled, *batch(step, dtype=torch.float32))).backward()
        scaler.step(scaled_opt)
        scaler.update()
    assert max_diff(plain, scaled) == 0  # a power-of-two scale is exact


HOST_READS = ("item", "__bool__", "tolist", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("inner, kw", [(torch.optim.Adam, dict(lr=1e-2)), (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                       (timm.optim.Lion, dict(lr=1e-3))], ids=["Adam", "SGD", "Lion"])
def test_step_never_reads_tensors_on_the_host(inner, kw, monkeypatch):
    """The wrapper's own work (copy, test, projection, decay) reads nothing to the host; the
    inner optimizer's step is not ours and runs unpatched (torch's Adam reads its step count)."""
    torch.manual_seed(0)
    model = Branches().double()
    opt = Projected(model.parameters(), inner=inner, weight_decay=WD, **kw)
    inner_step = opt.inner.step
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def unpatched_inner_step():
        with monkeypatch.context() as m:
            for name, fn in originals.items():
                m.setattr(torch.Tensor, name, fn)
            inner_step()

    monkeypatch.setattr(opt.inner, "step", unpatched_inner_step)
    for step in range(4):
        model.use_extra = step >= 2  # params joining later: a new projector
        opt.zero_grad()
        backward(model, step)
        with monkeypatch.context() as m:
            for name in HOST_READS:
                m.setattr(torch.Tensor, name, _forbid)
            opt.step()
    assert any(r.projected.any() for r in opt.last_projection)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("inner, kw", [(torch.optim.Adam, dict(lr=1e-2, foreach=True)),
                                       (torch.optim.SGD, dict(lr=0.1, momentum=0.9, foreach=True))],
                         ids=["Adam", "SGD"])
def test_cuda_step_does_not_sync(inner, kw):
    model = make_net(torch.float32).cuda()
    steps_without_sync(model, Projected(model.parameters(), inner=inner, weight_decay=WD, **kw))


def test_invalid_arguments():
    params = [nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="weight_decay"):
        Projected(params, inner=torch.optim.SGD, lr=0.1, weight_decay=-1.0)
    with pytest.raises(ValueError, match="wd_ratio"):
        Projected(params, inner=torch.optim.SGD, lr=0.1, wd_ratio=2.0)
    with pytest.raises(ValueError, match="projects its updates itself"):
        Projected(params, inner=SGDP, lr=0.1)
    with pytest.raises(ValueError, match="cannot be imported"):
        Projected(params, inner="timm.optim.NoSuchThing", lr=0.1)
    assert isinstance(Projected(params, inner="torch.optim.SGD", lr=0.1).inner, torch.optim.SGD)
