"""Runs -> paper tables: a real sweep fills the digits table; failed runs and missing cells are
reported, never papered over; the paper's numbers are the paper's; every output format parses."""

from __future__ import annotations

import csv
import io
import itertools
import math
import re
import shutil
import statistics
import sys

import pytest

from omegaconf import OmegaConf

from conftest import FAST, read_summary, run_cli
from projbench import stats, tables
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
    out = run_cli(["--runs", str(sweep), "--table", "digits", "--format", "csv", "md", "--out", str(tmp_path / "res")],
                  tmp_path, runner=TABLES_CLI)
    assert out.returncode == 0, out.stderr
    assert "read 8 runs" in out.stderr
    written = tmp_path / "res" / "tables" / "digits.csv"
    markdown = (tmp_path / "res" / "tables" / "digits.md").read_text()
    assert out.stdout == written.read_text() + "\n" + markdown + "\n"
    records = list(csv.DictReader(io.StringIO(written.read_text())))
    cells = {row["row"]: row for row in records if row["record"] == "cell"}
    assert set(cells) == set(ROW_OF.values())
    expected = {}
    for summary in _summaries(sweep):
        expected.setdefault(ROW_OF[summary["optim"]], {})[summary["seed"]] = summary["metrics"]["test/top1"]["final"]
    t2 = 12.706204736174694  # t_0.975 with 1 df: tan(0.475 pi)
    for row, values in expected.items():
        cell, mean, std = cells[row], statistics.fmean(values.values()), statistics.stdev(values.values())
        assert int(cell["n"]) == 2 and cell["seeds"] == "0 1" and cell["value"] == "final"
        assert [float(v) for v in cell["values"].split()] == pytest.approx([values[0], values[1]], abs=1e-8)
        assert float(cell["mean"]) == pytest.approx(mean, abs=1e-8)
        assert float(cell["std"]) == pytest.approx(std, abs=1e-8)
        assert float(cell["ci_low"]) == pytest.approx(mean - t2 * std / 2**0.5, abs=1e-8)
        assert float(cell["ci_high"]) == pytest.approx(mean + t2 * std / 2**0.5, abs=1e-8)
        assert cell["models"] == "resnet10t" and cell["paper"] == "" and cell["paper_in_ci"] == ""
    # Projected optimizers: the paired difference over the two shared seeds, and its verdict.
    for row, base in (("SGDP", "SGD"), ("AdamP", "Adam")):
        diffs = [expected[row][s] - expected[base][s] for s in (0, 1)]
        cell = cells[row]
        assert cell["base"] == f"{base}/Top-1" and cell["delta_test"] == "paired" and cell["delta_pairs"] == "2"
        assert float(cell["delta"]) == pytest.approx(statistics.fmean(diffs), abs=1e-8)
        half = t2 * abs(diffs[0] - diffs[1]) / 2  # the std of two values is |a - b| / sqrt(2)
        assert float(cell["delta_ci_low"]) == pytest.approx(statistics.fmean(diffs) - half, abs=1e-8)
        assert cell["verdict"] in ("gain reproduced", "no clear difference", "reversed")
        assert f"| {row} − {base} | Top-1 |" in markdown and cell["verdict"] in markdown
    assert cells["SGD"]["delta"] == "" and cells["SGD"]["verdict"] == ""
    claims = [row["text"] for row in records if row["record"] == "claim"]
    assert [c.split(":")[0] for c in claims] == ["SGDP > SGD", "AdamP > Adam"]
    assert all(c in markdown for c in claims)
    (compute,) = [row for row in records if row["record"] == "compute"]
    seconds = sum(s["wall_seconds"] * s["world_size"] for s in _summaries(sweep))
    assert compute["row"] == "cpu" and compute["n"] == "8"
    assert float(compute["device_seconds"]) == pytest.approx(seconds)
    assert "Compute: cpu " in markdown
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
    spot = {  # (table, row, column): the project page's number
        ("table1", "MobileNetV2", "SGD"): 71.61, ("table1", "ResNet50 + CutMix", "AdamP"): 78.31,
        ("table1", "ResNet18", "AdamW"): 70.41, ("table2", "AdamW", "w/o weight decay"): 68.52,
        ("table2", "SGD", "w/o weight decay"): 67.94, ("table2", "AdamP", "Baseline"): 70.81,
        ("table3", "SSD, ImageNet", "Adam"): 28.39, ("table3", "CenterNet, scratch", "AdamP"): 27.11,
        ("table4a", "l_2, eps 80/255", "AdamP attacked"): 83.59, ("table4b", "AdamP", "avg"): 68.0,
        ("table4b", "Adam", "rho .999"): 22.9, ("table4c", "AdamP", "ImageNet-A"): 32.9,
        ("table5", "AdamP", "Sound event tagging (DCASE) F1"): 56.04,
        ("table5", "Adam", "Music tagging PR-AUC"): 45.61,
        ("table6", "CUB", "ProxyAnchor Adam"): 69.28, ("table6", "InShop", "ProxyAnchor AdamP"): 87.4,
        ("table7", "Transformer-XL", "AdamW"): 23.38, ("table7", "Transformer-XL + WN", "AdamP"): 22.77,
    }
    spot.update({  # the project page's toys and ResNet18 figure
        ("toy2d", "SGD", "momentum 0.99"): 27.87, ("toy2d", "SGDP (Algorithm 1)", "momentum 0.9"): 1.12,
        ("toy3d", "GD + momentum", "momentum 0.9"): 3.16, ("toy3d", "GD + projection (Algorithm 1)", "momentum 0.9"): 1.12,
        ("resnet18_figure", "momentum SGD", "Top-1"): 66.6, ("resnet18_figure", "SGDP", "final weight norm"): 1.94,
    })
    for (table, row, column), value in spot.items():
        assert specs[table].paper[row][column] == value, (table, row, column)
    for name in ("table1", "table2", "table3", "table4a", "table4b", "table4c", "table5", "table6", "table7"):
        spec = specs[name]
        assert all(spec.paper[r.name][c.name] is not None for r in spec.rows for c in spec.columns), name
    # not in the paper: empty, never invented
    assert all(v is None for row in specs["digits"].paper.values() for v in row.values())
    assert specs["table7"].direction == "min"
    assert tables.resolve_table_names(specs, ["retrieval"]) == ["table6"]
    assert tables.resolve_table_names(specs, ["toy"]) == ["toy2d", "toy3d"]
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
            imagenet("sgd", 1e-4, 0, 10.0, cutmix=True),          # another row: must not mix in
            imagenet("adamw", 0.1, 0, 70.3), imagenet("adam", 1e-4, 0, 50.0)]   # torch Adam is no column
    t1 = build_table(specs["table1"], runs)
    sgd = t1.cells[("ResNet18", "SGD")]
    assert (sgd.n, sgd.mean) == (2, pytest.approx(70.1))       # weight-decay-free runs stay out
    assert t1.cells[("ResNet18", "SGDP")].delta == pytest.approx(0.5)
    assert t1.cells[("ResNet18", "SGDP")].paper_delta == pytest.approx(70.73 - 70.28)
    assert t1.cells[("ResNet50 + CutMix", "SGD")].n == 0        # arch differs
    assert (t1.cells[("ResNet18", "AdamW")].n, t1.cells[("ResNet18", "AdamW")].mean) == (1, 70.3)
    t2 = build_table(specs["table2"], runs)
    assert t2.cells[("SGD", "w/o weight decay")].mean == 68.0
    assert t2.cells[("AdamP", "w/o weight decay")].mean == 69.9
    assert t2.cells[("AdamP", "w/o weight decay")].delta is None  # no AdamW run: no delta
    assert t2.cells[("SGD", "Baseline")].n == 2
    # Table 4b's average column is the mean of the row's rho columns, once all of them exist.
    rho = [_fake({"task": {"name": "biased_mnist", "data": {"rho": r}}, "optim": {"name": "adam"}}, None)
           for r in (0.999, 0.997, 0.995, 0.99)]
    for run, value in zip(rho, (20.0, 60.0, 70.0, 90.0)):
        run.summary["metrics"] = {"test/unbiased_top1": {"final": value}}
    t4b = build_table(specs["table4b"], rho)
    assert t4b.cells[("Adam", "avg")].mean == pytest.approx(60.0)
    assert t4b.cells[("AdamP", "avg")].mean is None and "AdamP/avg" not in t4b.missing


