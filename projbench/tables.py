"""Finished runs -> the paper's tables, with the paper's numbers beside ours.

    python -m projbench.tables [--runs DIR ...] [--table NAME ...] [--format md|latex|csv]
                               [--out DIR] [--wandb ENTITY/PROJECT] [--no-figures]

results/paper.yaml holds every table: its rows and columns, the config selectors that say which
runs fill each cell, the metric a cell averages, and the paper's numbers. Runs come from run
directories (summary.json + .hydra/config.yaml, found recursively; default: ./outputs, the Hydra
roots) or from a W&B project. A cell is the mean, sample std, count and 95 % interval over seeds of
the matching completed runs, and whether the paper's number lies in that interval; failed and
unfinished runs are left out and counted, a cell without runs stays empty and is listed, never
filled with the paper's number. A projected optimizer's cell is compared with its base's (paired
over shared seeds, or Welch) and gets a verdict (projbench/stats.py); each table adds a claims line
(the verdicts per pair of optimizers) and a compute line (wall seconds x world size per device).
Tables go to <out>/tables/<table>.<ext> and stdout; figures (projbench/figures.py) to
<out>/figures/: training curves per task, and the figure a table names in its `figure:` entry
(drawn from that table's runs).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import DictConfig, OmegaConf

from projbench.stats import CONFIDENCE, VERDICTS, Comparison, Interval, compare, mean_interval

PAPER_YAML = Path(__file__).resolve().parent.parent / "results" / "paper.yaml"
FORMATS = {"md": "md", "latex": "tex", "csv": "csv"}
# One line per cell (record "cell"), then one per claim and one per device kind (record "claim" /
# "compute": `text` holds the line, `n` the runs and `device_seconds` the compute).
CSV_FIELDS = ["record", "table", "row", "column", "metric", "value", "units", "direction", "mean", "std", "n",
              "seeds", "values", "ci_low", "ci_high", "paper", "paper_in_ci", "final_mean", "final_std", "base", "delta",
              "delta_ci_low", "delta_ci_high", "delta_test", "delta_pairs", "delta_df", "verdict", "paper_delta",
              "excluded", "models", "device_seconds", "text"]
# Which value of a run's metric a cell takes: the last evaluation's, the best over the run's
# evaluations (as papers that report their best epoch on the test set), or that of the model
# chosen on a validation split (trainer.select_best; summary.json's "selection").
VALUE_KINDS = ("final", "best", "selected")


class SpecError(ValueError):
    """results/paper.yaml does not describe a valid table."""


# -- the tables ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Axis:
    """One row or column of a table: what it selects and what it changes about its cells."""

    name: str
    select: dict[str, Any] = field(default_factory=dict)
    base: str | None = None        # a projected optimizer's base row/column (for the delta)
    metric: str | None = None      # replaces the table's metric for this row's/column's cells
    direction: str | None = None
    units: str | None = None
    mean_of: tuple[str, ...] = ()  # derived: per seed, the mean of these columns' (rows') values
    info: dict[str, Any] = field(default_factory=dict)
    value: str | None = None       # final | best: replaces the table's `value` for these cells


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    experiment: str | None
    metric: str
    value: str                     # final | best
    direction: str
    units: str
    decimals: int
    select: dict[str, Any]
    row_header: str
    info_columns: tuple[str, ...]
    rows: tuple[Axis, ...]
    columns: tuple[Axis, ...]
    paper: dict[str, dict[str, float | None]]
    aliases: tuple[str, ...] = ()
    version: str | None = None     # which version of the paper the numbers come from
    sources: dict[str, str] = field(default_factory=dict)  # where `value`, `version` and the seeds come from
    figure: dict[str, Any] = field(default_factory=dict)  # {kind: ..., ...}: projbench/figures.py TABLE_FIGURES

    def axis(self, kind: str, name: str) -> Axis:
        return next(a for a in (self.rows if kind == "row" else self.columns) if a.name == name)


def _merge_selects(where: str, *selects: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for select in selects:
        for key, want in select.items():
            if key in merged and merged[key] != want:
                raise SpecError(f"{where}: {key} is selected as both {merged[key]!r} and {want!r}")
            merged[key] = want
    return merged


def _axis(table: str, kind: str, name: str, raw: dict | None) -> Axis:
    raw = dict(raw or {})
    unknown = set(raw) - {"select", "base", "metric", "direction", "units", "mean_of", "info", "value"}
    if unknown:
        raise SpecError(f"{table}: {kind} {name!r} has unknown keys {sorted(unknown)}")
    return Axis(name=str(name), select=dict(raw.get("select") or {}), base=raw.get("base"),
                metric=raw.get("metric"), direction=raw.get("direction"), units=raw.get("units"),
                mean_of=tuple(raw.get("mean_of") or ()), info=dict(raw.get("info") or {}),
                value=raw.get("value"))


def _table(name: str, raw: dict) -> TableSpec:
    for key in ("title", "metric", "direction", "rows", "columns", "paper"):
        if key not in raw:
            raise SpecError(f"{name}: missing {key!r}")
    rows = tuple(_axis(name, "row", k, v) for k, v in raw["rows"].items())
    columns = tuple(_axis(name, "column", k, v) for k, v in raw["columns"].items())
    spec = TableSpec(
        name=name, title=raw["title"], experiment=raw.get("experiment"), metric=raw["metric"],
        value=raw.get("value", "final"), direction=raw["direction"], units=str(raw.get("units", "")),
        decimals=int(raw.get("decimals", 2)), select=dict(raw.get("select") or {}),
        row_header=raw.get("row_header", ""), info_columns=tuple(raw.get("info_columns") or ()),
        rows=rows, columns=columns, aliases=tuple(raw.get("aliases") or ()), version=raw.get("version"),
        sources=dict(raw.get("sources") or {}), figure=dict(raw.get("figure") or {}),
        paper={str(r): dict(v or {}) for r, v in raw["paper"].items()})
    _validate(spec)
    return spec


def _validate(spec: TableSpec) -> None:
    row_names, col_names = [r.name for r in spec.rows], [c.name for c in spec.columns]
    if spec.value not in VALUE_KINDS:
        raise SpecError(f"{spec.name}: value must be one of {', '.join(VALUE_KINDS)}, got {spec.value!r}")
    if spec.figure:
        from projbench.figures import TABLE_FIGURES

        if spec.figure.get("kind") not in TABLE_FIGURES:
            raise SpecError(f"{spec.name}: figure kind must be one of {sorted(TABLE_FIGURES)}, "
                            f"got {spec.figure.get('kind')!r}")
    for kind, axes, names in (("row", spec.rows, row_names), ("column", spec.columns, col_names)):
        for axis in axes:
            if axis.value is not None and axis.value not in VALUE_KINDS:
                raise SpecError(f"{spec.name}: {kind} {axis.name!r}: value must be one of "
                               f"{', '.join(VALUE_KINDS)}, got {axis.value!r}")
            if (axis.direction or spec.direction) not in ("max", "min"):
                raise SpecError(f"{spec.name}: {kind} {axis.name!r}: direction must be max or min")
            for ref in ([axis.base] if axis.base else []) + list(axis.mean_of):
                if ref not in names:
                    raise SpecError(f"{spec.name}: {kind} {axis.name!r} refers to unknown {kind} {ref!r}")
    for row in spec.rows:
        for column in spec.columns:
            _merge_selects(f"{spec.name}: cell {row.name}/{column.name}", spec.select, row.select, column.select)
    for row, values in spec.paper.items():
        if row not in row_names:
            raise SpecError(f"{spec.name}: paper values for unknown row {row!r}")
        for column, value in values.items():
            if column not in col_names:
                raise SpecError(f"{spec.name}: paper value for unknown column {row!r}/{column!r}")
            if value is not None and not isinstance(value, (int, float)):
                raise SpecError(f"{spec.name}: paper value {row!r}/{column!r} is not a number: {value!r}")


def load_spec(path: Path | str = PAPER_YAML) -> dict[str, TableSpec]:
    """Every table of paper.yaml, validated (unknown references and conflicting selectors fail)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such file")
    raw = yaml.safe_load(path.read_text()) or {}
    return {name: _table(name, body) for name, body in (raw.get("tables") or {}).items()}


