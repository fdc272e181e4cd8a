"""Preemption and sweeps: a stop signal costs at most the current step, a cell's failure is the
cell's, and the same sweep command run again continues an interrupted sweep."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import FAST, make_cfg, read_summary
from projbench.errors import Interrupted
from projbench.records import read_metrics
from projbench.tasks.digits import DigitsTask
from projbench.train import train

RUN = FAST + ["trainer.log_every=3", "trainer.ckpt_every=5", "trainer.eval_every=6", "trainer.diagnostics_every=4"]


def timeless(points: list[dict]) -> list[dict]:
    return [{**p, "value": None} if p["name"] == "samples_per_s" else p for p in points]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    train(make_cfg(RUN + ["trainer.max_steps=12"]), run_dir)
    return run_dir


@pytest.mark.parametrize("sig, at_step", [(signal.SIGTERM, 7), (signal.SIGINT, 5), (signal.SIGUSR1, 3)])
def test_a_stop_signal_costs_at_most_the_current_step_and_the_same_command_continues(
        sig, at_step, uninterrupted, tmp_path, monkeypatch):
    run_dir, cfg = tmp_path / "run", make_cfg(RUN + ["trainer.max_steps=12"])
    real_loss, calls = DigitsTask.training_loss, []

    def signalled(self, model, batch):
        calls.append(1)
        if len(calls) == at_step:
            os.kill(os.getpid(), sig)  # arrives in the middle of the step
        return real_loss(self, model, batch)

    monkeypatch.setattr(DigitsTask, "training_loss", signalled)
    handler_before = signal.getsignal(sig)
    with pytest.raises(Interrupted) as stopped:
        train(cfg, run_dir)
    monkeypatch.undo()
    assert (stopped.value.signum, stopped.value.step) == (sig, at_step)
    summary = read_summary(run_dir)
    assert summary["status"] == "interrupted" and summary["steps"] == at_step
    assert summary["error"].startswith(f"{signal.Signals(sig).name} at step {at_step}: stopped after that step")
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == at_step  # nothing lost
    assert signal.getsignal(sig) is handler_before  # train() put the handlers back

    resumed = train(cfg, run_dir)  # the same config again: resume=auto continues it
    assert resumed["status"] == "completed" and [r["step"] for r in resumed["resumes"]] == [at_step]
    expected = timeless(read_metrics(uninterrupted / "metrics.jsonl")[0])
    assert timeless(read_metrics(run_dir / "metrics.jsonl")[0]) == expected
    assert resumed["metrics"] == read_summary(uninterrupted)["metrics"]


def _agree(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    from projbench.signals import STOP, StopPoll

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    poll, answers = StopPoll(distributed=True), []
    for step in range(1, 7):
        time.sleep(0.05 * (world - rank))  # the ranks reach each step at different times
        if rank == 1 and step == 3:
            STOP.signum = signal.SIGTERM  # only rank 1 receives the signal, during step 3
        answers.append(poll.poll())
    poll.close()
    out.put((rank, answers))
    dist.destroy_process_group()


def test_ddp_ranks_agree_on_the_step_to_stop_at():
    ctx = mp.get_context("fork")  # the children need nothing but gloo: no re-import
    out = ctx.Queue()
    with socket.socket() as s:  # a free port (other test runs may share the machine)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_agree, args=(rank, 2, port, out)) for rank in range(2)]
    for p in procs:
        p.start()
    answers = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    # Started at step 3, read at step 4 by both ranks: everyone stops after the same step.
    assert answers[0] == answers[1] == [None, None, None, signal.SIGTERM, signal.SIGTERM, signal.SIGTERM]


# -- sweeps through the real command line ---------------------------------------------------
SWEEP = ["-m", *FAST, "trainer.max_steps=16", "trainer.ckpt_every=4", "trainer.log_every=4", "trainer.eval_every=8"]


def sweep_cmd(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "projbench", *SWEEP, f"paths.log_dir={root}", *args]


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def cells(root: Path) -> dict[str, Path]:
    """optim name -> the cell's run directory (one seed per optimizer in these sweeps)."""
    return {p.name.split("-")[0]: p for p in sorted((root / "runs" / "digits").iterdir())}


def status(run_dir: Path) -> str | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text())["status"] if path.is_file() else None


def ckpt_step(run_dir: Path) -> int:
    try:
        return torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    except Exception:  # noqa: BLE001 - not written yet
        return 0


