"""Runs -> paper tables: a real sweep fills the digits table; failed runs and missing cells are
reported, never papered over; the paper's numbers are the paper's; every output format parses."""

from __future__ import annotations

import csv
import io
import itertools
import re
import shutil
import statistics
import sys

import pytest

from conftest import FAST, read_summary, run_cli
from projbench import tables
from projbench.tables import CSV_FIELDS, Run, build_table, find_runs, load_spec, runs_from_wandb

OPTIMS = ("sgd", "sgdp", "adam", "adamp")
ROW_OF = {"sgd": "SGD", "sgdp": "SGDP", "adam": "Adam", "adamp": "AdamP"}
TABLES_CLI = [sys.executable, "-m", "projbench.tables"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The real CLI's multirun: 4 optimizers x 2 seeds of digits, 3 steps each (about a minute)."""
    root = tmp_path_factory.mktemp("sweep")
    out = run_cli(["-m", "task=digits", "optim=" + ",".join(OPTIMS), "seed=0,1", "trainer.max_steps=3",
                   "trainer.eval_every=3", "trainer.diagnostics_every=1", *FAST, f"paths.log_dir={root}"],
                  root, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dirs = sorted(p for p in (root / "runs" / "digits").iterdir() if p.is_dir())  # one per cell
    assert len(run_dirs) == 8
    return root / "runs" / "digits"


def _summaries(sweep_dir):
    return [read_summary(d) for d in sorted(sweep_dir.iterdir()) if (d / "summary.json").exists()]


def test_sweep_fills_every_digits_cell_with_the_mean_of_its_seeds(sweep, tmp_path):
    out = run_cli(["--runs", str(sweep), "--table", "digits", "--format", "csv", "--out", str(tmp_path / "res")],
                  tmp_path, runner=TABLES_CLI)
    assert out.returncode == 0, out.stderr
    assert "read 8 runs" in out.stderr
    written = tmp_path / "res" / "tables" / "digits.csv"
    assert written.read_text() == out.stdout.rstrip("\n") + "\n"
    cells = {row["row"]: row for row in csv.DictReader(io.StringIO(written.read_text()))}
    assert set(cells) == set(ROW_OF.values())
    expected = {}
    for summary in _summaries(sweep):
        expected.setdefault(ROW_OF[summary["optim"]], []).append(summary["metrics"]["test/top1"]["final"])
    for row, values in expected.items():
        cell = cells[row]
        assert int(cell["n"]) == 2 and cell["seeds"] == "0 1"
        assert float(cell["mean"]) == pytest.approx(statistics.fmean(values), abs=1e-8)
        assert float(cell["std"]) == pytest.approx(statistics.stdev(values), abs=1e-8)
        assert cell["models"] == "resnet10t" and cell["paper"] == ""
    # Projected optimizers carry their difference to the base optimizer.
    assert float(cells["SGDP"]["delta"]) == pytest.approx(float(cells["SGDP"]["mean"]) - float(cells["SGD"]["mean"]))
    assert float(cells["AdamP"]["delta"]) == pytest.approx(float(cells["AdamP"]["mean"]) - float(cells["Adam"]["mean"]))
    assert cells["SGD"]["delta"] == "" and cells["SGDP"]["base"] == "SGD/Top-1"
    # The ResNet18-figure panels (weight norm, effective step, top-1 per epoch) for the task.
    figure = tmp_path / "res" / "figures" / "digits_resnet10t.png"
    assert figure.stat().st_size > 20_000


def test_failed_runs_are_excluded_and_missing_cells_listed(sweep, tmp_path):
    failed = tmp_path / "failed" / "nan"
    out = run_cli(FAST + ["optim=sgd", "optim.lr=1e12", "trainer.max_steps=20", "trainer.log_every=2",
                          f"hydra.run.dir={failed}"], tmp_path)
    assert out.returncode == 1 and read_summary(failed)["status"] == "failed"
    partial = tmp_path / "partial"
    for run_dir in sweep.iterdir():  # every run but AdamP's: that cell must stay empty
        if run_dir.is_dir() and read_summary(run_dir)["optim"] != "adamp":
            shutil.copytree(run_dir, partial / run_dir.name, ignore=shutil.ignore_patterns("checkpoint.pt"))
    out = run_cli(["--runs", str(partial), str(tmp_path / "failed"), "--table", "digits", "--no-figures",
                   "--out", str(tmp_path / "res")], tmp_path, runner=TABLES_CLI)
    assert out.returncode == 0, out.stderr
    table = out.stdout
    assert "excluded: 1 failed (SGD/Top-1 seed 0)" in table
    assert "missing: AdamP/Top-1" in table
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows["AdamP"] == "–"                      # empty, and no number from anywhere
    assert rows["SGD"].endswith("(n=2)")             # the failed seed-0 run is not in the mean
    assert "Δ" not in rows["AdamP"]
    assert not (tmp_path / "res" / "figures").exists()

    missing = run_cli(["--runs", str(tmp_path / "nowhere")], tmp_path, runner=TABLES_CLI)
    assert missing.returncode == 2
    assert "nowhere" in missing.stderr and "no such directory" in missing.stderr and "Traceback" not in missing.stderr


def test_damaged_runs_are_skipped_with_one_line_naming_the_file(sweep, tmp_path, capsys):
    runs = tmp_path / "runs"
    for run_dir in sorted(d for d in sweep.iterdir() if d.is_dir())[:4]:
        shutil.copytree(run_dir, runs / run_dir.name, ignore=shutil.ignore_patterns("checkpoint.pt"))
    listed, wrong, torn, damaged = sorted(runs.iterdir())
    (listed / "summary.json").write_text("[1, 2]")
    (wrong / "summary.json").write_text('{"status": "completed", "metrics": 3}')
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "epo')  # a run killed mid-write: the rest of the file still counts
    lines = (damaged / "metrics.jsonl").read_text().splitlines()
    (damaged / "metrics.jsonl").write_text("\n".join(lines[:1] + ["garbage"] + lines[2:]) + "\n")
    assert tables.main(["--runs", str(runs), "--table", "digits", "--out", str(tmp_path / "res")]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("skipped")] == [
        f"skipped {listed / 'summary.json'} (not a run summary: a JSON object with a metrics object)",
        f"skipped {wrong / 'summary.json'} (not a run summary: a JSON object with a metrics object)",
        f"skipped {damaged / 'metrics.jsonl'}:2: Expecting value: line 1 column 1 (char 0) "
        "(damaged metrics; the run is left out of the figures)"]
    assert "read 2 runs" in err and (tmp_path / "res" / "figures" / "digits_resnet10t.png").exists()


def test_paper_values_are_the_papers():
    specs = load_spec()
    assert {"digits", "table1", "table2", "table3", "table4a", "table4b", "table4c", "table5", "table6",
            "table7"} <= set(specs)
    spot = {  # (table, row, column): number in /work/shared/paper.md
        ("table1", "MobileNetV2", "SGD"): 71.61, ("table1", "ResNet50 + CutMix", "AdamP"): 78.31,
        ("table2", "SGD", "w/o weight decay"): 67.94, ("table2", "AdamP", "Baseline"): 70.81,
        ("table3", "SSD, ImageNet", "Adam"): 28.39, ("table3", "CenterNet, scratch", "AdamP"): 27.11,
        ("table4a", "l_2, eps 80/255", "AdamP attacked"): 83.59, ("table4b", "AdamP", "avg"): 68.0,
        ("table4b", "Adam", "rho .999"): 22.9, ("table4c", "AdamP", "ImageNet-A"): 32.9,
        ("table5", "AdamP", "Sound event tagging (DCASE) F1"): 56.04,
        ("table5", "Adam", "Music tagging PR-AUC"): 45.61,
        ("table6", "CUB", "ProxyAnchor Adam"): 69.28, ("table6", "InShop", "ProxyAnchor AdamP"): 87.4,
    }
    for (table, row, column), value in spot.items():
        assert specs[table].paper[row][column] == value, (table, row, column)
    for name in ("table1", "table2", "table3", "table4a", "table4b", "table4c", "table5", "table6"):
        spec = specs[name]
        assert all(spec.paper[r.name][c.name] is not None for r in spec.rows for c in spec.columns), name
    for name in ("table7", "digits"):  # not extracted / not in the paper: empty, never invented
        assert all(v is None for row in specs[name].paper.values() for v in row.values())
    assert specs["table7"].direction == "min"
    assert tables.resolve_table_names(specs, ["retrieval"]) == ["table6"]
    assert tables.resolve_table_names(specs, ["imagenet", "table1"]) == ["table1", "table2"]


_ids = itertools.count()


def _fake(config: dict, top1: float | None, status: str = "completed", seed: int = 0) -> Run:
    metrics = {} if top1 is None else {"val/top1": {"final": top1}}
    return Run(id=f"fake{next(_ids)}", config=config, summary={"status": status, "seed": seed, "metrics": metrics})


def test_selectors_route_runs_to_their_cells_and_deltas_follow_the_paper():
    specs = load_spec()

    def imagenet(optim: str, wd: float, seed: int, top1: float, **task) -> Run:
        cfg = {"task": {"name": "imagenet", "model": {"arch": "resnet18"}, **task},
               "optim": {"name": optim, "weight_decay": wd}, "seed": seed}
        return _fake(cfg, top1, seed=seed)

    runs = [imagenet("sgd", 1e-4, 0, 70.0), imagenet("sgd", 1e-4, 1, 70.2), imagenet("sgdp", 1e-4, 0, 70.6),
            imagenet("sgd", 0.0, 0, 68.0), imagenet("adamp", 0, 0, 69.9),
            imagenet("sgd", 1e-4, 0, 10.0, cutmix=True)]          # another row: must not mix in
    t1 = build_table(specs["table1"], runs)
    sgd = t1.cells[("ResNet18", "SGD")]
    assert (sgd.n, sgd.mean) == (2, pytest.approx(70.1))       # weight-decay-free runs stay out
    assert t1.cells[("ResNet18", "SGDP")].delta == pytest.approx(0.5)
    assert t1.cells[("ResNet18", "SGDP")].paper_delta == pytest.approx(70.73 - 70.28)
    assert t1.cells[("ResNet50 + CutMix", "SGD")].n == 0        # arch differs
    t2 = build_table(specs["table2"], runs)
    assert t2.cells[("SGD", "w/o weight decay")].mean == 68.0
    assert t2.cells[("AdamP", "w/o weight decay")].mean == 69.9
    assert t2.cells[("AdamP", "w/o weight decay")].delta is None  # no Adam run: no delta
    assert t2.cells[("SGD", "Baseline")].n == 2
    # Table 4b's average column is the mean of the row's rho columns, once all of them exist.
    rho = [_fake({"task": {"name": "biased_mnist", "data": {"rho": r}}, "optim": {"name": "adam"}}, None)
           for r in (0.999, 0.997, 0.995, 0.99)]
    for run, value in zip(rho, (20.0, 60.0, 70.0, 90.0)):
        run.summary["metrics"] = {"test/unbiased_top1": {"final": value}}
    t4b = build_table(specs["table4b"], rho)
    assert t4b.cells[("Adam", "avg")].mean == pytest.approx(60.0)
    assert t4b.cells[("AdamP", "avg")].mean is None and "AdamP/avg" not in t4b.missing


class _FakeWandbRun:
    def __init__(self, run_id, optim, seed, top1, state="finished"):
        self.id, self.state, self.created_at = run_id, state, "2026-01-01T00:00:00Z"
        self.config = {"task": {"name": "digits", "model": {"arch": "resnet18"}}, "optim": {"name": optim},
                       "seed": seed}
        self.summary_metrics = {"test/top1": top1, "train/loss": 0.1, "_step": 10, "status": "completed"}
        if state != "finished":
            self.summary_metrics.pop("status")


class _FakeApi:
    def __init__(self, runs):
        self._runs, self.asked = runs, []

    def runs(self, path):
        self.asked.append(path)
        return self._runs


def test_wandb_runs_fill_tables_like_run_directories():
    api = _FakeApi([_FakeWandbRun("a", "sgd", 0, 90.0), _FakeWandbRun("b", "sgd", 1, 92.0),
                    _FakeWandbRun("c", "sgdp", 0, 93.0), _FakeWandbRun("d", "adam", 0, 50.0, state="crashed")])
    runs = runs_from_wandb("me/projbench", api=api)
    assert api.asked == ["me/projbench"]
    assert [r.status for r in runs] == ["completed", "completed", "completed", "failed"]
    result = build_table(load_spec()["digits"], runs)
    assert result.cells[("SGD", "Top-1")].mean == pytest.approx(91.0)
    assert result.cells[("SGDP", "Top-1")].delta == pytest.approx(2.0)
    assert result.excluded == {"failed": {"me/projbench/d": "Adam/Top-1 seed 0"}}
    assert result.missing == ["Adam/Top-1", "AdamP/Top-1"]


def _latex_cells(row: str) -> int:
    row = row.rstrip().removesuffix(r"\\")
    spans = sum(int(n) - 1 for n in re.findall(r"\\multicolumn\{(\d+)\}", row))
    return row.count("&") - row.count(r"\&") + 1 + spans


def test_latex_and_csv_are_well_formed(sweep):
    runs = find_runs([sweep])
    specs = load_spec()
    for name in ("digits", "table1", "table4b", "table6"):
        result = build_table(specs[name], runs)
        tex = tables.render_latex(result)
        body = tex[tex.index(r"\begin{tabular}"):tex.index(r"\end{tabular}")]
        ncols = len(re.match(r"\\begin\{tabular\}\{([lrc]+)\}", body).group(1))
        rows = [line for line in body.splitlines() if line.rstrip().endswith(r"\\")]
        assert len(rows) == 2 + len(specs[name].rows), name
        assert all(_latex_cells(line) == ncols for line in rows), (name, ncols, rows)
        for env in ("table", "tabular"):
            assert tex.count(rf"\begin{{{env}}}") == tex.count(rf"\end{{{env}}}") == 1
        code = "".join(line for line in tex.splitlines() if not line.startswith("%"))
        assert re.search(r"(?<!\\)[%#_&]", code.replace(" & ", " ")) is None, name  # specials escaped

        parsed = list(csv.DictReader(io.StringIO(tables.render_csv(result))))
        assert list(parsed[0]) == CSV_FIELDS
        assert len(parsed) == len(specs[name].rows) * len(specs[name].columns)
        for row in parsed:
            assert row["table"] == name and int(row["n"]) >= 0
            for key in ("mean", "std", "paper", "delta", "paper_delta"):
                assert row[key] == "" or isinstance(float(row[key]), float)
            assert (row["mean"] == "") == (int(row["n"]) == 0)
    digits_tex = tables.render_latex(build_table(specs["digits"], runs))
    assert "(n=2)" in digits_tex and r"$\pm$" in digits_tex
    table1_csv = tables.render_csv(build_table(specs["table1"], runs))
    assert "table1,ResNet18,SGDP,val/top1,%,max,,,0,,70.73,ResNet18/SGD,,0.45," in table1_csv