def resolve_table_names(specs: dict[str, TableSpec], names: Iterable[str]) -> list[str]:
    """Table names (or aliases, which may stand for several tables) -> table names; a clear
    error for unknown ones."""
    lookup: dict[str, list[str]] = {name: [name] for name in specs}
    for name, spec in specs.items():
        for alias in spec.aliases:
            lookup.setdefault(alias, []).append(name)
    out = []
    for name in names:
        if name not in lookup:
            raise SpecError(f"unknown table {name!r}; choose from {', '.join(sorted(lookup))}")
        out += [table for table in lookup[name] if table not in out]
    return out


# -- runs ---------------------------------------------------------------------------------------
_ABSENT = object()


@dataclass
class Run:
    """One run, from its directory or from W&B: resolved config and summary.json's content."""

    id: str                        # run directory, or entity/project/run_id
    config: DictConfig | dict
    summary: dict
    timestamp: float = 0.0         # newer runs win when a cell has a seed twice
    run_dir: Path | None = None    # local runs: where metrics.jsonl is

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "unknown"))

    @property
    def seed(self) -> Any:
        seed = self.summary.get("seed")
        return self.get("seed") if seed is None else seed

    def get(self, key: str) -> Any:
        """The config value at a dotted key (interpolations resolved); None if absent."""
        if isinstance(self.config, DictConfig):
            value = OmegaConf.select(self.config, key, default=_ABSENT, throw_on_resolution_failure=False)
        else:
            value = _select_plain(self.config, key)
        return None if value is _ABSENT else value

    def metric(self, key: str, which: str = "final") -> float | None:
        """The run's `which` value (VALUE_KINDS) of metric `key`; None if it has none."""
        if which == "selected":
            value = ((self.summary.get("selection") or {}).get("metrics") or {}).get(key)
        else:
            entry = self.summary.get("metrics", {}).get(key)
            value = entry.get(which) if isinstance(entry, dict) else None
        if not _is_number(value):
            return None
        value = float(value)
        return value if math.isfinite(value) else None

    @property
    def device_kind(self) -> str:
        """cpu, cuda, ... (the device without its index); "unknown" when not recorded."""
        return str(self.summary.get("device") or "unknown").split(":")[0]

    @property
    def device_seconds(self) -> float | None:
        """Wall seconds x world size: the device time the run held; None when not recorded."""
        wall = self.summary.get("wall_seconds")
        if not isinstance(wall, (int, float)) or isinstance(wall, bool):
            return None
        return float(wall) * int(self.summary.get("world_size") or 1)


