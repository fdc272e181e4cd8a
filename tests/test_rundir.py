"""Run directories: one writer, checked before anything is written, append-only metrics, resumes
that change nothing they should not, and failures that lose nothing."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import FAST, make_cfg, read_summary
from projbench import rundir as rundir_module
from projbench.errors import ConfigError, StorageError
from projbench.records import read_metrics
from projbench.rundir import RunDirectory, RunDirError
from projbench.tasks.digits import DigitsTask
from projbench.train import train

RUN = FAST + ["trainer.log_every=3", "trainer.ckpt_every=5", "trainer.eval_every=6", "trainer.diagnostics_every=4"]


def cfg(*overrides: str):
    return make_cfg(RUN + list(overrides))


def snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime (what "nothing was written" means)."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def timeless(points: list[dict]) -> list[dict]:
    """The points with the samples/s values (a timing) blanked."""
    return [{**p, "value": None} if p["name"] == "samples_per_s" else p for p in points]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict]:
    """A completed 12-step run (checkpoints at 5, 10, 12) and its summary."""
    run_dir = tmp_path_factory.mktemp("runs") / "finished"
    return run_dir, train(cfg("trainer.max_steps=12"), run_dir)


def copy_of(finished, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished[0], tmp_path / "run"))


def test_a_new_run_into_a_run_directory_is_refused_and_changes_nothing(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(RunDirError, match="holds a run .status completed at step 12.; resume=auto continues it, "
                                          "overwrite=true replaces"):
        train(cfg("trainer.max_steps=12", "resume=false"), run_dir)
    assert snapshot(run_dir) == before


def test_auto_skips_its_completed_run_untouched_and_refuses_another_configs(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    again = train(cfg("trainer.max_steps=12", "trainer.log_every=2"), run_dir)  # observing keys may differ
    assert again["skipped"] and again["status"] == "completed" and again["steps"] == 12
    with pytest.raises(RunDirError, match=r"holds a run of another config: .*optim.lr \(0.1 -> 0.2\); resume=auto "
                                          "continues only the same config's run"):
        train(cfg("trainer.max_steps=12", "optim.lr=0.2"), run_dir)
    with pytest.raises(RunDirError, match=r"max_steps \(12 -> 16\); resume=true continues it with the new length"):
        train(cfg("trainer.max_steps=16"), run_dir)
    assert snapshot(run_dir) == before
    # A run that stopped before its first checkpoint has nothing to continue from: it starts again.
    (run_dir / "checkpoint.pt").unlink()
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "status": "running", "steps": 3}))
    restarted = train(cfg("trainer.max_steps=12"), run_dir)
    assert restarted["status"] == "completed" and restarted["resumes"] == [] and not restarted.get("skipped")


def test_resume_that_changes_training_is_refused_naming_the_keys_and_writes_nothing(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(RunDirError) as caught:
        train(cfg("trainer.max_steps=20", "resume=true", "optim=adam", "optim.lr=0.2", "seed=1"), run_dir)
    message = str(caught.value)
    assert message.startswith("resume refused: optim.name ('sgdp' -> 'adam'), seed (0 -> 1)")
    assert "optim.lr (0.1 -> 0.2)" in message and "overwrite=true" in message and "\n" not in message
    assert snapshot(run_dir) == before, "a refused resume must not touch the run, .hydra/config.yaml included"


def test_resume_may_extend_and_change_what_only_observes(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    summary = train(cfg("trainer.max_steps=16", "resume=true", "trainer.log_every=2"), run_dir)
    assert summary["status"] == "completed" and summary["steps"] == 16
    assert summary["resumes"] == [{"step": 12, "changed": {"trainer.log_every": [3, 2], "trainer.max_steps": [12, 16]}}]
    assert "max_steps: 16" in (run_dir / ".hydra" / "config.yaml").read_text()
    steps = [p["step"] for p in read_metrics(run_dir / "metrics.jsonl")[0] if p["name"] == "loss" and p["split"] == "train"]
    assert steps == [3, 6, 9, 12, 14, 16]
    with pytest.raises(ConfigError, match="trainer.max_steps: the run to resume is at step 16 of 16"):
        train(cfg("trainer.max_steps=16", "resume=true"), run_dir)


def test_overwrite_replaces_the_run(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    (run_dir / "notes.txt").write_text("mine")
    summary = train(cfg("trainer.max_steps=2", "overwrite=true"), run_dir)
    assert summary["steps"] == 2 and summary["resumes"] == []
    assert max(p["step"] for p in read_metrics(run_dir / "metrics.jsonl")[0]) == 2
    assert (run_dir / "notes.txt").read_text() == "mine", "only the run's own records are replaced"


def test_a_second_writer_stops_with_one_line(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    holder = RunDirectory(run_dir)
    holder.acquire()
    holder.claim()
    try:
        with pytest.raises(RunDirError, match=f"in use by another process .pid {os.getpid()} on "):
            train(cfg("trainer.max_steps=16", "resume=true"), run_dir)
    finally:
        holder.release()
    assert train(cfg("trainer.max_steps=13", "resume=true"), run_dir)["status"] == "completed"


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "not_ours"])
def test_a_damaged_checkpoint_is_one_line_and_left_as_it_is(finished, tmp_path, damage):
    run_dir = copy_of(finished, tmp_path)
    ckpt = run_dir / "checkpoint.pt"
    data = {"truncated": ckpt.read_bytes()[:5000], "empty": b"", "garbage": b"not a checkpoint at all" * 9}.get(damage)
    if data is None:
        torch.save({"weights": torch.zeros(2)}, ckpt)
    else:
        ckpt.write_bytes(data)
    before = snapshot(run_dir)
    with pytest.raises(RunDirError, match="checkpoint.pt: (cannot be read as a checkpoint|not a projbench checkpoint)"):
        train(cfg("trainer.max_steps=16", "resume=true"), run_dir)
    assert snapshot(run_dir) == before


def test_resume_after_a_crash_equals_the_uninterrupted_run(finished, tmp_path, monkeypatch):
    """A crash at step 8 (checkpoint at 5, points logged up to 6), a torn last line, and a kill
    while the resume rewrites metrics.jsonl: the resumed run still logs exactly the points of
    the uninterrupted run, the train loss of step 6 included (its window spans the checkpoint)."""
    run_dir = tmp_path / "crashed"
    real_loss, calls = DigitsTask.training_loss, []

    def crash_at_step_8(self, model, batch):
        calls.append(1)
        if len(calls) == 8:
            raise RuntimeError("the node went away")
        return real_loss(self, model, batch)

    monkeypatch.setattr(DigitsTask, "training_loss", crash_at_step_8)
    with pytest.raises(RuntimeError, match="the node went away"):
        train(cfg("trainer.max_steps=12"), run_dir)
    monkeypatch.setattr(DigitsTask, "training_loss", real_loss)
    assert read_summary(run_dir)["status"] == "failed"
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 5
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "epoch": 0.3, "spl')  # a kill in the middle of an append
    points, torn = read_metrics(run_dir / "metrics.jsonl")
    assert torn and max(p["step"] for p in points) == 6
    before = (run_dir / "metrics.jsonl").read_bytes()
    real_replace = os.replace

    def killed(src, dst):
        if Path(dst).name == "metrics.jsonl":
            raise KeyboardInterrupt  # the kill lands between writing the kept points and the rename
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg("trainer.max_steps=12", "resume=true"), run_dir)
    monkeypatch.undo()
    assert (run_dir / "metrics.jsonl").read_bytes() == before, "the old file stays whole"
    assert not list(run_dir.glob("*.tmp"))

    resumed = train(cfg("trainer.max_steps=12", "resume=true"), run_dir)
    assert resumed["status"] == "completed" and resumed["resumes"][-1]["step"] == 5
    expected = timeless(read_metrics(finished[0] / "metrics.jsonl")[0])
    assert timeless(read_metrics(run_dir / "metrics.jsonl")[0]) == expected
    assert resumed["metrics"] == finished[1]["metrics"]


def test_a_full_disk_keeps_the_previous_checkpoint_and_records_why(tmp_path, monkeypatch):
    run_dir = tmp_path / "full"
    real_save, saves = torch.save, []

    def disk_fills_up(state, f):
        saves.append(state["step"])
        if len(saves) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(state, f)

    monkeypatch.setattr(rundir_module.torch, "save", disk_fills_up)
    with pytest.raises(StorageError, match="checkpoint.pt: No space left on device; the previous checkpoint is kept"):
        train(cfg("trainer.max_steps=12"), run_dir)
    monkeypatch.undo()
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 5
    assert not (run_dir / "checkpoint.tmp").exists()
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]
    assert summary["steps"] == 10 and json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 9


def test_unwritable_or_too_long_directories_are_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(RunDirError, match="a_file/run: Not a directory"):
        train(cfg("trainer.max_steps=1"), blocker / "run")
    with pytest.raises(RunDirError, match="File name too long .shorten paths.log_dir or hydra.run.dir."):
        train(cfg("trainer.max_steps=1"), tmp_path / ("x" * 300))
