"""Parameters a task keeps out of the optimizer step for some epochs (Task.frozen_parameters).

The loop calls `drop_grads(step)` between backward and the optimizer step: the gradients of the
parameters the task names for the current epoch are set to None, and every torch optimizer (and
ours) skips a parameter without a gradient, so it gets no update, no weight decay and no moment
update. Dropping gradients after backward, rather than switching `requires_grad`, keeps the set
of parameters that produce gradients fixed, which DDP requires (its reducer is built once); every
rank drops the same, already averaged, gradients. The backward pass still computes them, which
costs time during those epochs only.
"""

from __future__ import annotations

from torch import nn

from projbench.tasks.base import Task


class ParameterFreezer:
    """Asks the task once per epoch which parameters are frozen, and drops their gradients."""

    def __init__(self, task: Task, model: nn.Module, steps_per_epoch: int):
        self.task, self.model, self.steps_per_epoch = task, model, steps_per_epoch
        self._epoch: int | None = None
        self._frozen: list[nn.Parameter] = []

    def frozen(self, epoch: int) -> list[nn.Parameter]:
        """The parameters frozen during `epoch` (asked of the task when the epoch changes)."""
        if epoch != self._epoch:
            self._frozen = list(self.task.frozen_parameters(self.model, epoch))
            self._epoch = epoch
        return self._frozen

    def drop_grads(self, step: int) -> None:
        """Before the optimizer step that follows `step` completed steps."""
        for p in self.frozen(step // self.steps_per_epoch):
            p.grad = None