def test_cells_take_the_value_their_table_row_or_column_names():
    """Proxy-Anchor and CutMix report their best test epoch, the Harmonic CNN code its best
    validation checkpoint: paper.yaml says so per table (Tables 5, 6) or per row (Table 1's CutMix
    row), and each cell reads that value of every run."""
    specs = load_spec()
    assert (specs["table5"].value, specs["table6"].value, specs["table1"].value) == ("selected", "best", "final")

    def run(config: dict, metric: str, final: float, best: float, selected: float | None = None) -> Run:
        summary = {"status": "completed", "seed": 0,
                   "metrics": {metric: {"final": final, "best": best, "best_step": 10, "best_epoch": 1.0}}}
        if selected is not None:
            summary["selection"] = {"metric": "val/loss", "step": 7, "metrics": {metric: selected}}
        return Run(id=f"fake{next(_ids)}", config=config, summary=summary)

    net = {"task": {"name": "imagenet", "model": {"arch": "resnet50"}}, "optim": {"name": "sgd", "weight_decay": 1e-4}}
    cutmix = {**net, "task": {**net["task"], "cutmix": True}}
    t1 = build_table(specs["table1"], [run(net, "val/top1", 76.0, 76.5), run(cutmix, "val/top1", 77.0, 77.6)])
    assert t1.cells[("ResNet50", "SGD")].mean == 76.0 and t1.cells[("ResNet50", "SGD")].which == "final"
    assert t1.cells[("ResNet50 + CutMix", "SGD")].mean == 77.6
    assert t1.cells[("ResNet50 + CutMix", "SGD")].final_mean == 77.0   # shown beside the best
    assert any("best: the run's best evaluation" in note for note in tables._footnotes(t1))
    tagging = {"task": {"name": "mtat"}, "optim": {"name": "adam"}}
    t5 = build_table(specs["table5"], [run(tagging, "test/roc_auc", 90.0, 91.0, selected=90.5),
                                       run(tagging, "test/roc_auc", 89.0, 92.0)])
    roc = t5.cells[("Adam", "Music tagging ROC-AUC")]
    assert (roc.mean, roc.n) == (90.5, 1)
    # a run without a selection (trainer.select_best off) is left out, and the table says why
    assert roc.excluded == {"without a selected test/roc_auc": 1}


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
    selected = _FakeWandbRun("e", "adam", 0, 91.0)
    selected.summary_metrics["selected/test/top1"] = 95.0      # RunRecorder.log_selection's key
    (run,) = runs_from_wandb("me/projbench", api=_FakeApi([selected]))
    assert run.metric("test/top1", "selected") == 95.0 and run.metric("test/top1") == 91.0
    assert "selected/test/top1" not in run.summary["metrics"]


