"""What a run leaves in its directory: metrics.jsonl, summary.json and the W&B run.

metrics.jsonl holds one JSON object per logged point: {"step", "epoch", "split", "name", "value"}.
summary.json holds the run's identity (task, optim, seed, model), its final and best metrics with
their direction (best: over the run's evaluations, with its step and epoch), the model chosen on a
validation split when trainer.select_best is on ("selection"), and how it ran (steps, wall
seconds, git commit, torch version, device, status).
Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import uuid
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


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
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


# summary.json's keys copied into the W&B run's summary when the run ends.
WANDB_SUMMARY_KEYS = ("status", "seed", "model", "metrics", "selection", "wall_seconds", "world_size", "device")


class WandbLogger:
    """Real wandb, offline by default. Any failure to start or log warns once and is ignored:
    tracking must never stop a training run."""

    def __init__(self, cfg: DictConfig, run_cfg: DictConfig, run_dir: Path, run_id: str):
        self.run = None
        self._warned = False
        if not cfg.enabled or cfg.mode == "disabled":
            return
        try:
            import wandb

            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(run_dir),
                group=run_cfg.task.name, tags=[run_cfg.optim.name, f"seed{run_cfg.seed}"],
                name=f"{run_cfg.task.name}-{run_cfg.optim.name}-seed{run_cfg.seed}",
                config=OmegaConf.to_container(run_cfg, resolve=True), id=run_id, resume="allow",
                settings=wandb.Settings(silent=True),
            )
        except Exception as exc:  # noqa: BLE001 - any wandb failure must not stop training
            self._warn(f"W&B could not start ({exc}); training continues without it")

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
            self.metrics_path.write_text("")
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
        if not self.enabled or not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def wall_seconds(self) -> float:
        return self.wall_offset + time.time() - self.started

    def _replay(self, resume_step: int) -> None:
        """Keep the points logged up to the checkpoint (later ones will be logged again) and
        restore final/best from them."""
        kept = []
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                if line.strip() and json.loads(line)["step"] <= resume_step:
                    kept.append(line)
        self.metrics_path.write_text("".join(k + "\n" for k in kept))
        for line in kept:
            point = json.loads(line)
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
        with self.metrics_path.open("a") as f:
            for name, value in values.items():
                f.write(json.dumps({"step": step, "epoch": round(epoch, 4), "split": split,
                                    "name": name, "value": value}) + "\n")
                if split != "train":
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
            write_json_atomic(self.run_dir / "summary.json", summary)
            if self.wandb is not None and status != "running":
                self.wandb.finish(summary)
        return summary
