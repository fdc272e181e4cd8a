"""Recipe cards: where each value's source is found, what a run writes, and the sweep printer."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from conftest import FAST, make_cfg, run_cli
from projbench.recipes import COMMAND_LINE, NO_SOURCE, card


def _rows(cfg, overrides=(), sweep_keys=()):
    return {e.key: e for e in card(cfg, overrides, sweep_keys)}


def test_sources_are_found_beside_the_key_in_an_ancestor_and_at_the_end_of_an_interpolation():
    cfg = make_cfg(["optim=sgd"])
    OmegaConf.set_struct(cfg, False)
    cfg.task.sources = {"model": {"arch": "ancestor source"}, "data": "covers every data key"}
    cfg.task.table = {"a": {"lr": 0.5, "sources": {"lr": "the table's source"}}, "b": {"lr": 0.7}}
    cfg.task.pick = "a"
    cfg.optim.lr = "${task.table.${task.pick}.lr}"   # optim.sources.lr ("our default ...") is now stale
    rows = _rows(cfg)
    assert rows["task.model.arch"].source == "ancestor source"
    assert rows["task.data.batch_size"].source == "covers every data key"
    assert (rows["optim.lr"].value, rows["optim.lr"].source) == (0.5, "the table's source")
    assert rows["optim.lr"].defined_at == "task.table.a.lr"
    assert rows["optim.momentum"].source == cfg.optim.sources.momentum
    cfg.task.pick = "b"
    assert _rows(cfg)["optim.lr"].source == NO_SOURCE   # never the stale source beside optim.lr
    assert not any(key.startswith("task.table") for key in rows), "unused lookup-table entries are not rows"


def test_command_line_and_sweep_values_are_marked_and_decay_shows_both_conventions():
    overrides = ["optim=adamw", "optim.lr=2e-3", "optim.decay.value=1e-4", "optim.decay.convention=decoupled"]
    rows = _rows(make_cfg(overrides), overrides, sweep_keys=["optim.lr"])
    assert rows["optim.lr"].origin == "sweep"
    assert (rows["optim.decay"].origin, rows["optim.decay"].source) == (COMMAND_LINE, COMMAND_LINE)
    assert rows["optim.decay"].shown == "0.0001 decoupled (AdamW weight_decay=0.05; per step 0.0001 at the base lr)"
    direct = ["optim=adamw", "optim.weight_decay=0.3"]
    assert _rows(make_cfg(direct), direct)["optim.weight_decay"].note.startswith("the optimizer's own argument")


def test_schedule_rows_follow_the_chosen_schedule():
    rows = _rows(make_cfg(["trainer.schedule.name=step"]))
    assert {"trainer.schedule.step_size", "trainer.schedule.gamma"} <= set(rows)
    assert not {"trainer.schedule.milestones", "trainer.schedule.min_lr_ratio", "trainer.max_steps"} & set(rows)
    assert "trainer.max_epochs" not in _rows(make_cfg(["trainer.max_steps=5"]))


def test_a_run_writes_its_card_and_logs_it_first(tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli(FAST + ["optim=adamp", "optim.lr=3e-3", "trainer.max_steps=1", f"hydra.run.dir={run_dir}"], tmp_path)
    assert out.returncode == 0, out.stderr
    card_json = json.loads((run_dir / "recipe.json").read_text())
    rows = {e["key"]: e for e in card_json["entries"]}
    assert rows["optim.lr"]["value"] == 3e-3 and rows["optim.lr"]["origin"] == COMMAND_LINE
    assert rows["optim.delta"]["source"].startswith("paper")
    assert "| `optim.lr` | 0.003 | command line |" in (run_dir / "recipe.md").read_text()
    log = (run_dir / "__main__.log").read_text().splitlines()
    assert "recipe task.model.arch = resnet10t" in log[0]


def test_multirun_cfg_job_prints_every_cell_resolved(tmp_path):
    out = run_cli(["-m", "+experiment=toy", "seed=0,1", "--cfg", "job"], tmp_path)
    assert out.returncode == 0, out.stderr
    docs = out.stdout.split("# cell ")[1:]
    assert len(docs) == 16 and docs[0].startswith("1/16: optim=sgd optim.momentum=0 seed=0")
    cells = [OmegaConf.create(doc.split("\n", 1)[1]) for doc in docs]
    assert {(c.optim.name, c.optim.momentum, c.seed) for c in cells} == {
        (o, m, s) for o in ("sgd", "sgdp") for m in (0, 0.9, 0.95, 0.99) for s in (0, 1)}
    assert all(isinstance(c.optim.weight_decay, float) for c in cells), "printed resolved"
