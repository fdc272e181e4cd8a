"""Recipe cards and sources: where each value's source is found, what a run writes, the sweep
printer, and, for every table's sweep, a public source for every value, the decay each
optimizer gets, and the README's cards."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import ROOT, make_cfg, run_cli
from projbench.recipes import (COMMAND_LINE, CORE_KEYS, NO_SOURCE, card, experiments, get_path, nearest_source,
                               readme_blocks, render_table, table_notes)
from projbench.sweeps import compose_cells


def _rows(cfg, overrides=(), sweep_keys=()):
    return {e.key: e for e in card(cfg, overrides, sweep_keys)}


def test_sources_are_found_beside_the_key_or_in_an_ancestor_and_lookup_tables_are_no_rows():
    cfg = make_cfg(["optim=sgd"])
    OmegaConf.set_struct(cfg, False)
    cfg.task.sources = {"model": {"arch": "ancestor source"}, "data": "covers every data key"}
    cfg.task.table = {"a": {"lr": 0.5, "sources": {"lr": "the table's source"}}, "b": {"lr": 0.7}}
    cfg.task.pick = "a"
    cfg.optim.lr = "${task.table.${task.pick}.lr}"
    cfg.optim.sources.lr = "${task.table.${task.pick}.sources.lr}"   # the contract: the source goes along
    rows = _rows(cfg)
    assert rows["task.model.arch"].source == "ancestor source"
    assert rows["task.data.batch_size"].source == "covers every data key"
    assert (rows["optim.lr"].value, rows["optim.lr"].source) == (0.5, "the table's source")
    assert rows["optim.lr"].defined_at == "task.table.a.lr"
    assert rows["optim.momentum"].source == cfg.optim.sources.momentum
    assert not any(key.startswith("task.table") for key in rows), "lookup-table entries are no rows"
    cfg.task.pick = "b"
    assert _rows(cfg)["optim.lr"].source == NO_SOURCE


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


def test_multirun_cfg_job_prints_every_cell_resolved(tmp_path):
    out = run_cli(["-m", "+experiment=toy", "task=toy", "optim=sgd,sgdp", "seed=0,1", "--cfg", "job"], tmp_path)
    assert out.returncode == 0, out.stderr
    docs = out.stdout.split("# cell ")[1:]
    assert len(docs) == 16 and docs[0].startswith("1/16: task=toy optim=sgd optim.momentum=0 seed=0")
    cells = [OmegaConf.create(doc.split("\n", 1)[1]) for doc in docs]
    assert {(c.optim.name, c.optim.momentum, c.seed) for c in cells} == {
        (o, m, s) for o in ("sgd", "sgdp") for m in (0, 0.9, 0.95, 0.99) for s in (0, 1)}
    assert all(isinstance(c.optim.weight_decay, float) for c in cells), "printed resolved"


# -- every table's recipes ---------------------------------------------------------------------------
MACHINE_PATH = re.compile(r"(?<![\w.])/(work|tmp|home|root|scratch|mnt)/")


@pytest.fixture(scope="module")
def sweeps() -> dict:
    """Every cell of every conf/experiment sweep, composed once for the module."""
    return {name: compose_cells([f"+experiment={name}"]) for name in experiments()}


def test_every_recipe_value_of_every_table_has_a_public_source(sweeps):
    missing = []
    for name, cells in sweeps.items():
        for cell in cells:
            for entry in card(cell.cfg, cell.overrides, cell.sweep_keys):
                if entry.source == NO_SOURCE or MACHINE_PATH.search(entry.source):
                    missing.append(f"{name} [{cell.label}] {entry.key}: {entry.source}")
        missing += [f"{name} {row}: {source}" for row, _, source in table_notes(name, cells)
                    if source == NO_SOURCE or MACHINE_PATH.search(source)]
    assert not missing, "\n".join(missing)


def _package(path: Path) -> str:
    """Where a conf/ file's keys land in the composed config."""
    header = path.read_text().split("\n", 1)[0]
    if header.startswith("# @package "):
        package = header.removeprefix("# @package ").strip()
        return "" if package == "_global_" else package
    group = path.parent.relative_to(ROOT / "conf").as_posix()
    return {"optim": "optim", "trainer": "trainer", "task/model": "task.model", "task/loss": "task.loss"}[group]


