"""Time one optimizer `step()` on torchvision ResNet parameters: ours vs official adamp vs timm vs torch.

    .venv/bin/python scripts/bench_optim.py --device cpu --out results/bench_optim.md

Every optimizer gets its own copy of the model's parameters and the same fixed random gradients
(normal, scale 1e-3). All optimizers run in one process, interleaved round-robin: each round does
one step of every optimizer (the starting optimizer rotates from round to round), after a few
warmup rounds; the reported time is the median over rounds. On CUDA, `torch.cuda.synchronize()`
brackets every timed step.

Two kinds of gradient (`--grads`, both by default, one table each):
* `random`: as drawn; the projection test mostly fails, so the official code skips the projection
  arithmetic (its cheapest case).
* `invariant`: each conv weight's gradient has its component along each filter removed, as in a
  real ResNet (every conv is followed by BatchNorm, so its gradient is orthogonal to each filter):
  SGDP/AdamP take the projection branch for every conv weight, as they do in training.
Ours does the same work in both cases (the decision is a tensor, both branches are computed).

Timings are wall-clock by default. On a shared machine other processes inflate and scatter them
(the p25-p75 column shows how much; the load average before and after is recorded);
`--clock cpu` times the process's CPU time instead (all its threads: steadier under load, but it
counts the threads' spin-waiting too, so compare it only with itself).

`--rev REV` (repeatable) adds our eager SGDP and AdamP as they were at git revision REV (read
with `git archive` into a temporary package), in the same process, interleaved with the rest: the
side-by-side way to tell whether a change to projbench/optim made the step faster.

Families and their baselines: the SGD family (momentum 0.9, no Nesterov, weight decay 1e-4) is
compared with torch.optim.SGD(foreach=True); the Adam family (lr 1e-3, betas (0.9, 0.999),
weight decay 1e-2, decoupled) with torch.optim.AdamW(foreach=True), and also with the fused
versions on CUDA; the Lion family (timm's Lion, lr 1e-4, decoupled weight decay 1e-1) with timm's
Lion(foreach=True).

Each family also times the projection wrapper, projbench.optim.Projected, around its foreach
baseline's optimizer: around SGD it is SGDP in the paper's Algorithm 1 form (its decay 1e-3 =
SGDP's 1e-4 / (1 - momentum)), around Adam it is AdamP, around Lion it is Lion with the projection
(no counterpart of ours). Its cost over SGDP / AdamP is the price of not knowing the inner
optimizer's math: a copy of every weight before the step and a pass to subtract it after.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import importlib
import importlib.metadata
import io
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import torchvision

import adamp
import timm
import timm.optim

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import projbench.optim as ours  # noqa: E402

SGD_KW = dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4)
ADAM_KW = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2)
LION_KW = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-1)
# The wrapper's decay is decoupled (w *= 1 - lr * wd): SGD's entry takes SGDP's 1e-4 / (1 - momentum).
WRAPPED = {"SGD": (torch.optim.SGD, dict(SGD_KW, weight_decay=1e-4 / (1 - 0.9))),
           "Adam": (torch.optim.Adam, ADAM_KW),
           "Lion": (timm.optim.Lion, LION_KW)}


@dataclass
class Entry:
    name: str
    family: str  # "SGD", "Adam" or "Lion"
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    role: str = ""  # "baseline", "fused", "official", "ours", "ours compiled", "wrapper" or ""


ROOT = Path(__file__).resolve().parent.parent


def load_revision(rev: str) -> tuple[str, ModuleType]:
    """`projbench.optim` as it was at git revision `rev`, imported as `projbench_<sha>.optim`.

    The revision's `projbench` package is extracted to a temporary folder and its absolute imports
    are renamed, so that it loads beside the working tree's package in this process.
    """
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.strip()
        archive = subprocess.run(["git", "archive", "--format=tar", sha, "projbench"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"--rev {rev}: cannot read it from git ({getattr(e, 'stderr', b'') or e})")
    name = f"projbench_{sha}"
    folder = Path(tempfile.mkdtemp(prefix="bench_rev_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "projbench").rename(folder / name)
    for py in (folder / name).rglob("*.py"):
        py.write_text(re.sub(r"\bprojbench(?=[.\s])", name, py.read_text()))
    sys.path.insert(0, str(folder))
    return sha, importlib.import_module(f"{name}.optim")


def entries(device: str, revisions: tuple[tuple[str, ModuleType], ...] = ()) -> list[Entry]:
    """Per family: torch's foreach baseline (and fused on CUDA), the official, timm's and ours
    (and ours at each `--rev`)."""
    families = [
        ("SGD", torch.optim.SGD, "SGDP", adamp.SGDP, timm.optim.SGDP, ours.SGDP, SGD_KW),
        ("Adam", torch.optim.AdamW, "AdamP", adamp.AdamP, timm.optim.AdamP, ours.AdamP, ADAM_KW),
    ]
    out = []
    for family, base, name, official, timm_cls, our_cls, kw in families:
        torch_name = base.__name__
        out.append(Entry(f"torch {torch_name} foreach", family,
                         lambda p, base=base, kw=kw: base(p, foreach=True, **kw), "baseline"))
        if device == "cuda":
            out.append(Entry(f"torch {torch_name} fused", family,
                             lambda p, base=base, kw=kw: base(p, fused=True, **kw), "fused"))
        out += [
            Entry(f"adamp.{name} 0.3.0 (official)", family, lambda p, c=official, kw=kw: c(p, **kw), "official"),
            Entry(f"timm.optim.{name} {timm.__version__}", family, lambda p, c=timm_cls, kw=kw: c(p, **kw)),
            Entry(f"projbench {name} (ours)", family, lambda p, c=our_cls, kw=kw: c(p, **kw), "ours"),
            Entry(f"projbench {name} compiled=True (ours)", family,
                  lambda p, c=our_cls, kw=kw: c(p, compiled=True, **kw), "ours compiled"),
        ]
        out += [Entry(f"projbench {name} at {sha}", family, lambda p, c=getattr(mod, name), kw=kw: c(p, **kw),
                      f"rev {sha}") for sha, mod in revisions]
        out.append(wrapper_entry(family))
    out.append(Entry(f"timm Lion {timm.__version__} foreach", "Lion",
                     lambda p: timm.optim.Lion(p, foreach=True, **LION_KW), "baseline"))
    out.append(wrapper_entry("Lion"))
    return out


def wrapper_entry(family: str) -> Entry:
    """projbench.optim.Projected around the family's foreach optimizer."""
    inner, kw = WRAPPED[family]
    return Entry(f"projbench Projected({inner.__name__}) (ours, any optimizer)", family,
                 lambda p: ours.Projected(p, inner=inner, foreach=True, **kw), "wrapper")


