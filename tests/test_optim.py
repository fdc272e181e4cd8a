"""SGDP and AdamP (projbench.optim): the same numbers as the official `adamp` 0.3.0 (and, for
SGDP's Algorithm 1 form, as timm's SGDP and a plain transcription of the paper's Algorithm 1) on
every path (eager and the multi-tensor `fused` step), and the behaviour a training loop relies on
(channels_last, half weights, GradScaler, checkpoints, no host-device sync in `step()`)."""

from __future__ import annotations

import copy
import io
import math

import adamp
import pytest
import timm.optim
import torch
import torch.nn.functional as F
from torch import nn

from projbench.optim import SGDP, AdamP
from projbench.optim import _base as optim_base

DELTA, EPS = 0.1, 1e-8
CL = torch.channels_last


class Net(nn.Module):
    """A small model that hits every branch of the projection.

    conv1 (no bias) -> BatchNorm2d and conv2 (bias) -> BatchNorm2d: each filter is scale-invariant,
    so the channel view passes at every step. conv3 -> GroupNorm(1, C) and fc (no bias) ->
    LayerNorm: only the whole weight is scale-invariant, so the channel view fails and the layer
    view passes at every step. head: not scale-invariant, mostly not projected (a random gradient
    passes the layer test now and then). Norm weights/biases and conv2/head biases are 1-D.
    """

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8)
        self.conv3, self.gn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.GroupNorm(1, 8)
        self.fc, self.ln = nn.Linear(8, 16, bias=False), nn.LayerNorm(16)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.gn(self.conv3(x)))
        return self.head(F.relu(self.ln(self.fc(x.mean((2, 3))))))


INVARIANT_VIEW = {"conv1.weight": "channel", "conv2.weight": "channel", "conv3.weight": "layer",
                  "fc.weight": "layer"}


# conv2's bias is followed by BatchNorm, which subtracts it: its true gradient is zero and what it
# gets is rounding noise, which Adam normalises into full-size steps. Comparisons between runs
# whose rounding differs (layouts, dtypes) treat it separately.
NOISE_ONLY = {"conv2.bias"}


def make_net(dtype=torch.float64, seed=0, memory_format=torch.contiguous_format) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype=dtype, memory_format=memory_format)


def batch(step: int, dtype=torch.float64, memory_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 3, 8, 8, generator=g, dtype=dtype).contiguous(memory_format=memory_format)
    return x, torch.randint(0, 5, (16,), generator=g)


def loss_fn(model, x, y):
    out = model(x)
    return F.cross_entropy(out.float() if out.dtype in (torch.float16, torch.bfloat16) else out, y)


def backward(model, step, **kw):
    loss = loss_fn(model, *batch(step, **kw))
    loss.backward()
    return loss


