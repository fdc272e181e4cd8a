"""Finished runs -> the paper's tables, with the paper's numbers beside ours.

    python -m projbench.tables [--runs DIR ...] [--table NAME ...] [--format md|latex|csv]
                               [--out DIR] [--wandb ENTITY/PROJECT] [--no-figures]

results/paper.yaml holds every table: its rows and columns, the config selectors that say which
runs fill each cell, the metric a cell averages, and the paper's numbers. Runs come from run
directories (summary.json + .hydra/config.yaml, found recursively; default: ./outputs, the Hydra
roots) or from a W&B project. A cell is the mean, sample std and count over seeds of the matching
completed runs; failed and unfinished runs are left out and counted, a cell without runs stays
empty and is listed, never filled with the paper's number. Tables go to <out>/tables/<table>.<ext>
and stdout; figures (projbench/figures.py) to <out>/figures/.
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

PAPER_YAML = Path(__file__).resolve().parent.parent / "results" / "paper.yaml"
FORMATS = {"md": "md", "latex": "tex", "csv": "csv"}
CSV_FIELDS = ["table", "row", "column", "metric", "units", "direction", "mean", "std", "n", "seeds",
              "paper", "base", "delta", "paper_delta", "excluded", "models"]


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
    mean_of: tuple[str, ...] = ()  # derived: the mean of these columns' (rows') means
    info: dict[str, Any] = field(default_factory=dict)


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
    unknown = set(raw) - {"select", "base", "metric", "direction", "units", "mean_of", "info"}
    if unknown:
        raise SpecError(f"{table}: {kind} {name!r} has unknown keys {sorted(unknown)}")
    return Axis(name=str(name), select=dict(raw.get("select") or {}), base=raw.get("base"),
                metric=raw.get("metric"), direction=raw.get("direction"), units=raw.get("units"),
                mean_of=tuple(raw.get("mean_of") or ()), info=dict(raw.get("info") or {}))


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
        rows=rows, columns=columns, aliases=tuple(raw.get("aliases") or ()),
        paper={str(r): dict(v or {}) for r, v in raw["paper"].items()})
    _validate(spec)
    return spec


def _validate(spec: TableSpec) -> None:
    row_names, col_names = [r.name for r in spec.rows], [c.name for c in spec.columns]
    if spec.value not in ("final", "best"):
        raise SpecError(f"{spec.name}: value must be final or best, got {spec.value!r}")
    for kind, axes, names in (("row", spec.rows, row_names), ("column", spec.columns, col_names)):
        for axis in axes:
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
        entry = self.summary.get("metrics", {}).get(key)
        if not isinstance(entry, dict) or entry.get(which) is None:
            return None
        value = float(entry[which])
        return value if math.isfinite(value) else None


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


def runs_from_wandb(path: str, api: Any = None) -> list[Run]:
    """Runs of the W&B project `entity/project`: run.config is the resolved Hydra config (as
    projbench logs it), run.summary the last logged value of every metric ("test/top1", ...)."""
    if api is None:
        import wandb

        api = wandb.Api()
    runs = []
    for wb in api.runs(path):
        config = dict(wb.config)
        raw = getattr(wb, "summary_metrics", None)
        summary = dict(raw) if isinstance(raw, dict) else dict(wb.summary)
        metrics = {key: {"final": value} for key, value in summary.items()
                   if "/" in key and not key.startswith("_") and isinstance(value, (int, float))
                   and not isinstance(value, bool)}
        status = summary.get("status") or WANDB_STATES.get(str(getattr(wb, "state", "")).lower(), "unknown")
        created = getattr(wb, "created_at", None)
        try:
            timestamp = datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp()
        except ValueError:
            timestamp = 0.0
        model = _select_plain(config, "task.model.arch")
        runs.append(Run(id=f"{path}/{wb.id}", config=config, timestamp=timestamp, summary={
            "status": status, "seed": config.get("seed"), "metrics": metrics,
            "model": None if model is _ABSENT else model}))
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
    row: str
    column: str
    metric: str
    units: str
    direction: str
    paper: float | None
    values: list[float] = field(default_factory=list)
    seeds: list[Any] = field(default_factory=list)
    models: set[str] = field(default_factory=set)
    excluded: dict[str, int] = field(default_factory=dict)
    derived_from: tuple[str, ...] = ()
    derived_mean: float | None = None
    derived_n: int = 0
    base: tuple[str, str] | None = None
    delta: float | None = None
    paper_delta: float | None = None

    @property
    def n(self) -> int:
        return self.derived_n if self.derived_from else len(self.values)

    @property
    def mean(self) -> float | None:
        if self.derived_from:
            return self.derived_mean
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def name(self) -> str:
        return f"{self.row}/{self.column}"


@dataclass
class TableResult:
    spec: TableSpec
    cells: dict[tuple[str, str], Cell]
    excluded: dict[str, dict[str, str]]  # reason -> run id -> label, each run counted once
    duplicates: int = 0

    @property
    def missing(self) -> list[str]:
        return [c.name for c in self.cells.values() if c.mean is None and not c.derived_from]

    @property
    def has_runs(self) -> bool:
        return any(c.values for c in self.cells.values()) or bool(self.excluded)


def build_table(spec: TableSpec, runs: list[Run]) -> TableResult:
    """Group runs into the table's cells by selectors; one value per seed (the newest run)."""
    cells: dict[tuple[str, str], Cell] = {}
    excluded: dict[str, dict[str, str]] = defaultdict(dict)
    duplicates = 0
    for row in spec.rows:
        for column in spec.columns:
            metric = column.metric or row.metric or spec.metric
            cell = Cell(row=row.name, column=column.name, metric=metric,
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
                reason = None
                value = run.metric(metric, spec.value)
                if run.status != "completed":
                    reason = run.status
                elif value is None:
                    reason = f"without {metric}"
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
                cell.values.append(value)
                cell.seeds.append(seed)
                if run.summary.get("model"):
                    cell.models.add(str(run.summary["model"]))
    _fill_derived(spec, cells)
    _fill_deltas(spec, cells)
    return TableResult(spec, cells, dict(excluded), duplicates)


def _fill_derived(spec: TableSpec, cells: dict[tuple[str, str], Cell]) -> None:
    for (row, column), cell in cells.items():
        if not cell.derived_from:
            continue
        along_columns = bool(spec.axis("column", column).mean_of)
        parts = [cells[(row, ref)] if along_columns else cells[(ref, column)] for ref in cell.derived_from]
        if all(p.mean is not None for p in parts):
            cell.derived_mean = statistics.fmean(p.mean for p in parts)
            cell.derived_n = min(p.n for p in parts)


def _fill_deltas(spec: TableSpec, cells: dict[tuple[str, str], Cell]) -> None:
    for (row, column), cell in cells.items():
        row_base, col_base = spec.axis("row", row).base, spec.axis("column", column).base
        if not (row_base or col_base):
            continue
        base = cells[(row_base or row, col_base or column)]
        cell.base = (base.row, base.column)
        if cell.mean is not None and base.mean is not None:
            cell.delta = cell.mean - base.mean
        if cell.paper is not None and base.paper is not None:
            cell.paper_delta = cell.paper - base.paper


# -- rendering ----------------------------------------------------------------------------------
def _num(x: float | None, decimals: int, sign: bool = False) -> str:
    if x is None:
        return ""
    return f"{x:+.{decimals}f}" if sign else f"{x:.{decimals}f}"


def _ours(cell: Cell, decimals: int, pm: str = "±") -> str:
    if cell.mean is None:
        return ""
    if cell.derived_from:
        return f"{_num(cell.mean, decimals)} (mean of {len(cell.derived_from)})"
    spread = f" {pm} {_num(cell.std, decimals)}" if cell.std is not None else ""
    return f"{_num(cell.mean, decimals)}{spread} (n={cell.n})"


def _caption(spec: TableSpec) -> str:
    better = "higher" if spec.direction == "max" else "lower"
    units = f", {spec.units}" if spec.units else ""
    return f"{spec.title} ({spec.value} {spec.metric}{units}; {better} is better)"


def _footnotes(result: TableResult) -> list[str]:
    spec = result.spec
    notes = [f"Cells: mean ± sample std over n seeds of each run's {spec.value} value; paper: the "
             "paper's number; Δ: the projected optimizer minus its base, ours (paper)."]
    if spec.experiment:
        notes.append(f"Runs: python -m projbench -m +experiment={spec.experiment}")
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


def render_markdown(result: TableResult) -> str:
    spec = result.spec
    header = [spec.row_header, *spec.info_columns, *(c.name for c in spec.columns)]
    lines = [f"### {_caption(spec)}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in spec.rows:
        out = [row.name, *(str(row.info.get(k, "")) for k in spec.info_columns)]
        for column in spec.columns:
            cell = result.cells[(row.name, column.name)]
            parts = [_ours(cell, spec.decimals) or "–"]
            if cell.paper is not None:
                parts.append(f"paper {_num(cell.paper, spec.decimals)}")
            if cell.delta is not None:
                delta = f"Δ {_num(cell.delta, spec.decimals, True)}"
                if cell.paper_delta is not None:
                    delta += f" (paper {_num(cell.paper_delta, spec.decimals, True)})"
                parts.append(delta)
            out.append(" · ".join(parts))
        lines.append("| " + " | ".join(out) + " |")
    lines.append("")
    lines += [f"{note}  " for note in _footnotes(result)]
    return "\n".join(lines).rstrip() + "\n"


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def _tex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text)).replace("±", r"$\pm$").replace("Δ", r"$\Delta$")


