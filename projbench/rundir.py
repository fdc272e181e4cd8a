"""A run directory: owned by one writer, checked before anything is written, never half-written.

    run = RunDirectory(path)
    run.acquire()                     # an fcntl lock on run.lock; a second writer stops with one line
    plan = run.plan(cfg, device)      # what the directory holds decides: a fresh run, a resume, or a refusal
    run.start(cfg, plan)              # only now is anything written: the config snapshot (.hydra/)
    ...                               # records.RunRecorder writes metrics.jsonl / summary.json
    write_checkpoint(state, run.checkpoint)
    run.release()

What the command does with a directory that holds a run is `resume` (conf/config.yaml): `auto`
(the default) continues this config's run (a completed one is skipped, a partial one resumes from
its checkpoint, one without a checkpoint starts again) and refuses another config's; `true`
resumes (and may extend) it; `false` refuses it. `overwrite=true` replaces it. A resumed config may
differ from the run's only in keys that extend or observe it (projbench.runconfig). Hydra does not write the config snapshot itself
(`hydra.output_subdir: null` in conf/config.yaml): `start` writes `.hydra/config.yaml`,
`overrides.yaml` and `hydra.yaml` once the checks have passed, so a refused command leaves the
run's own config in place.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from projbench.distributed import DistInfo, broadcast_object
from projbench.errors import StorageError, UserError
from projbench.runconfig import differences, key_kind

log = logging.getLogger(__name__)

LOCK = "run.lock"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
SNAPSHOT_DIR = ".hydra"
SNAPSHOT = f"{SNAPSHOT_DIR}/config.yaml"
#: what a run writes into its directory (overwrite=true removes these, and nothing else)
RECORDS = (CHECKPOINT, "checkpoint.tmp", METRICS, SUMMARY, "wandb_id.txt", SNAPSHOT,
           f"{SNAPSHOT_DIR}/overrides.yaml", f"{SNAPSHOT_DIR}/hydra.yaml", "recipe.md", "recipe.json")
#: what every checkpoint written by the loop holds
CHECKPOINT_KEYS = ("step", "model", "optimizer", "scheduler", "scaler", "rng")
REPLACE_HINT = "overwrite=true replaces the run, or choose another directory (hydra.run.dir=...)"


class RunDirError(UserError):
    """The run directory cannot be used as asked: in use, holding another run, unwritable."""


class RunCompleted(Exception):
    """The directory holds this config's completed run (resume=auto): nothing to train."""

    def __init__(self, summary: dict):
        super().__init__("already completed")
        self.summary = summary


@dataclass
class Plan:
    """What starting a run in a directory means: "fresh", "resume" from `state` at `step`, or
    "skip" (this config's run is complete: `summary`)."""

    kind: str
    step: int = 0
    state: dict | None = None
    #: keys that differ from the run's config (only length and observe keys for a resume): key -> (old, new)
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    summary: dict | None = None