def train(model, opt, steps, start=0, **kw):
    for step in range(start, start + steps):
        opt.zero_grad()
        backward(model, step, **kw)
        opt.step()


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p.double() - q.double()).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def official_view(w, g):
    """Which view the official code projects in ("channel", "layer" or None), computed its way."""
    for name, rows in (("channel", w.size(0)), ("layer", 1)):
        cos = F.cosine_similarity(g.reshape(rows, -1), w.reshape(rows, -1), dim=1, eps=EPS).abs()
        if cos.max() < DELTA / math.sqrt(w.numel() // rows):
            return name
    return None


def sgdp_alg1(params, **kw):
    """SGDP in the form of the paper's Algorithm 1 (the buffer is not projected)."""
    return SGDP(params, project_buffer=False, **kw)


# (name, our optimizer, reference optimizer, kwargs). The official SGDP form against `adamp`
# 0.3.0; the Algorithm 1 form against timm's SGDP, which is the official code with the buffer
# cloned before the projection (timm/optim/sgdp.py), Nesterov and decay handled alike.
CASES = [
    *[(f"SGDP-nesterov{int(n)}-wd{wd}", SGDP, adamp.SGDP, dict(lr=0.1, momentum=0.9, nesterov=n, weight_decay=wd))
      for n in (False, True) for wd in (0.0, 1e-2)],
    ("SGDP-dampening", SGDP, adamp.SGDP, dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=1e-2)),
    ("SGDP-dampening-nesterov", SGDP, adamp.SGDP,
     dict(lr=0.1, momentum=0.9, dampening=0.3, nesterov=True, weight_decay=1e-2)),
    ("SGDP-no-momentum", SGDP, adamp.SGDP, dict(lr=0.1, weight_decay=1e-2)),
    *[(f"SGDP-alg1-nesterov{int(n)}-wd{wd}", sgdp_alg1, timm.optim.SGDP,
       dict(lr=0.1, momentum=0.9, nesterov=n, weight_decay=wd)) for n, wd in ((False, 0.0), (False, 1e-2), (True, 1e-2))],
    ("SGDP-alg1-dampening", sgdp_alg1, timm.optim.SGDP, dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=1e-2)),
    *[(f"AdamP-nesterov{int(n)}-wd{wd}", AdamP, adamp.AdamP, dict(lr=1e-2, nesterov=n, weight_decay=wd))
      for n in (False, True) for wd in (0.0, 1e-2)],
]


# fused=True: the multi-tensor step (projbench/optim/multi_tensor.py); its kernel is built once per
# machine and cached, so only the first test of a fresh machine pays for the build (seconds).
FUSED = pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])


@pytest.fixture(params=["eager", "eager-foreach", "fused"])
def fused_path(request, monkeypatch) -> bool:
    """The three ways a step runs; gives the `fused` flag. eager-foreach: the eager step in the
    form it takes on CUDA (foreach ops instead of the CPU's fused per-tensor ops), here on the CPU.
    fused: the eager step must not run at all."""
    if request.param == "eager-foreach":
        monkeypatch.setattr(optim_base, "PER_TENSOR_DEVICES", set())
    if request.param == "fused":
        monkeypatch.setattr(optim_base.ProjectedOptimizer, "_apply", _forbid_eager)
    return request.param == "fused"


def _forbid_eager(*args, **kwargs):
    raise AssertionError("the eager step ran where the multi-tensor step should have")


@pytest.mark.parametrize("name, cls, official_cls, kw", CASES, ids=[c[0] for c in CASES])
def test_matches_official_float64(name, cls, official_cls, kw, fused_path):
    model = make_net()
    ref = copy.deepcopy(model)
    opt, ref_opt = cls(model.parameters(), fused=fused_path, **kw), official_cls(ref.parameters(), **kw)
    names = {id(p): n for n, p in model.named_parameters()}
    multi = [n for n, p in model.named_parameters() if p.dim() > 1]
    projected_any, unprojected_any, seen = False, False, set()
    for step in range(25):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            backward(m, step)
        views = {n: official_view(p, p.grad) for n, p in model.named_parameters() if p.dim() > 1}
        assert {n: views[n] for n in INVARIANT_VIEW} == INVARIANT_VIEW, f"step {step}"
        seen |= set(views.values())
        opt.step()
        ref_opt.step()
        (record,) = opt.last_projection
        assert [names[id(p)] for p in record.params] == multi  # 1-D parameters are not in the record
        assert record.projected.tolist() == [views[n] is not None for n in multi]
        projected_any |= bool(record.projected.any())
        unprojected_any |= not bool(record.projected.all())
    assert projected_any and unprojected_any
    assert seen == {"channel", "layer", None}
    assert max_diff(model, ref) < 1e-8


