"""Learning-rate schedules as multipliers of the base lr, as functions of the (fractional) epoch.

Each is registered by name; `trainer.schedule.name` picks one. A linear warm-up from 0 over
`warmup_epochs` wraps any of them. Epoch-based definitions match the paper's recipes (ImageNet:
x0.1 every 30 epochs), and step-based tasks still work: the loop passes step / steps_per_epoch.
"""

from __future__ import annotations

import math
from typing import Callable

from omegaconf import DictConfig
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from projbench.errors import ConfigError

Multiplier = Callable[[float, float, DictConfig], float]


def _constant(epoch: float, total: float, cfg: DictConfig) -> float:
    return 1.0


def _step(epoch: float, total: float, cfg: DictConfig) -> float:
    return cfg.gamma ** math.floor(epoch / cfg.step_size)


def _multistep(epoch: float, total: float, cfg: DictConfig) -> float:
    return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


def _cosine(epoch: float, total: float, cfg: DictConfig) -> float:
    progress = min(max(epoch - cfg.warmup_epochs, 0.0) / max(total - cfg.warmup_epochs, 1e-12), 1.0)
    floor = cfg.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


SCHEDULES: dict[str, Multiplier] = {
    "constant": _constant,
    "step": _step,
    "multistep": _multistep,
    "cosine": _cosine,
}


def validate_schedule(cfg: DictConfig) -> None:
    if cfg.name not in SCHEDULES:
        raise ConfigError("trainer.schedule.name", f"unknown schedule {cfg.name!r}; choose one of {sorted(SCHEDULES)}")
    if cfg.name == "step" and cfg.step_size <= 0:
        raise ConfigError("trainer.schedule.step_size", f"must be > 0 epochs, got {cfg.step_size}")
    if cfg.warmup_epochs < 0:
        raise ConfigError("trainer.schedule.warmup_epochs", f"must be >= 0, got {cfg.warmup_epochs}")


def lr_multiplier(cfg: DictConfig, epoch: float, total_epochs: float) -> float:
    """The schedule's multiplier at `epoch`, warm-up included."""
    base = SCHEDULES[cfg.name](epoch, total_epochs, cfg)
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return base * epoch / cfg.warmup_epochs
    return base


def build_scheduler(cfg: DictConfig, optimizer: Optimizer, steps_per_epoch: int, total_steps: int,
                    start_step: int = 0) -> LambdaLR:
    """A per-step LambdaLR following `cfg` (trainer.schedule). `start_step`: the run's step at
    which this optimizer starts (projbench/phases.py), so the schedule stays on the run's axis."""
    validate_schedule(cfg)
    total_epochs = total_steps / steps_per_epoch
    return LambdaLR(optimizer, lambda step: lr_multiplier(cfg, (start_step + step) / steps_per_epoch, total_epochs))