def _select_plain(config: dict, key: str) -> Any:
    """Nested lookup in a plain dict; W&B may also hold flattened dotted keys."""
    if key in config:
        return config[key]
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def find_runs(dirs: Iterable[Path | str], log=print) -> list[Run]:
    """Every run directory (a summary.json next to .hydra/config.yaml) under `dirs`, recursively."""
    runs, skipped = [], []
    for root in map(Path, dirs):
        if not root.is_dir():
            raise FileNotFoundError(f"--runs {root}: no such directory")
        for summary_path in sorted(root.rglob("summary.json")):
            run_dir = summary_path.parent
            config_path = run_dir / ".hydra" / "config.yaml"
            try:
                summary = json.loads(summary_path.read_text())
                config = OmegaConf.load(config_path) if config_path.is_file() else None
            except (OSError, ValueError, yaml.YAMLError) as exc:
                skipped.append(f"{run_dir} (unreadable: {str(exc).splitlines()[0] if str(exc) else exc!r})")
                continue
            if not isinstance(summary, dict) or not isinstance(summary.get("metrics", {}), dict):
                skipped.append(f"{summary_path} (not a run summary: a JSON object with a metrics object)")
                continue
            if config is None:
                skipped.append(f"{run_dir} (no .hydra/config.yaml)")
                continue
            runs.append(Run(id=str(run_dir), config=config, summary=summary,
                            timestamp=summary_path.stat().st_mtime, run_dir=run_dir))
    for reason in skipped:
        log(f"skipped {reason}")
    return runs


WANDB_STATES = {"finished": "completed", "failed": "failed", "crashed": "failed", "killed": "failed",
                "running": "running", "pending": "running"}


def _plain_dict(value: Any) -> Any:
    """W&B's summary objects (nested SummarySubDict) -> plain dicts."""
    if hasattr(value, "items"):
        return {str(k): _plain_dict(v) for k, v in value.items()}
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def runs_from_wandb(path: str, api: Any = None) -> list[Run]:
    """Runs of the W&B project `entity/project`: run.config is the resolved Hydra config (as
    projbench logs it); run.summary holds summary.json's metrics (final, best), status, seed,
    model, wall_seconds, world_size and device (records.py writes them when the run ends). Runs
    logged before that have only W&B's last value of each metric ("test/top1", taken as final),
    and W&B's own _runtime as their wall time."""
    if api is None:
        import wandb

        api = wandb.Api()
    runs = []
    for wb in api.runs(path):
        config = _plain_dict(wb.config)
        raw = getattr(wb, "summary_metrics", None)
        summary = _plain_dict(raw if isinstance(raw, dict) else wb.summary)
        metrics = summary.get("metrics")
        if not isinstance(metrics, dict):
            metrics = {key: {"final": value} for key, value in summary.items()
                       if "/" in key and not key.startswith("_") and _is_number(value)}
        selection = summary.get("selection")
        if not isinstance(selection, dict):
            # the selected model's metrics, logged as selected/<split>/<name> (RunRecorder.log_selection)
            selected = {key.removeprefix("selected/"): metrics.pop(key)["final"]
                        for key in [k for k in metrics if k.startswith("selected/")]}
            selection = {"metrics": selected} if selected else None
        status = summary.get("status") or WANDB_STATES.get(str(getattr(wb, "state", "")).lower(), "unknown")
        created = getattr(wb, "created_at", None)
        try:
            timestamp = datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp()
        except ValueError:
            timestamp = 0.0
        model = summary.get("model") or _select_plain(config, "task.model.arch")
        wall = summary.get("wall_seconds", summary.get("_runtime"))
        runs.append(Run(id=f"{path}/{wb.id}", config=config, timestamp=timestamp, summary={
            "status": status, "seed": summary.get("seed", config.get("seed")), "metrics": metrics,
            "selection": selection,
            "model": None if model is _ABSENT else model, "wall_seconds": wall if _is_number(wall) else None,
            "world_size": summary.get("world_size") or 1, "device": summary.get("device")}))
    return runs


def matches(value: Any, want: Any) -> bool:
    """Selector semantics (see results/paper.yaml): scalar equality (numbers as numbers, null =
    absent), a list = any of, {not: V} = anything V does not match."""
    if isinstance(want, dict):
        if set(want) != {"not"}:
            raise SpecError(f"selector {want!r}: only {{not: value}} is understood")
        return not matches(value, want["not"])
    if isinstance(want, list):
        return any(matches(value, w) for w in want)
    if want is None or value is None:
        return want is None and value is None
    if isinstance(want, bool) or isinstance(value, bool):
        return isinstance(want, bool) and isinstance(value, bool) and want == value
    if isinstance(want, (int, float)) and isinstance(value, (int, float)):
        return math.isclose(float(value), float(want), rel_tol=1e-9, abs_tol=1e-12)
    return str(value) == str(want)