def algorithm1_step(params, bufs, lr: float, momentum: float) -> None:
    """The paper's Algorithm 1 (SGDP), transcribed in float64: p = momentum * p + grad; a weight
    that passes the scale-invariance test (the official code's channel, then layer view) steps by
    the projection of p off w in that view, any other by p; p itself is never projected."""
    with torch.no_grad():
        for w, p in zip(params, bufs):
            p.mul_(momentum).add_(w.grad)
            view = official_view(w, w.grad) if w.dim() > 1 else None
            update = p.clone()
            if view is not None:
                rows = w.size(0) if view == "channel" else 1
                w_rows, u_rows = w.reshape(rows, -1), update.view(rows, -1)
                w_unit = w_rows / (w_rows.norm(dim=1, keepdim=True) + EPS)
                u_rows -= w_unit * (w_unit * u_rows).sum(1, keepdim=True)
            w.sub_(lr * update)


def test_algorithm1_form_matches_a_transcription_of_the_paper(fused_path):
    model = make_net()
    ref = copy.deepcopy(model)
    opt = SGDP(model.parameters(), lr=0.1, momentum=0.9, project_buffer=False, fused=fused_path)
    ref_bufs = [torch.zeros_like(p) for p in ref.parameters()]
    for step in range(25):
        for m in (model, ref):
            m.zero_grad()
            backward(m, step)
        opt.step()
        algorithm1_step(list(ref.parameters()), ref_bufs, lr=0.1, momentum=0.9)
    assert max_diff(model, ref) < 1e-8
    # the buffer is the plain momentum sum of the gradients: it keeps its radial part
    assert all(torch.allclose(opt.state[p]["momentum"], b, atol=1e-10) for p, b in zip(model.parameters(), ref_bufs))


def test_the_two_forms_differ_without_nesterov_only():
    def final(project_buffer, nesterov):
        model = make_net()
        train(model, SGDP(model.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, project_buffer=project_buffer), 10)
        return model

    assert max_diff(final(True, False), final(False, False)) > 1e-4
    assert max_diff(final(True, True), final(False, True)) == 0


def test_state_dict_without_the_form_loads_as_the_official_form():
    """A checkpoint written before `project_buffer` existed resumes in the official form."""
    model = make_net()
    opt = SGDP(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, 3)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["project_buffer"]
    resumed = copy.deepcopy(model)
    resumed_opt = SGDP(resumed.parameters(), lr=0.1, momentum=0.9, project_buffer=False)
    resumed_opt.load_state_dict(roundtrip(saved))
    assert all(g["project_buffer"] for g in resumed_opt.param_groups)
    train(model, opt, 3, start=3)
    train(resumed, resumed_opt, 3, start=3)
    assert max_diff(model, resumed) == 0


@pytest.mark.parametrize("cls, kw", [(SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
                                     (AdamP, dict(lr=1e-2, weight_decay=1e-2))], ids=["SGDP", "AdamP"])
def test_fused_takes_the_eager_path_for_weights_without_row_views(cls, kw):
    """A transposed weight cannot be walked as rows in memory order: the multi-tensor kernel
    could not step it, so that group steps eagerly, with the same numbers."""
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(6, 5, generator=g, dtype=torch.float64).t(), torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)]
    runs = []
    for fused in (False, True):
        params = [nn.Parameter(w.clone().t().contiguous().t() if w.dim() == 2 else w.clone()) for w in start]
        assert not params[0].is_contiguous()
        opt = cls(params, fused=fused, **kw)
        for step in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step), dtype=p.dtype)
            opt.step()
        runs.append(params)
    for p, q in zip(*runs):
        assert (p - q).abs().max() < 1e-12


@pytest.mark.parametrize("cls, kw", [(SGDP, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
                                     (SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
                                     (AdamP, dict(lr=1e-2, weight_decay=1e-2))], ids=["SGDP-nesterov", "SGDP", "AdamP"])
@FUSED
def test_channels_last_matches_contiguous(cls, kw, fused):
    dense, cl = make_net(), make_net(memory_format=CL)
    opt_dense, opt_cl = cls(dense.parameters(), fused=False, **kw), cls(cl.parameters(), fused=fused, **kw)
    train(dense, opt_dense, 25)
    train(cl, opt_cl, 25, memory_format=CL)
    for (name, p), q in zip(dense.named_parameters(), cl.parameters()):
        assert (p - q).abs().max() < (1e-8 if name in NOISE_ONLY else 1e-10), name
    for p in cl.parameters():  # layouts kept: weights and every state buffer stay channels_last
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=CL)
            assert all(s.is_contiguous(memory_format=CL) for s in opt_cl.state[p].values() if torch.is_tensor(s))
    assert any(r.projected.any() for r in opt_cl.last_projection)


def roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dtype, memory_format", [(torch.float64, torch.contiguous_format), (torch.bfloat16, CL)],
                         ids=["float64", "bfloat16-channels_last"])