def _latex_cells(row: str) -> int:
    row = row.rstrip().removesuffix(r"\\")
    spans = sum(int(n) - 1 for n in re.findall(r"\\multicolumn\{(\d+)\}", row))
    return row.count("&") - row.count(r"\&") + 1 + spans


def _tabulars(tex: str) -> list[tuple[int, list[str]]]:
    """(declared column count, rows) of each tabular."""
    out = []
    for body in re.findall(r"\\begin\{tabular\}(.*?)\\end\{tabular\}", tex, flags=re.S):
        ncols = len(re.match(r"\{([lrc]+)\}", body).group(1))
        out.append((ncols, [line for line in body.splitlines() if line.rstrip().endswith(r"\\")]))
    return out


def test_a_table_draws_its_figure_from_its_runs_with_the_paper_values_marked(sweep, tmp_path):
    """`figure: {kind: training_curves}` in a table: one curve per row, from the rows' runs."""
    paper = tmp_path / "paper.yaml"
    paper.write_text("""
tables:
  curves:
    title: "SGD and SGDP"
    metric: test/top1
    direction: max
    select: {task.name: digits}
    rows:
      SGD: {select: {optim.name: sgd}}
      SGDP: {select: {optim.name: sgdp}}
    columns:
      norm: {metric: diag/weight_norm}
    paper:
      SGD: {norm: 1.5}
      SGDP: {norm: null}
    figure: {kind: training_curves, panels: [diag/weight_norm, diag/effective_step]}
""")
    out = run_cli(["--runs", str(sweep), "--paper", str(paper), "--out", str(tmp_path / "res")], tmp_path,
                  runner=TABLES_CLI)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "res" / "figures" / "curves.png").stat().st_size > 20_000
    assert "wrote " + str(tmp_path / "res" / "figures" / "curves.png") in out.stderr
    paper.write_text(paper.read_text().replace("kind: training_curves", "kind: nonsense"))
    out = run_cli(["--runs", str(sweep), "--paper", str(paper)], tmp_path, runner=TABLES_CLI)
    assert out.returncode == 2 and "figure kind must be one of" in out.stderr


