"""scripts/bench_optim.py's `--rev`: an earlier revision's optimizers load beside the working tree's."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import adamp
import pytest
import torch

import projbench.optim

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_optim", ROOT / "scripts" / "bench_optim.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_revision_loads_beside_the_working_tree(bench):
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    sha, optim = bench.load_revision("HEAD")
    assert optim.__name__ == f"projbench_{sha}.optim"
    assert optim.SGDP is not projbench.optim.SGDP
    assert not Path(optim.__file__).is_relative_to(ROOT)  # the revision's copy, not this tree
    # the revision's optimizer works: a few steps agree with the official code
    torch.manual_seed(0)
    weights = [torch.randn(8, 3, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    copies = [w.detach().clone().requires_grad_(True) for w in weights]
    ours, official = optim.SGDP(weights, lr=0.1, momentum=0.9), adamp.SGDP(copies, lr=0.1, momentum=0.9)
    for _ in range(3):
        for params, opt in ((weights, ours), (copies, official)):
            opt.zero_grad()
            sum((p.sin() * torch.arange(p.numel(), dtype=p.dtype).view_as(p)).sum() for p in params).backward()
            opt.step()
    assert max((a - b).abs().max().item() for a, b in zip(weights, copies)) < 1e-10


def test_unknown_revision_is_one_clear_line(bench):
    with pytest.raises(SystemExit, match="--rev no-such-rev: cannot read it from git"):
        bench.load_revision("no-such-rev")


def test_table_gives_ratios_to_torch_fused_and_names_failures(bench):
    """Ratios are against torch's fused step of the same family; an entry that failed is a row
    saying why, and the ratios that need it read n/a."""
    names = [e.name for e in bench.entries("cpu")]
    steps = {name: [10.0, 10.0] for name in names}
    steps["torch SGD fused"] = [4.0, 4.0]
    steps["projbench SGDP fused=True (ours, the default)"] = [6.0, 6.0]
    failed = {"projbench AdamP fused=True (ours, the default)": "RuntimeError: no kernel | here\nmore"}
    for name in failed:
        del steps[name]
    timings = bench.Timings(steps, {name: 1.0 for name in steps}, failed)
    rows, summary = bench.table(timings, "cpu")
    row = {r.split(" | ")[0].lstrip("| "): r for r in rows[2:]}
    assert row["projbench SGDP fused=True (ours, the default)"].startswith(
        "| projbench SGDP fused=True (ours, the default) | 6.0 | 6.0-6.0 | 1.50x | 0.60x | 1 |")
    assert "failed: RuntimeError: no kernel / here |" in row["projbench AdamP fused=True (ours, the default)"]
    assert "SGD family: ours fused / torch fused = 1.50x; official / ours fused = 1.67x" in summary
    assert "Adam family: ours fused / torch fused = n/a; official / ours fused = n/a" in summary
