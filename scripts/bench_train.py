"""Images/s of the shared loop (projbench.train.Trainer) against a bare PyTorch loop.

    .venv/bin/python scripts/bench_train.py --device cuda --model resnet50 --batch-size 256 \\
        --precision bf16 --channels-last --out results/bench_train.md
    .venv/bin/python scripts/bench_train.py --device cpu --model resnet18 --image-size 64 \\
        --batch-size 32 --steps 30 --precision 32 --channels-last --threads 1 --clock cpu \\
        trainer.log_every=10 trainer.diagnostics_every=30

Both loops train the same model with the same optimizer, scheduler, GradScaler and precision on
one synthetic batch that is already on the device (in channels_last when asked), so they differ
only in the loop: the bare loop is forward + cross-entropy, backward, optimizer step, zero_grad,
scheduler step; ours is `Trainer.fit()` with `task=imagenet`'s model and loss (cross-entropy
through ImageNetTask) and whatever the loop does besides (non-finite-loss tracking, loss
accumulation, periodic logging, diagnostics, the progress bar off).

They run in one process, interleaved: `--rounds` rounds, each timing `--steps` steps of each
loop (after `--warmup` untimed steps; the order alternates from round to round). The device is
synchronised at the start and end of a timed window only. `--clock wall` (default) times
wall-clock seconds; `--clock cpu` times the process's CPU seconds (all its threads), which on a
shared CPU machine is far steadier than wall time (other processes do not inflate it), but counts
spin-waiting threads too, so use it with `--threads 1`, on CPU only. Our loop's final step,
which always evaluates and writes a checkpoint, falls outside its window. Reported: the median images/s of
each loop over the rounds and the overhead = bare / ours - 1 (the share of extra time per step).

Extra `key=value` arguments are Hydra overrides of the run config (conf/, `task=imagenet`), e.g.
`trainer.log_every=10 trainer.diagnostics_every=20` to put log points and diagnostics inside
the timed windows, or `optim=sgdp` (default here: optim=sgd, so that a slow optimizer step does
not hide loop overhead).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from projbench.distributed import DistInfo  # noqa: E402
from projbench.freezing import ParameterFreezer  # noqa: E402
from projbench.optim import build_optimizer  # noqa: E402
from projbench.phases import PhasePlan  # noqa: E402
from projbench.records import RunRecorder  # noqa: E402
from projbench.schedules import build_scheduler  # noqa: E402
from projbench.selection import BestCheckpoint  # noqa: E402
from projbench.tasks.imagenet import ImageNetTask  # noqa: E402
from projbench.train import AUTOCAST_DTYPES, Trainer, resolve_device, seed_everything  # noqa: E402


class SyntheticImageNet(ImageNetTask):
    """ImageNetTask's model and loss without a data set: the class count comes from the config."""

    @property
    def num_classes(self) -> int:
        return int(self.cfg.num_classes)


class DeviceBatches:
    """A stand-in loader: the same on-device batch `length` times. It reads the clock (after a
    device sync) when batch `start` and batch `stop` are fetched, i.e. around steps [start, stop)."""

    def __init__(self, batch, length: int, start: int, stop: int, sync, clock):
        self.batch, self.length, self.start, self.stop = batch, length, start, stop
        self.sync, self.clock = sync, clock
        self.times: dict[int, float] = {}

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for i in range(self.length):
            if i in (self.start, self.stop):
                self.sync()
                self.times[i] = self.clock()
            yield self.batch

    def seconds(self) -> float:
        return self.times[self.stop] - self.times[self.start]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="resnet50", help="timm model name")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=100, help="timed steps per loop and round")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before each timed window")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--precision", choices=sorted(AUTOCAST_DTYPES), default="bf16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall-clock seconds, or the process's CPU seconds (CPU device, --threads 1)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--out", type=Path, default=None, help="write a markdown report here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the run config, key=value")
    return p.parse_args()


