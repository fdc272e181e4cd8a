"""The one training loop every task runs through.

    train(cfg, run_dir) -> summary dict

It knows nothing about the task beyond projbench.tasks.base.Task, and nothing about the optimizer
beyond torch.optim.Optimizer. Per step it does what a bare PyTorch loop does (forward, backward,
optimizer step, scheduler step) plus two tiny device-side ops that remember the first non-finite
loss; it reads values on the host only every `log_every` steps, at evaluations, diagnostics and
checkpoints. Three hooks live in their own modules: parameters a task freezes for an epoch
(freezing.py, between backward and step), the model kept on a validation metric (selection.py,
after each evaluation and at the end) and optimizer phases (phases.py, before a step).
"""

from __future__ import annotations

import logging
import random
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import get_class
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from projbench import diagnostics
from projbench.distributed import DistInfo, barrier, broadcast_object, init_distributed
from projbench.errors import ConfigError, Interrupted, NonFiniteLossError
from projbench.freezing import ParameterFreezer
from projbench.optim import build_optimizer
from projbench.optim.factory import check_optim_config
from projbench.phases import PhasePlan, new_optimizer_schedule, set_base_lr
from projbench.records import LossWindow, RunRecorder, read_summary
from projbench.rundir import SUMMARY, Plan, RunCompleted, RunDirectory, open_run, write_checkpoint
from projbench.schedules import build_scheduler, validate_schedule
from projbench.selection import BestCheckpoint
from projbench.signals import StopPoll, handling_stop_signals
from projbench.tasks.base import Task
from projbench.validation import check_loop_config

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def validate_config(cfg: DictConfig) -> None:
    """Fail before anything is built, naming the key at fault."""
    check_loop_config(cfg)  # types, nulls and finite numbers of the keys the loop reads
    tr = cfg.trainer
    if str(tr.precision) not in AUTOCAST_DTYPES:
        raise ConfigError("trainer.precision", f"got {tr.precision!r}; choose one of {sorted(AUTOCAST_DTYPES)}")
    if tr.max_steps is None and (tr.max_epochs is None or tr.max_epochs <= 0):
        raise ConfigError("trainer.max_epochs", "set max_epochs > 0 or max_steps > 0")
    if tr.max_steps is not None and tr.max_steps <= 0:
        raise ConfigError("trainer.max_steps", f"must be > 0, got {tr.max_steps}")
    for key in ("log_every", "ckpt_every", "diagnostics_every"):
        if tr[key] is not None and tr[key] <= 0:
            raise ConfigError(f"trainer.{key}", f"must be > 0 (or null), got {tr[key]}")
    if tr.grad_clip is not None and tr.grad_clip <= 0:
        raise ConfigError("trainer.grad_clip", f"must be > 0 or null, got {tr.grad_clip}")
    if cfg.task.data.batch_size <= 0:
        raise ConfigError("task.data.batch_size", f"must be > 0, got {cfg.task.data.batch_size}")
    validate_schedule(tr.schedule)
    check_optim_config(cfg.optim)


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device", "cuda was asked for but no GPU is visible")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: Any, device: torch.device, channels_last: bool) -> Any:
    """Move tensors in a (nested) batch to `device`; 4-D float tensors go channels_last if asked."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Trainer:
    """Everything one run holds; `fit()` runs it."""

    cfg: DictConfig
    run_dir: Path
    dist: DistInfo
    device: torch.device
    task: Task
    model: nn.Module  # the bare model (checkpoints, evaluation)
    train_model: nn.Module  # what the forward pass goes through (DDP and/or compiled)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    train_loader: Any
    eval_loaders: dict
    steps_per_epoch: int
    total_steps: int
    recorder: RunRecorder
    freezer: ParameterFreezer
    selector: BestCheckpoint  # trainer.select_best
    plan: PhasePlan  # trainer.phases
    step: int = 0
    phase: int = 0  # the index in `plan` of the phase in force
    monitor: diagnostics.ScaleInvariance = field(init=False)  # weight norms, effective steps
    rundir: RunDirectory | None = None  # holds the directory's lock while the run lives
    loss_window: LossWindow | None = None
    stop: StopPoll | None = None  # asked after every step whether a stop signal arrived

    def __post_init__(self):
        self.monitor = diagnostics.ScaleInvariance(self.cfg.trainer.diagnostics_every)
        # Defaults for a Trainer built by hand (scripts/bench_train.py): no lock, one process.
        self.rundir = self.rundir or RunDirectory(self.run_dir)
        self.loss_window = self.loss_window or LossWindow(self.device)
        self.stop = self.stop or StopPoll(distributed=False)

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        task_state = self.task.state_dict()  # on every rank: a task may gather its ranks' state
        if not self.dist.is_main:
            return
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "wall_seconds": self.recorder.wall_seconds(),
            "loss_window": self.loss_window.state_dict(),
            "monitor": self.monitor.state_dict(self.optimizer),
            "task": task_state,
            "phase": self.phase,
            "select_best": self.selector.state_dict(),
        }
        write_checkpoint(state, self.rundir.checkpoint)  # atomic; a full disk keeps the previous one

    def load_checkpoint(self, state: dict) -> int:
        """Restore everything `save_checkpoint` wrote (`state`: the loaded checkpoint)."""
        self.model.load_state_dict(state["model"])
        self.phase = int(state.get("phase", 0))
        phase = self.plan.optimizer_phase(self.phase)
        if phase is not None:  # the optimizer in force then, before its state is loaded
            self.optimizer, self.scheduler = new_optimizer_schedule(
                phase, self.cfg.trainer.schedule, self._build_optimizer, self.steps_per_epoch, self.total_steps)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.task.load_state_dict(state.get("task", {}))
        _set_rng_state(state["rng"])
        self.recorder.wall_offset = float(state["wall_seconds"])
        if "loss_window" in state:
            self.loss_window.load_state_dict(state["loss_window"])
        if "monitor" in state:  # the fixed set of scale-invariant weights, as classified before
            self.monitor.load_state_dict(state["monitor"], self.optimizer)
        self.selector.load_state_dict(state.get("select_best"))
        self.step = int(state["step"])
        return self.step

    # -- phases (projbench/phases.py) ----------------------------------------------------------
    def _build_optimizer(self, optim_cfg: DictConfig) -> torch.optim.Optimizer:
        """A phase's optimizer. The task's extra groups (e.g. retrieval's proxies at 100x) are
        built from the run's lr: they keep their ratio to it under the phase's lr."""
        scale = float(optim_cfg.lr) / float(self.cfg.optim.lr)
        extra = [{**group, "lr": group["lr"] * scale} if "lr" in group else group
                 for group in self.task.optimizer_groups(self.model)]
        return build_optimizer(optim_cfg, self.model, extra)

    def _enter_phases(self) -> None:
        """Start the phases of trainer.phases whose first step comes next."""
        while self.phase < self.plan.index_at(self.step):
            self.phase += 1
            phase = self.plan.phases[self.phase - 1]
            if phase.reload_best:
                self.selector.load_into(self.model)
            if phase.optim is not None:
                self.optimizer, self.scheduler = new_optimizer_schedule(
                    phase, self.cfg.trainer.schedule, self._build_optimizer, self.steps_per_epoch, self.total_steps)
            else:
                set_base_lr(self.scheduler, phase.lr)
            log.info("phase %s from step %d: %s, lr %.3g%s", phase.name, self.step, type(self.optimizer).__name__,
                     self.optimizer.param_groups[0]["lr"], ", from the best model" if phase.reload_best else "")

    # -- the loop ------------------------------------------------------------------------------
    def evaluate(self, loaders: dict | None = None, record: bool = True) -> dict[str, dict[str, float]]:
        """Evaluate on `loaders` (default: the task's eval loaders) and log under their names
        (`record=False`: only return the metrics)."""
        self.model.eval()
        results = {}
        with torch.no_grad(), self._autocast():
            for split, loader in (self.eval_loaders if loaders is None else loaders).items():
                results[split] = self.task.evaluate(self.model, loader, self.device)
                if record:
                    self.recorder.log(split, results[split], self.step, self.epoch)
        self.model.train()
        return results

    def evaluate_selected(self) -> dict | None:
        """trainer.select_best: the kept model's metrics on every evaluation split and the task's
        final protocol, for summary.json's "selection" (None when selection is off). When the kept
        model is the final one these are its logged metrics; otherwise it is loaded into
        `self.model` and evaluated."""
        if not self.selector.enabled:
            return None
        loaders = {**self.eval_loaders, **self._final_eval_loaders()}
        chosen = self.selector.chosen
        if chosen is not None and chosen.step == self.step:  # the final model: its last logged metrics
            metrics = {key: value for key, value in self.recorder.final.items() if key.split("/")[0] in loaders}
        elif self.selector.load_into(self.model):
            metrics = {f"{split}/{name}": value for split, values in self.evaluate(loaders, record=False).items()
                       for name, value in values.items()}
        else:
            metrics = {}
        selection = self.selector.summary(metrics)
        self.recorder.log_selection(selection, self.step)
        return selection

    def _autocast(self):
        dtype = AUTOCAST_DTYPES[str(self.cfg.trainer.precision)]
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    def _batches(self):
        """Batches from the current step on, epoch after epoch; (re)seeds the order per epoch."""
        loader, seed = self.train_loader, int(self.cfg.seed)
        while True:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            if getattr(loader, "generator", None) is not None:
                loader.generator.manual_seed(seed * 1_000_003 + epoch)
            skip = offset
            # Start part-way through the epoch in the sampler when it can (no batches are loaded
            # and dropped); a loader with a batch sampler (batch_size None) skips batches instead.
            if offset and hasattr(sampler, "set_start") and loader.batch_size is not None:
                sampler.set_start(offset * loader.batch_size)
                skip = 0
            for i, batch in enumerate(loader):
                if i < skip:
                    continue
                yield batch
                if self.step % self.steps_per_epoch == 0:
                    break

    def fit(self) -> dict:
        tr = self.cfg.trainer
        eval_every = tr.eval_every or self.steps_per_epoch
        batch_size = int(self.cfg.task.data.batch_size)
        bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        window = self.loss_window
        bar = tqdm(total=self.total_steps, initial=self.step, dynamic_ncols=True, desc=self.task.name,
                   disable=not (self.dist.is_main and tr.progress))
        self.train_model.train()
        batches = self._batches()
        signum = self.stop.now()  # a signal during set-up: stop before training
        if signum:
            raise Interrupted(signum, self.step)
        while self.step < self.total_steps:
            self._enter_phases()
            if self.step % self.steps_per_epoch == 0:
                self.task.epoch_start(self.model, self.step // self.steps_per_epoch, self.train_loader, self.device,
                                      int(self.cfg.seed))
                self.train_model.train()
            batch = to_device(next(batches), self.device, tr.channels_last)
            with self._autocast():
                loss = self.task.training_loss(self.train_model, batch)
            self.scaler.scale(loss).backward()
            self.freezer.drop_grads(self.step)
            if tr.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), tr.grad_clip)
            pending = self.monitor.before_step(self.optimizer, self.step + 1)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            loss = loss.detach().float()
            bad_step = torch.where(torch.isfinite(loss) | (bad_step >= 0), bad_step, self.step)
            window.add(loss)

            if values := self.monitor.after_step(self.optimizer, pending):
                self.recorder.log("diag", values, self.step, self.epoch)
            self.optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                # GradScaler skips optimizer.step() on a step with inf/NaN gradients (the first few
                # of an fp16 run, while it finds its scale); the schedule still advances, by design.
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
                self.scheduler.step()

            last = self.step == self.total_steps
            if _due(self.step, tr.log_every) or last:
                self._check_finite(bad_step, window.total)
                mean_loss, samples_per_s = window.take(batch_size)
                values = {"loss": mean_loss, "lr": self.optimizer.param_groups[0]["lr"],
                          "samples_per_s": samples_per_s}
                self.recorder.log("train", values, self.step, self.epoch)
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.3g}",
                                sps=f"{values['samples_per_s']:.0f}")
            bar.update(1)
            if self.step % eval_every == 0 or last:
                self.selector.observe(self.evaluate(), self.step, self.epoch, self.model)
            checkpoint_due = _due(self.step, tr.ckpt_every) or last
            if checkpoint_due:
                self._check_finite(bad_step, window.total)
                self.save_checkpoint()
            signum = self.stop.poll()  # every rank gets the same answer at the same step
            if signum and not last:
                if not checkpoint_due:  # finish this step, checkpoint it, stop
                    self._check_finite(bad_step, window.total)
                    self.save_checkpoint()
                raise Interrupted(signum, self.step)
        self.stop.close()
        bar.close()
        # the task's final evaluation protocol, if it has one: once, also when a resumed run had done its steps
        final_loaders = self._final_eval_loaders()
        if final_loaders:
            self.evaluate(final_loaders)
        return self.recorder.final

    def _final_eval_loaders(self) -> dict:
        return self.task.final_eval_loaders(int(self.cfg.task.data.batch_size) // self.dist.world_size, self.dist)

    def _check_finite(self, bad_step: torch.Tensor, loss_sum: torch.Tensor) -> None:
        step = int(bad_step.item())
        if step >= 0:
            raise NonFiniteLossError(step, float(loss_sum.item()))


def _due(step: int, every: int | None) -> bool:
    """Whether a periodic action (`every` steps; null: never) falls on `step`."""
    return bool(every) and step % every == 0


def build_trainer(cfg: DictConfig, run_dir: Path) -> Trainer:
    validate_config(cfg)
    tr = cfg.trainer
    kind = resolve_device(tr.device, 0).type
    dist = init_distributed(kind)
    device = resolve_device(tr.device, dist.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    # Every torchrun rank resolves ${now:...} itself; all ranks use rank 0's run directory so that
    # checkpoints (resume=true) and fixtures are found in one place.
    run_dir = Path(broadcast_object(str(run_dir)))
    # The directory is locked and checked (fresh run, resume, or a refusal) before anything is
    # built or written; it is released when the run ends, or here if building fails.
    rundir, start = open_run(run_dir, cfg, dist, device)
    try:
        return _build(cfg, run_dir, dist, device, rundir, start)
    except BaseException:
        rundir.release()
        raise


def _build(cfg: DictConfig, run_dir: Path, dist: DistInfo, device: torch.device, rundir: RunDirectory,
           start: Plan) -> Trainer:
    tr = cfg.trainer
    global_batch = int(cfg.task.data.batch_size)
    if global_batch % dist.world_size:
        raise ConfigError("task.data.batch_size",
                          f"the global batch {global_batch} must divide by the {dist.world_size} ranks")
    seed_everything(int(cfg.seed))

    task: Task = get_class(cfg.task._target_)(cfg.task)
    task.setup(dist)
    model = task.build_model().to(device)
    if tr.channels_last:
        model = model.to(memory_format=torch.channels_last)
        if device.type == "cpu" and str(tr.precision) in ("bf16", "fp16"):
            log.warning("trainer.channels_last with %s on the CPU: PyTorch's reduced-precision channels_last "
                        "BatchNorm backward can give NaN gradients on some CPUs (pytorch/pytorch#147303); "
                        "prefer float32 or the default layout on the CPU", tr.precision)
    optimizer = build_optimizer(cfg.optim, model, task.optimizer_groups(model))

    per_rank = global_batch // dist.world_size
    train_loader = task.train_loader(per_rank, dist, int(cfg.seed))
    eval_loaders = task.eval_loaders(per_rank, dist)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError("task.data.batch_size",
                          f"{per_rank} per rank is larger than the training set; no full batch fits")
    total = int(tr.max_steps) if tr.max_steps is not None else int(tr.max_epochs) * steps_per_epoch
    scheduler = build_scheduler(tr.schedule, optimizer, steps_per_epoch, total)
    scaler = torch.amp.GradScaler(device.type, enabled=str(tr.precision) == "fp16")
    selector = BestCheckpoint(tr.get("select_best"), task.metrics, list(eval_loaders))
    plan = PhasePlan(tr.get("phases"), steps_per_epoch, total, selecting=selector.enabled)

    train_model = model
    if dist.enabled:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tr.compile:
        train_model = torch.compile(train_model)

    if start.kind == "resume" and total <= start.step:
        key = "trainer.max_steps" if tr.max_steps is not None else "trainer.max_epochs"
        raise ConfigError(key, f"the run to resume is at step {start.step} of {total}: nothing is left to train "
                               f"(raise {key} to train it further)")
    if dist.is_main:
        rundir.start(cfg, start)  # the checks passed: only now is anything written
    resume_step = start.step if start.kind == "resume" else None
    recorder = RunRecorder(run_dir, cfg, task.metrics, enabled=dist.is_main, resume_step=resume_step)
    trainer = Trainer(cfg, run_dir, dist, device, task, model, train_model, optimizer, scheduler, scaler,
                      train_loader, eval_loaders, steps_per_epoch, total, recorder,
                      ParameterFreezer(task, model, steps_per_epoch), selector, plan, rundir=rundir,
                      loss_window=LossWindow(device), stop=StopPoll(dist.enabled))
    if start.state is not None:
        trainer.load_checkpoint(start.state)
        log.info("resumed from %s at step %d", rundir.checkpoint, trainer.step)
    barrier()
    return trainer


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Run one (task, optim, seed) cell; returns (and writes) its summary. A stop signal ends it
    after the current step with a checkpoint (Interrupted); this config's completed run in
    `run_dir` (resume=auto) is returned as it is, with `"skipped": True`."""
    with handling_stop_signals():
        try:
            trainer = build_trainer(cfg, run_dir)
        except RunCompleted as done:
            return {**done.summary, "skipped": True}
        try:
            return _run(trainer)
        finally:
            trainer.rundir.release()


def _run(trainer: Trainer) -> dict:
    n_params = sum(p.numel() for p in trainer.model.parameters())
    common = dict(device=str(trainer.device), world_size=trainer.dist.world_size, model=trainer.task.model_name())
    extra = {"params": n_params, "primary_metric": next(iter(trainer.task.metrics), None)}
    extra["resumes"] = _resume_history(trainer)
    trainer.recorder.write_summary(status="running", steps=trainer.step, epoch=trainer.epoch, extra=extra, **common)
    try:
        trainer.fit()
        selection = trainer.evaluate_selected()
    except BaseException as exc:
        extra["scale_invariant"] = trainer.monitor.summary()
        status = "interrupted" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "failed"
        error = str(exc) or type(exc).__name__
        if isinstance(exc, KeyboardInterrupt):
            error = "SIGINT twice: stopped at once; the same command continues from the last checkpoint"
        try:
            trainer.recorder.write_summary(status=status, steps=trainer.step, epoch=trainer.epoch,
                                           extra=extra, error=error, **common)
        except Exception as record_exc:  # noqa: BLE001 - e.g. a full disk: the original error matters more
            log.error("could not record the failure in summary.json: %s", record_exc)
        raise
    if selection is not None:
        extra["selection"] = selection
    extra["scale_invariant"] = trainer.monitor.summary()  # the share of the model SGDP / AdamP act on
    if trainer.dist.is_main:
        history = trainer.recorder.history()
        extra["derived"] = trainer.task.summarize(history)
        extra["figures"] = [str(p) for p in trainer.task.write_figures(history, trainer.run_dir)]
    return trainer.recorder.write_summary(status="completed", steps=trainer.step, epoch=trainer.epoch,
                                          extra=extra, **common)


def _resume_history(trainer: Trainer) -> list[dict]:
    """The run's earlier resumes (from summary.json) and this one: the step it continued from and
    the keys that changed (old, new)."""
    previous = read_summary(trainer.run_dir / SUMMARY) if trainer.step else None
    history = list((previous or {}).get("resumes") or [])
    if trainer.step:
        changed = {k: [old, new] for k, (old, new) in trainer.rundir.changed.items()}
        history.append({"step": trainer.step, "changed": changed})
    return history