def test_projection_pairs_figure_puts_each_base_beside_its_projected_rows(sweep, tmp_path):
    """`figure: {kind: projection_pairs}`: one panel per row that is another row's `base:`, per column."""
    from projbench.figures import write_table_figures

    paper = tmp_path / "paper.yaml"
    paper.write_text("""
tables:
  pairs:
    title: "pairs"
    metric: test/top1
    direction: max
    select: {task.name: digits}
    rows:
      SGD: {select: {optim.name: sgd}}
      SGDP: {select: {optim.name: sgdp}, base: SGD}
      Adam: {select: {optim.name: adam}}
      AdamP: {select: {optim.name: adamp}, base: Adam}
    columns:
      Top-1: {}
    paper: {}
    figure: {kind: projection_pairs}
""")
    result = build_table(load_spec(paper)["pairs"], find_runs([sweep]))
    (path,) = write_table_figures([result], tmp_path / "figures")
    assert path == tmp_path / "figures" / "pairs-top-1.png" and path.stat().st_size > 20_000


def test_latex_and_csv_are_well_formed(sweep):
    runs = find_runs([sweep])
    specs = load_spec()
    for name in ("digits", "table1", "table4b", "table6", "toy2d"):
        spec = specs[name]
        result = build_table(spec, runs)
        tex = tables.render_latex(result)
        (ncols, rows), *pairs = _tabulars(tex)
        assert len(rows) == 2 + len(spec.rows), name
        assert ncols == 1 + len(spec.info_columns) + 3 * len(spec.columns)
        assert all(_latex_cells(line) == ncols for line in rows), (name, ncols, rows)
        (pair_cols, pair_rows), = pairs   # every one of these tables has projected optimizers
        assert len(pair_rows) == 1 + len(result.pairs) and all(_latex_cells(r) == pair_cols for r in pair_rows)
        assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") == 1
        assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 2
        code = "".join(line for line in tex.splitlines() if not line.startswith("%"))
        assert re.search(r"(?<!\\)[%#_&]", code.replace(" & ", " ")) is None, name  # specials escaped
        assert re.search(r"(?<!\$)[<>](?!\$)", code) is None, name  # < > are math (text mode prints ¡ ¿)
        assert code.count("Claim: ") == len(result.claims()) and code.count("Compute: ") == 1

        parsed = list(csv.DictReader(io.StringIO(tables.render_csv(result))))
        assert list(parsed[0]) == CSV_FIELDS
        cells = [row for row in parsed if row["record"] == "cell"]
        assert len(cells) == len(spec.rows) * len(spec.columns)
        assert [row["record"] for row in parsed[len(cells):]] == ["claim"] * len(result.claims()) + \
            ["compute"] * len(result.compute())
        for row in cells:
            assert row["table"] == name and int(row["n"]) >= 0
            for key in ("mean", "std", "ci_low", "ci_high", "paper", "delta", "delta_ci_low", "paper_delta"):
                assert row[key] == "" or isinstance(float(row[key]), float)
            assert (row["mean"] == "") == (int(row["n"]) == 0)
            assert (row["ci_low"] == "") == (int(row["n"]) < 2)
    digits_tex = tables.render_latex(build_table(specs["digits"], runs))
    assert "(n=2)" in digits_tex and r"$\pm$" in digits_tex
    table1_csv = tables.render_csv(build_table(specs["table1"], runs))
    assert "cell,table1,ResNet18,SGDP,val/top1,final,%,max,,,0,,,,,70.73,,,,ResNet18/SGD,,,,,,,untested (no runs),0.45," \
        in table1_csv



