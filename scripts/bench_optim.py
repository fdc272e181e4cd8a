"""Time one optimizer `step()` on torchvision ResNet parameters: ours vs official adamp vs timm vs
torch's own steps (foreach, fused, compiled).

    .venv/bin/python scripts/bench_optim.py --device cpu --out results/bench_optim.md

Every optimizer gets its own copy of the model's parameters; all share the same fixed random
gradients (normal, scale 1e-3; no optimizer here writes into its gradients). All optimizers run in
one process, interleaved round-robin: each round does one step of every optimizer (the starting
optimizer rotates from round to round), after a few warmup rounds; the reported time is the median
over rounds. On CUDA, `torch.cuda.synchronize()` brackets every timed step. The first step of
each optimizer is reported apart: it includes one-time costs (torch.compile's compilation, our
kernel's build or load).

Two kinds of gradient (`--grads`, both by default, one table each):
* `random`: as drawn; the projection test mostly fails, so the official code skips the projection
  arithmetic (its cheapest case).
* `invariant`: before every step (untimed), each conv weight's gradient has its component along
  each filter of the current weight removed, as in a real ResNet (every conv is followed by
  BatchNorm, so its gradient is orthogonal to each filter): SGDP/AdamP take the projection branch
  for every conv weight at every step, as they do in training. Each optimizer has its own copy.

Timings are wall-clock by default. On a shared machine other processes inflate and scatter them
(the p25-p75 column shows how much; the load average before and after is recorded);
`--clock cpu` times the process's CPU time instead (all its threads: steadier under load, but it
counts the threads' spin-waiting too, so compare it only with itself).

`--rev REV` (repeatable) adds our SGDP and AdamP as they were at git revision REV, with that
revision's defaults (read with `git archive` into a temporary package), in the same process,
interleaved with the rest: the side-by-side way to tell whether a change to projbench/optim made
the step faster.

Families and their baselines: the SGD family (momentum 0.9, no Nesterov, weight decay 1e-4) is
compared with torch.optim.SGD, the Adam family (lr 1e-3, betas (0.9, 0.999), weight decay 1e-2,
decoupled) with torch.optim.AdamW, each as torch runs it: foreach (torch's default), fused
(`fused=True`: one multi-tensor kernel) and compiled (`torch.compile` of `step()`, as in torch's
"Compiling the optimizer" recipe). The fused step is the floor: ratios are given against it. The
Lion family (timm's Lion, lr 1e-4, decoupled weight decay 1e-1) has timm's Lion(foreach=True).

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
    role: str = ""  # "foreach", "fused", "compiled", "official", "ours eager", "ours fused", "wrapper", ...


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


def compiled_step(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """`opt` with its step() replaced by a torch.compile'd one (torch's recipe for a compiled
    optimizer step; the first call compiles)."""
    opt.step = torch.compile(opt.step, fullgraph=False)
    return opt


def entries(device: str, revisions: tuple[tuple[str, ModuleType], ...] = ()) -> list[Entry]:
    """Per family: torch's foreach, fused and compiled steps, the official, timm's and ours
    (eager and fused; and ours at each `--rev`), the wrapper around the family's foreach
    optimizer; the Lion family: timm's Lion and the wrapper around it."""
    families = [
        ("SGD", torch.optim.SGD, "SGDP", adamp.SGDP, timm.optim.SGDP, ours.SGDP, SGD_KW),
        ("Adam", torch.optim.AdamW, "AdamP", adamp.AdamP, timm.optim.AdamP, ours.AdamP, ADAM_KW),
    ]
    out = []
    for family, base, name, official, timm_cls, our_cls, kw in families:
        torch_name = base.__name__
        out += [
            Entry(f"torch {torch_name} foreach", family, lambda p, base=base, kw=kw: base(p, foreach=True, **kw),
                  "foreach"),
            Entry(f"torch {torch_name} fused", family, lambda p, base=base, kw=kw: base(p, fused=True, **kw), "fused"),
            Entry(f"torch {torch_name} compiled", family,
                  lambda p, base=base, kw=kw: compiled_step(base(p, foreach=True, **kw)), "compiled"),
            Entry(f"adamp.{name} 0.3.0 (official)", family, lambda p, c=official, kw=kw: c(p, **kw), "official"),
            Entry(f"timm.optim.{name} {timm.__version__}", family, lambda p, c=timm_cls, kw=kw: c(p, **kw)),
            Entry(f"projbench {name} fused=False (ours, eager)", family,
                  lambda p, c=our_cls, kw=kw: c(p, fused=False, **kw), "ours eager"),
            Entry(f"projbench {name} fused=True (ours, the default)", family,
                  lambda p, c=our_cls, kw=kw: c(p, fused=True, **kw), "ours fused"),
        ]
        out += [Entry(f"projbench {name} at {sha}", family, lambda p, c=getattr(mod, name), kw=kw: c(p, **kw),
                      f"rev {sha}") for sha, mod in revisions]
        out.append(wrapper_entry(family))
    out.append(Entry(f"timm Lion {timm.__version__} foreach", "Lion",
                     lambda p: timm.optim.Lion(p, foreach=True, **LION_KW), "foreach"))
    out.append(wrapper_entry("Lion"))
    return out


