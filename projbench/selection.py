"""Model selection on a validation split: `trainer.select_best`.

Upstream codebases test the model of their best validation evaluation, not the last one: the
Harmonic CNN code (minzwon/sota-music-tagging-models and data-driven-harmonic-filters,
training/solver.py) saves `best_model.pth` whenever the validation loss improves and its eval.py
tests that file. With `trainer.select_best.metric: val/loss` the loop does the same: after each
evaluation, a better value of that metric replaces the kept model state (a CPU copy, on every
rank: DDP keeps the ranks' models equal, and every rank takes part in the final evaluation); the
kept state and its step travel in checkpoint.pt, so a resumed run selects exactly as an
uninterrupted one. At the end the kept state is evaluated on every evaluation split, and
summary.json's "selection" holds the chosen step, the metric's value there, and those metrics
beside the final model's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from projbench.errors import ConfigError

log = logging.getLogger(__name__)
KEY = "trainer.select_best"


@dataclass
class Chosen:
    """The evaluation whose model is kept."""

    step: int
    epoch: float
    value: float


class BestCheckpoint:
    """Keeps the model state of the best evaluation of one "<split>/<name>" metric."""

    def __init__(self, cfg: DictConfig | None, directions: dict[str, str], splits: list[str]):
        cfg = cfg or {}
        self.metric: str | None = cfg.get("metric")
        self.chosen: Chosen | None = None
        self.state: dict[str, torch.Tensor] | None = None
        if self.metric is None:
            return
        split, _, name = str(self.metric).partition("/")
        if split not in splits or name not in directions:
            raise ConfigError(f"{KEY}.metric", f"{self.metric!r} is not an evaluated metric; the task evaluates "
                              f"the splits {sorted(splits)} with the metrics {sorted(directions)} (<split>/<name>)")
        self.split, self.name = split, name
        self.mode = cfg.get("mode") or directions[name]
        if self.mode not in ("max", "min"):
            raise ConfigError(f"{KEY}.mode", f"must be max, min or null (the metric's direction), got {self.mode!r}")
        self.from_epoch = float(cfg.get("from_epoch") or 0)

    @property
    def enabled(self) -> bool:
        return self.metric is not None

    def observe(self, results: dict[str, dict[str, float]], step: int, epoch: float, model: nn.Module) -> bool:
        """After an evaluation (`results`: split -> metrics): keep the model if it is the best so
        far; returns whether it was."""
        if not self.enabled or self.split not in results or epoch < self.from_epoch:
            return False
        value = float(results[self.split][self.name])
        if self.chosen is not None:
            better = value > self.chosen.value if self.mode == "max" else value < self.chosen.value
            if not better:
                return False
        self.chosen = Chosen(step, epoch, value)
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict | None:
        if self.chosen is None:
            return None
        return {"step": self.chosen.step, "epoch": self.chosen.epoch, "value": self.chosen.value,
                "model": self.state}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            self.chosen, self.state = None, None
            return
        self.chosen = Chosen(int(state["step"]), float(state["epoch"]), float(state["value"]))
        self.state = {k: v.cpu() for k, v in state["model"].items()}

    # -- the end ----------------------------------------------------------------------------
    def load_into(self, model: nn.Module) -> bool:
        """Put the kept state into `model`; False (and a warning) when nothing was kept."""
        if self.state is None:
            log.warning("%s: no evaluation of %s at epoch >= %g; nothing was selected", KEY, self.metric,
                        self.from_epoch)
            return False
        model.load_state_dict(self.state)
        return True

    def summary(self, metrics: dict[str, float]) -> dict:
        """summary.json's "selection": the rule, the chosen evaluation, and the metrics of its model
        ("<split>/<name>" -> value) on every evaluation split."""
        chosen = self.chosen
        return {"metric": self.metric, "mode": self.mode, "from_epoch": self.from_epoch,
                "step": chosen.step if chosen else None, "epoch": round(chosen.epoch, 4) if chosen else None,
                "value": chosen.value if chosen else None, "metrics": metrics}