def run_matches(run: Run, select: dict[str, Any]) -> bool:
    return all(matches(run.get(key), want) for key, want in select.items())


# -- cells --------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One table cell: the runs' values per seed, their statistics, and (for a projected
    optimizer) the comparison with its base cell."""

    row: str
    column: str
    metric: str
    which: str                     # VALUE_KINDS: the value the cell reports (as the paper did)
    units: str
    direction: str
    paper: float | None
    samples: dict[Any, float] = field(default_factory=dict)  # seed -> reported value
    finals: dict[Any, float] = field(default_factory=dict)   # seed -> final value, when `which` is not
    runs: dict[Any, Run] = field(default_factory=dict)       # seed -> the run behind its value
    models: set[str] = field(default_factory=set)
    excluded: dict[str, int] = field(default_factory=dict)
    derived_from: tuple[str, ...] = ()
    base: tuple[str, str] | None = None
    pair: tuple[str, str] | None = None  # (projected, base) names on the axis that declares the base
    where: str = ""                # the pair's place on the other axis (the row of a column pair)
    comparison: Comparison | None = None
    paper_delta: float | None = None

    @property
    def values(self) -> list[float]:
        return list(self.samples.values())

    @property
    def seeds(self) -> list[Any]:
        return list(self.samples)

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.samples else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    @property
    def interval(self) -> Interval | None:
        return mean_interval(self.values)

    @property
    def paper_in_interval(self) -> bool | None:
        """Whether the paper's number lies in our interval; None without either."""
        interval = self.interval
        return None if interval is None or self.paper is None else interval.contains(self.paper)

    @property
    def final_mean(self) -> float | None:
        return statistics.fmean(self.finals.values()) if self.finals else None

    @property
    def final_std(self) -> float | None:
        return statistics.stdev(self.finals.values()) if len(self.finals) > 1 else None

    @property
    def delta(self) -> float | None:
        return None if self.comparison is None else self.comparison.estimate

    @property
    def name(self) -> str:
        return f"{self.row}/{self.column}"


@dataclass(frozen=True)
class Claim:
    """The verdicts of one projected / base pair of optimizers over a table's rows (or columns)."""

    projected: str
    base: str
    direction: str
    along: str                     # rows | columns: what the pair's cells vary over
    verdicts: tuple[str | None, ...]
    reasons: tuple[str, ...]       # why untested, one per untested cell
    paper_gains: int | None        # cells where the paper's Δ is on the better side (None: no paper Δ)
    paper_pairs: int = 0           # cells with a paper Δ

    def text(self) -> str:
        sign = ">" if self.direction == "max" else "<"
        total = len(self.verdicts)
        unit = self.along if total != 1 else self.along.rstrip("s")
        parts = [f"{VERDICTS[0]} in {self.verdicts.count(VERDICTS[0])} of {total} {unit}"]
        parts += [f"{v} in {self.verdicts.count(v)}" for v in VERDICTS[1:] if self.verdicts.count(v)]
        if self.reasons:
            parts.append(f"untested in {len(self.reasons)} ({', '.join(sorted(set(self.reasons)))})")
        paper = "" if self.paper_gains is None else f"; paper: a gain in {self.paper_gains} of {self.paper_pairs}"
        return f"{self.projected} {sign} {self.base}: " + ", ".join(parts) + paper


@dataclass
class TableResult:
    spec: TableSpec
    cells: dict[tuple[str, str], Cell]
    excluded: dict[str, dict[str, str]]  # reason -> run id -> label, each run counted once
    duplicates: int = 0
    runs: list[Run] = field(default_factory=list)  # every run a cell selected, whatever its status

    @property
    def missing(self) -> list[str]:
        return [c.name for c in self.cells.values() if c.mean is None and not c.derived_from]

    @property
    def has_runs(self) -> bool:
        return any(c.samples for c in self.cells.values()) or bool(self.excluded)

    @property
    def pairs(self) -> list[Cell]:
        """The projected cells, grouped by pair of optimizers, in table order."""
        cells = [self.cells[(r.name, c.name)] for r in self.spec.rows for c in self.spec.columns
                 if self.cells[(r.name, c.name)].base is not None]
        order = list(dict.fromkeys(cell.pair for cell in cells))
        return sorted(cells, key=lambda cell: order.index(cell.pair))

    def claims(self) -> list[Claim]:
        groups: dict[tuple[str, str, str], list[Cell]] = defaultdict(list)
        for cell in self.pairs:
            groups[(*cell.pair, cell.direction)].append(cell)
        out = []
        for (projected, base, direction), cells in groups.items():
            by_column = bool(self.spec.axis("column", cells[0].column).base)
            by_row = bool(self.spec.axis("row", cells[0].row).base)
            along = "cells" if by_column and by_row else "rows" if by_column else "columns"
            verdicts = tuple(c.comparison.verdict for c in cells)
            reasons = tuple(c.comparison.reason for c in cells if not c.comparison.tested)
            paper = [c.paper_delta for c in cells if c.paper_delta is not None]
            gains = sum(d > 0 if direction == "max" else d < 0 for d in paper) if paper else None
            out.append(Claim(projected, base, direction, along, verdicts, reasons, gains, len(paper)))
        return out

    def compute(self) -> dict[str, tuple[float, int, int]]:
        """device kind -> (device seconds, runs, runs without a recorded wall time)."""
        out: dict[str, list] = defaultdict(lambda: [0.0, 0, 0])
        for run in self.runs:
            entry = out[run.device_kind]
            seconds = run.device_seconds
            entry[0] += seconds or 0.0
            entry[1] += 1
            entry[2] += seconds is None
        return {kind: tuple(v) for kind, v in sorted(out.items())}