LINTED = [p for d in ("optim", "trainer", "task", "experiment") for p in sorted((ROOT / "conf" / d).rglob("*.yaml"))]


@pytest.mark.parametrize("path", LINTED, ids=lambda p: p.relative_to(ROOT / "conf").as_posix())
def test_the_file_that_writes_a_recipe_value_writes_its_source(path):
    """Otherwise a value a task overrides would show the stale source of the file it overrides
    (conf/optim's "our default" beside a recipe's lr)."""
    prefix = _package(path)
    tree = yaml.safe_load(path.read_text()) or {}
    if prefix:
        for part in reversed(prefix.split(".")):
            tree = {part: tree}
    problems = []
    for key in CORE_KEYS:
        node = get_path(tree, key, default=KeyError)
        if node is KeyError:
            continue
        if nearest_source(lambda p: get_path(tree, p), key) is None:
            problems.append(f"{key} is written without a source in this file")
        if key == "optim.decay" and isinstance(node, dict) and isinstance(node.get("value"), (int, float)) \
                and "convention" not in node:
            problems.append("optim.decay.value is written without its convention")
    if get_path(tree, "optim.weight_decay") is not None and prefix != "optim":
        problems.append("optim.weight_decay is written: write optim.decay (value, convention) instead")
    assert not problems, problems


SGD, SGDP, ADAMW, ADAMP, ADAM = ("torch.optim.SGD", "projbench.optim.SGDP", "torch.optim.AdamW",
                                 "projbench.optim.AdamP", "torch.optim.Adam")


def _imagenet(c) -> tuple:
    """(class, weight_decay, per-step decay) of a Table 1 / 2 cell."""
    mobilenet = c.task.model.arch == "mobilenetv2_100"
    if c.get("table2_column") == "no_decay":
        return None, 0.0, 0.0
    if c.optim.name in ("sgd", "sgdp"):   # coupled L2 (SGDP: the same argument, the same decay)
        wd = 4e-5 if mobilenet else 1e-4
        return None, wd, wd * c.optim.lr / (1 - c.optim.momentum)
    return None, 1e-4 / c.optim.lr, 1e-4   # the paper's 1e-4 per step (clovaai/AdamP issue #10)


EXPECTED_DECAY = {   # experiment -> cell config -> (optimizer class or None, weight_decay, per-step decay)
    "imagenet_table1": _imagenet,
    "imagenet_table2": _imagenet,
    "coco_table3": lambda c: (None, *{("centernet", "adam"): (0.0, 0.0), ("centernet", "adamp"): (0.0, 0.0),
                                      ("ssd", "adam"): (5e-4, None), ("ssd", "adamp"): (5e-4, 5e-7)}[
                                          (c.task.model.detector, c.optim.name)]),
    "audio_table5": lambda c: (None, 1e-4, None if c.optim.name == "adam" else 1e-8),
    "cifar10_adv_table4a": lambda c: (None, 5e-4, None if c.optim.name == "adam" else 5e-7),
    "retrieval_table6": lambda c: ({"adamw": ADAMW, "adamp": ADAMP}[c.optim.name], 1e-4, 1e-4 * c.optim.lr),
    "biased_mnist_table4b": lambda c: (None, 1e-4, None if c.optim.name == "adam" else 1e-7),
    "imagenet9_table4c": lambda c: (None, 1e-4, None if c.optim.name == "adam" else 1e-7),
    "wikitext_table7": lambda c: (None, 1e-2, 2.5e-6),
    "toy": lambda c: (None, *((79.0, 79.0 * c.optim.lr / (1 - c.optim.momentum)) if c.optim.decay.value else (0.0, 0.0))),
    "resnet18_figure": lambda c: (None, 0.0, 0.0),
    "resnet18_figure_digits": lambda c: (None, 0.0, 0.0),
    "digits": lambda c: (None, *{"sgd": (1e-4, 1e-4), "sgdp": (1e-4, 1e-4), "adam": (0.0, 0.0),
                                 "adamp": (0.0, 0.0)}[c.optim.name]),
    "beyond": lambda c: (_class(c.optim.name), 0.0, 0.0),
    "beyond_imagenet": lambda c: _beyond_imagenet(c),
}
PAPER_CLASS = {"sgd": SGD, "sgdp": SGDP, "sgdp_alg1": SGDP, "adam": ADAM, "adamw": ADAMW, "adamp": ADAMP}
PROJECTED = "projbench.optim.Projected"


