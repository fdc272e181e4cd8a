"""What one `task=cifar10_adv` run costs: the FLOPs of PGD adversarial training and of its PGD
evaluations, counted by torch.utils.flop_counter on the task's own model, and (with --steps) the
measured images/s of real adversarial training steps on a device, from which GPU-hours follow.

    .venv/bin/python scripts/adv_training_cost.py                         # FLOP count, CPU, no data
    .venv/bin/python scripts/adv_training_cost.py --device cuda --steps 20 --out results/adv_training_cost_cuda.md
    .venv/bin/python scripts/adv_training_cost.py task.attack.norm=l2 task.model.width=4   # any override

Counted per image: a training step is `steps` attack steps (forward + backward to the input
only, the weights frozen) and one forward + backward to the weights; an evaluation is
`eval_attack.steps` attack steps and two forwards (clean and attacked). The run's total is the
training over trainer.max_epochs of the 50,000 training images plus one evaluation of the 10,000
test images every trainer.eval_every steps (and at the end). Timing runs the task's
training_loss, backward and an optimizer step on a synthetic batch already on the device.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from projbench.optim import build_optimizer  # noqa: E402
from projbench.tasks.cifar10_adv import Cifar10AdvTask  # noqa: E402
from projbench.train import AUTOCAST_DTYPES  # noqa: E402

TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def per_image_flops(model: torch.nn.Module) -> dict[str, float]:
    """FLOPs of one 32x32 image: forward, forward + weight backward, forward + input backward."""
    image = torch.rand(1, 3, 32, 32)
    forward = flops(lambda: model(image))
    train = flops(lambda: model(image).sum().backward())
    for p in model.parameters():
        p.requires_grad_(False)
    attacked = image.clone().requires_grad_(True)
    attack = flops(lambda: model(attacked).sum().backward())
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    return {"forward": forward, "train": train, "attack": attack}


def images_per_second(cfg, task: Cifar10AdvTask, device: torch.device, steps: int) -> float:
    model = task.build_model().to(device)
    channels_last = bool(cfg.trainer.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, model)
    batch = int(cfg.task.data.batch_size)
    images = torch.rand(batch, 3, 32, 32, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 10, (batch,), device=device)
    dtype = AUTOCAST_DTYPES[str(cfg.trainer.precision)]

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = task.training_loss(model, (images, targets))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=0, help="time this many training steps (0: count FLOPs only)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the run config (task=cifar10_adv is set)")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["task=cifar10_adv", "logger=none", *args.overrides])
    task = Cifar10AdvTask(cfg.task)
    per_image = per_image_flops(task.build_model())
    train_image = task.train_attack.steps * per_image["attack"] + per_image["train"]
    eval_image = task.eval_attack.steps * per_image["attack"] + 2 * per_image["forward"]
    batch = int(cfg.task.data.batch_size)
    steps_per_epoch = TRAIN_IMAGES // batch
    total_steps = int(cfg.trainer.max_epochs) * steps_per_epoch
    evaluations = total_steps // int(cfg.trainer.eval_every or steps_per_epoch) + 1
    run_flops = total_steps * batch * train_image + evaluations * TEST_IMAGES * eval_image
    lines = [
        f"# cost of one task=cifar10_adv run: {task.model_name()}, {task.train_attack.norm} "
        f"PGD-{task.train_attack.steps} training, PGD-{task.eval_attack.steps} evaluation",
        f"command: scripts/adv_training_cost.py {' '.join(sys.argv[1:])}",
        f"per image: forward {per_image['forward'] / 1e9:.2f} GFLOP, attack step {per_image['attack'] / 1e9:.2f}, "
        f"weight update {per_image['train'] / 1e9:.2f}; training step {train_image / 1e9:.1f}, "
        f"evaluation {eval_image / 1e9:.1f}",
        f"run: {total_steps} steps at batch {batch} + {evaluations} evaluations of {TEST_IMAGES} test images "
        f"= {run_flops / 1e18:.2f} EFLOP (counted by torch.utils.flop_counter)",
    ]
    if args.steps:
        device = torch.device(args.device)
        rate = images_per_second(cfg, task, device, args.steps)
        eval_seconds = evaluations * TEST_IMAGES / (rate * train_image / eval_image)
        hours = (total_steps * batch / rate + eval_seconds) / 3600
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        lines.append(f"measured on {name} ({cfg.trainer.precision}, channels_last={cfg.trainer.channels_last}): "
                     f"{rate:.1f} training images/s over {args.steps} steps = {rate * train_image / 1e12:.1f} TFLOP/s; "
                     f"one run about {hours:.1f} device-hours (evaluations at the training FLOP rate)")
    else:
        lines.append(f"at a sustained 100 TFLOP/s one run takes {run_flops / 100e12 / 3600:.1f} GPU-hours "
                     "(an assumed rate; --device cuda --steps 20 measures one)")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