def run_config(args: argparse.Namespace):
    overrides = ["task=imagenet", "optim=sgd", "logger=none", "trainer.progress=false",
                 f"task.model.arch={args.model}", f"task.num_classes={args.num_classes}",
                 f"task.data.batch_size={args.batch_size}", f"task.data.image_size={args.image_size}",
                 f"trainer.precision={args.precision}", f"trainer.channels_last={args.channels_last}",
                 f"trainer.device={args.device}", *args.overrides]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = run_config(args)
    device = resolve_device(args.device, 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu measures host CPU time: use it with --device cpu")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    seed_everything(0)

    task = SyntheticImageNet(cfg.task)
    model = task.build_model().to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = build_optimizer(cfg.optim, model)
    steps_per_round = args.warmup + args.steps + 1  # +1: our loop's final (evaluating, checkpointing) step
    # (the schedule's values do not matter here; a long horizon keeps the lr away from 0)
    scheduler = build_scheduler(cfg.trainer.schedule, optimizer, steps_per_round, steps_per_round * 10 ** 6)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    dtype = AUTOCAST_DTYPES[args.precision]
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    images = images.contiguous(memory_format=memory_format)
    targets = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    def bare_step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    def bare_round() -> float:
        for _ in range(args.warmup):
            bare_step()
        sync()
        start = clock()
        for _ in range(args.steps):
            bare_step()
        sync()
        return clock() - start

    run_root = Path(tempfile.mkdtemp(prefix="bench_train-"))

    def our_round(index: int) -> float:
        loader = DeviceBatches((images, targets), steps_per_round, args.warmup, args.warmup + args.steps, sync, clock)
        run_dir = run_root / f"round{index}"
        recorder = RunRecorder(run_dir, cfg, task.metrics, enabled=True)
        # the loop's hooks as a plain run builds them: no frozen parameters, no selection, one phase
        selector = BestCheckpoint(None, task.metrics, [])
        trainer = Trainer(cfg, run_dir, DistInfo(), device, task, model, model, optimizer, scheduler, scaler,
                          loader, {}, steps_per_round, steps_per_round, recorder,
                          ParameterFreezer(task, model, steps_per_round), selector,
                          PhasePlan(None, steps_per_round, steps_per_round, selecting=False))
        trainer.fit()
        return loader.seconds()

    model.train()
    seconds: dict[str, list[float]] = {"bare": [], "ours": []}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        order = ("bare", "ours") if r % 2 == 0 else ("ours", "bare")
        for name in order:
            seconds[name].append(bare_round() if name == "bare" else our_round(r))
        print(f"round {r}: " + ", ".join(f"{n} {args.batch_size * args.steps / seconds[n][-1]:.1f} img/s"
                                         for n in ("bare", "ours")), flush=True)
    load_after = os.getloadavg()

    ips = {n: [args.batch_size * args.steps / s for s in v] for n, v in seconds.items()}
    median = {n: statistics.median(v) for n, v in ips.items()}
    overhead = median["bare"] / median["ours"] - 1
    shutil.rmtree(run_root, ignore_errors=True)
    lines = report(args, cfg, device, ips, median, overhead, load_before, load_after)
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


def report(args, cfg, device, ips, median, overhead, load_before, load_after) -> list[str]:
    tr = cfg.trainer
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        machine = f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, " \
                  f"{torch.get_num_threads()} torch threads"
    command = ".venv/bin/python scripts/bench_train.py " + shlex.join(sys.argv[1:])
    window = range(args.warmup + 1, args.warmup + args.steps + 1)  # the steps (1-based) timed
    logs = sum(1 for s in window if s % tr.log_every == 0)
    diags = sum(1 for s in window if tr.diagnostics_every and s % tr.diagnostics_every == 0)
    rows = [f"| {name} | {median[name]:.1f} | " + " / ".join(f"{v:.1f}" for v in ips[name]) + " |"
            for name in ("bare", "ours")]
    return [
        "## Training-loop throughput: projbench.train.Trainer vs a bare PyTorch loop",
        "",
        f"- Date: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- Command: `{command}`",
        f"- Machine: {machine}; torch {torch.__version__}; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after",
        f"- Model: {args.model}, {args.image_size}x{args.image_size}, batch {args.batch_size}, "
        f"precision {args.precision}, channels_last {args.channels_last}, optimizer {cfg.optim.name}",
        f"- Clock: {args.clock} ({'process CPU seconds' if args.clock == 'cpu' else 'wall-clock seconds'})",
        f"- {args.rounds} interleaved rounds of {args.steps} timed steps per loop (after {args.warmup} warm-up "
        f"steps); each of our windows held {logs} log point(s) (log_every {tr.log_every}) and {diags} "
        f"diagnostics point(s) (diagnostics_every {tr.diagnostics_every})",
        "",
        "| loop | median images/s | per round |",
        "|---|---|---|",
        *rows,
        "",
        f"Overhead of our loop: {100 * overhead:+.1f}% time per step (goal: at most +5%).",
    ]


if __name__ == "__main__":
    main()