def make_grads(model: torch.nn.Module, mode: str, generator: torch.Generator) -> list[torch.Tensor]:
    grads = []
    for p in model.parameters():
        g = torch.randn(p.shape, generator=generator, dtype=p.dtype) * 1e-3
        if mode == "invariant" and p.dim() == 4:
            w, rows = p.detach().cpu().reshape(p.size(0), -1), g.reshape(p.size(0), -1)
            rows -= w * ((rows * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True))
        grads.append(g.to(p.device))
    return grads


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_model(arch: str, device: str, rounds: int, warmup: int, grads_mode: str,
                clock: Callable[[], float] = time.perf_counter,
                revisions: tuple[tuple[str, ModuleType], ...] = ()) -> dict[str, list[float]]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().to(device)
    grads = make_grads(model, grads_mode, torch.Generator().manual_seed(1))
    optimizers = []
    for entry in entries(device, revisions):
        params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizers.append((entry, entry.make(params)))
    del model
    times: dict[str, list[float]] = {e.name: [] for e, _ in optimizers}
    for r in range(warmup + rounds):
        shift = r % len(optimizers)
        for entry, opt in optimizers[shift:] + optimizers[:shift]:
            sync(device)
            t0 = clock()
            opt.step()
            sync(device)
            if r >= warmup:
                times[entry.name].append((clock() - t0) * 1e3)
    return times


