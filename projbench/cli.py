"""What `python -m projbench` does around one run (projbench/__main__.py is the Hydra entry point):

- `entry(main)`: Hydra's own errors (an unknown key or option, a bad override, an interpolation
  that fails) and the run's user errors end as one line `error: ...` naming the key or path, with
  exit code 2; `HYDRA_FULL_ERROR=1` shows the traceback instead.
- `run(cfg)`: per run, checks the command line's values against the types of their defaults,
  applies the task's fixture sizes with `task.data.fixture=true`, trains, and turns the outcome
  into a log and an exit code (2 bad input, 1 a failed run).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from projbench.errors import NonFiniteLossError, StorageError, UserError
from projbench.runconfig import apply_fixture_overrides, override_key
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

    if isinstance(exc, UserError):
        return str(exc)
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
    """Check the command line's values against their defaults' types, then apply the fixture's
    sizes (task.fixture_overrides) where the command line did not set them."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    choices = set(hydra_cfg.runtime.choices)
    keys = [override_key(o) for o in overrides if not o.startswith("~") and override_key(o) not in choices]
    defaults = _defaults(hydra_cfg)
    if defaults is not None:
        check_override_types(cfg, defaults, keys)
    check_finite(cfg)
    applied = apply_fixture_overrides(cfg, set(keys))
    if applied:
        log.info("fixture: %s (task.fixture_overrides)", ", ".join(f"{k}={v}" for k, v in applied.items()))


def run(cfg: DictConfig) -> float | None:
    """One run under Hydra: train, log the outcome, and return the primary metric (what Hydra
    sweepers such as Optuna optimise)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        prepare(cfg)
        from projbench.train import train  # imported late: --help, tab completion and bad input stay fast

        summary = train(cfg, run_dir)
    except (UserError, OmegaConfBaseException) as exc:
        # Bad input: one line, exit code 2, no traceback (HYDRA_FULL_ERROR=1 shows it).
        if full_error():
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except (NonFiniteLossError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if multirun:
            raise  # the other jobs of the sweep still run; Hydra reports this one as failed
        sys.exit(1)
    report(summary, run_dir)
    primary = summary.get("primary_metric")
    for split in ("test", "val"):
        entry = summary["metrics"].get(f"{split}/{primary}")
        if entry is not None:
            return entry["final"]
    return None


def report(summary: dict, run_dir: Path) -> None:
    for key, entry in summary["metrics"].items():
        best = f" (best {entry['best']:.6g} at step {entry['best_step']})" if "best" in entry else ""
        log.info("%s = %.6g%s", key, entry["final"], best)
    for key, value in summary.get("derived", {}).items():
        log.info("%s = %s", key, f"{value:.6g}" if isinstance(value, float) else value)
    log.info("run directory: %s", run_dir)