# -- statistics on made-up run sets, against hand-computed numbers ------------------------------
T1, T2 = math.tan(0.475 * math.pi), math.sqrt(2 * 0.95**2 / (1 - 0.95**2))  # t_0.975 at 1 and 2 df: 12.706, 4.303


def test_numbers_that_round_to_zero_print_without_a_minus_sign():
    # a toy delta of -1e-9 printed as "-0.00" in results/tables/toy2d.md
    assert tables._num(-1e-9, 2, sign=True) == "+0.00"
    assert tables._num(-0.004, 2) == "0.00"
    assert tables._num(-0.006, 2, sign=True) == "-0.01"
    assert tables._num(0.5, 1, sign=True) == "+0.5"


def test_t_interval_of_a_mean_and_the_quantiles_behind_it():
    assert stats.t_quantile(1) == pytest.approx(T1, rel=1e-9)        # Cauchy: tan(pi (0.975 - 0.5))
    assert stats.t_quantile(2) == pytest.approx(T2, rel=1e-9)        # 2 df: q / sqrt(2 + q^2) = 0.95
    assert stats.t_quantile(1e9) == pytest.approx(1.959964, abs=1e-6)  # the normal's
    ci = stats.mean_interval([1.0, 2.0, 3.0])                          # mean 2, std 1, se 1/sqrt(3)
    assert (ci.low, ci.high, ci.df) == (pytest.approx(2 - T2 / math.sqrt(3)), pytest.approx(2 + T2 / math.sqrt(3)), 2)
    assert stats.mean_interval([5.0]) is None and stats.mean_interval([]) is None
    tie = stats.mean_interval([4.0, 4.0])                              # no spread: a point
    assert (tie.low, tie.high) == (4.0, 4.0) and tie.contains(4.0) and not tie.contains(4.01)


