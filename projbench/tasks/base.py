"""The small interface between a task and the shared loop.

A task owns its data, model, loss and metrics; it never sees the optimizer or the loop. The loop
(projbench/train.py) calls, in order:

    task = TaskClass(cfg.task)          # cfg.task is the task's config node
    task.setup(dist)                    # check / prepare data; raise DataError before training
    model = task.build_model()
    train_loader = task.train_loader(batch_size, dist, seed)
    eval_loaders = task.eval_loaders(batch_size, dist)      # {"val": ..., "test": ...}
    loss = task.training_loss(model, batch)                 # per step, on the device
    metrics = task.evaluate(model, loader, device)          # {"top1": 97.1, ...}, reduced over ranks
    frozen = task.frozen_parameters(model, epoch)           # optional: no step for these this epoch
    state = task.state_dict()                               # in every checkpoint; task.load_state_dict(state) on resume
    final_loaders = task.final_eval_loaders(batch_size, dist)  # optional: evaluated once after the last step
    extra = task.summarize(history)                         # optional derived summary values
    task.write_figures(history, run_dir)                    # optional per-run figures

`metrics` declares each metric's direction ("max" or "min"); the first is the primary metric.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from projbench.data.fixtures import write_once
from projbench.distributed import DistInfo, ResumableSampler, ShardSampler, barrier


class Task(ABC):
    #: metric name -> "max" | "min"; the first entry is the primary metric of the task
    metrics: dict[str, str] = {}

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    @property
    def name(self) -> str:
        return self.cfg.name

    def setup(self, dist: DistInfo) -> None:
        """Check the data set (and write the fixture when asked); called on every rank before
        anything is built. Raise projbench.errors.DataError naming the path on a problem."""

    def data_root(self) -> Path:
        """Where the data set is read from: `task.data.root`, or `task.data.fixture_root` with
        `task.data.fixture=true`."""
        data = self.cfg.data
        return Path(data.fixture_root if data.fixture else data.root)

    def prepare_fixture(self, dist: DistInfo, writer: Callable[[Path], None]) -> Path:
        """The data root; with `task.data.fixture=true`, rank 0 first writes the fixture there with
        `writer(dir)`, once (projbench.data.fixtures.write_once), while the other ranks wait."""
        root = self.data_root()
        if self.cfg.data.fixture:
            if dist.is_main:
                write_once(root, writer)
            barrier()
        return root

    @abstractmethod
    def build_model(self) -> nn.Module: ...

    @abstractmethod
    def train_dataset(self) -> Dataset: ...

    def eval_datasets(self) -> dict[str, Dataset]:
        return {}

    @abstractmethod
    def training_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar loss of one batch (already on the device)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        """Metrics over `loader`, reduced across ranks (torchmetrics does this when a process
        group exists). Called in eval mode under torch.no_grad()."""

    def model_name(self) -> str:
        return self.cfg.get("model", {}).get("arch", type(self).__name__)

    def optimizer_groups(self, model: nn.Module) -> list[dict]:
        """Extra parameter groups with their own settings (e.g. loss proxies with their own lr)."""
        return []

    def frozen_parameters(self, model: nn.Module, epoch: int) -> list[nn.Parameter]:
        """Parameters that take no optimizer step during `epoch` (counted from 0), e.g. a pretrained
        trunk while a new head warms up. The loop drops their gradients before each step of that
        epoch (projbench/freezing.py), so the optimizer skips them: no update, no weight decay, no
        moment. Default: none."""
        return []

    def epoch_start(self, model: nn.Module, epoch: int, loader: DataLoader, device: torch.device, seed: int) -> None:
        """Called before the first step of each training epoch (counted from 0) with the model
        (not DDP-wrapped), the training loader, the device and the run's seed; not called when a
        run resumes part-way through an epoch, so what it computes belongs in `state_dict`.
        E.g. ReBias's kernel bandwidths from a quarter of the training set. Default: nothing."""

    def final_eval_loaders(self, batch_size: int, dist: DistInfo) -> dict[str, DataLoader]:
        """Loaders of a final evaluation whose protocol differs from the one during training (e.g.
        Transformer-XL's eval.py), run through `evaluate` once after the last step. The keys are
        the names its metrics are logged under, e.g. {"test_final": ...} -> test_final/<metric>."""
        return {}

    def state_dict(self) -> dict:
        """What the task carries from step to step besides the model (e.g. a recurrent memory),
        saved in every checkpoint so that a resumed run continues exactly. Called on every rank at
        the same step (so it may gather the ranks' states); rank 0's result is saved."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned; called on every rank when a run resumes."""

    def summarize(self, history: list[dict]) -> dict:
        """Values derived from the whole metric history (the parsed metrics.jsonl), added to
        summary.json under "derived"."""
        return {}

    def write_figures(self, history: list[dict], run_dir: Path) -> list[Path]:
        """Figures of this one run, written into its directory at the end (rank 0)."""
        return []

    # Loaders: the default is a (distributed, resumable) shuffled loader over train_dataset();
    # tasks with special batching (class-balanced, token streams) override these.
    def loader_kwargs(self) -> dict:
        workers = self.cfg.data.get("num_workers", 0)
        workers = default_num_workers() if workers is None else int(workers)
        return dict(num_workers=workers, pin_memory=torch.cuda.is_available(),
                    persistent_workers=workers > 0)

    def train_loader(self, batch_size: int, dist: DistInfo, seed: int) -> DataLoader:
        dataset = self.train_dataset()
        sampler = ResumableSampler(dataset, dist, shuffle=True, seed=seed, drop_last=True)
        # Its own generator (the loop reseeds it each epoch from seed and epoch): creating an
        # iterator must not draw from the global RNG, or a resumed run's augmentations would differ.
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                          generator=torch.Generator(), **self.loader_kwargs())

    def eval_loaders(self, batch_size: int, dist: DistInfo) -> dict[str, DataLoader]:
        return {
            split: DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(ds, dist),
                              generator=torch.Generator().manual_seed(0), **self.loader_kwargs())
            for split, ds in self.eval_datasets().items()
        }


def default_num_workers(limit: int = 8) -> int:
    """DataLoader workers per rank when `task.data.num_workers` is null: the CPUs this process may
    run on, shared by the ranks of its node (torchrun's LOCAL_WORLD_SIZE), less one for the
    training process itself; at most `limit`."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = cpus // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(0, min(limit, per_rank - 1))