def _describe_os_error(path: Path, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENAMETOOLONG:
        reason += " (shorten paths.log_dir or hydra.run.dir)"
    return f"{path}: {reason}"


def make_dirs(path: Path) -> None:
    """mkdir -p, with a one-line RunDirError for an unwritable or too-long path."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(_describe_os_error(path, exc)) from None


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def describe_changes(changes: dict[str, tuple[Any, Any]], limit: int = 8) -> str:
    parts = [f"{key} ({_short(old)} -> {_short(new)})" for key, (old, new) in list(changes.items())[:limit]]
    if len(changes) > limit:
        parts.append(f"and {len(changes) - limit} more")
    return ", ".join(parts)


class RunDirectory:
    """One run's directory, as seen by the process that trains in it (rank 0 under DDP)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.checkpoint = self.path / CHECKPOINT
        self.changed: dict[str, tuple[Any, Any]] = {}  # what the current resume changed (see Plan)
        self._lock_fd: int | None = None

    # -- ownership -------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the directory's lock (held until release() or the process ends)."""
        make_dirs(self.path)
        lock = self.path / LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(_describe_os_error(lock, exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f" ({holder})" if holder else ""
            raise RunDirError(f"{self.path}: in use by another process{who}; wait for it to end, or choose "
                              "another directory (hydra.run.dir=...)") from None
        self._lock_fd = fd

    def claim(self) -> None:
        """Write who holds the lock into it (for the message a second writer gets)."""
        if self._lock_fd is None:
            return
        text = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, text.encode(), 0)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    # -- what the directory holds ------------------------------------------------------------------
    def run_config(self) -> DictConfig | None:
        path = self.path / SNAPSHOT
        if not path.is_file():
            return None
        try:
            return OmegaConf.load(path)
        except Exception as exc:  # noqa: BLE001 - yaml and OmegaConf errors alike
            raise RunDirError(f"{path}: cannot be read ({str(exc).splitlines()[0]}); {REPLACE_HINT}") from None

    def holds_run(self) -> bool:
        return any((self.path / name).exists() for name in (SNAPSHOT, SUMMARY, CHECKPOINT, METRICS))

    def status(self) -> str:
        from projbench.records import read_summary

        summary = read_summary(self.path / SUMMARY)
        if summary is None:
            return "no summary"
        return f"status {summary.get('status')} at step {summary.get('steps')}"

    def load_checkpoint(self, device: torch.device | str = "cpu") -> dict:
        """The checkpoint, read with weights_only=True; a one-line RunDirError if it is missing,
        truncated, not a checkpoint or lacks what the loop writes."""
        path = self.checkpoint
        if not path.is_file():
            raise RunDirError(f"no checkpoint at {path}; nothing to resume (pass the run's directory as hydra.run.dir)")
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - zip, pickle and EOF errors alike
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RunDirError(f"{path}: cannot be read as a checkpoint ({reason}); it is left as it is; "
                              f"{REPLACE_HINT}") from None
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise RunDirError(f"{path}: not a projbench checkpoint (no {', '.join(missing)}); {REPLACE_HINT}")
        return state

    # -- deciding ------------------------------------------------------------------------------
    def plan(self, cfg: DictConfig, device: torch.device | str = "cpu") -> Plan:
        """Decide, reading only, what this command does with the directory: a fresh run, a resume,
        a skip, or a RunDirError saying why none."""
        if cfg.get("overwrite", False):
            return Plan("fresh")
        if cfg.resume is True:
            return self._plan_resume(cfg, device)
        if not self.holds_run():
            return Plan("fresh")
        if cfg.resume is False:
            raise RunDirError(f"{self.path} holds a run ({self.status()}); resume=auto continues it, {REPLACE_HINT}")
        return self._plan_auto(cfg, device)

    def _plan_auto(self, cfg: DictConfig, device: torch.device | str) -> Plan:
        """resume=auto: continue this config's run, whatever state it is in."""
        from projbench.records import read_summary

        old = self.run_config()
        if old is not None:
            other = {k: v for k, v in differences(old, cfg).items() if key_kind(k) in ("training", "length")}
            if other:
                longer = all(key_kind(k) == "length" for k in other)
                hint = "resume=true continues it with the new length" if longer else "resume=auto continues only the same config's run"
                raise RunDirError(f"{self.path} holds a run of another config: {describe_changes(other)}; {hint}; "
                                  f"{REPLACE_HINT}")
        summary = read_summary(self.path / SUMMARY)
        if summary is not None and summary.get("status") == "completed":
            return Plan("skip", int(summary.get("steps") or 0), summary=summary)
        if self.checkpoint.exists():
            return self._plan_resume(cfg, device)
        return Plan("fresh")  # it stopped before its first checkpoint: nothing to continue from

    def _plan_resume(self, cfg: DictConfig, device: torch.device | str) -> Plan:
        old = self.run_config()
        state = self.load_checkpoint(device)
        if old is None:
            raise RunDirError(f"{self.path / SNAPSHOT}: missing, so the resumed config cannot be checked against "
                              f"the run's; {REPLACE_HINT}")
        changes = differences(old, cfg)
        refused = {k: v for k, v in changes.items() if key_kind(k) == "training"}
        if refused:
            raise RunDirError(f"resume refused: {describe_changes(refused)} differ from the run in {self.path}, "
                              f"and they change what is trained; {REPLACE_HINT}")
        return Plan("resume", int(state["step"]), state, changes)

    # -- writing -----------------------------------------------------------------------------------
    def start(self, cfg: DictConfig, plan: Plan) -> None:
        """The checks passed: clear an overwritten run's records, write the config snapshot and
        (under Hydra) the recipe card, and record who holds the directory."""
        try:
            if plan.kind == "fresh":
                for name in RECORDS:
                    (self.path / name).unlink(missing_ok=True)
            self._write_snapshot(cfg)
            self._write_recipe_card(cfg)
        except OSError as exc:
            raise RunDirError(_describe_os_error(self.path, exc)) from None
        self.claim()
        self.changed = plan.changed
        for key, (old, new) in plan.changed.items():
            log.info("resume: %s changed from %s to %s", key, _short(old), _short(new))

    def _write_recipe_card(self, cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from projbench.recipes import write_run_card

        if not HydraConfig.initialized():
            return
        hydra_cfg = HydraConfig.get()
        sweep_keys = list(hydra_cfg.sweeper.get("params") or {}) if hydra_cfg.mode == RunMode.MULTIRUN else []
        write_run_card(cfg, self.path, list(hydra_cfg.overrides.task), sweep_keys, log=log.info)

    def _write_snapshot(self, cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        snapshot = self.path / SNAPSHOT_DIR
        snapshot.mkdir(exist_ok=True)
        files = {"config.yaml": OmegaConf.to_yaml(cfg)}
        if HydraConfig.initialized():
            hydra_cfg = HydraConfig.instance().cfg
            files["overrides.yaml"] = OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task)
            files["hydra.yaml"] = OmegaConf.to_yaml(hydra_cfg)
        for name, text in files.items():
            write_text_atomic(snapshot / name, text)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see the old or the
    new content, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_checkpoint(state: dict, path: Path) -> None:
    """torch.save through a temporary file, fsync and an atomic rename: a kill or a full disk
    leaves the previous checkpoint intact and no temporary file behind."""
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            kept = "the previous checkpoint is kept" if path.exists() else "no earlier checkpoint exists"
            raise StorageError(f"{_describe_os_error(path, exc)}; {kept}") from exc
        raise


def open_run(path: Path, cfg: DictConfig, dist: DistInfo, device: torch.device) -> tuple[RunDirectory, Plan]:
    """Lock and check the run directory (rank 0), agree on the plan on every rank. Nothing is
    written yet; the caller calls `run.start(cfg, plan)` (rank 0) once the run is built, and
    `run.release()` at the end (also on failure). This config's completed run (resume=auto) raises
    RunCompleted, with the lock released."""
    run = RunDirectory(path)
    plan, error, shared = None, None, None
    if dist.is_main:
        try:
            run.acquire()
            plan = run.plan(cfg, device)
            shared = (plan.kind, plan.step, None, plan.summary)
        except UserError as exc:
            run.release()
            error, shared = exc, (None, 0, str(exc), None)
    kind, step, message, summary = broadcast_object(shared)
    if error is not None:
        raise error
    if message is not None:
        raise RunDirError(message)
    if kind == "skip":
        run.release()
        raise RunCompleted(summary)
    if plan is None:  # another rank than 0: read the checkpoint rank 0 checked
        plan = Plan(kind, step, run.load_checkpoint(device) if kind == "resume" else None)
    return run, plan


def record_failure(path: Path, cfg: DictConfig, error: str) -> bool:
    """Record a run that failed before it started (a bad value in one cell of a sweep) as the
    directory's run: its config snapshot and a summary.json with `status: failed` and the error.
    A directory that holds a run, or that another process holds, is left as it is. True if
    recorded."""
    run = RunDirectory(path)
    try:
        run.acquire()
    except RunDirError:
        return False
    try:
        if run.holds_run():
            return False
        run._write_snapshot(cfg)

        def value(key: str) -> Any:
            return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)

        summary = {"task": value("task.name"), "optim": value("optim.name"), "seed": value("seed"), "model": None,
                   "status": "failed", "error": error, "metrics": {}, "steps": 0}
        write_text_atomic(run.path / SUMMARY, json.dumps(summary, indent=2) + "\n")
        return True
    except OSError:
        return False
    finally:
        run.release()
