"""Training curves across runs: the paper's ResNet18 figure, for every task that has runs.

For each (task, model) among the runs, one figure <out>/<task>_<model>.png with three panels per
epoch: the mean weight norm and the mean effective step size (the step of the normalised weight,
`||w_{t+1}/||w_{t+1}|| - w_t/||w_t|| ||`) of the scale-invariant weights (split "diag" of
metrics.jsonl, averaged over each epoch's diagnostics steps, see projbench/diagnostics.py), and
the task's primary metric on its evaluation split. One line per optimizer setting, averaged over
seeds (band: ± std).

A task can add its own comparison figures: register a function in TASK_FIGURES (see
`register_task_figure`); the toy's trajectory plot is plugged in that way. A table of
results/paper.yaml can name a figure drawn from its own runs (`figure: {kind: ...}`, see
TABLE_FIGURES): one curve per row, the paper's values marked (`training_curves`), or each optimizer
beside its projected versions (`projection_pairs`).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import yaml

if TYPE_CHECKING:
    from projbench.tables import Run, TableResult

History = list[dict]
#: task name -> fn({curve label: [history of each run]}, out_dir, stem) -> the figures it wrote
TaskFigure = Callable[[dict[str, list[History]], Path, str], list[Path]]
TASK_FIGURES: dict[str, TaskFigure] = {}
OPTIM_ORDER = ["sgd", "sgdp", "sgdp_alg1", "adam", "adamw", "adamp"]
# Overrides that never tell settings apart in a legend (the optimizer's name leads every label).
IGNORED_OVERRIDES = {"seed", "optim", "experiment", "trainer.progress", "resume", "overwrite"}
IGNORED_PREFIXES = ("hydra", "logger", "paths")


def register_task_figure(task: str) -> Callable[[TaskFigure], TaskFigure]:
    """Decorator: `fn` also draws the runs of `task` (called once per (task, model) group)."""
    def wrap(fn: TaskFigure) -> TaskFigure:
        TASK_FIGURES[task] = fn
        return fn
    return wrap


@register_task_figure("toy")
def _toy_trajectories(curves: dict[str, list[History]], out_dir: Path, stem: str) -> list[Path]:
    from projbench.tasks.toy import plot_toy_runs  # the toy's own plot, one run per setting

    return [plot_toy_runs({label: runs[0] for label, runs in curves.items()}, out_dir / f"{stem}_trajectories.png")]


def read_history(run_dir: Path, log: Callable[[str], None] = print) -> History:
    """The run's metrics.jsonl (a torn last line, from a kill mid-write, is left out); a damaged
    file is skipped with one line naming it."""
    from projbench.records import DamagedRecord, read_metrics

    try:
        return read_metrics(run_dir / "metrics.jsonl")[0]
    except DamagedRecord as exc:
        log(f"skipped {exc} (damaged metrics; the run is left out of the figures)")
        return []


def _overrides(run: Run) -> dict[str, str]:
    path = run.run_dir / ".hydra" / "overrides.yaml" if run.run_dir else None
    if path is None or not path.is_file():
        return {}
    out = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).lstrip("+~").partition("=")
        if key not in IGNORED_OVERRIDES and not key.startswith(IGNORED_PREFIXES):
            out[key] = value
    return out


def curve_labels(runs: list[Run]) -> dict[str, str]:
    """run id -> legend label: the optimizer, plus each command-line override that differs among
    these runs (seeds aside, so the seeds of one setting share a label)."""
    overrides = {run.id: _overrides(run) for run in runs}
    keys = sorted({k for o in overrides.values() for k in o})
    varying = [k for k in keys if len({o.get(k) for o in overrides.values()}) > 1]
    labels = {}
    for run in runs:
        extra = [f"{k}={overrides[run.id].get(k, 'default')}" for k in varying]
        labels[run.id] = " ".join([str(run.get("optim.name"))] + extra)
    return labels


def mean_curve(histories: list[History], split: str, name: str,
               per_epoch: bool = False) -> tuple[list[float], list[float], list[float]]:
    """Epochs, mean and std across runs of one logged quantity, matched by step; with
    `per_epoch`, each run's points are first averaged over each epoch (as the paper's figure)."""
    by_x: dict[float, list[float]] = defaultdict(list)
    for history in histories:
        points = [(float(p["epoch"]), float(p["value"])) for p in history
                  if p["split"] == split and p["name"] == name and p["value"] is not None]
        if per_epoch:
            epochs: dict[float, list[float]] = defaultdict(list)
            for epoch, value in points:
                epochs[float(math.ceil(epoch - 1e-9))].append(value)
            points = [(epoch, statistics.fmean(values)) for epoch, values in epochs.items()]
        for x, value in points:
            by_x[x].append(value)
    xs = sorted(by_x)
    means = [statistics.fmean(by_x[x]) for x in xs]
    stds = [statistics.stdev(by_x[x]) if len(by_x[x]) > 1 else 0.0 for x in xs]
    return xs, means, stds


def _eval_split(histories: list[History], metric: str) -> str | None:
    for split in ("test", "val"):
        if any(p["split"] == split and p["name"] == metric for h in histories for p in h):
            return split
    return None


#: the quantities of the paper's ResNet18 figure: (split, name) -> (axis label, y scale)
PANELS = {("diag", "weight_norm"): ("mean weight norm ||w||", "linear"),
          ("diag", "effective_step"): ("mean effective step ||Δ(w/||w||)||", "linear"),
          ("diag", "effective_lr"): ("mean lr / ||w||²", "log")}


def plot_training_curves(curves: dict[str, list[History]], panels: list[str], path: Path, title: str,
                         marks: dict[str, dict[str, float]] | None = None) -> Path:
    """One panel per `split/name` key in `panels` (diag quantities averaged per epoch), one line
    per label; `marks` (label -> key -> value) puts a paper value at the end of that line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        panel_split, name = key.split("/", 1)
        ylabel, yscale = PANELS.get((panel_split, name), (key, "linear"))
        drawn = False
        for label, histories in curves.items():
            x, mean, std = mean_curve(histories, panel_split, name, per_epoch=panel_split == "diag")
            if not x:
                continue
            (line,) = ax.plot(x, mean, lw=1.4, marker="o" if len(x) < 4 else None, ms=3,
                              label=f"{label} (n={len(histories)})")
            if len(histories) > 1:
                ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.2, lw=0)
            paper = (marks or {}).get(label, {}).get(key)
            if paper is not None:
                ax.plot([x[-1]], [paper], marker="*", ms=11, color=line.get_color(), mec="black", mew=0.6,
                        ls="none", label=f"{label}: paper {paper:g}")
            drawn = True
        if drawn:
            ax.set_yscale(yscale)
        else:
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _sort_key(label: str) -> tuple[int, str]:
    name = label.split(" ", 1)[0]
    return (OPTIM_ORDER.index(name) if name in OPTIM_ORDER else len(OPTIM_ORDER), label)


