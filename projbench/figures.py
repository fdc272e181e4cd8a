"""Training curves across runs: the paper's ResNet18 figure, for every task that has runs.

For each (task, model) among the runs, one figure <out>/<task>_<model>.png with three panels per
epoch: the mean weight norm and the mean effective step size (lr / ||w||^2) of the scale-invariant
weights (split "diag" of metrics.jsonl, see projbench/diagnostics.py), and the task's primary
metric on its evaluation split. One line per optimizer setting, averaged over seeds (band: ± std).

A task can add its own comparison figures: register a function in TASK_FIGURES (see
`register_task_figure`); the toy's trajectory plot is plugged in that way.

When the runs of a (task, model) hold at least two optimizers each with a projected version
(SGD and SGDP, Adam and AdamP, any `<name>` and `<name>_p`: the tables' `base:` pairs), a second
figure <task>_<model>_pairs.png gives each such optimizer a panel of its own: the weight norm of
its scale-invariant weights per epoch beside its projected versions'.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import yaml

if TYPE_CHECKING:
    from projbench.tables import Run

History = list[dict]
#: task name -> fn({curve label: [history of each run]}, out_dir, stem) -> the figures it wrote
TaskFigure = Callable[[dict[str, list[History]], Path, str], list[Path]]
TASK_FIGURES: dict[str, TaskFigure] = {}
OPTIM_ORDER = ["sgd", "sgdp", "adam", "adamw", "adamp"]
# Projected optimizers whose name does not end in `_p`, and their base candidates (first present wins).
PROJECTED_BASES = {"sgdp": ("sgd",), "adamp": ("adam", "adamw")}
# Overrides that never tell settings apart in a legend (the optimizer's name leads every label).
IGNORED_OVERRIDES = {"seed", "optim", "experiment", "trainer.progress"}
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


def read_history(run_dir: Path) -> History:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


def mean_curve(histories: list[History], split: str, name: str) -> tuple[list[float], list[float], list[float]]:
    """Epochs, mean and std across runs of one logged quantity, matched by step."""
    by_step: dict[int, list[float]] = defaultdict(list)
    epoch_of: dict[int, float] = {}
    for history in histories:
        for p in history:
            if p["split"] == split and p["name"] == name and p["value"] is not None:
                by_step[p["step"]].append(float(p["value"]))
                epoch_of[p["step"]] = float(p["epoch"])
    steps = sorted(by_step)
    means = [statistics.fmean(by_step[s]) for s in steps]
    stds = [statistics.stdev(by_step[s]) if len(by_step[s]) > 1 else 0.0 for s in steps]
    return [epoch_of[s] for s in steps], means, stds


def _eval_split(histories: list[History], metric: str) -> str | None:
    for split in ("test", "val"):
        if any(p["split"] == split and p["name"] == metric for h in histories for p in h):
            return split
    return None


def plot_training_curves(curves: dict[str, list[History]], primary: str, path: Path, title: str) -> Path:
    """Weight norm, effective step size and the primary metric per epoch, one line per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_histories = [h for hs in curves.values() for h in hs]
    split = _eval_split(all_histories, primary) or "test"
    panels = [("diag", "weight_norm", "mean weight norm ||w||", "linear"),
              ("diag", "effective_step", "mean effective step lr / ||w||²", "log"),
              (split, primary, f"{split}/{primary}", "linear")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (panel_split, name, ylabel, yscale) in zip(axes, panels):
        drawn = False
        for label, histories in curves.items():
            x, mean, std = mean_curve(histories, panel_split, name)
            if not x:
                continue
            (line,) = ax.plot(x, mean, lw=1.4, marker="o" if len(x) < 4 else None, ms=3,
                              label=f"{label} (n={len(histories)})")
            if len(histories) > 1:
                ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.2, lw=0)
            drawn = True
        if drawn:
            ax.set_yscale(yscale)
        else:
            ax.text(0.5, 0.5, f"no {panel_split}/{name} logged", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _sort_key(label: str) -> tuple[int, str]:
    name = label.split(" ", 1)[0]
    return (OPTIM_ORDER.index(name) if name in OPTIM_ORDER else len(OPTIM_ORDER), label)


def projection_pairs(labels: list[str]) -> dict[str, list[str]]:
    """base optimizer -> its projected versions, among curve `labels` that are bare optimizer
    names (labels with overrides are settings of their own, not pairs)."""
    pairs: dict[str, list[str]] = defaultdict(list)
    for label in labels:
        bases = PROJECTED_BASES.get(label) or ((label.removesuffix("_p"),) if label.endswith("_p") else ())
        base = next((b for b in bases if b in labels), None)
        if base is not None:
            pairs[base].append(label)
    return dict(pairs)


def plot_projection_pairs(curves: dict[str, list[History]], pairs: dict[str, list[str]], path: Path,
                          title: str) -> Path:
    """One panel per base optimizer: the mean weight norm of the scale-invariant weights per epoch
    (± std over seeds), the base in grey, its projected versions in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(pairs))
    rows = -(-len(pairs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, (base, projected) in zip(axes.flat, pairs.items()):
        for label, color in [(base, "0.45"), *zip(projected, ("tab:red", "tab:blue"))]:
            x, mean, std = mean_curve(curves[label], "diag", "weight_norm")
            if not x:
                continue
            ax.plot(x, mean, color=color, lw=1.4, label=f"{label} (n={len(curves[label])})")
            if len(curves[label]) > 1:
                ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=color, alpha=0.2, lw=0)
        ax.set(title=base, xlabel="epoch", ylabel="mean ||w||")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    fig.suptitle(f"{title}: weight norm of the scale-invariant weights, without and with the projection")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_figures(runs: list[Run], out_dir: Path) -> list[Path]:
    """One training-curve figure per (task, model) over the completed local runs (plus the task's
    registered figures); returns the files written."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        if run.status == "completed" and run.run_dir is not None:
            groups[(str(run.get("task.name")), str(run.summary.get("model") or run.get("task.model.arch")))].append(run)
    written = []
    for (task, model), group in sorted(groups.items()):
        histories = {run.id: read_history(run.run_dir) for run in group}
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
        written.append(plot_training_curves(curves, primary, out_dir / f"{stem}.png", f"{task} ({model})"))
        pairs = projection_pairs(list(curves))
        if len(pairs) >= 2:
            written.append(plot_projection_pairs(curves, pairs, out_dir / f"{stem}_pairs.png", f"{task} ({model})"))
        if task in TASK_FIGURES:
            written += TASK_FIGURES[task](curves, out_dir, stem)
    return written
