"""What `python -m projbench` does around one run (projbench/__main__.py is the Hydra entry point):

- `entry(main)`: Hydra's own errors (an unknown key or option, a bad override, an interpolation
  that fails) and the run's user errors end as one line `error: ...` naming the key or path, with
  exit code 2; `HYDRA_FULL_ERROR=1` shows the traceback instead.
- `run(cfg)`: per run, checks the command line's values against the types of their defaults,
  trains, and turns the outcome
  into a log and an exit code (2 bad input, 1 a failed run, 128 + the signal for an interrupted
  one), or, in a sweep, into the cell's record (projbench/sweep_report.py).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from projbench.errors import Interrupted, NonFiniteLossError, StorageError, UserError, raised_user_error
from projbench.runconfig import override_key
from projbench.signals import STOP, exit_code
from projbench.validation import check_finite, check_override_types

log = logging.getLogger("projbench")
# The user's HYDRA_FULL_ERROR, kept across `entry` setting it for Hydra (and for worker processes,
# which inherit the environment).
_USER_FULL_ERROR = "PROJBENCH_USER_HYDRA_FULL_ERROR"


def full_error() -> bool:
    """Whether the user asked for tracebacks (HYDRA_FULL_ERROR=1)."""
    return os.environ.get(_USER_FULL_ERROR, os.environ.get("HYDRA_FULL_ERROR", "")) == "1"


def one_line(exc: BaseException) -> str | None:
    """The one-line message of an error the user can fix (Hydra's, OmegaConf's, ours, a path that
    cannot be written), or None for anything else (a bug: its traceback is shown)."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    user_error = raised_user_error(exc)  # ours, also when a config resolver raised it inside OmegaConf's
    if user_error is not None:
        return str(user_error)
    if isinstance(exc, MissingConfigException):
        text = str(exc)
        group = (exc.missing_cfg_file or "").rsplit("/", 1)
        options = f"; choose one of {', '.join(exc.options)}" if exc.options else ""
        if len(group) == 2:
            return f"{group[0]}={group[1]}: no such config{options}"
        return text.splitlines()[0] + options
    if isinstance(exc, HydraException):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip() and "hydra.cc/docs" not in line]
        cause = exc.__cause__
        key = getattr(cause, "full_key", None) or getattr(exc, "override", None)
        if isinstance(cause, OmegaConfBaseException):
            lines = [str(cause).strip().splitlines()[0]] + [ln for ln in lines if not ln.startswith("Could not")]
        return f"{key}: {'; '.join(lines)}" if key else "; ".join(lines)
    if isinstance(exc, OmegaConfBaseException):
        key = getattr(exc, "full_key", None)
        text = str(exc).strip().splitlines()[0]
        return f"{key}: {text}" if key else text
    for err in (exc, exc.__cause__, exc.__context__):
        if isinstance(err, OSError) and err.filename:
            return f"{err.filename}: {err.strerror or err}"
    return None


