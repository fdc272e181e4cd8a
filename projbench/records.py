"""What a run leaves in its directory: metrics.jsonl, summary.json and the W&B run.

metrics.jsonl holds one JSON object per logged point: {"step", "epoch", "split", "name", "value"}.
It is only ever appended to; a resume drops the points after its checkpoint by writing the kept
ones to a new file and renaming it over the old one, so a kill at any moment leaves a whole file.
A kill in the middle of an append leaves a torn last line, which every reader here ignores.
summary.json holds the run's identity (task, optim, seed, model), its final and best metrics with
their direction (best: over the run's evaluations, with its step and epoch), the model chosen on a
validation split when trainer.select_best is on ("selection"), and how it ran (steps, wall
seconds, git commit, torch version, device, status: running, completed, failed or interrupted).
Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
import uuid
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from projbench.errors import StorageError
from projbench.rundir import RunDirError, write_text_atomic

log = logging.getLogger(__name__)


class DamagedRecord(ValueError):
    """A run record that cannot be parsed (not a torn last line: damage in the middle)."""


def read_metrics(path: Path) -> tuple[list[dict], bool]:
    """The points of a metrics.jsonl and whether its last line was torn (a kill mid-append; that
    line is left out). A line that is not a JSON object elsewhere raises DamagedRecord naming it."""
    if not path.is_file():
        return [], False
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    points, torn = [], False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            point = json.loads(line)
            if not isinstance(point, dict) or not {"step", "split", "name", "value"} <= point.keys():
                raise ValueError("not a metrics point")
        except ValueError as exc:
            if number == len(lines):  # no newline after it: the write was cut short
                torn = True
                break
            raise DamagedRecord(f"{path}:{number}: {exc}") from None
        points.append(point)
    return points, torn


def read_summary(path: Path) -> dict | None:
    """summary.json as a dict, or None when it is missing or not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def git_commit() -> str | None:
    """The commit of the code that ran (with '-dirty' when the tree had changes), if in git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


class LossWindow:
    """What the next logged train loss averages over: the losses of the steps since the last log
    point (summed on the device, no host sync per step). Checkpointed, so that the first point
    after a resume averages the same steps as in an uninterrupted run."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), device=device)
        self.count = 0
        self.timed_steps, self.started = 0, time.perf_counter()  # for samples/s (since this process started)

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss
        self.count += 1
        self.timed_steps += 1

    def take(self, batch_size: int) -> tuple[float, float]:
        """(mean loss, samples per second) of the window, which then starts again."""
        mean = self.total.item() / max(self.count, 1)
        rate = self.timed_steps * batch_size / max(time.perf_counter() - self.started, 1e-9)
        self.total.zero_()
        self.count = self.timed_steps = 0
        self.started = time.perf_counter()
        return mean, rate

    def state_dict(self) -> dict:
        return {"total": float(self.total.item()), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.total.fill_(float(state["total"]))
        self.count = int(state["count"])


# summary.json's keys copied into the W&B run's summary when the run ends.
WANDB_SUMMARY_KEYS = ("status", "seed", "model", "metrics", "selection", "wall_seconds", "world_size", "device")


class WandbLogger:
    """Real wandb, offline by default. Tracking never stops or stalls a run: start-up waits at most
    `logger.init_timeout` seconds (W&B's own init_timeout setting); an online run that cannot
    reach the server in that time warns once and logs offline instead (upload it later with
    `wandb sync`); any other failure to start or log warns once and is ignored."""

    def __init__(self, cfg: DictConfig, run_cfg: DictConfig, run_dir: Path, run_id: str):
        self.run = None
        self._warned = False
        if not cfg.enabled or cfg.mode == "disabled":
            return
        try:
            self.run = self._init(cfg, run_cfg, run_dir, run_id, cfg.mode)
        except Exception as exc:  # noqa: BLE001 - any wandb failure must not stop training
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if cfg.mode != "online":
                self._warn(f"W&B could not start ({reason}); training continues without it")
                return
            self._warn(f"W&B could not start online within logger.init_timeout={cfg.init_timeout} s ({reason}); "
                       f"logging offline to {run_dir / 'wandb'} instead (upload it later with `wandb sync`)")
            try:
                import wandb

                wandb.teardown()  # the failed online start still holds the run id in W&B's service
                self.run = self._init(cfg, run_cfg, run_dir, run_id, "offline")
            except Exception:  # noqa: BLE001
                self.run = None

    @staticmethod
    def _init(cfg: DictConfig, run_cfg: DictConfig, run_dir: Path, run_id: str, mode: str):
        import wandb

        return wandb.init(
            project=cfg.project, entity=cfg.entity, mode=mode, dir=str(run_dir),
            group=run_cfg.task.name, tags=[run_cfg.optim.name, f"seed{run_cfg.seed}"],
            name=f"{run_cfg.task.name}-{run_cfg.optim.name}-seed{run_cfg.seed}",
            config=OmegaConf.to_container(run_cfg, resolve=True), id=run_id, resume="allow",
            settings=wandb.Settings(silent=True, init_timeout=float(cfg.get("init_timeout", 15))),
        )

    def _warn(self, message: str) -> None:
        if not self._warned:
            warnings.warn(message, stacklevel=3)
            log.warning(message)
            self._warned = True

    def log(self, values: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(values, step=step)
        except Exception as exc:  # noqa: BLE001
            self._warn(f"W&B logging failed ({exc}); continuing without it")

    def finish(self, summary: dict) -> None:
        if self.run is None:
            return
        try:
            # What projbench.tables needs to build a table from W&B alone (runs_from_wandb).
            self.run.summary.update({key: summary[key] for key in WANDB_SUMMARY_KEYS if key in summary})
            if summary["status"] == "interrupted":
                self.run.mark_preempting()  # W&B shows it as preempted: it will be resumed
            self.run.finish(exit_code=0 if summary["status"] == "completed" else 1)
        except Exception as exc:  # noqa: BLE001
            self._warn(f"W&B finish failed ({exc})")


class RunRecorder:
    """Writes metrics.jsonl, tracks final/best values per metric, writes summary.json."""

    def __init__(self, run_dir: Path, run_cfg: DictConfig, directions: dict[str, str],
                 enabled: bool, resume_step: int | None = None):
        self.run_dir = run_dir
        self.cfg = run_cfg
        self.directions = directions
        self.enabled = enabled
        self.started = time.time()
        self.wall_offset = 0.0  # seconds spent before a resume (restored from the checkpoint)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.final: dict[str, float] = {}
        self.best: dict[str, tuple[float, int, float]] = {}  # key -> (value, step, epoch)
        self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            write_text_atomic(self.metrics_path, "")
        else:
            self._replay(resume_step)
        run_id = f"{run_cfg.task.name}-{run_cfg.optim.name}-s{run_cfg.seed}-{uuid.uuid4().hex[:8]}"
        id_file = run_dir / "wandb_id.txt"
        if resume_step is not None and id_file.exists():
            run_id = id_file.read_text().strip()
        id_file.write_text(run_id)
        self.wandb = WandbLogger(run_cfg.logger, run_cfg, run_dir, run_id)

    def history(self) -> list[dict]:
        """Every point logged so far (the parsed metrics.jsonl)."""
        if not self.enabled:
            return []
        return read_metrics(self.metrics_path)[0]

    def wall_seconds(self) -> float:
        return self.wall_offset + time.time() - self.started

    def _replay(self, resume_step: int) -> None:
        """Keep the points logged up to the checkpoint (later ones will be logged again; a torn
        last line goes too) by an atomic replacement of the file, and restore final/best from them."""
        try:
            points, _ = read_metrics(self.metrics_path)
        except DamagedRecord as exc:
            raise RunDirError(f"{exc}; the run's metrics are damaged, so it cannot be resumed in place") from None
        kept = [p for p in points if p["step"] <= resume_step]
        write_text_atomic(self.metrics_path, "".join(json.dumps(p) + "\n" for p in kept))
        for point in kept:
            if point["split"] != "train":
                self._track(f"{point['split']}/{point['name']}", point["value"], point["step"], point["epoch"])

    def _track(self, key: str, value: float, step: int, epoch: float) -> None:
        self.final[key] = value
        name = key.split("/", 1)[1]
        direction = self.directions.get(name)
        if direction is None:
            return
        best = self.best.get(key)
        better = best is None or (value > best[0] if direction == "max" else value < best[0])
        if better:
            self.best[key] = (value, step, round(epoch, 4))

    def log(self, split: str, values: dict[str, float], step: int, epoch: float) -> None:
        if not self.enabled:
            return
        lines = "".join(json.dumps({"step": step, "epoch": round(epoch, 4), "split": split, "name": name,
                                    "value": value}) + "\n" for name, value in values.items())
        try:
            with self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(lines)  # one write per call: a kill tears at most the last line
        except OSError as exc:
            raise StorageError(f"{self.metrics_path}: cannot be appended to ({exc.strerror or exc})") from exc
        if split != "train":
            for name, value in values.items():
                self._track(f"{split}/{name}", value, step, epoch)
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in values.items()}, step=step)

    def log_selection(self, selection: dict, step: int) -> None:
        """The metrics of the model trainer.select_best kept (projbench/selection.py), to W&B as
        selected/<split>/<name>; summary.json holds them under "selection". metrics.jsonl keeps
        the points of the model being trained only."""
        if self.enabled and self.wandb is not None and selection["metrics"]:
            self.wandb.log({f"selected/{k}": v for k, v in selection["metrics"].items()}, step=step)

    def write_summary(self, *, status: str, steps: int, epoch: float, device: str, world_size: int,
                      model: str, extra: dict | None = None, error: str | None = None) -> dict:
        metrics = {}
        for key, value in self.final.items():
            name = key.split("/", 1)[1]
            entry = {"final": value, "direction": self.directions.get(name)}
            if key in self.best:
                entry["best"], entry["best_step"], entry["best_epoch"] = self.best[key]
            metrics[key] = entry
        summary = {
            "task": self.cfg.task.name,
            "optim": self.cfg.optim.name,
            "seed": int(self.cfg.seed),
            "model": model,
            "status": status,
            "error": error,
            "metrics": metrics,
            "steps": steps,
            "epochs": round(epoch, 4),
            "wall_seconds": round(self.wall_seconds(), 2),
            "git_commit": git_commit(),
            "torch_version": torch.__version__,
            "device": device,
            "world_size": world_size,
            **(extra or {}),
        }
        if self.enabled:
            try:
                write_json_atomic(self.run_dir / "summary.json", summary)
            except OSError as exc:
                raise StorageError(f"{self.run_dir / 'summary.json'}: cannot be written ({exc.strerror or exc})") from exc
            if self.wandb is not None and status != "running":
                self.wandb.finish(summary)
        return summary
