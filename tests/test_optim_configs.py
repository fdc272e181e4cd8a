"""Every conf/optim/*.yaml builds and steps on a small model through build_optimizer; the `_p`
configs are their base optimizer plus the projection and nothing else; a task recipe without an
entry for an optimizer gives it the entry its config names (`recipe_as`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from conftest import CONF, make_cfg
from projbench.errors import ConfigError, raised_user_error
from projbench.optim import Projected, build_optimizer
from test_optim import NOISE_ONLY, make_net, train

OPTIMS = sorted(p.stem for p in Path(CONF, "optim").glob("*.yaml"))
PROJECTED = [name for name in OPTIMS if name.endswith("_p")]


def test_every_optimizer_has_a_projected_version():
    assert set(OPTIMS) >= {"lion", "lamb", "adan", "nadamw", "adopt", "laprop", "mars", "muon"}
    # SGDP and AdamP (and their variants) project already; adam_p, with its decoupled decay, is AdamW's
    bases = {name for name in OPTIMS if not name.endswith("_p") and not name.startswith(("sgdp", "adamp"))}
    bases -= {"adamw"}
    assert {f"{name}_p" for name in bases} == set(PROJECTED)


@pytest.mark.parametrize("no_decay_bias_norm", [False, True], ids=["one-group", "no-decay-group"])
@pytest.mark.parametrize("name", OPTIMS)
def test_config_builds_and_steps(name, no_decay_bias_norm):
    cfg = make_cfg([f"optim={name}", f"optim.no_decay_bias_norm={no_decay_bias_norm}"])
    model = make_net(torch.float32)
    opt = build_optimizer(cfg.optim, model)
    assert len(opt.param_groups) == (2 if no_decay_bias_norm else 1)
    start = [p.clone() for p in model.parameters()]
    for step in range(2):  # ADOPT only fills its second moment at the first step
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 8, 8)), torch.arange(8) % 5)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        # the wrapper's test reads the gradient after the inner step: it must be left as it was
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert all(torch.isfinite(p).all() and not torch.equal(p, p0) for p, p0 in zip(model.parameters(), start))
    if name.endswith("_p"):
        assert isinstance(opt, Projected) and type(opt.inner).__name__ != "Projected"
        assert any(r.projected.any() for r in opt.last_projection)


@pytest.mark.parametrize("name", PROJECTED)
def test_projected_config_without_projection_is_its_base(name):
    """delta 0 projects nothing; without decay the wrapper then leaves the base's steps as they
    are: the `_p` config passes every argument to its base optimizer unchanged."""
    runs = []
    for overrides in ([f"optim={name}", "optim.delta=0"], [f"optim={name.removesuffix('_p')}"]):
        cfg = make_cfg([*overrides, "optim.decay.value=0"])
        model = make_net(torch.float64)
        train(model, build_optimizer(cfg.optim, model), 5)
        runs.append(model)
    for (param_name, p), q in zip(runs[0].named_parameters(), runs[1].parameters()):
        if param_name not in NOISE_ONLY:  # its noise-only gradient: sign-based steps amplify rounding
            assert (p - q).abs().max() < 1e-12, param_name


def test_recipe_without_an_entry_takes_the_one_its_config_names():
    lion = make_cfg(["task=imagenet", "optim=lion"])
    adamw = make_cfg(["task=imagenet", "optim=adamw"])
    assert lion.optim.lr == pytest.approx(adamw.optim.lr * 0.1)
    assert lion.trainer.schedule.name == adamw.trainer.schedule.name
    lion_p = make_cfg(["task=imagenet", "optim=lion_p", "task.recipe=resnet50_cutmix"])
    assert lion_p.optim.lr == pytest.approx(0.1 * make_cfg(["task=imagenet", "optim=adamw",
                                                             "task.recipe=resnet50_cutmix"]).optim.lr)
    # AdamW's per-step decay kept at a tenth of its lr: Lion's argument x 10 (the Lion paper's rule),
    # whether the row states it per step (ResNets) or in torch's lr * wd (MobileNetV2)
    for recipe in ("resnet18", "mobilenetv2"):
        ref, cfg = (make_cfg(["task=imagenet", f"optim={o}", f"task.recipe={recipe}"]) for o in ("adamw", "lion_p"))
        assert cfg.optim.decay_per_step == pytest.approx(ref.optim.decay_per_step)
        assert cfg.optim.weight_decay == pytest.approx(10 * ref.optim.weight_decay)
    assert "lion has no entry here: adamw's, lr x 0.1" in lion.optim.sources.lr
    sgd, sgd_p = (make_cfg(["task=imagenet", f"optim={o}"]) for o in ("sgd", "sgd_p"))
    assert (sgd_p.optim.lr, sgd_p.trainer.schedule.name) == (sgd.optim.lr, sgd.trainer.schedule.name)
    # SGD's coupled 1e-4 is the wrapper's 1e-3 (SGDP's 1e-4 / (1 - momentum)): the same per-step decay
    assert (sgd_p.optim.weight_decay, sgd_p.optim.decay_per_step) == pytest.approx((1e-3, sgd.optim.decay_per_step))
    assert make_cfg(["task=imagenet", "optim=lion", "optim.lr=3e-4"]).optim.lr == 3e-4  # the command line wins


def test_recipe_without_any_entry_is_a_config_error():
    cfg = make_cfg(["task=imagenet", "optim=lion", "optim.recipe_as.entries=[]"])
    with pytest.raises(InterpolationResolutionError) as info:
        OmegaConf.to_container(cfg.optim, resolve=True)
    error = raised_user_error(info.value)
    assert isinstance(error, ConfigError)
    assert str(error) == ("task.recipes.resnet18: has no entry for optim=lion; add one, or give "
                          "optim.recipe_as.entries an entry it has")