def write_figures(runs: list[Run], out_dir: Path, log: Callable[[str], None] = print) -> list[Path]:
    """One training-curve figure per (task, model) over the completed local runs (plus the task's
    registered figures); returns the files written."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        if run.status == "completed" and run.run_dir is not None:
            groups[(str(run.get("task.name")), str(run.summary.get("model") or run.get("task.model.arch")))].append(run)
    written = []
    for (task, model), group in sorted(groups.items()):
        histories = {run.id: read_history(run.run_dir, log) for run in group}
        labels = curve_labels(group)
        curves: dict[str, list[History]] = defaultdict(list)
        for run in group:
            if histories[run.id]:
                curves[labels[run.id]].append(histories[run.id])
        if not curves:
            continue
        curves = dict(sorted(curves.items(), key=lambda item: _sort_key(item[0])))
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{task}_{model}")
        primary = str(group[0].summary.get("primary_metric") or "top1")
        split = _eval_split([h for hs in curves.values() for h in hs], primary) or "test"
        panels = ["diag/weight_norm", "diag/effective_step", f"{split}/{primary}"]
        written.append(plot_training_curves(curves, panels, out_dir / f"{stem}.png", f"{task} ({model})"))
        if task in TASK_FIGURES:
            written += TASK_FIGURES[task](curves, out_dir, stem)
    return written


# -- figures of a table's runs ------------------------------------------------------------------
#: figure kind -> fn(table result, out_dir) -> the figures it wrote (results/paper.yaml `figure:`)
TableFigure = Callable[["TableResult", Path], list[Path]]
TABLE_FIGURES: dict[str, TableFigure] = {}


def register_table_figure(kind: str) -> Callable[[TableFigure], TableFigure]:
    def wrap(fn: TableFigure) -> TableFigure:
        TABLE_FIGURES[kind] = fn
        return fn
    return wrap


def row_runs(result: TableResult, column: str | None = None) -> dict[str, list[Run]]:
    """Row name -> the runs of its cells (of one column, or of all columns without repeats)."""
    out: dict[str, list[Run]] = {}
    for row in result.spec.rows:
        runs: dict[str, Run] = {}
        for col in result.spec.columns:
            if column is None or col.name == column:
                runs.update((run.id, run) for run in result.cells[(row.name, col.name)].runs.values())
        if runs:
            out[row.name] = list(runs.values())
    return out


@register_table_figure("training_curves")
def _table_training_curves(result: TableResult, out_dir: Path) -> list[Path]:
    """The paper's ResNet18 figure from a table's runs: `figure.panels` (split/name keys) per
    epoch, one curve per row, each paper value of the table at the end of its row's curve."""
    spec = result.spec
    curves = {row: [h for run in runs if run.run_dir and (h := read_history(run.run_dir))]
              for row, runs in row_runs(result).items()}
    curves = {row: hs for row, hs in curves.items() if hs}
    if not curves:
        return []
    metric_of = {c.name: c.metric or spec.metric for c in spec.columns}
    marks = {row: {metric_of[col]: value for col, value in values.items() if value is not None}
             for row, values in spec.paper.items()}
    panels = list(spec.figure.get("panels") or ["diag/weight_norm", "diag/effective_step", spec.metric])
    return [plot_training_curves(curves, panels, out_dir / f"{spec.name}.png", spec.title, marks)]


