"""`python -m projbench task=<name> optim=<name> [seed=N] [key=value ...]`: the Hydra entry point
(what happens around a run is in projbench/cli.py).

`-m ... --cfg job` (which Hydra refuses) prints every cell of the sweep, resolved
(projbench/sweeps.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from projbench import cli

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    return cli.run(cfg)


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
    cli.entry(main)