def table(times: dict[str, list[float]], device: str,
          revisions: tuple[tuple[str, ModuleType], ...] = ()) -> tuple[list[str], list[str]]:
    """Markdown table rows and summary lines for one model."""
    es = entries(device, revisions)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    by_role = {(e.family, e.role): e.name for e in es if e.role}
    cuda = device == "cuda"
    head = "| optimizer | median ms | p25-p75 ms | vs foreach baseline |" + (" vs torch fused |" if cuda else "")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in es:
        q = statistics.quantiles(times[e.name], n=4, method="inclusive")
        row = (f"| {e.name} | {med[e.name]:.1f} | {q[0]:.1f}-{q[2]:.1f} "
               f"| {med[e.name] / med[by_role[(e.family, 'baseline')]]:.2f}x |")
        if cuda:
            fused = by_role.get((e.family, "fused"))
            row += f" {med[e.name] / med[fused]:.2f}x |" if fused else " – |"
        rows.append(row)
    summary = []
    for family in ("SGD", "Adam"):
        official = med[by_role[(family, "official")]]
        for role in ("ours", "ours compiled"):
            summary.append(f"{family} family: official / {role} = {official / med[by_role[(family, role)]]:.2f}x")
        wrapper = med[by_role[(family, "wrapper")]]
        summary.append(f"{family} family: wrapper / ours = {wrapper / med[by_role[(family, 'ours')]]:.2f}x, "
                       f"official / wrapper = {official / wrapper:.2f}x")
        for sha, _ in revisions:
            ratio = med[by_role[(family, f"rev {sha}")]] / med[by_role[(family, "ours")]]
            summary.append(f"{family} family: ours at {sha} / ours now = {ratio:.2f}x")
    lion = med[by_role[("Lion", "wrapper")]] / med[by_role[("Lion", "baseline")]]
    summary.append(f"Lion family: wrapper / timm Lion foreach = {lion:.2f}x")
    return rows, summary


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", default="resnet50,resnet18", help="comma-separated torchvision model names")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (one step of each optimizer per round)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--grads", default="random,invariant", help="comma-separated: random, invariant")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: time.perf_counter; cpu: time.process_time (CPU only)")
    parser.add_argument("--rev", action="append", default=[], metavar="REV",
                        help="also time our eager step as it was at this git revision (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="write a markdown report here")
    parser.add_argument("--append", action="store_true", help="add this run's report to --out instead of replacing it")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the report gives quartiles)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu measures host CPU time: use it with --device cpu")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    # one entry per commit, however many names (HEAD, a branch, a sha) point at it
    revisions = tuple(dict(load_revision(rev) for rev in args.rev).items())
    grad_modes = args.grads.split(",")
    if not set(grad_modes) <= {"random", "invariant"}:
        parser.error(f"--grads: unknown kind in {args.grads!r}")

    machine = [
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{shlex.join(['python', *sys.orig_argv[1:]])}`",  # no path of this machine
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores; torch threads: {torch.get_num_threads()}",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
        f"adamp {importlib.metadata.version('adamp')}, Python {platform.python_version()}",
    ]
    if args.device == "cuda":
        machine.append(f"- GPU: {torch.cuda.get_device_name()}")
    machine.append(f"- device {args.device}, float32 parameters, {args.warmup} warmup + {args.rounds} timed rounds, "
                   f"gradients normal, scale 1e-3, {args.clock}-clock time")
    machine.append(f"- load average before: {load()}")
    print("\n".join(machine), flush=True)

    report = ["# Optimizer step time", "", *machine, ""]
    for arch in args.models.split(","):
        n_params = sum(p.numel() for p in getattr(torchvision.models, arch)().parameters())
        for mode in grad_modes:
            times = bench_model(arch, args.device, args.rounds, args.warmup, mode, clock, revisions)
            rows, summary = table(times, args.device, revisions)
            title = f"## {arch} ({n_params / 1e6:.1f}M parameters), {mode} gradients: ms per step()"
            print("\n" + title, *rows, *summary, sep="\n", flush=True)
            report += [title, "", *rows, "", *[f"- {s}" for s in summary], ""]
    report.append(f"Load average after: {load()}")
    print(report[-1])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join(report) + "\n"
        if args.append and args.out.exists():
            text = args.out.read_text() + "\n" + text
        args.out.write_text(text)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