def test_paired_welch_and_untested_comparisons():
    gain = stats.compare({0: 71.0, 1: 71.8, 2: 72.2}, {0: 70.0, 1: 71.0, 2: 71.0}, "max")
    # differences 1.0, 0.8, 1.2: mean 1.0, std 0.2, half width 4.303 * 0.2 / sqrt(3) = 0.497
    assert (gain.test, gain.pairs, gain.left_out, gain.verdict) == ("paired", 3, 0, stats.GAIN)
    assert gain.estimate == pytest.approx(1.0)
    assert (gain.interval.low, gain.interval.high) == (pytest.approx(1 - T2 * 0.2 / math.sqrt(3)),
                                                       pytest.approx(1 + T2 * 0.2 / math.sqrt(3)))
    # The same numbers where lower is better (a loss, perplexity): the projected one got worse.
    assert stats.compare({0: 71.0, 1: 71.8, 2: 72.2}, {0: 70.0, 1: 71.0, 2: 71.0}, "min").verdict == stats.REVERSED
    assert stats.compare({0: 70.0, 1: 71.0, 2: 71.0}, {0: 71.0, 1: 71.8, 2: 72.2}, "min").verdict == stats.GAIN
    # Ties: equal per seed -> a zero-width interval at 0, no clear difference.
    tie = stats.compare({0: 5.0, 1: 6.0}, {0: 5.0, 1: 6.0}, "max")
    assert (tie.estimate, tie.interval.low, tie.interval.high, tie.verdict) == (0.0, 0.0, 0.0, stats.NO_DIFFERENCE)
    # Partial pairing: seeds 0-2 shared, seed 3 (projected) and 4 (base) left out of the paired Δ.
    part = stats.compare({0: 2.0, 1: 3.0, 2: 4.0, 3: 100.0}, {0: 1.0, 1: 1.0, 2: 1.0, 4: -100.0}, "max")
    assert (part.test, part.pairs, part.left_out, part.estimate) == ("paired", 3, 2, pytest.approx(2.0))
    # Δ 1, 2, 3: mean 2, std 1, low end 2 - 4.303 / sqrt(3) = -0.48 (the left-out 100 and -100 play no part).
    assert part.interval.low == pytest.approx(2 - T2 / math.sqrt(3)) and part.verdict == stats.NO_DIFFERENCE
    # Fewer than two shared seeds: Welch over all runs. [1, 2, 3] vs [4, 6]: Δ -3, variances of the
    # means 1/3 and 1, df = (4/3)^2 / ((1/3)^2 / 2 + 1^2 / 1) = 32/19, t_0.975(32/19) = 5.17623.
    welch = stats.compare({0: 1.0, 1: 2.0, 2: 3.0}, {0: 4.0, 5: 6.0}, "max")
    assert (welch.test, welch.estimate, welch.interval.df) == ("welch", pytest.approx(-3.0), pytest.approx(32 / 19))
    assert welch.interval.high == pytest.approx(-3 + 5.1762316285 * math.sqrt(4 / 3), abs=1e-8)  # 2.977: holds 0
    assert welch.verdict == stats.NO_DIFFERENCE
    # Untested: a single run on a side (the Δ is still shown), no base runs, no runs.
    single = stats.compare({0: 3.0}, {0: 1.0, 1: 2.0}, "max")
    assert (single.estimate, single.interval, single.verdict, single.reason) == (pytest.approx(1.5), None, None, "n = 1")
    assert stats.compare({0: 3.0, 1: 4.0}, {}, "max").reason == "no base runs"
    assert stats.compare({}, {0: 1.0}, "max").reason == "no runs"
    # An interval that ends at 0 holds 0.
    assert stats.verdict(stats.Interval(0.0, 1.0, 2), "max") == stats.NO_DIFFERENCE
    assert stats.verdict(stats.Interval(-1.0, 0.0, 2), "min") == stats.NO_DIFFERENCE


def _imagenet(arch: str, optim: str, seed: int, top1: float, best: float | None = None, status: str = "completed",
              wall: float = 100.0) -> Run:
    metric = {"final": top1, **({"best": best} if best is not None else {})}
    config = {"task": {"name": "imagenet", "model": {"arch": arch}}, "optim": {"name": optim, "weight_decay": 1e-4},
              "seed": seed}
    return Run(id=f"in{next(_ids)}", config=config, summary={
        "status": status, "seed": seed, "metrics": {"val/top1": metric}, "wall_seconds": wall, "world_size": 8,
        "device": "cuda:0"})