def build_table(spec: TableSpec, runs: list[Run]) -> TableResult:
    """Group runs into the table's cells by selectors; one value per seed (the newest run)."""
    cells: dict[tuple[str, str], Cell] = {}
    excluded: dict[str, dict[str, str]] = defaultdict(dict)
    selected: dict[str, Run] = {}
    duplicates = 0
    for row in spec.rows:
        for column in spec.columns:
            cell = Cell(row=row.name, column=column.name, metric=column.metric or row.metric or spec.metric,
                        which=column.value or row.value or spec.value,
                        units=column.units or row.units or spec.units,
                        direction=column.direction or row.direction or spec.direction,
                        paper=spec.paper.get(row.name, {}).get(column.name),
                        derived_from=column.mean_of or row.mean_of)
            cells[(row.name, column.name)] = cell
            if cell.derived_from:
                continue
            select = _merge_selects(spec.name, spec.select, row.select, column.select)
            chosen: dict[Any, tuple[Run, float]] = {}
            for run in runs:
                if not run_matches(run, select):
                    continue
                selected[run.id] = run
                reason = None
                value = run.metric(cell.metric, cell.which)
                if run.status != "completed":
                    reason = run.status
                elif value is None:
                    reason = f"without {cell.metric}" if cell.which == "final" else f"without a {cell.which} {cell.metric}"
                if reason is not None:
                    excluded[reason][run.id] = f"{cell.name} seed {run.seed}"
                    cell.excluded[reason] = cell.excluded.get(reason, 0) + 1
                    continue
                if run.seed in chosen:
                    duplicates += 1
                    if chosen[run.seed][0].timestamp >= run.timestamp:
                        continue
                chosen[run.seed] = (run, value)
            for seed in sorted(chosen, key=str):
                run, value = chosen[seed]
                cell.samples[seed] = value
                if cell.which != "final":
                    cell.finals[seed] = run.metric(cell.metric, "final")
                cell.runs[seed] = run
                if run.summary.get("model"):
                    cell.models.add(str(run.summary["model"]))
    _fill_derived(spec, cells)
    _fill_comparisons(spec, cells)
    return TableResult(spec, cells, dict(excluded), duplicates, list(selected.values()))


def _fill_derived(spec: TableSpec, cells: dict[tuple[str, str], Cell]) -> None:
    """A derived cell's value of a seed is the mean of its parts' values of that seed, for the
    seeds every part has (so it compares, and pairs, like any other cell)."""
    for (row, column), cell in cells.items():
        if not cell.derived_from:
            continue
        along_columns = bool(spec.axis("column", column).mean_of)
        parts = [cells[(row, ref)] if along_columns else cells[(ref, column)] for ref in cell.derived_from]
        seeds = [s for s in parts[0].samples if all(s in p.samples for p in parts)]
        cell.samples = {s: statistics.fmean(p.samples[s] for p in parts) for s in seeds}
        if all(p.finals for p in parts):
            cell.finals = {s: statistics.fmean(p.finals[s] for p in parts) for s in seeds}
        cell.models = set().union(*(p.models for p in parts))


def _fill_comparisons(spec: TableSpec, cells: dict[tuple[str, str], Cell]) -> None:
    for (row, column), cell in cells.items():
        row_base, col_base = spec.axis("row", row).base, spec.axis("column", column).base
        if not (row_base or col_base):
            continue
        base = cells[(row_base or row, col_base or column)]
        cell.base = (base.row, base.column)
        if col_base and not row_base:
            cell.pair, cell.where = (column, col_base), row
        elif row_base and not col_base:
            cell.pair, cell.where = (row, row_base), column
        else:
            cell.pair = (cell.name, base.name)
        cell.comparison = compare(cell.samples, base.samples, cell.direction)
        if cell.paper is not None and base.paper is not None:
            cell.paper_delta = cell.paper - base.paper


# -- rendering ----------------------------------------------------------------------------------
def _num(x: float | None, decimals: int, sign: bool = False) -> str:
    if x is None:
        return ""
    x = round(x, decimals) + 0.0  # a value that rounds to zero prints as 0, never as -0
    return f"{x:+.{decimals}f}" if sign else f"{x:.{decimals}f}"


def _bracket(interval: Interval | None, decimals: int, sign: bool = False) -> str:
    if interval is None:
        return ""
    return f"[{_num(interval.low, decimals, sign)}, {_num(interval.high, decimals, sign)}]"