def wrapper_entry(family: str) -> Entry:
    """projbench.optim.Projected around the family's foreach optimizer."""
    inner, kw = WRAPPED[family]
    return Entry(f"projbench Projected({inner.__name__}) (ours, any optimizer)", family,
                 lambda p: ours.Projected(p, inner=inner, foreach=True, **kw), "wrapper")


def make_grads(model: torch.nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    return [(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 1e-3).to(p.device)
            for p in model.parameters()]


@torch.no_grad()
def project_off_filters_(params: list[torch.Tensor]) -> None:
    """Remove from each conv weight's gradient its component along each filter (in place), as
    BatchNorm after the conv does in a real ResNet."""
    for p in params:
        if p.dim() == 4:
            w, rows = p.reshape(p.size(0), -1), p.grad.view(p.size(0), -1)
            rows -= w * ((rows * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timings:
    steps: dict[str, list[float]]  # ms per timed step, per entry name
    first: dict[str, float]  # ms of each entry's first step (one-time costs included)
    failed: dict[str, str]  # entries whose construction or first step raised: the error


def bench_model(arch: str, device: str, rounds: int, warmup: int, grads_mode: str,
                clock: Callable[[], float] = time.perf_counter,
                revisions: tuple[tuple[str, ModuleType], ...] = ()) -> Timings:
    """Time every entry; an entry that fails to build or to take its first step is reported
    as failed (e.g. a kernel that does not compile on this device) and the others go on."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().to(device)
    grads = make_grads(model, torch.Generator().manual_seed(1))
    invariant = grads_mode == "invariant"
    timings = Timings({}, {}, {})
    optimizers = []
    for entry in entries(device, revisions):
        params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        for p, g in zip(params, grads):
            p.grad = g.clone() if invariant else g  # random: shared, no optimizer writes into its gradients
        try:
            optimizers.append((entry, entry.make(params), params))
        except Exception as exc:  # noqa: BLE001 - reported in the table
            timings.failed[entry.name] = f"{type(exc).__name__}: {exc}"
    del model
    timings.steps = {e.name: [] for e, _, _ in optimizers}
    for r in range(warmup + rounds):
        shift = r % len(optimizers)
        for entry, opt, params in optimizers[shift:] + optimizers[:shift]:
            if entry.name in timings.failed:
                continue
            if invariant:
                project_off_filters_(params)
            sync(device)
            t0 = clock()
            try:
                opt.step()
                sync(device)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                if r:
                    raise
                timings.failed[entry.name] = f"{type(exc).__name__}: {exc}"
                continue
            ms = (clock() - t0) * 1e3
            if r == 0:
                timings.first[entry.name] = ms
            elif r >= warmup:
                timings.steps[entry.name].append(ms)
    return timings


def table(timings: Timings, device: str,
          revisions: tuple[tuple[str, ModuleType], ...] = ()) -> tuple[list[str], list[str]]:
    """Markdown table rows and summary lines for one model."""
    es = entries(device, revisions)
    med = {name: statistics.median(ts) for name, ts in timings.steps.items() if name not in timings.failed}
    by_role = {(e.family, e.role): e.name for e in es if e.role}

    def ratio(a: str | None, b: str | None) -> str:
        return f"{med[a] / med[b]:.2f}x" if a in med and b in med else "n/a"

    head = "| optimizer | median ms | p25-p75 ms | vs torch fused | vs torch foreach | first step ms |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in es:
        if e.name not in med:
            error = timings.failed.get(e.name, "no timing").splitlines()[0][:120].replace("|", "/")
            rows.append(f"| {e.name} | failed: {error} | | | | |")
            continue
        q = statistics.quantiles(timings.steps[e.name], n=4, method="inclusive")
        rows.append(f"| {e.name} | {med[e.name]:.1f} | {q[0]:.1f}-{q[2]:.1f} "
                    f"| {ratio(e.name, by_role.get((e.family, 'fused')))} "
                    f"| {ratio(e.name, by_role[(e.family, 'foreach')])} | {timings.first[e.name]:.0f} |")
    summary = []
    for family in ("SGD", "Adam"):
        fused, official = by_role[(family, "fused")], by_role[(family, "official")]
        for role in ("ours fused", "ours eager"):
            ours_name = by_role[(family, role)]
            summary.append(f"{family} family: {role} / torch fused = {ratio(ours_name, fused)}; "
                           f"official / {role} = {ratio(official, ours_name)}")
        wrapper = by_role[(family, "wrapper")]
        summary.append(f"{family} family: wrapper / ours fused = {ratio(wrapper, by_role[(family, 'ours fused')])}, "
                       f"wrapper / ours eager = {ratio(wrapper, by_role[(family, 'ours eager')])}, "
                       f"official / wrapper = {ratio(official, wrapper)}")
        for sha, _ in revisions:
            summary.append(f"{family} family: ours at {sha} / ours fused now = "
                           f"{ratio(by_role[(family, f'rev {sha}')], by_role[(family, 'ours fused')])}")
    summary.append(f"Lion family: wrapper / timm Lion foreach = "
                   f"{ratio(by_role[('Lion', 'wrapper')], by_role[('Lion', 'foreach')])}")
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


def process_cpu_times() -> dict[int, tuple[float, int, str]]:
    """CPU seconds used so far by every process (Linux /proc; empty elsewhere), with its parent's
    id and its command line (paths cut to their last part)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        out[int(stat.parent.name)] = ((int(fields[11]) + int(fields[12])) / tick, int(fields[1]),
                                      re.sub(r"\S*/", "", cmd).strip()[:60])
    return out


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), None elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children (torch.compile's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class Others:
    """What else ran during the benchmark: the machine's busy CPU time minus this process's."""

    busy: float | None
    own: float
    processes: dict[int, tuple[float, int, str]]
    start: float

    @classmethod
    def now(cls) -> Others:
        return cls(busy_cpu_seconds(), own_cpu_seconds(), process_cpu_times(), time.monotonic())

    def report(self, top: int = 4) -> str:
        seconds = time.monotonic() - self.start
        busy = busy_cpu_seconds()
        if busy is None or self.busy is None:
            return "what else ran: unknown (no /proc)"
        others = (busy - self.busy) - (own_cpu_seconds() - self.own)
        after = process_cpu_times()
        ours = {os.getpid()}
        while True:  # this process and its descendants
            more = {pid for pid, (_, ppid, _) in after.items() if ppid in ours} - ours
            if not more:
                break
            ours |= more
        used = sorted(((cpu - self.processes.get(pid, (0.0,))[0], cmd) for pid, (cpu, _, cmd) in after.items()
                       if pid not in ours), reverse=True)
        busiest = "; ".join(f"`{cmd or '?'}` {u / seconds:.2f}" for u, cmd in used[:top] if u > 0.01 * seconds)
        return (f"other processes kept {max(others, 0.0) / seconds:.2f} of the {os.cpu_count()} cores busy on "
                f"average over the {seconds:.0f} s (busiest still running at the end, cores: {busiest or 'none'})")


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
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step is reported apart)")
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
    others = Others.now()
    for arch in args.models.split(","):
        n_params = sum(p.numel() for p in getattr(torchvision.models, arch)().parameters())
        for mode in grad_modes:
            timings = bench_model(arch, args.device, args.rounds, args.warmup, mode, clock, revisions)
            rows, summary = table(timings, args.device, revisions)
            title = f"## {arch} ({n_params / 1e6:.1f}M parameters), {mode} gradients: ms per step()"
            print("\n" + title, *rows, *summary, sep="\n", flush=True)
            report += [title, "", *rows, "", *[f"- {s}" for s in summary], ""]
    report.append(f"Load average after: {load()}. During the run {others.report()}.")
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