def _class(name: str) -> str:
    """The class behind an optimizer config: the paper's, the wrapper (`_p`) or timm's."""
    timm = {"lion": "Lion", "lamb": "Lamb", "adan": "Adan", "nadamw": "NAdamW", "adopt": "Adopt",
            "laprop": "LaProp", "mars": "Mars", "muon": "Muon"}
    return PAPER_CLASS.get(name) or (PROJECTED if name.endswith("_p") else f"timm.optim.{timm[name]}")


def _beyond_imagenet(c) -> tuple:
    """ResNet18's recipe: SGD's coupled 1e-4 (sgd_p: the wrapper's 1e-3 at momentum 0.9), and for
    the rest AdamW's 1e-4 per step at their lr (Lion's: AdamW's / 10)."""
    if c.optim.name in ("sgd", "sgdp", "sgd_p"):
        return _class(c.optim.name), 1e-3 if c.optim.name == "sgd_p" else 1e-4, 1e-4
    return _class(c.optim.name), 1e-4 / c.optim.lr, 1e-4


def test_each_tables_sweep_decays_every_optimizer_as_its_source_says(sweeps):
    assert set(EXPECTED_DECAY) <= set(sweeps)
    for name, cells in sweeps.items():
        for cell in cells:
            c = cell.cfg
            cls, wd, per_step = EXPECTED_DECAY[name](c) if name in EXPECTED_DECAY else (None, None, None)
            assert c.optim._target_ == (cls or PAPER_CLASS[c.optim.name]), (name, cell.label)
            if wd is not None:
                assert c.optim.weight_decay == pytest.approx(wd, rel=1e-9), (name, cell.label)
                assert (c.optim.decay_per_step is None) == (per_step is None), (name, cell.label)
            if per_step is not None:
                assert c.optim.decay_per_step == pytest.approx(per_step, rel=1e-9), (name, cell.label)
    adamp18 = next(cell.cfg for cell in sweeps["imagenet_table1"]
                   if (cell.cfg.task.recipe, cell.cfg.optim.name) == ("resnet18", "adamp"))
    assert adamp18.optim.lr * adamp18.optim.weight_decay == pytest.approx(1e-4)   # AdamP: w <- (1 - lr wd) w
    table1_names = {cell.cfg.optim.name for cell in sweeps["imagenet_table1"]}
    assert table1_names == {"sgd", "sgdp", "adamw", "adamp"}, "Table 1's baseline is AdamW, not torch Adam"


def test_readme_shows_the_generated_card_of_every_table(sweeps):
    blocks = readme_blocks((ROOT / "README.md").read_text())
    assert set(blocks) == set(sweeps), "README: one <!-- recipe-card: NAME --> block per conf/experiment sweep"
    stale = [name for name, cells in sweeps.items()
             if blocks[name] != render_table(name, cells, table_notes(name, cells))]
    assert not stale, f"stale README recipe cards: {stale}; run python -m projbench.recipes --write README.md"