def _ours(cell: Cell, decimals: int, interval: bool = True) -> str:
    """mean ± std [interval] (n=3), with the final value beside a best-valued cell; "" when empty."""
    if cell.mean is None:
        return ""
    spread = f" ± {_num(cell.std, decimals)}" if cell.std is not None else ""
    if interval and cell.interval is not None:
        spread += f" {_bracket(cell.interval, decimals)}"
    notes = [f"n={cell.n}"] + ([cell.which] if cell.which != "final" else [])
    if cell.derived_from:
        notes.append(f"per seed the mean of {len(cell.derived_from)}")
    text = f"{_num(cell.mean, decimals)}{spread} ({', '.join(notes)})"
    if cell.which != "final" and cell.final_mean is not None:
        final_spread = f" ± {_num(cell.final_std, decimals)}" if cell.final_std is not None else ""
        text += f"; final {_num(cell.final_mean, decimals)}{final_spread}"
    return text


def _paper_mark(cell: Cell) -> str:
    inside = cell.paper_in_interval
    return "" if inside is None else (" ∈ CI" if inside else " ∉ CI")


def _test(c: Comparison) -> str:
    """How the Δ was had, in words: "3 paired seeds", "Welch, 3 + 2 runs, df 2.9", "1 + 1 runs"."""
    if c.test == "paired":
        left = f", {c.left_out} unpaired run{'s' * (c.left_out != 1)} left out" if c.left_out else ""
        return f"{c.pairs} paired seeds{left}"
    if c.test == "welch":
        return f"Welch, {c.n_projected} + {c.n_base} runs, df {c.interval.df:.1f}"
    return f"{c.n_projected} + {c.n_base} runs"


def _verdict(c: Comparison) -> str:
    return c.verdict if c.tested else f"untested ({c.reason})"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def compute_line(result: TableResult) -> str:
    """Compute: cpu 24.3 min in 12 runs; ... (wall time x world size, every selected run)."""
    parts = []
    for kind, (seconds, runs, unknown) in result.compute().items():
        text = f"{kind} {_duration(seconds)} in {runs} run{'s' * (runs != 1)}"
        parts.append(text + (f" ({unknown} without a recorded wall time)" if unknown else ""))
    return ("Compute: " + "; ".join(parts) + " (wall time x world size, summed over every run the table "
            "selected, failed ones included)") if parts else "Compute: no runs"


def _caption(spec: TableSpec) -> str:
    better = "higher" if spec.direction == "max" else "lower"
    units = f", {spec.units}" if spec.units else ""
    other = {a.value for a in spec.rows + spec.columns if a.value and a.value != spec.value}
    value = spec.value + "".join(f" ({k} where marked)" for k in sorted(other))
    return f"{spec.title} ({value} {spec.metric}{units}; {better} is better)"


def _footnotes(result: TableResult) -> list[str]:
    spec = result.spec
    level = round(CONFIDENCE * 100)
    kinds = {c.which for c in result.cells.values()}
    value = " or ".join(k for k in VALUE_KINDS if k in kinds) if len(kinds) > 1 else spec.value
    notes = [f"Cells: mean ± sample std over n seeds of each run's {value} value, [its {level} % confidence "
             "interval: Student t, n - 1 df; none at n = 1]; paper: the paper's number, ∈ CI / ∉ CI: inside / "
             "outside our interval."]
    if "best" in kinds:
        notes.append("best: the run's best evaluation, as the paper reports these cells; final (beside it): the "
                     "run's last evaluation.")
    if "selected" in kinds:
        notes.append("selected: the evaluation of the model chosen on the validation split (trainer.select_best), "
                     "as the upstream code reports these cells; final (beside it): the last model's.")
    if result.pairs:
        notes.append(f"Δ: projected minus base optimizer, its {level} % interval, and the paper's Δ. Paired t over "
                     "the seeds both cells ran when at least two are shared (runs of the other seeds are left "
                     "out of Δ); otherwise Welch's t over all runs of both (Welch-Satterthwaite df). Verdict: "
                     "gain reproduced when the whole interval lies on the better side of 0, reversed when on the "
                     "worse side, else no clear difference (at 2-3 seeds the intervals are wide: no clear "
                     "difference is not evidence of none).")
    if spec.version:
        notes.append(f"Paper numbers: {spec.version}.")
    if spec.experiment:
        notes.append(f"Runs: python -m projbench -m +experiment={spec.experiment}; recipe: python -m "
                     f"projbench.recipes --experiment {spec.experiment}")
    if result.missing:
        notes.append("missing: " + ", ".join(result.missing))
    if result.excluded:
        parts = [f"{len(ids)} {reason} ({', '.join(sorted(ids.values()))})"
                 for reason, ids in sorted(result.excluded.items())]
        notes.append("excluded: " + "; ".join(parts))
    if result.duplicates:
        notes.append(f"duplicates: {result.duplicates} runs repeat a seed of their cell; the newest is used")
    mixed = [f"{c.name}: {', '.join(sorted(c.models))}" for c in result.cells.values() if len(c.models) > 1]
    if mixed:
        notes.append("mixed models: " + "; ".join(mixed))
    return notes


