"""`python -m projbench task=<name> optim=<name> [seed=N] [key=value ...]`: the Hydra entry point
(what happens around a run is in projbench/cli.py)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from projbench import cli

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    return cli.run(cfg)


if __name__ == "__main__":
    cli.entry(main)