def test_a_made_up_table1_gets_intervals_verdicts_claims_and_compute():
    runs = []
    for seed, (sgd, sgdp, adam, adamp) in enumerate([(70.0, 71.0, 70.3, 70.3), (70.2, 71.0, 70.5, 70.5),
                                                      (70.1, 71.2, 70.4, 70.4)]):
        runs += [_imagenet("resnet18", "sgd", seed, sgd), _imagenet("resnet18", "sgdp", seed, sgdp),
                 _imagenet("resnet18", "adamw", seed, adam), _imagenet("resnet18", "adamp", seed, adamp)]
    runs += [_imagenet("resnet50", "sgd", 0, 76.0), _imagenet("resnet50", "sgdp", 0, 76.5),
             _imagenet("resnet50", "adamw", 0, 76.2, status="failed", wall=50.0)]
    result = build_table(load_spec()["table1"], runs)
    sgd = result.cells[("ResNet18", "SGD")]            # 70.0, 70.2, 70.1: mean 70.1, std 0.1
    assert (sgd.n, sgd.mean, sgd.std) == (3, pytest.approx(70.1), pytest.approx(0.1))
    assert sgd.interval.low == pytest.approx(70.1 - T2 * 0.1 / math.sqrt(3))   # 69.85
    assert sgd.paper_in_interval is True                                          # 70.28 < 70.35
    assert result.cells[("ResNet18", "SGDP")].paper_in_interval is False          # 70.73 < 70.88
    sgdp = result.cells[("ResNet18", "SGDP")].comparison                          # Δ 1.0, 0.8, 1.1
    assert (sgdp.test, sgdp.estimate, sgdp.verdict) == ("paired", pytest.approx(29 / 30), stats.GAIN)
    assert result.cells[("ResNet18", "AdamP")].comparison.verdict == stats.NO_DIFFERENCE  # ties
    assert result.cells[("ResNet50", "SGDP")].comparison.reason == "n = 1"
    assert result.cells[("ResNet50", "AdamP")].comparison.reason == "no runs"
    assert [c.text() for c in result.claims()] == [
        "SGDP > SGD: gain reproduced in 1 of 4 rows, untested in 3 (n = 1, no runs); paper: a gain in 4 of 4",
        "AdamP > AdamW: gain reproduced in 0 of 4 rows, no clear difference in 1, untested in 3 (no runs); "
        "paper: a gain in 4 of 4"]
    # 14 runs x 100 s x 8 GPUs + the failed one, 50 s x 8: 11600 s.
    assert tables.compute_line(result).startswith("Compute: cuda 3.2 h in 15 runs (wall time x world size")
    markdown = tables.render_markdown(result)
    assert "| ResNet18 | 11.7M | 70.10 ± 0.10 [69.85, 70.35] (n=3) · paper 70.28 ∈ CI | " in markdown
    assert "71.07 ± 0.12 [70.78, 71.35] (n=3) · paper 70.73 ∉ CI" in markdown
    assert "| SGDP − SGD | ResNet18 | +0.97 | [+0.59, +1.35] | 3 paired seeds | gain reproduced | +0.45 |" in markdown
    assert "| SGDP − SGD | ResNet50 | +0.50 |  | 1 + 1 runs | untested (n = 1) | +0.07 |" in markdown
    assert "Claim: SGDP > SGD: gain reproduced in 1 of 4 rows" in markdown
    assert "excluded: 1 failed (ResNet50/AdamW seed 0)" in markdown
    tex = tables.render_latex(result)
    assert r"70.73$^\dagger$" in tex and r"70.28$^\dagger$" not in tex and "outside our 95" in tex


def _spec_with(tmp_path, yaml_text: str) -> tables.TableSpec:
    path = tmp_path / "paper.yaml"
    path.write_text(yaml_text)
    return load_spec(path)["t"]


BEST_TABLE = """
tables:
  t:
    title: "Made up: best epoch on one row"
    metric: val/top1
    direction: max
    rows:
      ResNet18: {select: {task.model.arch: resnet18}}
      ResNet50 + CutMix: {select: {task.model.arch: resnet50}, value: best}
    columns:
      SGD: {select: {optim.name: sgd}}
      SGDP: {select: {optim.name: sgdp}, base: SGD}
    paper:
      ResNet18: {SGD: 70.0, SGDP: 70.5}
      ResNet50 + CutMix: {SGD: 77.61, SGDP: 77.72}
"""


