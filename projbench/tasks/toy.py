"""`task=toy`, `task=toy3d`: the project page's toy problems, where only a weight's direction counts.

cosine2d     minimise -cos(w, w*) for 2-D w (project page). The setting was not published; the one
             used here reproduces the page's norms with torch.optim.SGD: w0 = (-0.8, -0.6)
             (norm 1, 171.9 degrees from w*), w* = (1, 1), lr 0.02, 500 steps: momentum 0.9 grows
             ||w|| to 2.93 and momentum 0.99 to 27.87, as on the page (tests/test_toy.py).
rosenbrock3d the page's 3-D toy: the Rosenbrock function f(psi, phi) = (1 - psi)^2 + b (phi - psi^2)^2
             of coordinates (psi, phi) of the direction of a 3-D weight w, so that the radius r = ||w||
             is a redundant axis. The page's figure shows f's contours for b = 300 (its levels are
             exact iso-lines of that f), the start (psi, phi) = (-2, 2) at r = 1, the optimum (1, 1)
             and 200 iterations, but not how (psi, phi) map to w. Here they are the coordinates of the
             central (gnomonic) projection of the hemisphere z > 0 onto the plane z = 1, scaled and
             centred: w ~ (s (psi - psi_c), s (phi - phi_c), 1), `task.chart` = {scale: s, center:
             [psi_c, phi_c]}. The chart and the step sizes of conf/task/toy3d*.yaml come from a search
             against the page's figure (scripts/toy3d_search.py; README, "The toy").

The weight is a (1, d) matrix so that SGDP / AdamP treat it as they treat a conv or linear weight
(one row: the channel view). Each step is logged (eval_every: 1) so that trajectories, norms and
the steps to converge can be read from metrics.jsonl.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from projbench.tasks.base import Task


class _Ticks(Dataset):
    """A data set of `n` empty items: one per optimisation step of the toy."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.zeros(())


class DirectionModel(nn.Module):
    def __init__(self, w0: list[float]):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([w0], dtype=torch.float64))