def _summary_lines(result: TableResult) -> list[str]:
    return [f"Claim: {claim.text()}" for claim in result.claims()] + [compute_line(result)]


def _comparison_table(result: TableResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the projected-minus-base comparisons (the paper's Δ where it has one)."""
    d = result.spec.decimals
    with_paper = any(cell.paper_delta is not None for cell in result.pairs)
    header = ["Δ", "in", "ours", "95 % CI", "from", "verdict"] + (["paper"] if with_paper else [])
    rows = []
    for cell in result.pairs:
        c = cell.comparison
        row = [f"{cell.pair[0]} − {cell.pair[1]}", cell.where, _num(c.estimate, d, True),
               _bracket(c.interval, d, True), _test(c), _verdict(c)]
        rows.append(row + ([_num(cell.paper_delta, d, True)] if with_paper else []))
    return header, rows


def render_markdown(result: TableResult) -> str:
    spec, d = result.spec, result.spec.decimals
    header = [spec.row_header, *spec.info_columns, *(c.name for c in spec.columns)]
    lines = [f"### {_caption(spec)}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in spec.rows:
        out = [row.name, *(str(row.info.get(k, "")) for k in spec.info_columns)]
        for column in spec.columns:
            cell = result.cells[(row.name, column.name)]
            parts = [_ours(cell, d) or "–"]
            if cell.paper is not None:
                parts.append(f"paper {_num(cell.paper, d)}{_paper_mark(cell)}")
            out.append(" · ".join(parts))
        lines.append("| " + " | ".join(out) + " |")
    if result.pairs:
        header, rows = _comparison_table(result)
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    lines += [f"{line}  " for line in _summary_lines(result) + _footnotes(result)]
    return "\n".join(lines).rstrip() + "\n"


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}
_LATEX_SYMBOLS = {"±": r"$\pm$", "Δ": r"$\Delta$", "−": "$-$", "∈": r"$\in$", "∉": r"$\notin$", "<": "$<$",
                  ">": "$>$"}


def _tex(text: str) -> str:
    return "".join(_LATEX_SYMBOLS.get(ch) or _LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def render_latex(result: TableResult) -> str:
    """Booktabs: the table (per column: ours, its 95 % interval, the paper's number, dagger when
    outside ours), then the projected-minus-base comparisons, then the claims and compute lines."""
    spec, d = result.spec, result.spec.decimals
    lead = 1 + len(spec.info_columns)
    top = [_tex(spec.row_header), *map(_tex, spec.info_columns)]
    sub = [""] * lead
    rules = []
    for k, column in enumerate(spec.columns):
        top.append(rf"\multicolumn{{3}}{{c}}{{{_tex(column.name)}}}")
        sub += ["ours", r"95\% CI", "paper"]
        rules.append(rf"\cmidrule(lr){{{lead + 3 * k + 1}-{lead + 3 * k + 3}}}")
    lines = [f"% {_tex(_caption(spec))}", "% generated by python -m projbench.tables from results/paper.yaml",
             r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(_caption(spec))}}}",
             rf"\begin{{tabular}}{{{'l' * lead + 'rrr' * len(spec.columns)}}}", r"\toprule",
             " & ".join(top) + r" \\", " ".join(rules), " & ".join(sub) + r" \\", r"\midrule"]
    for row in spec.rows:
        out = [_tex(row.name), *(_tex(row.info.get(k, "")) for k in spec.info_columns)]
        for column in spec.columns:
            cell = result.cells[(row.name, column.name)]
            paper = _num(cell.paper, d) + (r"$^\dagger$" if cell.paper_in_interval is False else "")
            out += [_tex(_ours(cell, d, interval=False)) or "--", _bracket(cell.interval, d) or "--", paper or "--"]
        lines.append(" & ".join(out) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if result.pairs:
        header, rows = _comparison_table(result)
        lines += [r"\par\medskip", rf"\begin{{tabular}}{{llrrll{'r' * (len(header) - 6)}}}", r"\toprule",
                  " & ".join(map(_tex, header)) + r" \\", r"\midrule"]
        lines += [" & ".join(_tex(x) or "--" for x in row) + r" \\" for row in rows]
        lines += [r"\bottomrule", r"\end{tabular}"]
    below = [_tex(line) + r"\par" for line in _summary_lines(result)]
    if any(cell.paper_in_interval is False for cell in result.cells.values()):
        below.append(r"$^\dagger$ the paper's number lies outside our 95\% interval.\par")
    lines += [r"\par\smallskip\footnotesize", *below]
    lines += [r"\end{table}"] + [f"% {_tex(note)}" for note in _footnotes(result)]
    return "\n".join(lines) + "\n"


def csv_rows(result: TableResult) -> list[dict[str, Any]]:
    """One row per cell (long format: what a spreadsheet or pandas wants), then the claims and the
    compute per device kind (record "claim" / "compute")."""
    name = result.spec.name
    out = []
    for cell in result.cells.values():
        interval, c = cell.interval, cell.comparison
        inside = cell.paper_in_interval
        out.append({
            "record": "cell", "table": name, "row": cell.row, "column": cell.column, "metric": cell.metric,
            "value": cell.which, "units": cell.units, "direction": cell.direction, "mean": _plain(cell.mean),
            "std": _plain(cell.std), "n": cell.n, "seeds": " ".join(map(str, cell.seeds)),
            "values": " ".join(map(_plain, cell.values)),
            "ci_low": _plain(interval and interval.low), "ci_high": _plain(interval and interval.high),
            "paper": _plain(cell.paper), "paper_in_ci": "" if inside is None else str(inside).lower(),
            "final_mean": _plain(cell.final_mean if cell.which != "final" else None),
            "final_std": _plain(cell.final_std if cell.which != "final" else None),
            "base": "/".join(cell.base) if cell.base else "", "delta": _plain(cell.delta),
            "delta_ci_low": _plain(c and c.interval and c.interval.low),
            "delta_ci_high": _plain(c and c.interval and c.interval.high),
            "delta_test": c.test if c else "", "delta_pairs": c.pairs if c and c.test == "paired" else "",
            "delta_df": _plain(c and c.interval and c.interval.df),
            "verdict": _verdict(c) if c else "", "paper_delta": _plain(cell.paper_delta),
            "excluded": " ".join(f"{k}:{v}" for k, v in sorted(cell.excluded.items())),
            "models": " ".join(sorted(cell.models))})
    for claim in result.claims():
        out.append({"record": "claim", "table": name, "row": f"{claim.projected} vs {claim.base}",
                    "n": len(claim.verdicts), "text": claim.text()})
    for kind, (seconds, runs, _unknown) in result.compute().items():
        out.append({"record": "compute", "table": name, "row": kind, "n": runs,
                    "device_seconds": _plain(seconds), "text": compute_line(result)})
    return out


def _plain(x: float | None) -> str:
    return "" if x is None else repr(round(x, 10))


def render_csv(result: TableResult) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(csv_rows(result))
    return buf.getvalue()


RENDERERS = {"md": render_markdown, "latex": render_latex, "csv": render_csv}


# -- command line -------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m projbench.tables",
        description="Turn finished runs into the paper's tables (results/paper.yaml), with the "
                    "paper's numbers beside ours, and plot training curves.")
    p.add_argument("--runs", nargs="+", action="extend", metavar="DIR",
                   help="directories searched recursively for runs (default: ./outputs, unless --wandb is given)")
    p.add_argument("--table", nargs="+", action="extend", metavar="NAME",
                   help="tables to render (default: every table with at least one matching run)")
    p.add_argument("--format", nargs="+", action="extend", choices=sorted(RENDERERS), metavar="FORMAT",
                   help="md (default), latex, csv; several write one file each")
    p.add_argument("--out", default="results", metavar="DIR",
                   help="writes DIR/tables/<table>.{md,tex,csv} and DIR/figures/ (default: results)")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read runs from this W&B project (online API)")
    p.add_argument("--paper", default=str(PAPER_YAML), metavar="YAML", help="the tables' definition")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                   help="plot weight norm, effective step and the primary metric per epoch (local runs; "
                        "with --table, those the tables selected)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def info(message: str) -> None:
        print(message, file=sys.stderr)

    try:
        specs = load_spec(args.paper)
        names = resolve_table_names(specs, args.table) if args.table else list(specs)
        dirs = args.runs if args.runs is not None else ([] if args.wandb else ["outputs"])
        if args.runs is None and dirs and not Path(dirs[0]).is_dir():
            raise FileNotFoundError(f"{Path(dirs[0]).resolve()}: no such directory (the default, the Hydra "
                                    "output root under the current directory); pass --runs DIR")
        runs = find_runs(dirs, log=info)
        if args.wandb:
            runs += runs_from_wandb(args.wandb)
    except (SpecError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the W&B client's errors (no network, no key, no project)
        print(f"error: W&B project {args.wandb}: {exc}", file=sys.stderr)
        return 2
    by_status: dict[str, int] = defaultdict(int)
    for run in runs:
        by_status[run.status] += 1
    counts = ", ".join(f"{n} {status}" for status, n in sorted(by_status.items())) or "none"
    info(f"read {len(runs)} runs from {', '.join(dirs + ([args.wandb] if args.wandb else []))}: {counts}")

    out = Path(args.out)
    results = [build_table(specs[name], runs) for name in names]
    if not args.table:
        empty = [r.spec.name for r in results if not r.has_runs]
        results = [r for r in results if r.has_runs]
        if empty:
            info(f"no runs for: {', '.join(empty)} (pass --table NAME to render one anyway)")
    for result in results:
        for fmt in dict.fromkeys(args.format or ["md"]):
            text = RENDERERS[fmt](result)
            path = out / "tables" / f"{result.spec.name}.{FORMATS[fmt]}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(text)
            info(f"wrote {path}")
    if args.figures:
        from projbench.figures import write_figures, write_table_figures

        # with --table, the tables' runs; a table that names its own figure gets that one instead
        plotted = {run.id: run for result in results if not result.spec.figure for run in result.runs} \
            if args.table else {run.id: run for run in runs}
        paths = write_figures([r for r in plotted.values() if r.run_dir is not None], out / "figures", log=info)
        for path in paths + write_table_figures(results, out / "figures"):
            info(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
