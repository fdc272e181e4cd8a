"""Weight decay: each convention converts to each optimizer's argument, and the per-step decay the
config reports is what the optimizer does."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_cfg
from projbench.decay import Context, decay_per_step, optimizer_weight_decay
from projbench.errors import ConfigError
from projbench.optim import build_optimizer

ADAMW, ADAMP, ADAM = "torch.optim.AdamW", "projbench.optim.AdamP", "torch.optim.Adam"
SGD, SGDP = "torch.optim.SGD", "projbench.optim.SGDP"
PROJECTED = "projbench.optim.Projected"


@pytest.mark.parametrize("value, convention, ctx, argument, per_step", [
    # the paper's ImageNet decay 1e-4 (AdamW paper's notation) = PyTorch 0.1 at lr 1e-3 (clovaai/AdamP issue #10)
    (1e-4, "decoupled", Context(ADAMW, lr=1e-3), 0.1, 1e-4),
    (1e-4, "decoupled", Context(ADAMP, lr=1e-3), 0.1, 1e-4),
    (1e-4, "decoupled", Context(ADAMP, lr=2e-3), 0.05, 1e-4),
    (0.1, "decoupled_lr", Context(ADAMP, lr=1e-3), 0.1, 1e-4),
    # SGD's coupled 1e-4 at lr 0.1, momentum 0.9: 1e-4 per step in steady state; SGDP's argument
    # is divided by (1 - momentum), so the same 1e-4 gives the same decay
    (1e-4, "coupled", Context(SGD, lr=0.1, momentum=0.9), 1e-4, 1e-4),
    (1e-4, "coupled", Context(SGDP, lr=0.1, momentum=0.9), 1e-4, 1e-4),
    (1e-4, "coupled", Context(SGDP, lr=0.1, momentum=0.9, nesterov=True), 1e-4, 1e-4),
    (1e-4, "decoupled", Context(SGDP, lr=0.1, momentum=0.9), 1e-4, 1e-4),
    (1e-4, "decoupled", Context(SGD, lr=0.05, momentum=0.9), 2e-4, 1e-4),
    (1e-4, "coupled", Context(SGD, lr=0.1, momentum=0.9, dampening=0.5), 1e-4, 5e-5),
    (1e-4, "decoupled_lr_momentum", Context(SGD, lr=0.1, momentum=0.0), 1e-4, 1e-5),
    # native: the argument as given, whatever the optimizer does with it
    (5e-4, "native", Context(ADAM, lr=1e-3), 5e-4, None),
    (5e-4, "native", Context(ADAMP, lr=1e-3), 5e-4, 5e-7),
    (0.0, "coupled", Context(ADAMW, lr=1e-3), 0.0, 0.0),   # no decay is no decay in any convention
    # the projection wrapper decays as AdamW around any optimizer: SGD's coupled 1e-4 at momentum
    # 0.9 is its 1e-3 (SGDP's 1e-4 / (1 - momentum)); timm's classes by their rule
    (1e-4, "coupled", Context(PROJECTED, lr=0.1, momentum=0.9, inner=SGD), 1e-3, 1e-4),
    (1e-4, "decoupled", Context(PROJECTED, lr=1e-3, inner=ADAM), 0.1, 1e-4),
    (1e-4, "decoupled", Context("timm.optim.Lion", lr=1e-4), 1.0, 1e-4),
    (1e-4, "decoupled", Context("timm.optim.Adopt", lr=1e-3, switches=(("decoupled", True),)), 0.1, 1e-4),
])
def test_conventions_convert_to_each_optimizers_argument(value, convention, ctx, argument, per_step):
    got = optimizer_weight_decay(value, convention, ctx)
    assert got == pytest.approx(argument, rel=1e-12)
    assert (decay_per_step(got, ctx) is None) == (per_step is None)
    if per_step is not None:
        assert decay_per_step(got, ctx) == pytest.approx(per_step, rel=1e-12)


@pytest.mark.parametrize("value, convention, ctx, key", [
    (1e-4, "coupled", Context(ADAMW, lr=1e-3), "optim.decay"),      # L2 under Adam has no decoupled equivalent
    (1e-4, "decoupled", Context(ADAM, lr=1e-3), "optim.decay"),
    (1e-4, "l2", Context(SGD, lr=0.1), "optim.decay.convention"),
    (-1e-4, "coupled", Context(SGD, lr=0.1), "optim.decay.value"),
    (1e-4, "decoupled", Context("torch.optim.RMSprop", lr=0.1), "optim.decay"),   # no known rule
    (1e-4, "coupled", Context(PROJECTED, lr=1e-3, inner=ADAM), "optim.decay"),    # L2 through Adam's moments
    (1e-4, "decoupled", Context("timm.optim.Lamb", lr=1e-3, switches=(("decoupled_decay", False),)),
     "optim.decay"),                                                              # inside LAMB's trust ratio
    (1e-4, "decoupled", Context("timm.optim.Adopt", lr=1e-3), "optim.decay"),     # ADOPT's default: L2
])
def test_conversions_that_do_not_exist_are_config_errors(value, convention, ctx, key):
    with pytest.raises(ConfigError) as err:
        optimizer_weight_decay(value, convention, ctx)
    assert err.value.key == key


def _shrink_per_step(optim_overrides: list[str], steps: int) -> tuple[float, float]:
    """(the config's decay_per_step, the shrink the optimizer applies at its last step) for a
    1-D weight (never projected, so SGDP / AdamP apply their full decay) with zero gradient."""
    cfg = make_cfg(optim_overrides).optim
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    model = torch.nn.Module()
    model.weight = weight
    opt = build_optimizer(cfg, model)
    for _ in range(steps):
        before = weight.detach().clone()
        weight.grad = torch.zeros_like(weight)
        opt.step()
    return cfg.decay_per_step, float(1 - (weight.detach() / before).mean())


@pytest.mark.parametrize("overrides, steps", [
    (["optim=adamw", "optim.decay.value=1e-4", "optim.decay.convention=decoupled"], 1),
    (["optim=adamp", "optim.decay.value=1e-4", "optim.decay.convention=decoupled", "optim.lr=2e-3"], 1),
    (["optim=sgdp", "optim.decay.value=1e-4", "optim.decay.convention=coupled"], 1),
    (["optim=sgd", "optim.decay.value=1e-4", "optim.decay.convention=decoupled", "optim.lr=0.05"], 300),
    (["optim=sgd", "optim.decay.value=1e-4", "optim.decay.convention=coupled", "optim.nesterov=true"], 300),
])
def test_the_reported_per_step_decay_is_what_the_optimizer_does(overrides, steps):
    reported, measured = _shrink_per_step(overrides, steps)
    assert reported == pytest.approx(1e-4, rel=1e-9)
    assert measured == pytest.approx(reported, rel=1e-3)   # SGD: its momentum buffer reaches steady state


def test_resolved_config_shows_the_stated_decay_the_argument_and_the_per_step_decay():
    optim = make_cfg(["optim=adamp", "optim.decay.value=1e-4", "optim.decay.convention=decoupled"]).optim
    assert (optim.decay.value, optim.decay.convention) == (1e-4, "decoupled")
    assert optim.weight_decay == pytest.approx(0.1) and optim.decay_per_step == pytest.approx(1e-4)
    # the optimizer's argument may still be given directly; the per-step decay follows it
    direct = make_cfg(["optim=adamp", "optim.weight_decay=0.2"]).optim
    assert direct.decay_per_step == pytest.approx(2e-4)


def test_a_saved_run_config_resolves_in_a_fresh_process_that_only_imports_the_tables(tmp_path):
    path = tmp_path / "config.yaml"
    OmegaConf.save(make_cfg(["optim=adamw", "optim.decay.value=1e-4", "optim.decay.convention=decoupled"]), path)
    code = ("import sys; from omegaconf import OmegaConf; from projbench.tables import Run; "
            "run = Run(id='r', config=OmegaConf.load(sys.argv[1]), summary={}); "
            "print(run.get('optim.weight_decay'), run.get('optim.decay_per_step'))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0.1", "0.0001"]