def render_latex(result: TableResult) -> str:
    """A booktabs table: per column, ours and the paper's number (and Δ for projected optimizers)."""
    spec = result.spec
    has_delta = {c.name: any(result.cells[(r.name, c.name)].base for r in spec.rows) for c in spec.columns}
    widths = {c.name: 3 if has_delta[c.name] else 2 for c in spec.columns}
    lead = 1 + len(spec.info_columns)
    colspec = "l" * lead + "".join("r" * widths[c.name] for c in spec.columns)
    top = [_tex(spec.row_header), *map(_tex, spec.info_columns)]
    sub = [""] * lead
    rules, start = [], lead + 1
    for column in spec.columns:
        top.append(rf"\multicolumn{{{widths[column.name]}}}{{c}}{{{_tex(column.name)}}}")
        sub += ["ours", "paper"] + ([r"$\Delta$ (paper)"] if has_delta[column.name] else [])
        rules.append(rf"\cmidrule(lr){{{start}-{start + widths[column.name] - 1}}}")
        start += widths[column.name]
    lines = [f"% {_tex(_caption(spec))}", "% generated by python -m projbench.tables from results/paper.yaml",
             r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(_caption(spec))}}}",
             rf"\begin{{tabular}}{{{colspec}}}", r"\toprule", " & ".join(top) + r" \\", " ".join(rules),
             " & ".join(sub) + r" \\", r"\midrule"]
    for row in spec.rows:
        out = [_tex(row.name), *(_tex(row.info.get(k, "")) for k in spec.info_columns)]
        for column in spec.columns:
            cell = result.cells[(row.name, column.name)]
            out += [_tex(_ours(cell, spec.decimals)) or "--", _num(cell.paper, spec.decimals) or "--"]
            if has_delta[column.name]:
                delta = _num(cell.delta, spec.decimals, True) or "--"
                paper_delta = _num(cell.paper_delta, spec.decimals, True)
                out.append(f"{delta} ({paper_delta})" if paper_delta else delta)
        lines.append(" & ".join(out) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    lines += [f"% {_tex(note)}" for note in _footnotes(result)]
    return "\n".join(lines) + "\n"


def csv_rows(result: TableResult) -> list[dict[str, Any]]:
    """One row per cell (long format): what a spreadsheet or pandas wants."""
    out = []
    for cell in result.cells.values():
        out.append({
            "table": result.spec.name, "row": cell.row, "column": cell.column, "metric": cell.metric,
            "units": cell.units, "direction": cell.direction, "mean": _plain(cell.mean), "std": _plain(cell.std),
            "n": cell.n, "seeds": " ".join(map(str, cell.seeds)), "paper": _plain(cell.paper),
            "base": "/".join(cell.base) if cell.base else "", "delta": _plain(cell.delta),
            "paper_delta": _plain(cell.paper_delta),
            "excluded": " ".join(f"{k}:{v}" for k, v in sorted(cell.excluded.items())),
            "models": " ".join(sorted(cell.models))})
    return out


def _plain(x: float | None) -> str:
    return "" if x is None else repr(round(x, 10))


def render_csv(result: TableResult) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
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
    p.add_argument("--format", choices=sorted(RENDERERS), default="md")
    p.add_argument("--out", default="results", metavar="DIR",
                   help="writes DIR/tables/<table>.{md,tex,csv} and DIR/figures/ (default: results)")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read runs from this W&B project (online API)")
    p.add_argument("--paper", default=str(PAPER_YAML), metavar="YAML", help="the tables' definition")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                   help="plot weight norm, effective step and the primary metric per epoch (local runs)")
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
        text = RENDERERS[args.format](result)
        path = out / "tables" / f"{result.spec.name}.{FORMATS[args.format]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(text)
        info(f"wrote {path}")
    if args.figures:
        from projbench.figures import write_figures

        for path in write_figures([r for r in runs if r.run_dir is not None], out / "figures", log=info):
            info(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
