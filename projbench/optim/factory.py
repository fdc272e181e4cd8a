"""`build_optimizer(cfg.optim, model)`: the one place where a config becomes an optimizer."""

from __future__ import annotations

from typing import Iterable

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import nn

from projbench.decay import check as check_decay
from projbench.errors import ConfigError

# Keys of conf/optim/*.yaml that are ours, not the optimizer's arguments: `decay` is the weight
# decay as the recipe states it (projbench/decay.py turns it into `weight_decay`), `sources`
# where each recipe value comes from, `recipe_as` which entry of a task's per-optimizer recipe an
# optimizer without one of its own takes (projbench/config.py).
_META_KEYS = ("name", "_target_", "no_decay_bias_norm", "decay", "decay_per_step", "sources", "recipe_as")


def param_groups(model: nn.Module, no_decay_bias_norm: bool, extra_groups: Iterable[dict] = ()) -> list[dict]:
    """Trainable parameters as optimizer groups.

    With `no_decay_bias_norm`, every parameter with fewer than two dimensions (biases and
    normalisation weights) goes to a group with weight_decay 0, as timm's create_optimizer_v2
    does. `extra_groups` (e.g. ProxyAnchor proxies with their own lr) are appended as given; their
    parameters are excluded from the model groups.
    """
    extra_groups = list(extra_groups)
    taken = {id(p) for g in extra_groups for p in g["params"]}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    if not no_decay_bias_norm:
        return [{"params": params}] + extra_groups
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]] + extra_groups


def check_optim_config(cfg: DictConfig) -> None:
    """The checks that need no model, run before anything is built."""
    lr = cfg.get("lr")
    if lr is None or lr <= 0:
        raise ConfigError("optim.lr", f"must be > 0, got {lr}")
    check_decay(cfg)
    if "weight_decay" in cfg and cfg.weight_decay < 0:
        raise ConfigError("optim.weight_decay", f"must be >= 0, got {cfg.weight_decay}")


def build_optimizer(cfg: DictConfig, model: nn.Module, extra_groups: Iterable[dict] = ()) -> torch.optim.Optimizer:
    """The optimizer named by `cfg` (a conf/optim/*.yaml node) over `model`'s parameters.
    Arguments set to null are not passed (the optimizer's default applies), so a task may set an
    argument that only some optimizers have (e.g. `nesterov`) to null for the others."""
    check_optim_config(cfg)
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
              if k not in _META_KEYS and v is not None}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    try:
        cls = get_class(cfg._target_)
    except Exception as exc:  # hydra raises ImportError or ValueError depending on the path
        raise ConfigError("optim._target_", f"cannot import {cfg._target_!r}: {exc}") from exc
    groups = param_groups(model, cfg.get("no_decay_bias_norm", False), extra_groups)
    try:
        return cls(groups, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optim ({cfg.name})", str(exc)) from exc