def entry(main: Callable[[], object]) -> None:
    """Run the Hydra main function with one-line errors (exit code 2) for what the user can fix."""
    os.environ.setdefault(_USER_FULL_ERROR, os.environ.get("HYDRA_FULL_ERROR", ""))
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing; the message is made here
    try:
        main()
    except Exception as exc:
        message = None if full_error() else one_line(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _defaults(hydra_cfg: DictConfig) -> DictConfig | None:
    """The config composed from the same config files (group choices) without the command line's
    values: what each value override's type is checked against."""
    from hydra import compose

    choices = set(hydra_cfg.runtime.choices)
    groups = [o for o in hydra_cfg.overrides.task if override_key(o) in choices]
    try:
        return compose(config_name=hydra_cfg.job.config_name, overrides=groups)
    except Exception:  # noqa: BLE001 - then only the loop's own checks run
        return None


def prepare(cfg: DictConfig) -> None:
    """Check the command line's values against their defaults' types, and every number's
    finiteness, before the (slow) training imports."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    choices = set(hydra_cfg.runtime.choices)
    keys = [override_key(o) for o in overrides if not o.startswith("~") and override_key(o) not in choices]
    defaults = _defaults(hydra_cfg)
    if defaults is not None:
        check_override_types(cfg, defaults, keys)
    check_finite(cfg)


def _failure(exc: BaseException) -> tuple[str, str, int] | None:
    """(status, one-line message, exit code) of how a run ended early; None for a bug."""
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, (UserError, OmegaConfBaseException)):
        return "failed", one_line(exc) or str(exc), 2
    if isinstance(exc, (NonFiniteLossError, StorageError)):
        return "failed", str(exc), 1
    if isinstance(exc, Interrupted):
        return "interrupted", str(exc), exit_code(exc.signum)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", "SIGINT twice: stopped at once", exit_code(signal.SIGINT)
    return None


def run(cfg: DictConfig) -> float | None:
    """One run under Hydra: train, report, and return the primary metric (what Hydra sweepers such
    as Optuna optimise). A single run that ends early ends the process with one line and its exit
    code (2 bad input, 1 a failed run, 128 + the signal for an interrupted one). In a sweep a cell's
    failure is the cell's: it is recorded (summary.json, the sweep's report) and the sweep goes on;
    after a stop signal the cells not started yet are skipped."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from projbench import sweep_report
    from projbench.rundir import record_failure

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    STOP.install()  # for the whole process: a sweep's later cells see an earlier signal
    if multirun and sweep_report.stopping(hydra_cfg.sweep.dir):
        sweep_report.note_outcome("not started", "the sweep was stopping")
        return None
    try:
        prepare(cfg)
        from projbench.train import train  # imported late: --help, tab completion and bad input stay fast

        summary = train(cfg, run_dir)
    except BaseException as exc:  # noqa: BLE001 - each kind of ending is told apart below
        if isinstance(exc, SystemExit) or (full_error() and not isinstance(exc, Interrupted)):
            raise
        failure = _failure(exc)
        if failure is None:
            if not multirun:
                raise  # a bug: its traceback
            log.exception("the cell failed")  # a bug: its traceback goes to the cell's log
            first = str(exc).strip().splitlines()
            failure = ("failed", f"{type(exc).__name__}: {first[0]}" if first else type(exc).__name__, 1)
        status, message, code = failure
        print(f"{'error' if status == 'failed' else status}: {message}", file=sys.stderr)
        if status == "interrupted":
            try:
                STOP.hand_over()  # in a submitit job: submitit requeues it (and exits)
            except Exception as requeue_exc:  # noqa: BLE001 - e.g. submitit's "timed-out too many times"
                message += f"; not requeued: {str(requeue_exc).strip().splitlines()[0]}"
                print(f"interrupted: {message}", file=sys.stderr)
        if not multirun:
            sys.exit(code)
        if isinstance(exc, KeyboardInterrupt):
            raise  # a second Ctrl-C stops the sweep at once
        if status == "failed":
            record_failure(run_dir, cfg, message)  # unless the directory holds a run (then it is recorded there)
        sweep_report.note_outcome(status, message)
        return None
    if summary.get("skipped"):
        # Printed, not logged: a completed run's directory (its log file included) stays untouched.
        print(f"{run_dir}: already completed at step {summary.get('steps')}; nothing to do (overwrite=true trains "
              "it again)", file=sys.stderr)
        sweep_report.note_outcome("skipped")
    else:
        report(summary, run_dir)
        sweep_report.note_outcome("completed")
    primary = summary.get("primary_metric")
    for split in ("test", "val"):
        entry = (summary.get("metrics") or {}).get(f"{split}/{primary}")
        if entry is not None:
            return entry["final"]
    return None


def report(summary: dict, run_dir: Path) -> None:
    for key, entry in summary["metrics"].items():
        best = f" (best {entry['best']:.6g} at step {entry['best_step']})" if "best" in entry else ""
        log.info("%s = %.6g%s", key, entry["final"], best)
    selection = summary.get("selection")
    if selection and selection["step"] is not None:
        log.info("selected on %s: the model of step %d (%s %.6g)", selection["metric"], selection["step"],
                 selection["metric"], selection["value"])
        for key, value in selection["metrics"].items():
            log.info("  %s = %.6g (selected model)", key, value)
    for key, value in summary.get("derived", {}).items():
        log.info("%s = %s", key, f"{value:.6g}" if isinstance(value, float) else value)
    log.info("run directory: %s", run_dir)

