"""Shared test helpers: compose the real Hydra config, run the real CLI in a subprocess."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")

# Small and fast: a few steps of digits at 16x16 with a tiny timm ResNet, no W&B, no progress bar.
FAST = ["logger=none", "trainer.progress=false", "task.data.image_size=16", "task.model.arch=resnet10t"]


def make_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def fixture_cfg(task: str, data_dir: Path, *overrides: str):
    """The config `python -m projbench task=<task> task.data.fixture=true <overrides>` trains with."""
    return make_cfg([f"task={task}", "task.data.fixture=true", f"paths.data_dir={data_dir}", *overrides])


def fixture_batches(cfg) -> int:
    """How many training batches the fixture of `cfg` gives (0: the run would stop before training)."""
    from hydra.utils import get_class

    from projbench.distributed import DistInfo

    task = get_class(cfg.task._target_)(cfg.task)
    task.setup(DistInfo())
    return len(task.train_loader(int(cfg.task.data.batch_size), DistInfo(), 0))


def sweep_cells(experiment: str, *overrides: str) -> list:
    """Every job config of `-m +experiment=<experiment> OVERRIDES`: the product of the
    experiment's hydra.sweeper.params (an override of a swept key does not narrow the sweep)."""
    base = [f"+experiment={experiment}", *overrides]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        primary = compose(config_name="config", overrides=base, return_hydra_config=True)
        params = OmegaConf.to_container(primary.hydra.sweeper.params, resolve=True)
        choices = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
        return [compose(config_name="config", overrides=[*base, *cell]) for cell in itertools.product(*choices)]


def run_cli(args: list[str], cwd: Path, timeout: int = 300, env: dict | None = None, runner=None):
    """`python -m projbench ARGS` (or `runner + ARGS`) in a subprocess; returns CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    full_env.pop("HYDRA_FULL_ERROR", None)  # the tests' own setting, not the developer's
    full_env.update(env or {})
    cmd = (runner or [sys.executable, "-m", "projbench"]) + args
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """In-process training tests use one intra-op thread: their models are tiny, and on a
    2-core machine that also runs subprocess tests, two threads oversubscribe the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