class Chart:
    """Coordinates (psi, phi) of directions in the hemisphere z > 0: the central projection onto
    the plane z = 1, scaled by 1 / `scale` and shifted by `center`."""

    def __init__(self, scale: float = 1.0, center: tuple[float, float] = (0.0, 0.0)):
        self.scale, self.center = float(scale), (float(center[0]), float(center[1]))

    def coords(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(psi, phi) of the rows of `w` (any norm: the radius drops out)."""
        x, y, z = w[..., 0], w[..., 1], w[..., 2]
        return x / (z * self.scale) + self.center[0], y / (z * self.scale) + self.center[1]

    def direction(self, psi: float, phi: float) -> list[float]:
        """The unit vector with coordinates (psi, phi)."""
        v = torch.tensor([self.scale * (psi - self.center[0]), self.scale * (phi - self.center[1]), 1.0],
                         dtype=torch.float64)
        return (v / v.norm()).tolist()


def rosenbrock(psi, phi, b: float):
    return (1 - psi) ** 2 + b * (phi - psi**2) ** 2


def cosine2d_loss(w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -F.cosine_similarity(w, target, dim=1).squeeze()


def rosenbrock3d_loss(w: torch.Tensor, b: float, chart: Chart | None = None) -> torch.Tensor:
    psi, phi = (chart or Chart()).coords(w[0])
    return rosenbrock(psi, phi, b)


class ToyTask(Task):
    metrics = {"cos": "max", "loss": "min"}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.objective = cfg.objective
        if self.objective == "rosenbrock3d":
            self.chart = Chart(cfg.chart.scale, tuple(cfg.chart.center))
            self.w0 = self.chart.direction(*cfg.start)
            target = self.chart.direction(1.0, 1.0)  # Rosenbrock's minimum
        else:
            self.chart = None
            self.w0 = list(cfg.w0)
            target = list(cfg.target)
        self.target = torch.tensor([target], dtype=torch.float64)

    def model_name(self) -> str:
        return f"toy-{self.objective}"

    def build_model(self) -> nn.Module:
        w0 = torch.tensor(self.w0, dtype=torch.float64)
        return DirectionModel((w0 / w0.norm() * self.cfg.init_norm).tolist())

    def train_dataset(self) -> Dataset:
        return _Ticks(int(self.cfg.data.steps_per_epoch))

    def eval_datasets(self) -> dict[str, Dataset]:
        return {"test": _Ticks(1)}

    def loss_of(self, w: torch.Tensor) -> torch.Tensor:
        if self.objective == "cosine2d":
            return cosine2d_loss(w, self.target.to(w.device))
        return rosenbrock3d_loss(w, float(self.cfg.rosenbrock_b), self.chart)

    def training_loss(self, model: nn.Module, batch) -> torch.Tensor:
        return self.loss_of(_weight(model))

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        w = _weight(model).detach()
        values = {"loss": self.loss_of(w).item(),
                  "cos": F.cosine_similarity(w, self.target.to(w.device), dim=1).item(),
                  "w_norm": w.norm().item()}
        values.update({f"w{i}": float(c) for i, c in enumerate(w[0].tolist())})
        if self.chart is not None:
            psi, phi = self.chart.coords(w[0])
            values.update(psi=psi.item(), phi=phi.item())
        return values

    def summarize(self, history: list[dict]) -> dict:
        """Final norm and the first step with 1 - cos(w, w*) < converge_tol (None if never)."""
        cos = [(p["step"], p["value"]) for p in history if p["split"] == "test" and p["name"] == "cos"]
        tol = float(self.cfg.converge_tol)
        first = next((s for s, c in cos if 1 - c < tol), None)
        norms = [p["value"] for p in history if p["split"] == "test" and p["name"] == "w_norm"]
        return {"steps_to_converge": first, "final_norm": norms[-1] if norms else None,
                "converge_tol": tol}

    def write_figures(self, history: list[dict], run_dir: Path) -> list[Path]:
        return [plot_toy_runs({self.model_name(): history}, run_dir / "toy.png")]


def _series(history: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(p["step"], p["value"]) for p in history if p["split"] == "test" and p["name"] == name]
    return [s for s, _ in points], [v for _, v in points]


def _xy_names(history: list[dict]) -> tuple[str, str]:
    """The coordinates a trajectory is drawn in: (psi, phi) on the 3-D toy, w's first two otherwise."""
    return ("psi", "phi") if any(p["name"] == "psi" for p in history) else ("w0", "w1")


def plot_toy_runs(runs: dict[str, list[dict]], path: Path) -> Path:
    """Trajectories and ||w|| per step, one line per run; used for a single run's toy.png and for
    the comparison figure of a sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_path, ax_norm) = plt.subplots(1, 2, figsize=(10, 4.2))
    names = ("w0", "w1")
    for label, history in runs.items():
        names = _xy_names(history)
        _, x = _series(history, names[0])
        _, y = _series(history, names[1])
        steps, norms = _series(history, "w_norm")
        (line,) = ax_path.plot(x, y, lw=1.2, label=label)
        ax_path.plot(x[:1], y[:1], "o", color=line.get_color(), ms=3)
        ax_norm.plot(steps, norms, lw=1.2, color=line.get_color(), label=label)
    ax_path.set(title=f"trajectory ({names[0]}, {names[1]})", xlabel=names[0], ylabel=names[1])
    ax_path.set_aspect("equal", adjustable="datalim")
    ax_norm.set(title="||w|| per step", xlabel="step", ylabel="||w||", yscale="log")
    ax_norm.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_toy3d_panels(panels: dict, path: Path, title: str) -> Path:
    """The project page's 3-D toy figure: per panel (title -> (run, the page's final ||w|| or
    None, the page's digitised panel or None)), the trajectory in (psi, phi) over the contours of
    the run's Rosenbrock function, and below it r = ||w|| per iteration with the page's final
    value dotted; the page's own trajectory and r curve in grey where given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from projbench.figures import read_history

    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 6.6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]})
    grid_psi, grid_phi = np.meshgrid(np.linspace(-2, 2, 300), np.linspace(-1, 3, 300))
    for (name, (run, paper_r, page)), ax, ax_r in zip(panels.items(), axes[0], axes[1]):
        history = read_history(run.run_dir)
        b = float(run.get("task.rosenbrock_b") or 300.0)
        levels = np.arange(100.0, rosenbrock(-2.0, -1.0, b), 100.0)  # the page's: every 100
        ax.contour(grid_psi, grid_phi, rosenbrock(grid_psi, grid_phi, b), levels=levels, cmap="jet",
                   linewidths=0.6)
        start = list(run.get("task.start") or [])
        _, psi = _series(history, "psi")
        _, phi = _series(history, "phi")
        if page:
            page_traj, page_r = np.array(page["trajectory"]), np.array(page["r"])
            ax.plot(page_traj[:, 0], page_traj[:, 1], "-", color="0.45", lw=1, label="page")
            ax_r.plot(page_r[:, 0], page_r[:, 1], "-", color="0.6", lw=1.2)
        ax.plot(start[:1] + psi, start[1:2] + phi, "r-x", lw=1, ms=3, label="ours")
        if page:
            ax.legend(fontsize=8, loc="upper right")
        ax.plot([1], [1], "D", color="green", ms=5)
        ax.set(xlim=(-2, 2), ylim=(-1, 3), xlabel="ψ", ylabel="φ", title=name)
        steps, norms = _series(history, "w_norm")
        ax_r.plot([0] + steps, [float(run.get("task.init_norm") or 1.0)] + norms, "b-", lw=1.2)
        if paper_r is not None:
            ax_r.axhline(paper_r, color="gray", ls=":", lw=1)
            ax_r.text(0.02, 0.92, f"page: {paper_r:g}, ours: {norms[-1]:.2f}", transform=ax_r.transAxes,
                      fontsize=8, va="top")
        ax_r.set(ylim=(0, 4), xlabel="iterations", ylabel="r")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _weight(model: nn.Module) -> torch.Tensor:
    return getattr(model, "module", model).weight
