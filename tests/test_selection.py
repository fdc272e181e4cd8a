"""Model selection on a validation split (trainer.select_best) and optimizer phases (trainer.phases).

A scripted task makes every value known in closed form: one weight w, from 0, trained by plain
SGD (lr 0.1) on (w - 2)^2, so w_t = 2 (1 - 0.8^t); its validation metric `gap` = |w - 1| is
smallest at step 3 (w = 0.976) and grows after it, while the test split reports w itself, so the
test metrics say which weights were tested.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import ROOT, make_cfg, read_summary, run_cli
from projbench.errors import ConfigError
from projbench.phases import PhasePlan
from projbench.tasks.base import Task
from projbench.train import train

KILL_AT = "PROJBENCH_TEST_KILL_AT_STEP"  # the scripted task SIGKILLs its process at this training step


class ScriptedTask(Task):
    metrics = {"gap": "min", "w": "max"}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls = 0

    def build_model(self) -> nn.Module:
        model = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(model.weight)
        return model

    def train_dataset(self):
        return TensorDataset(torch.ones(4, 1))

    def eval_datasets(self):
        return {"val": TensorDataset(torch.ones(1, 1)), "test": TensorDataset(torch.ones(1, 1))}

    def training_loss(self, model, batch):
        self.calls += 1
        if os.environ.get(KILL_AT) == str(self.calls):
            os.kill(os.getpid(), signal.SIGKILL)
        (x,) = batch
        return ((model(x) - 2) ** 2).mean()

    def evaluate(self, model, loader: DataLoader, device) -> dict[str, float]:
        w = model.weight.item()
        return {"gap": abs(w - 1), "w": w}


def w_at(step: int) -> float:
    return 2 * (1 - 0.8 ** step)


# One step an epoch (4 samples, batch 4), an evaluation and a log point every step; plain SGD.
TASK = ["logger=none", "trainer.progress=false", "task._target_=test_selection.ScriptedTask",
        "task.name=scripted", "task.data.batch_size=4", "task.data.num_workers=0",
        "trainer.schedule.name=constant", "trainer.eval_every=1", "trainer.log_every=1",
        "trainer.diagnostics_every=null"]
SCRIPTED = TASK + ["optim=sgd", "optim.lr=0.1", "optim.momentum=0", "optim.weight_decay=0"]


def history(run_dir: Path, split: str, name: str) -> dict[int, float]:
    points = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {p["step"]: p["value"] for p in points if p["split"] == split and p["name"] == name}


def test_the_best_validation_checkpoint_is_tested_beside_the_final_model(tmp_path):
    summary = train(make_cfg(SCRIPTED + ["trainer.max_steps=10", "trainer.select_best.metric=val/gap"]),
                    tmp_path / "run")
    selection = summary["selection"]
    assert (selection["metric"], selection["mode"], selection["step"], selection["epoch"]) == ("val/gap", "min", 3, 3.0)
    assert selection["value"] == pytest.approx(abs(w_at(3) - 1), rel=1e-5)
    # the kept weights were tested, on every split; the final model's numbers stay in "metrics"
    assert selection["metrics"]["test/w"] == pytest.approx(w_at(3), rel=1e-5)
    assert selection["metrics"]["val/gap"] == selection["value"]
    assert summary["metrics"]["test/w"]["final"] == pytest.approx(w_at(10), rel=1e-5)
    # every metric has its final value and its best one, with the step and epoch of the best
    gap = summary["metrics"]["val/gap"]
    assert (gap["best_step"], gap["best_epoch"]) == (3, 3.0) and gap["final"] > gap["best"]

    late = train(make_cfg(SCRIPTED + ["trainer.max_steps=10", "trainer.select_best.metric=val/gap",
                                      "trainer.select_best.from_epoch=5"]), tmp_path / "late")
    assert late["selection"]["step"] == 5, "evaluations before from_epoch are not candidates"
    last = train(make_cfg(SCRIPTED + ["trainer.max_steps=10", "trainer.select_best.metric=test/w"]), tmp_path / "last")
    assert last["selection"]["step"] == 10, "w grows at every step: the final model is the best"
    assert last["selection"]["metrics"] == {key: entry["final"] for key, entry in last["metrics"].items()}
    off = train(make_cfg(SCRIPTED + ["trainer.max_steps=3"]), tmp_path / "off")
    assert "selection" not in off


@pytest.mark.parametrize("override,key", [
    ("trainer.select_best.metric=val/top1", "trainer.select_best.metric"),
    ("trainer.select_best.metric=dev/gap", "trainer.select_best.metric"),
    ("trainer.select_best.mode=up", "trainer.select_best.mode"),
])
def test_a_selection_metric_the_task_does_not_evaluate_is_a_config_error(override, key, tmp_path):
    metric = [] if "metric" in override else ["trainer.select_best.metric=val/gap"]
    with pytest.raises(ConfigError, match=key):
        train(make_cfg(SCRIPTED + ["trainer.max_steps=2", override] + metric), tmp_path)


# Plain SGD until step 6, then the best model so far with a new SGD (lr 0.05, momentum 0.9), then
# from step 8 the best model again with the same optimizer (momentum kept) at lr 0.01.
PHASES = ["trainer.select_best.metric=val/gap",
          "+trainer.phases.sgd.start_epoch=6", "+trainer.phases.sgd.optim._target_=torch.optim.SGD",
          "+trainer.phases.sgd.optim.name=sgd", "+trainer.phases.sgd.optim.lr=0.05",
          "+trainer.phases.sgd.optim.momentum=0.9",
          "+trainer.phases.low.start_epoch=8", "+trainer.phases.low.lr=0.01"]


def simulate(steps: int) -> dict[int, float]:
    """w after each step, with the phases of PHASES, as torch.optim.SGD computes it."""
    w, best_gap, best_w, buf = 0.0, None, None, None
    lr, momentum, out = 0.1, 0.0, {}
    for step in range(steps):
        if step in (6, 8):
            w = best_w
        if step == 6:
            lr, momentum, buf = 0.05, 0.9, None
        if step == 8:
            lr = 0.01
        g = 2 * (w - 2)
        buf = g if buf is None or not momentum else momentum * buf + g
        w -= lr * buf
        out[step + 1] = w
        if best_gap is None or abs(w - 1) < best_gap:
            best_gap, best_w = abs(w - 1), w
    return out


def test_phases_switch_the_optimizer_and_restart_from_the_best_model(tmp_path):
    summary = train(make_cfg(SCRIPTED + ["trainer.max_steps=10"] + PHASES), tmp_path / "run")
    assert history(tmp_path / "run", "test", "w") == pytest.approx(simulate(10), rel=1e-5)
    lrs = history(tmp_path / "run", "train", "lr")
    assert [lrs[s] for s in (6, 7, 8, 9, 10)] == pytest.approx([0.1, 0.05, 0.05, 0.01, 0.01])
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["phase"] == 2 and ckpt["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert summary["selection"]["step"] in simulate(10)


class GroupedTask(ScriptedTask):
    """The scripted task with a second weight in its own optimizer group at 10x the run's lr (0.1),
    as retrieval's proxies are."""

    def build_model(self) -> nn.Module:
        model = super().build_model()
        model.extra = nn.Parameter(torch.zeros(1))
        return model

    def training_loss(self, model, batch):
        return super().training_loss(model, batch) + (model.extra - 1).pow(2).sum()

    def optimizer_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": [model.extra], "lr": 1.0}]


