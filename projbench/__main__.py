"""`python -m projbench task=<name> optim=<name> [seed=N] [key=value ...]`: the Hydra entry point.

`-m ... --cfg job` (which Hydra refuses) prints every cell of the sweep, resolved
(projbench/sweeps.py).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError

from projbench.errors import NonFiniteLossError, UserError, raised_user_error

log = logging.getLogger("projbench")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from projbench.train import train  # imported here so `--help` and tab completion stay fast

    from projbench.recipes import write_run_card

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        if int(os.environ.get("RANK", "0")) == 0:
            sweep_keys = list(hydra_cfg.sweeper.get("params") or {}) if multirun else []
            write_run_card(cfg, run_dir, list(hydra_cfg.overrides.task), sweep_keys, log=log.info)
        summary = train(cfg, run_dir)
    except (UserError, InterpolationResolutionError) as exc:
        # Bad input: one line, exit code 2, no traceback (HYDRA_FULL_ERROR=1 shows it).
        user_error = raised_user_error(exc)
        if user_error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if multirun:
            raise  # the other jobs of the sweep still run; Hydra reports this one as failed
        sys.exit(1)
    primary = summary.get("primary_metric")
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
    # The return value is what Hydra sweepers (e.g. Optuna) optimise: the primary test/val metric.
    for split in ("test", "val"):
        entry = summary["metrics"].get(f"{split}/{primary}")
        if entry is not None:
            return entry["final"]
    return None


def _sweep_cfg_request(argv: list[str]) -> list[str] | None:
    """The overrides of `-m/--multirun ... --cfg job` (None for any other command line)."""
    flags = {"-m", "--multirun"}
    if not flags & set(argv):
        return None
    for i, arg in enumerate(argv):
        if arg in ("-c", "--cfg") and i + 1 < len(argv) and argv[i + 1] == "job":
            rest = argv[:i] + argv[i + 2:]
            rest = [a for a in rest if a not in flags | {"--resolve"}]
            return None if any(a.startswith("-") for a in rest) else rest
    return None


if __name__ == "__main__":
    request = _sweep_cfg_request(sys.argv[1:])
    if request is not None:
        from projbench.sweeps import print_cells

        sys.exit(print_cells(request))
    main()
