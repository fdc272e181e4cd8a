"""How much of a task's model AdamP / SGDP act on: the weights that pass the scale-invariance
test at the first training step, as a share of the model's trainable parameters and tensors.

    .venv/bin/python scripts/scale_invariance.py task=coco task.data.fixture=true \\
        task.data.image_size=64 task.data.batch_size=4
    .venv/bin/python scripts/scale_invariance.py task=coco task/model=ssd task.data.fixture=true \\
        task.data.batch_size=16

Arguments are Hydra overrides of the run config (conf/), as for `python -m projbench`. The task
is set up (a fixture is written if asked), its model built, and one training batch's loss
backpropagated at the initial weights; then each weight with more than one dimension is tested
as the optimizers test it before their first step (projbench.diagnostics.detect: the channel,
then the layer view of projbench.optim.projection, delta 0.1). A weight that is all zeros (e.g.
CenterNet's offset / mask convolutions at their start) or gets no gradient on that batch (e.g.
an SSD300 layer that serves only default boxes that no object of a small batch matches) passes
that test vacuously (its cosine is 0 / eps); it is counted apart, not as scale-invariant. Nothing is
trained or written besides the fixture. Prints one line per count: scale-invariant / all
trainable, and the vacuous passes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class

from projbench import diagnostics
from projbench.distributed import DistInfo
from projbench.tasks.base import Task

ROOT = Path(__file__).resolve().parents[1]


def first_step_scale_invariance(overrides: list[str]) -> dict[str, int]:
    """Counts of trainable parameters / tensors, the multi-dimensional ones among them, the
    scale-invariant ones (detected on the first batch's gradients at the initial weights) and
    the vacuous passes (zero weight or zero gradient)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["logger=none", "task.data.num_workers=0", *overrides])
    torch.manual_seed(int(cfg.seed))
    task: Task = get_class(cfg.task._target_)(cfg.task)
    task.setup(DistInfo())
    model = task.build_model().train()
    batch = next(iter(task.train_loader(int(cfg.task.data.batch_size), DistInfo(), int(cfg.seed))))
    task.training_loss(model, batch).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    detected = diagnostics.detect(torch.optim.SGD(trainable, lr=0.0)) or []
    passed = [w for weights, mask in detected for w, m in zip(weights, mask.tolist()) if m]
    vacuous = [w for w in passed if not (w.detach().norm() > 0 and w.grad.norm() > 0)]
    invariant = [w for w in passed if all(w is not v for v in vacuous)]
    weights = [p for p in trainable if p.dim() > 1]
    counts = {}
    for name, tensors in (("", trainable), ("weight_", weights), ("invariant_", invariant), ("vacuous_", vacuous)):
        counts[f"{name}params"], counts[f"{name}tensors"] = sum(p.numel() for p in tensors), len(tensors)
    return counts


def main(argv: list[str]) -> None:
    counts = first_step_scale_invariance(argv)
    for unit in ("params", "tensors"):
        n, of, weights = counts[f"invariant_{unit}"], counts[unit], counts[f"weight_{unit}"]
        print(f"scale-invariant {unit}: {n:,} of {of:,} trainable ({100 * n / of:.1f}%; "
              f"{100 * n / weights:.1f}% of the {weights:,} with more than one dimension); "
              f"vacuous passes: {counts[f'vacuous_{unit}']:,}")


if __name__ == "__main__":
    main(sys.argv[1:])
