"""The cells of a Hydra multirun, composed without running them.

`python -m projbench -m +experiment=imagenet_table1 --cfg job` prints every cell of the sweep
(Hydra itself refuses `-m` together with `--cfg`), and `python -m projbench.recipes` writes each
cell's recipe card. Both expand the sweep as Hydra's basic sweeper does: the experiment's
`hydra.sweeper.params` followed by the command line's overrides, a comma list being one axis,
their product being the cells.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from projbench.errors import UserError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@dataclass
class SweepCell:
    """One job of a multirun: its overrides, the sweep axes' values, and its composed config."""

    overrides: list[str]
    axes: dict[str, str]               # the swept keys (experiment params and command-line lists) -> value
    cfg: DictConfig
    sweep_keys: tuple[str, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.axes.items()) or "(one cell)"


def _sweep_params(overrides: list[str]) -> dict[str, str]:
    """hydra.sweeper.params of the primary config (the experiment's sweep axes)."""
    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    primary = compose(config_name="config", overrides=fixed, return_hydra_config=True)
    params = primary.hydra.sweeper.get("params") or {}
    return {str(k): str(v) for k, v in OmegaConf.to_container(params, resolve=True).items()}


def expand(overrides: list[str]) -> list[SweepCell]:
    """Every cell of `python -m projbench -m OVERRIDES`, in Hydra's order (call inside
    `initialize_config_dir`, or use `compose_cells`)."""
    params = _sweep_params(overrides)
    parser = OverridesParser.create()
    parsed = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + list(overrides))
    axes = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    axes += [k for k in params if k not in axes]
    cells = []
    for job in BasicSweeper.split_arguments(parsed, None)[0]:
        values = dict(item.split("=", 1) for item in job)
        cfg = compose(config_name="config", overrides=job)
        cells.append(SweepCell(overrides=job, axes={k: values[k] for k in axes if k in values}, cfg=cfg,
                               sweep_keys=tuple(axes)))
    return cells


def compose_cells(overrides: list[str]) -> list[SweepCell]:
    """`expand` with the project's config directory initialised."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return expand(overrides)


def print_cells(overrides: list[str]) -> int:
    """`-m ... --cfg job`: each cell's job config, resolved, under a comment naming the cell."""
    try:
        cells = compose_cells(overrides)
        for k, cell in enumerate(cells, 1):
            print(f"# cell {k}/{len(cells)}: {cell.label}")
            print(OmegaConf.to_yaml(cell.cfg, resolve=True))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - Hydra's and OmegaConf's errors: one line, no traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0