def wait_for(condition, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended before it could be stopped: {proc.communicate()[1][-3000:]}")
        try:
            if condition():
                return
        except (OSError, ValueError, KeyError, StopIteration):
            pass
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the sweep")


def files(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}


def assert_each_cell_trained_once(run_dirs: list[Path]) -> None:
    for run_dir in run_dirs:
        summary = read_summary(run_dir)
        assert summary["status"] == "completed" and summary["steps"] == 16, run_dir
        assert len(summary["resumes"]) <= 1
        train_steps = [p["step"] for p in read_metrics(run_dir / "metrics.jsonl")[0]
                       if p["split"] == "train" and p["name"] == "loss"]
        assert train_steps == [4, 8, 12, 16], (run_dir, train_steps)


def test_submitit_a_bad_cell_fails_alone_and_a_preempted_cell_is_requeued_and_resumes(tmp_path):
    """submitit's local executor, two cells at once: optim.lr=0 fails alone, recorded in its
    summary and the report; the other gets submitit's preemption signal (USR2) part-way,
    checkpoints that step, is requeued by submitit and resumes by itself."""
    cmd = sweep_cmd(tmp_path, "hydra/launcher=submitit_local", "trainer.max_steps=40", "optim.lr=0.1,0")
    proc = start(cmd, tmp_path)
    records = lambda: [json.loads(p.read_text()) for p in (tmp_path / "multiruns").glob("*/cells/*.json")]  # noqa: E731
    good = lambda: next(r for r in records() if "optim.lr=0.1" in r["overrides"])  # noqa: E731

    def training() -> bool:
        points = read_metrics(Path(good()["run_dir"]) / "metrics.jsonl")[0]
        return any(p["step"] >= 8 for p in points)

    wait_for(training, proc)
    os.kill(good()["pid"], signal.SIGUSR2)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]
    assert "sweep: 1 of 2 cells completed (0 of them already before), 1 failed, 0 interrupted, 0 not run" in err
    assert "  failed       optim.lr=0  " in err and "optim.lr: must be > 0, got 0" in err
    bad = next(r for r in records() if "optim.lr=0" in r["overrides"])
    assert read_summary(Path(bad["run_dir"]))["error"] == "optim.lr: must be > 0, got 0"
    resumed = read_summary(Path(good()["run_dir"]))
    assert resumed["status"] == "completed" and resumed["steps"] == 40
    assert len(resumed["resumes"]) == 1 and resumed["resumes"][0]["step"] >= 8  # not from scratch
    train_steps = [p["step"] for p in read_metrics(Path(good()["run_dir"]) / "metrics.jsonl")[0]
                   if p["split"] == "train" and p["name"] == "loss"]
    assert train_steps == list(range(4, 41, 4))


def test_a_killed_sweep_run_again_completes_every_cell_once(tmp_path):
    """Basic launcher, killed with SIGKILL while its second cell trains: the same command skips
    the first cell (its files untouched), resumes the second from its checkpoint, runs the third."""
    cmd = sweep_cmd(tmp_path, "optim=sgd,adam,adamp")
    proc = start(cmd, tmp_path)
    wait_for(lambda: status(cells(tmp_path)["sgd"]) == "completed" and ckpt_step(cells(tmp_path)["adam"]) >= 4, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    first, second = cells(tmp_path)["sgd"], cells(tmp_path)["adam"]
    assert status(second) == "running" and 4 <= ckpt_step(second) < 16
    before = files(first)

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "WANDB_MODE": "disabled"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sweep: 3 of 3 cells completed (1 of them already before), 0 failed" in again.stderr
    assert files(first) == before, "a completed cell is left exactly as it was"
    assert read_summary(second)["resumes"][0]["step"] >= 4
    assert_each_cell_trained_once(list(cells(tmp_path).values()))


def test_a_stopped_joblib_sweep_run_again_completes_every_cell_once(tmp_path):
    """Joblib launcher (2 cells at a time), SIGTERM to the sweep's process while two cells train:
    they stop with a checkpoint, the third does not start; the same command finishes all three."""
    cmd = sweep_cmd(tmp_path, "hydra/launcher=local", "hydra.launcher.n_jobs=2", "optim=sgd,adam,adamp")
    proc = start(cmd, tmp_path)
    wait_for(lambda: sum(ckpt_step(d) >= 4 for d in cells(tmp_path).values()) >= 2, proc)
    proc.send_signal(signal.SIGTERM)  # the sweep's own process only: it passes the signal on
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "2 interrupted, 1 not run" in err
    interrupted = [d for d in cells(tmp_path).values() if status(d) == "interrupted"]
    assert len(interrupted) == 2 and all(ckpt_step(d) == read_summary(d)["steps"] for d in interrupted)

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "WANDB_MODE": "disabled"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert_each_cell_trained_once(list(cells(tmp_path).values()))
    assert all(read_summary(d)["resumes"] for d in interrupted)
