"""Optimizer phases within one run: `trainer.phases`.

The Harmonic CNN authors train with Adam, then switch to SGD and lower its lr twice, each time
going back to the best validation checkpoint first (minzwon/sota-music-tagging-models,
training/solver.py `opt_schedule`). `trainer.phases` expresses such a run in the config:

    trainer:
      phases:                      # name -> a phase; they run in the order of start_epoch
        sgd1: {start_epoch: 80, optim: <a conf/optim node>}   # a new optimizer from epoch 80 on
        sgd2: {start_epoch: 100, lr: 1.0e-4}                  # the same optimizer, a new base lr
        sgd3: {start_epoch: 120, lr: 1.0e-5}

Before the first phase the run's own `optim` trains. A phase with `optim` replaces the optimizer
(fresh state) and its lr schedule (trainer.schedule, still read on the run's epoch axis); a phase
with `lr` keeps the optimizer and its state (momentum buffers) and changes the base lr of its
groups, which keep their ratios to the first group's (the upstream code sets the lr of every
group). `reload_best` (default true) first puts back the model of the best evaluation so far
(trainer.select_best must be on). The task's own optimizer groups (Task.optimizer_groups) are
built again for a new optimizer, as the task gives them.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from projbench.errors import ConfigError
from projbench.optim.factory import check_optim_config
from projbench.schedules import build_scheduler

KEY = "trainer.phases"
PHASE_KEYS = {"start_epoch", "optim", "lr", "reload_best", "sources"}


@dataclass(frozen=True)
class Phase:
    name: str
    start_step: int
    optim: DictConfig | None       # a new optimizer from this phase on ...
    lr: float | None               # ... or a new base lr for the current one
    reload_best: bool


class PhasePlan:
    """`trainer.phases`, checked and ordered. Phase index 0 is the run's start (its own optim);
    index k > 0 is the k-th phase of `phases`."""

    def __init__(self, cfg: DictConfig | None, steps_per_epoch: int, total_steps: int, selecting: bool):
        self.phases: list[Phase] = []
        for name, raw in (cfg or {}).items():
            where = f"{KEY}.{name}"
            if not isinstance(raw, DictConfig):
                raise ConfigError(where, f"must be a mapping with keys {sorted(PHASE_KEYS)}")
            unknown = set(raw) - PHASE_KEYS
            if unknown:
                raise ConfigError(where, f"unknown keys {sorted(unknown)}; a phase has {sorted(PHASE_KEYS)}")
            start = raw.get("start_epoch")
            if start is None or start <= 0:
                raise ConfigError(f"{where}.start_epoch", f"must be > 0 (the run's optim trains before it), got {start}")
            start_step = round(float(start) * steps_per_epoch)
            if start_step >= total_steps:
                raise ConfigError(f"{where}.start_epoch", f"epoch {start} (step {start_step}) is not before the "
                                  f"end of the run (step {total_steps})")
            optim, lr = raw.get("optim"), raw.get("lr")
            if (optim is None) == (lr is None):
                raise ConfigError(where, "give either optim (a new optimizer) or lr (a new base lr), not both or none")
            if optim is not None:
                if "_target_" not in optim:
                    raise ConfigError(f"{where}.optim", "needs _target_ (compose it from conf/optim, "
                                      "e.g. `- /optim@phases.<name>.optim: sgd` in the defaults list)")
                try:
                    check_optim_config(optim)
                except ConfigError as exc:
                    raise ConfigError(f"{where}.{exc.key}", str(exc).split(": ", 1)[1]) from None
            if lr is not None and lr <= 0:
                raise ConfigError(f"{where}.lr", f"must be > 0, got {lr}")
            reload_best = bool(raw.get("reload_best", True))
            if reload_best and not selecting:
                raise ConfigError(f"{where}.reload_best", "needs trainer.select_best.metric (the best model "
                                  "is the one of the best evaluation of that metric); or set it false")
            self.phases.append(Phase(str(name), start_step, optim, None if lr is None else float(lr), reload_best))
        self.phases.sort(key=lambda p: p.start_step)
        for before, after in zip(self.phases, self.phases[1:]):
            if before.start_step == after.start_step:
                raise ConfigError(f"{KEY}.{after.name}.start_epoch", f"starts at the same step as {before.name}")

    def __bool__(self) -> bool:
        return bool(self.phases)

    def index_at(self, step: int) -> int:
        """The phase in force for the training step after `step` completed steps."""
        return sum(p.start_step <= step for p in self.phases)

    def optimizer_phase(self, index: int) -> Phase | None:
        """The latest phase up to `index` that built a new optimizer (None: the run's own)."""
        return next((p for p in reversed(self.phases[:index]) if p.optim is not None), None)


def new_optimizer_schedule(phase: Phase, schedule: DictConfig, build, steps_per_epoch: int,
                           total_steps: int) -> tuple[Optimizer, LambdaLR]:
    """The optimizer of `phase` (`build(optim_cfg)` makes it) with trainer.schedule on the run's
    epoch axis from the phase's first step."""
    optimizer = build(phase.optim)
    return optimizer, build_scheduler(schedule, optimizer, steps_per_epoch, total_steps, start_step=phase.start_step)


def set_base_lr(scheduler: LambdaLR, lr: float) -> None:
    """A new base lr for the scheduler's optimizer: the first group gets `lr`, the others keep
    their ratio to it; the current lr follows at once (the schedule's multiplier now)."""
    first = scheduler.base_lrs[0]
    scheduler.base_lrs = [lr * base / first for base in scheduler.base_lrs]
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(scheduler.last_epoch)