def test_a_phase_optimizer_keeps_the_tasks_extra_groups_at_their_ratio_to_its_lr(tmp_path):
    grouped = [o.replace("test_selection.ScriptedTask", "test_selection.GroupedTask") for o in SCRIPTED]
    train(make_cfg(grouped + ["trainer.max_steps=7"] + PHASES[:-2]), tmp_path / "sgd")
    groups = torch.load(tmp_path / "sgd" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.05, 0.5])  # the new SGD at 0.05: the extra group at 10x
    train(make_cfg(grouped + ["trainer.max_steps=10"] + PHASES), tmp_path / "low")
    groups = torch.load(tmp_path / "low" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.1])  # an lr phase keeps the ratio too


def test_phases_and_selection_survive_sigkill_and_resume(tmp_path):
    """Adam, then SGD: the resumed run must rebuild the optimizer of its phase to load its state."""
    args = TASK + ["optim=adam", "optim.lr=0.1", "trainer.max_steps=12", "trainer.ckpt_every=4"] + PHASES
    full = train(make_cfg(args), tmp_path / "full")

    # Killed during step 10: the checkpoint of step 8 is in phase "sgd" (its optimizer must be
    # rebuilt before its state loads) and phase "low" starts right after the resume.
    killed = tmp_path / "killed"
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), KILL_AT: "10"}
    out = run_cli(args + [f"hydra.run.dir={killed}"], tmp_path, env=env)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["step"] == 8
    assert read_summary(killed)["status"] == "running"

    resumed = train(make_cfg(args + ["resume=true"]), killed)
    assert resumed["status"] == "completed"
    assert resumed["selection"] == full["selection"] and resumed["metrics"] == full["metrics"]
    assert history(killed, "test", "w") == history(tmp_path / "full", "test", "w")


def test_audio_tasks_select_on_validation_and_offer_the_adam_then_sgd_schedule():
    selection = {task: make_cfg([f"task={task}"]).trainer.select_best for task in ("dcase", "mtat", "speech_commands")}
    assert {t: (s.metric, s.from_epoch) for t, s in selection.items()} == {
        "dcase": ("val/f1", 12), "mtat": ("val/loss", 0), "speech_commands": ("val/loss", 0)}
    assert all(s.sources.metric for s in selection.values())
    assert make_cfg(["task=mtat"]).trainer.phases == {}, "one optimizer per run unless asked"

    cfg = make_cfg(["task=mtat", "optim=adamp", "+trainer/phases=adam_then_sgd"])
    assert cfg.optim.name == "adamp" and cfg.trainer.max_epochs == 200
    plan = PhasePlan(cfg.trainer.phases, steps_per_epoch=10, total_steps=2000, selecting=True)
    assert [(p.name, p.start_step, p.lr, p.reload_best) for p in plan.phases] == [
        ("sgd1", 800, None, True), ("sgd2", 1000, 1e-4, True), ("sgd3", 1200, 1e-5, True)]
    sgd = plan.phases[0].optim
    assert (sgd._target_, sgd.lr, sgd.momentum, sgd.nesterov, sgd.weight_decay) == ("torch.optim.SGD", 1e-3, 0.9, True, 1e-4)
    assert plan.index_at(799) == 0 and plan.index_at(800) == 1 and plan.index_at(1999) == 3
    with pytest.raises(ConfigError, match="trainer.phases.sgd1.reload_best"):
        PhasePlan(cfg.trainer.phases, steps_per_epoch=10, total_steps=2000, selecting=False)
    with pytest.raises(ConfigError, match="trainer.phases.sgd3.start_epoch"):
        PhasePlan(cfg.trainer.phases, steps_per_epoch=10, total_steps=1100, selecting=True)