@register_table_figure("toy3d")
def _table_toy3d(result: TableResult, out_dir: Path) -> list[Path]:
    """The project page's 3-D toy figure: one panel per row (the run of `figure.column`),
    trajectory over the Rosenbrock contours and ||w|| per iteration, the page's final ||w|| marked
    and, where `figure.page` names the page's digitised figure (results/toy3d_page.json) and
    `figure.page_panels` a row's panel in it, the page's trajectory and r curve in grey."""
    from projbench.tables import PAPER_YAML
    from projbench.tasks.toy import plot_toy3d_panels  # the toy's own plot

    spec = result.spec
    column = spec.figure.get("column")
    page_file = PAPER_YAML.parent / spec.figure["page"] if spec.figure.get("page") else None
    page = json.loads(page_file.read_text())["panels"] if page_file and page_file.is_file() else {}
    page_of = spec.figure.get("page_panels") or {}
    panels = {row: (runs[0], spec.paper.get(row, {}).get(column), page.get(page_of.get(row)))
              for row, runs in row_runs(result, column).items()}
    if not panels:
        return []
    return [plot_toy3d_panels(panels, out_dir / f"{spec.name}.png", spec.title)]


@register_table_figure("projection_pairs")
def _table_projection_pairs(result: TableResult, out_dir: Path) -> list[Path]:
    """Each optimizer beside its projected versions (the rows whose `base:` it is): for each column
    of `figure.columns` (default: all), one panel per base row with `figure.panel` (default
    diag/weight_norm) per epoch, mean ± std over the seeds of that column's runs; one file each,
    <table>_<column>.png."""
    spec = result.spec
    projected: dict[str, list[str]] = defaultdict(list)
    for row in spec.rows:
        if row.base:
            projected[row.base].append(row.name)
    written = []
    for column in spec.figure.get("columns") or [c.name for c in spec.columns]:
        curves = {row: [h for run in runs if run.run_dir and (h := read_history(run.run_dir))]
                  for row, runs in row_runs(result, column).items()}
        pairs = {base: [p for p in rows if curves.get(p)] for base, rows in projected.items() if curves.get(base)}
        pairs = {base: rows for base, rows in pairs.items() if rows}
        if pairs:
            stem = re.sub(r"[^A-Za-z0-9]+", "-", f"{spec.name}_{column}").strip("-").lower()
            written.append(plot_projection_pairs(curves, pairs, spec.figure.get("panel", "diag/weight_norm"),
                                                 out_dir / f"{stem}.png", f"{spec.name}, {column}"))
    return written


def plot_projection_pairs(curves: dict[str, list[History]], pairs: dict[str, list[str]], key: str, path: Path,
                          title: str) -> Path:
    """One panel per base optimizer: `key` (split/name; diag quantities averaged per epoch) per
    epoch, ± std over seeds, the base in grey and its projected versions in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split, name = key.split("/", 1)
    ylabel = PANELS.get((split, name), (key,))[0]
    cols = min(4, len(pairs))
    rows = -(-len(pairs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, (base, projected) in zip(axes.flat, pairs.items()):
        for label, color in [(base, "0.45"), *zip(projected, ("tab:red", "tab:blue", "tab:green"))]:
            x, mean, std = mean_curve(curves[label], split, name, per_epoch=split == "diag")
            ax.plot(x, mean, color=color, lw=1.4, label=f"{label} (n={len(curves[label])})")
            if len(curves[label]) > 1:
                ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=color, alpha=0.2, lw=0)
        ax.set(title=base, xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    fig.suptitle(f"{title}: without and with the projection")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_table_figures(results: list[TableResult], out_dir: Path) -> list[Path]:
    """The figures that tables name in their `figure:` entry, each drawn from its table's runs."""
    written: list[Path] = []
    for result in results:
        kind = result.spec.figure.get("kind")
        if kind:
            written += TABLE_FIGURES[kind](result, out_dir)
    return written
