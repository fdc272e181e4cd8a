"""A sweep that survives a cluster: each cell's outcome is its own, and the sweep ends with a report.

conf/config.yaml registers `SweepReport` as a Hydra callback (hydra.callbacks). On every launcher
(basic, joblib, submitit), each cell of a multirun records itself in
`<sweep dir>/cells/<job number>.json` when it starts (its overrides, run directory, host and
process) and when it ends: completed, skipped (its config's run was already complete), failed
(with the first line of why), interrupted, or not started (the sweep was stopping). At the end the
sweep prints which cells completed, failed or were interrupted, writes the same to
`<sweep dir>/report.txt`, and exits non-zero if any did not complete.

A stop signal to the sweep's own process (Ctrl-C, SIGTERM) stops the sweep: it is passed on to
the running cells in other processes of the same host (Ctrl-C reaches them from the terminal
already), which finish their step and checkpoint; a `STOP` file in the sweep directory keeps
cells that had not started from starting. Running the same command again continues the sweep:
each cell's directory follows from its config (projbench.runconfig.run_dir_resolver), so
completed cells are skipped, interrupted ones resume from their checkpoints, missing ones start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from projbench.rundir import SUMMARY, write_text_atomic
from projbench.signals import STOP, exit_code

CELLS = "cells"
STOP_FILE = "STOP"
REPORT = "report.txt"
#: the statuses of a cell that did what the sweep asked
DONE = ("completed", "skipped")

_outcome: dict[str, Any] | None = None


def note_outcome(status: str, error: str | None = None) -> None:
    """What the cell running in this process ended with (read by SweepReport.on_job_end)."""
    global _outcome
    _outcome = {"status": status, "error": error}


def _take_outcome() -> dict[str, Any] | None:
    global _outcome
    outcome, _outcome = _outcome, None
    return outcome


def stopping(sweep_dir: Path | str | None) -> bool:
    """Whether this process got a stop signal, or the sweep's own process did (its STOP file)."""
    return STOP.signum is not None or (sweep_dir is not None and (Path(sweep_dir) / STOP_FILE).exists())


def _is_multirun(config: DictConfig) -> bool:
    return config.hydra.mode == RunMode.MULTIRUN


def _record_path(config: DictConfig) -> Path:
    return Path(config.hydra.sweep.dir) / CELLS / f"{config.hydra.job.num}.json"


def _read_records(sweep_dir: Path) -> list[dict]:
    records = []
    for path in sorted((sweep_dir / CELLS).glob("*.json"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return records


def _write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def _count_cells(config: DictConfig) -> int | None:
    """How many cells the basic sweeper makes of this command (None for another sweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    try:
        params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
        overrides = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
        return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))
    except Exception:  # noqa: BLE001 - the report then counts only the cells that started
        return None


def _pass_on(sweep_dir: Path, signum: int) -> None:
    """The sweep's own process got a stop signal: no new cell starts, running ones stop."""
    (sweep_dir / STOP_FILE).write_text(f"{signum}\n")
    if signum == signal.SIGINT:
        return  # Ctrl-C reaches every process of the terminal's process group by itself
    host = socket.gethostname()
    for record in _read_records(sweep_dir):
        if record.get("status") == "running" and record.get("host") == host and record.get("pid") != os.getpid():
            try:
                os.kill(int(record["pid"]), signum)
            except (ProcessLookupError, PermissionError):
                pass


def _differing(records: list[dict]) -> dict[int, str]:
    """Per cell, its overrides that differ between the cells (what tells them apart)."""
    parsed = [dict(o.split("=", 1) for o in r.get("overrides", []) if "=" in o) for r in records]
    keys = sorted({k for p in parsed for k in p if len({q.get(k) for q in parsed}) > 1})
    return {r.get("num", i): " ".join(f"{k}={p.get(k, '')}" for k in keys) for i, (r, p) in enumerate(zip(records, parsed))}


def report(records: list[dict], expected: int | None, sweep_dir: Path) -> tuple[str, int]:
    """The sweep's report and its exit code (0 only if every cell completed)."""
    count = {status: sum(r.get("status") == status for r in records)
             for status in ("completed", "skipped", "failed", "interrupted", "not started", "running")}
    missing = max((expected or 0) - len(records), 0)
    total = expected if expected is not None else len(records)
    done = count["completed"] + count["skipped"]
    lines = [f"sweep: {done} of {total} cells completed ({count['skipped']} of them already before), "
             f"{count['failed']} failed, {count['interrupted']} interrupted, "
             f"{count['not started'] + missing + count['running']} not run"]
    labels = _differing(records)
    for record in records:
        status = record.get("status")
        if status in DONE:
            continue
        why = f": {record['error']}" if record.get("error") else ""
        label = labels.get(record.get("num"), "")
        lines.append(f"  {status:<12} {label}  {record.get('run_dir', '')}{why}")
    if done < total:
        lines.append("the same command continues the sweep: completed cells are skipped, interrupted ones resume "
                     "from their checkpoints, the others start")
    lines.append(f"(this report: {sweep_dir / REPORT})")
    if done == total:
        code = 0
    elif count["failed"]:
        code = 1
    else:
        code = exit_code(STOP.signum or signal.SIGTERM)
    return "\n".join(lines) + "\n", code


class SweepReport(Callback):
    """Records each cell of a multirun and reports the sweep at its end (see the module's doc)."""

    def __init__(self) -> None:
        self.expected: int | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        (sweep_dir / CELLS).mkdir(parents=True, exist_ok=True)
        self.expected = _count_cells(config)
        STOP.install()  # for the whole sweep: a signal stops it after the running cells' step
        STOP.listeners.append(lambda signum: _pass_on(sweep_dir, signum))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _is_multirun(config):
            return
        _write_record(_record_path(config), {
            "num": int(config.hydra.job.num), "overrides": list(config.hydra.overrides.task),
            "run_dir": str(config.hydra.runtime.output_dir), "host": socket.gethostname(), "pid": os.getpid(),
            "status": "running"})

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _is_multirun(config):
            return
        outcome = _take_outcome()
        if outcome is None:  # an error outside the run (none is expected: projbench.cli catches them)
            if job_return.status == JobStatus.FAILED:
                error = str(job_return._return_value).strip().splitlines()
                outcome = {"status": "failed", "error": error[0] if error else "failed"}
            else:
                summary = Path(config.hydra.runtime.output_dir) / SUMMARY
                status = json.loads(summary.read_text()).get("status") if summary.is_file() else "failed"
                outcome = {"status": status, "error": None}
        path = _record_path(config)
        record = json.loads(path.read_text()) if path.is_file() else {"num": int(config.hydra.job.num)}
        _write_record(path, {**record, **outcome})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        text, code = report(_read_records(sweep_dir), self.expected, sweep_dir)
        (sweep_dir / REPORT).write_text(text)
        print(text, end="", file=sys.stderr)
        if code:
            sys.exit(code)