def test_best_valued_cells_show_the_best_as_the_paper_and_the_final_beside_it(tmp_path):
    spec = _spec_with(tmp_path, BEST_TABLE)
    runs = [_imagenet("resnet50", "sgd", 0, 77.0, best=77.6), _imagenet("resnet50", "sgd", 1, 77.2, best=77.8),
            _imagenet("resnet50", "sgdp", 0, 77.1, best=78.0), _imagenet("resnet50", "sgdp", 1, 77.3, best=78.2),
            _imagenet("resnet50", "sgdp", 2, 77.4),                 # no best recorded: left out
            _imagenet("resnet18", "sgd", 0, 70.0, best=71.0)]
    result = build_table(spec, runs)
    cutmix = result.cells[("ResNet50 + CutMix", "SGDP")]
    assert (cutmix.which, cutmix.n, cutmix.mean, cutmix.final_mean) == ("best", 2, pytest.approx(78.1), pytest.approx(77.2))
    assert cutmix.comparison.estimate == pytest.approx(0.4)       # best minus best, paired
    assert result.cells[("ResNet18", "SGD")].mean == 70.0          # the table's own value: final
    assert result.excluded == {"without a best val/top1": {runs[4].id: "ResNet50 + CutMix/SGDP seed 2"}}
    markdown = tables.render_markdown(result)
    assert "(final (best where marked) val/top1" in markdown
    assert "78.10 ± 0.14 [76.83, 79.37] (n=2, best); final 77.20 ± 0.14 · paper 77.72 ∈ CI" in markdown
    assert "best: the run's best evaluation" in markdown
    row = next(r for r in csv.DictReader(io.StringIO(tables.render_csv(result)))
               if r["row"] == "ResNet50 + CutMix" and r["column"] == "SGDP")
    assert (row["value"], row["mean"], row["final_mean"]) == ("best", "78.1", "77.2")
    with pytest.raises(tables.SpecError, match="row 'ResNet18': value must be one of final, best, selected"):
        _spec_with(tmp_path, BEST_TABLE.replace("{select: {task.model.arch: resnet18}}",
                                                "{select: {task.model.arch: resnet18}, value: last}"))


def test_derived_average_is_taken_per_seed_and_compared_like_any_cell():
    def run(optim, rho, seed, value):
        return Run(id=f"b{next(_ids)}", config={"task": {"name": "biased_mnist", "data": {"rho": rho}},
                                                 "optim": {"name": optim}, "seed": seed},
                   summary={"status": "completed", "seed": seed, "metrics": {"test/unbiased_top1": {"final": value}}})
    rhos = (0.999, 0.997, 0.995, 0.99)
    runs = [run("adam", r, s, 10.0 * (k + 1) + s) for k, r in enumerate(rhos) for s in (0, 1)]  # avg 25 + seed
    runs += [run("adamp", r, s, 10.0 * (k + 1) + 2 + s * 0.5) for k, r in enumerate(rhos) for s in (0, 1, 2)]
    runs.remove(next(r for r in runs if r.config["optim"]["name"] == "adamp" and r.config["seed"] == 2
                     and r.config["task"]["data"]["rho"] == 0.99))  # seed 2 lacks a column: not averaged
    result = build_table(load_spec()["table4b"], runs)
    adam, adamp = result.cells[("Adam", "avg")], result.cells[("AdamP", "avg")]
    assert adam.samples == {0: 25.0, 1: 26.0} and adamp.samples == {0: 27.0, 1: 27.5}
    assert adamp.comparison.test == "paired" and adamp.comparison.estimate == pytest.approx(1.75)
    assert "(n=2, per seed the mean of 4)" in tables.render_markdown(result)


def test_wandb_summary_written_at_finish_rebuilds_the_same_table(sweep, monkeypatch):
    """records.WandbLogger.finish puts summary.json's metrics and run facts into the W&B run's
    summary; a table built from those recorded W&B runs equals the one built from the run
    directories, intervals, verdicts and compute included."""
    from projbench.records import WandbLogger

    class Recorded:                      # the W&B run object, as far as finish() touches it
        def __init__(self):
            self.summary, self.exit_code = {}, None

        def finish(self, exit_code):
            self.exit_code = exit_code

    dir_runs = find_runs([sweep])
    wandb_runs = []
    for k, run in enumerate(dir_runs):
        logger = WandbLogger.__new__(WandbLogger)
        logger.run, logger._warned = Recorded(), False
        logger.finish(run.summary)
        assert logger.run.exit_code == 0 and logger._warned is False
        fake = _FakeWandbRun(f"w{k}", "", 0, 0.0)
        fake.config = OmegaConf.to_container(run.config, resolve=True)
        # W&B's own last values of the logged series stay beside what finish() added.
        fake.summary_metrics = {"test/top1": -1.0, "_runtime": 1e6, **logger.run.summary}
        wandb_runs.append(fake)
    from_wandb = runs_from_wandb("me/projbench", api=_FakeApi(wandb_runs))
    spec = load_spec()["digits"]
    assert tables.render_markdown(build_table(spec, from_wandb)) == tables.render_markdown(build_table(spec, dir_runs))