@pytest.mark.parametrize("cls, kw", [(SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
                                     (sgdp_alg1, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
                                     (AdamP, dict(lr=1e-2, weight_decay=1e-2))], ids=["SGDP", "SGDP-alg1", "AdamP"])
def test_state_dict_round_trip_resumes_exactly(cls, kw, dtype, memory_format):
    fmt = dict(dtype=dtype, memory_format=memory_format)
    model = make_net(**fmt)
    opt = cls(model.parameters(), **kw)
    train(model, opt, 4, **fmt)
    resumed = copy.deepcopy(model)
    resumed_opt = cls(resumed.parameters(), **kw)
    resumed_opt.load_state_dict(roundtrip(opt.state_dict()))
    for p, q in zip(model.parameters(), resumed.parameters()):  # same state, same dtype and layout
        assert opt.state[p].keys() == resumed_opt.state[q].keys()
        for key, s in opt.state[p].items():
            if torch.is_tensor(s):
                t = resumed_opt.state[q][key]
                assert t.dtype == s.dtype and t.stride() == s.stride() and torch.equal(t, s)
            else:
                assert resumed_opt.state[q][key] == s
    train(model, opt, 4, start=4, **fmt)
    train(resumed, resumed_opt, 4, start=4, **fmt)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls, kw", [(SGDP, dict(lr=0.1, momentum=0.9)), (AdamP, dict(lr=1e-2))], ids=["SGDP", "AdamP"])
def test_closure(cls, kw):
    model = make_net()
    other = copy.deepcopy(model)
    opt, other_opt = cls(model.parameters(), **kw), cls(other.parameters(), **kw)
    for step in range(3):
        def closure():
            opt.zero_grad()
            return backward(model, step)

        loss = opt.step(closure)
        other_opt.zero_grad()
        expected = backward(other, step)
        other_opt.step()
        assert torch.equal(loss, expected)
    assert max_diff(model, other) == 0


@pytest.mark.parametrize("cls, official_cls, lrs", [(SGDP, adamp.SGDP, (0.05, 0.2)), (AdamP, adamp.AdamP, (1e-2, 3e-3))],
                         ids=["SGDP", "AdamP"])
def test_param_groups_with_their_own_lr_and_weight_decay(cls, official_cls, lrs):
    model = make_net()
    ref = copy.deepcopy(model)

    def groups(m):
        convs = [m.conv1.weight, m.conv3.weight]
        return [{"params": convs, "lr": lrs[0], "weight_decay": 5e-2},
                {"params": [p for p in m.parameters() if all(p is not c for c in convs)], "weight_decay": 0.0}]

    kw = dict(lr=lrs[1], momentum=0.9) if cls is SGDP else dict(lr=lrs[1])
    opt, ref_opt = cls(groups(model), **kw), official_cls(groups(ref), **kw)
    train(model, opt, 10)
    train(ref, ref_opt, 10)
    assert max_diff(model, ref) < 1e-8
    assert len(opt.last_projection) == 2
    # The groups really differ: the same run with one group moves the conv weights differently.
    single = make_net()
    single_opt = cls(single.parameters(), **kw)
    train(single, single_opt, 10)
    assert (single.conv1.weight - model.conv1.weight).abs().max() > 1e-4


class Branches(nn.Module):
    """Net plus a branch that takes part in the loss only when `use_extra` is set."""

    def __init__(self):
        super().__init__()
        self.net = Net()
        self.extra = nn.Linear(5, 5)
        self.use_extra = False

    def forward(self, x):
        y = self.net(x)
        return y + self.extra(y) if self.use_extra else y


@pytest.mark.parametrize("cls, official_cls, kw", [(SGDP, adamp.SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
                                                   (AdamP, adamp.AdamP, dict(lr=1e-2, weight_decay=1e-2))],
                         ids=["SGDP", "AdamP"])
def test_params_without_grad_are_skipped_and_can_join_later(cls, official_cls, kw):
    torch.manual_seed(0)
    model = Branches().double()
    ref = copy.deepcopy(model)
    opt, ref_opt = cls(model.parameters(), **kw), official_cls(ref.parameters(), **kw)
    extra_before = [p.clone() for p in model.extra.parameters()]
    train(model, opt, 3)
    train(ref, ref_opt, 3)
    for p, before in zip(model.extra.parameters(), extra_before):
        assert p.grad is None and p not in opt.state and torch.equal(p, before)  # no decay either
    model.use_extra = ref.use_extra = True
    train(model, opt, 5, start=3)
    train(ref, ref_opt, 5, start=3)
    assert all(len(opt.state[p]) > 0 for p in model.extra.parameters())
    assert not torch.equal(model.extra.weight, extra_before[0])
    assert max_diff(model, ref) < 1e-8


@pytest.mark.parametrize("cls, kw", [(SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
                                     (AdamP, dict(lr=1e-2, weight_decay=1e-2))], ids=["SGDP", "AdamP"])
def test_zero_grad(cls, kw):
    model = make_net()
    opt = cls(model.parameters(), **kw)
    train(model, opt, 2)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    params = [p.clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.step()  # no gradients at all: nothing moves, no state changes
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert repr(opt.state_dict()["state"]) == repr(state)


HALF_TOL = {torch.float16: 0.02, torch.bfloat16: 0.1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("cls, kw", [(SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
                                     (AdamP, dict(lr=1e-2, weight_decay=1e-2))], ids=["SGDP", "AdamP"])
def test_half_weights_follow_float32(cls, kw, dtype, fused_path):
    """Half weights get the float32 gradients (cast) of a float32 twin; float32 state, and the
    parameter movement stays within a few half-precision roundings of the float32 run's."""
    ref = make_net(torch.float32)
    half = copy.deepcopy(ref).to(dtype)
    start = copy.deepcopy(ref)
    ref_opt, opt = cls(ref.parameters(), fused=fused_path, **kw), cls(half.parameters(), fused=fused_path, **kw)
    for step in range(10):
        ref_opt.zero_grad()
        backward(ref, step, dtype=torch.float32)
        for p, q in zip(half.parameters(), ref.parameters()):
            p.grad = q.grad.to(dtype)
        ref_opt.step()
        opt.step()
    for p in half.parameters():
        assert p.dtype == dtype
        assert all(s.dtype == torch.float32 for s in opt.state[p].values() if torch.is_tensor(s))
    assert any(r.projected.any() for r in opt.last_projection)
    for (name, p), q, p0 in zip(half.named_parameters(), ref.parameters(), start.parameters()):
        if name in NOISE_ONLY:  # float32 noise, zero once cast to half
            continue
        moved = (q - p0).abs().max()
        assert moved > 0
        assert (p.float() - q).abs().max() < HALF_TOL[dtype] * max(moved, q.abs().max()), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("cls, kw", [(SGDP, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
                                     (AdamP, dict(lr=1e-2, weight_decay=1e-2))], ids=["SGDP", "AdamP"])
def test_channels_last_half_weights_train(cls, kw, dtype):
    fmt = dict(dtype=dtype, memory_format=CL)
    model = make_net(**fmt)
    before = copy.deepcopy(model)
    opt = cls(model.parameters(), **kw)
    train(model, opt, 5, **fmt)
    for p, p0 in zip(model.parameters(), before.parameters()):
        assert p.dtype == dtype and torch.isfinite(p).all()
        if p.dim() == 4:
            assert not torch.equal(p, p0) and p.is_contiguous(memory_format=CL)
            assert all(s.dtype == torch.float32 and s.is_contiguous(memory_format=CL)
                       for s in opt.state[p].values() if torch.is_tensor(s))
    assert any(r.projected.any() for r in opt.last_projection)


@pytest.mark.parametrize("cls, kw", [(SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
                                     (AdamP, dict(lr=1e-2, weight_decay=1e-2))], ids=["SGDP", "AdamP"])
def test_grad_scaler(cls, kw):
    plain = make_net(torch.float32)
    scaled = copy.deepcopy(plain)
    opt, scaled_opt = cls(plain.parameters(), **kw), cls(scaled.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step in range(5):
        opt.zero_grad()
        backward(plain, step, dtype=torch.float32)
        opt.step()
        scaled_opt.zero_grad()
        x, y = batch(step, dtype=torch.float32)
        scaler.scale(loss_fn(scaled, x, y)).backward()
        scaler.step(scaled_opt)
        scaler.update()
    assert scaler.get_scale() == 2.0**12
    assert max_diff(plain, scaled) == 0  # a power-of-two scale is exact

    # An inf gradient: the scaler skips the step (parameters and state untouched) and backs off.
    params = [p.clone() for p in scaled.parameters()]
    state = copy.deepcopy(scaled_opt.state_dict()["state"])
    scaled_opt.zero_grad()
    x, y = batch(5, dtype=torch.float32)
    scaler.scale(loss_fn(scaled, x, y)).backward()
    scaled.conv1.weight.grad[0, 0, 0, 0] = float("inf")
    scaler.step(scaled_opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**11
    assert all(torch.equal(p, q) for p, q in zip(scaled.parameters(), params))
    assert repr(scaled_opt.state_dict()["state"]) == repr(state)


@pytest.mark.parametrize("cls, official_cls, kw", [(SGDP, adamp.SGDP, dict(lr=0.1, weight_decay=0.1)),
                                                   (AdamP, adamp.AdamP, dict(lr=1e-2, weight_decay=0.1))],
                         ids=["SGDP", "AdamP"])
def test_1d_params_are_never_projected(cls, official_cls, kw):
    """A 1-D weight whose gradient is orthogonal to it (the loss depends on its direction only)
    would pass the layer test; it must get the plain update and the full weight decay."""
    torch.manual_seed(0)
    vec = torch.randn(16, dtype=torch.float64, requires_grad=True)
    mat = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)  # same kind of loss, 2-D: projected
    target_v, target_m = torch.randn(16, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    ref_vec, ref_mat = vec.detach().clone().requires_grad_(), mat.detach().clone().requires_grad_()
    opt, ref_opt = cls([vec, mat], **kw), official_cls([ref_vec, ref_mat], **kw)

    def loss(v, m):
        return -F.cosine_similarity(v, target_v, dim=0) - F.cosine_similarity(m.flatten(), target_m.flatten(), dim=0)

    for step in range(5):
        for (v, m), o in (((vec, mat), opt), ((ref_vec, ref_mat), ref_opt)):
            o.zero_grad()
            loss(v, m).backward()
        assert F.cosine_similarity(vec.grad, vec.detach(), dim=0).abs() < 1e-6
        before, grad = vec.detach().clone(), vec.grad.clone()
        opt.step()
        ref_opt.step()
        (record,) = opt.last_projection
        assert len(record.params) == 1 and record.params[0] is mat and record.projected.tolist() == [True]
        if cls is SGDP:  # no momentum: exactly w * (1 - lr * wd) - lr * g, no wd_ratio, no projection
            expected = before * (1 - kw["lr"] * kw["weight_decay"]) - kw["lr"] * grad
            torch.testing.assert_close(vec.detach(), expected, rtol=0, atol=1e-15)
    assert (vec - ref_vec).abs().max() < 1e-12 and (mat - ref_mat).abs().max() < 1e-12


def test_invalid_arguments():
    params = [nn.Parameter(torch.zeros(2, 2))]
    for bad in (dict(lr=0.0), dict(lr=-0.1), dict(lr=0.1, momentum=1.0), dict(lr=0.1, momentum=1.5),
                dict(lr=0.1, momentum=-0.1), dict(lr=0.1, weight_decay=-1e-4)):
        with pytest.raises(ValueError):
            SGDP(params, **bad)
    with pytest.raises(ValueError):
        SGDP(params)  # lr is required
    for bad in (dict(lr=0.0), dict(lr=-1e-3), dict(betas=(1.0, 0.999)), dict(betas=(0.9, 1.0)),
                dict(weight_decay=-1e-4)):
        with pytest.raises(ValueError):
            AdamP(params, **bad)
    SGDP(params, lr=0.1, momentum=0.99)  # the valid edge cases construct
    AdamP(params, betas=(0.0, 0.0))


def _forbid(*args, **kwargs):
    raise AssertionError("step() read a tensor value on the host (a device sync on CUDA)")


def _forbid_h2d(*args, **kwargs):
    raise AssertionError("step() built a tensor from host data (a blocking copy on CUDA)")


@pytest.mark.parametrize("cls, kw", [(SGDP, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
                                     (SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
                                     (sgdp_alg1, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
                                     (AdamP, dict(lr=1e-2, nesterov=True, weight_decay=1e-2)),
                                     (AdamP, dict(lr=1e-2))],
                         ids=["SGDP-nesterov", "SGDP", "SGDP-alg1", "AdamP-nesterov", "AdamP"])
@FUSED
def test_step_never_reads_tensors_on_the_host(cls, kw, monkeypatch, fused):
    torch.manual_seed(0)
    model = Branches().double()
    opt = cls(model.parameters(), fused=fused, **kw)
    for step in range(4):
        model.use_extra = step >= 2  # params joining later: different step counts in the group
        opt.zero_grad()
        backward(model, step)
        with monkeypatch.context() as m:
            for name in ("item", "__bool__", "tolist", "__float__", "__int__", "__index__"):
                m.setattr(torch.Tensor, name, _forbid)
            if step not in (0, 2):  # the projector is (re)built on these steps and uploads its constants
                m.setattr(torch, "tensor", _forbid_h2d)
                m.setattr(torch, "as_tensor", _forbid_h2d)
                m.setattr(torch.Tensor, "new_tensor", _forbid_h2d)
            opt.step()
    assert any(r.projected.any() for r in opt.last_projection)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls, kw", [(SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
                                     (AdamP, dict(lr=1e-2, weight_decay=1e-2))], ids=["SGDP", "AdamP"])
@FUSED
def test_cuda_step_does_not_sync(cls, kw, fused):
    model = make_net(torch.float32).cuda()
    steps_without_sync(model, cls(model.parameters(), fused=fused, **kw))


def steps_without_sync(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Three CUDA steps; after the first (which builds the projector: one upload), any host-device
    sync inside `opt.step()` raises."""
    x, y = (t.cuda() for t in batch(0, dtype=torch.float32))
    for step in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        torch.cuda.synchronize()
        if step > 0:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name, cls, official_cls, kw", CASES, ids=[c[0] for c in CASES])
def test_cuda_fused_matches_official_float64(name, cls, official_cls, kw, monkeypatch):
    """The Triton kernels (fused=True on CUDA) against the official code, both on the GPU."""
    monkeypatch.setattr(optim_base.ProjectedOptimizer, "_apply", _forbid_eager)
    model = make_net().cuda()
    ref = copy.deepcopy(model)
    opt, ref_opt = cls(model.parameters(), fused=True, **kw), official_cls(ref.parameters(), **kw)
    for step in range(25):
        x, y = (t.cuda() for t in batch(step))
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_fn(m, x, y).backward()
            o.step()
    assert max_diff(model, ref) < 1e-8
