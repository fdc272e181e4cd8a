"""`task=toy`: the paper's toy problems, where the only weight is a direction.

cosine2d     minimise -cos(w, w*) for 2-D w (project page). The setting was not published; the one
             used here reproduces the page's norms with torch.optim.SGD: w0 = (-0.8, -0.6)
             (norm 1, 171.9 degrees from w*), w* = (1, 1), lr 0.02, 500 steps: momentum 0.9 grows
             ||w|| to 2.93 and momentum 0.99 to 27.87, as on the page (tests/test_toy.py).
rosenbrock3d the Rosenbrock function h(u, v) = (1 - u)^2 + b (v - u^2)^2 put on the upper
             hemisphere through the central (gnomonic) projection (u, v) = (w_x / w_z, w_y / w_z):
             the loss depends only on the direction of w, so its radial axis is redundant. Start at
             (u, v) = (-2, 2), minimum at (1, 1), i.e. direction (1, 1, 1). The page gives the
             function's picture but not its exact map; this map is our documented choice.

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


def cosine2d_loss(w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -F.cosine_similarity(w, target, dim=1).squeeze()


def rosenbrock3d_loss(w: torch.Tensor, b: float) -> torch.Tensor:
    x, y, z = w[0]
    u, v = x / z, y / z
    return (1 - u) ** 2 + b * (v - u**2) ** 2


class ToyTask(Task):
    metrics = {"cos": "max", "loss": "min"}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.objective = cfg.objective
        self.target = torch.tensor([list(cfg.target)], dtype=torch.float64)

    def model_name(self) -> str:
        return f"toy-{self.objective}"

    def build_model(self) -> nn.Module:
        w0 = torch.tensor(list(self.cfg.w0), dtype=torch.float64)
        return DirectionModel((w0 / w0.norm() * self.cfg.init_norm).tolist())

    def train_dataset(self) -> Dataset:
        return _Ticks(int(self.cfg.data.steps_per_epoch))

    def eval_datasets(self) -> dict[str, Dataset]:
        return {"test": _Ticks(1)}

    def loss_of(self, w: torch.Tensor) -> torch.Tensor:
        if self.objective == "cosine2d":
            return cosine2d_loss(w, self.target.to(w.device))
        return rosenbrock3d_loss(w, float(self.cfg.rosenbrock_b))

    def training_loss(self, model: nn.Module, batch) -> torch.Tensor:
        return self.loss_of(_weight(model))

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        w = _weight(model).detach()
        values = {"loss": self.loss_of(w).item(),
                  "cos": F.cosine_similarity(w, self.target.to(w.device), dim=1).item(),
                  "w_norm": w.norm().item()}
        values.update({f"w{i}": float(c) for i, c in enumerate(w[0].tolist())})
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


def plot_toy_runs(runs: dict[str, list[dict]], path: Path) -> Path:
    """Trajectories (first two coordinates of w) and ||w|| per step, one line per run;
    used for a single run's toy.png and for the comparison figure of a sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_path, ax_norm) = plt.subplots(1, 2, figsize=(10, 4.2))
    for label, history in runs.items():
        _, x = _series(history, "w0")
        _, y = _series(history, "w1")
        steps, norms = _series(history, "w_norm")
        (line,) = ax_path.plot(x, y, lw=1.2, label=label)
        ax_path.plot(x[:1], y[:1], "o", color=line.get_color(), ms=3)
        ax_norm.plot(steps, norms, lw=1.2, color=line.get_color(), label=label)
    ax_path.set(title="trajectory of w (first two coordinates)", xlabel="w[0]", ylabel="w[1]")
    ax_path.set_aspect("equal", adjustable="datalim")
    ax_norm.set(title="||w|| per step", xlabel="step", ylabel="||w||", yscale="log")
    ax_norm.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _weight(model: nn.Module) -> torch.Tensor:
    return getattr(model, "module", model).weight
