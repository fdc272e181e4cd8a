"""Biased-MNIST (Table 4b): the IDX reader and its errors, the colour bias, the fixture, one
training step and evaluation end to end, and the Table 4b sweep."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets.mnist import read_image_file, read_label_file

from conftest import make_cfg, run_cli, sweep_cells
from projbench.data.mnist import IDX_FILES, colour_labels, read_mnist, write_idx, write_mnist_fixture
from projbench.distributed import DistInfo
from projbench.errors import ConfigError, DataError
from projbench.tables import Run, build_table, load_spec
from projbench.tasks.biased_mnist import BiasedMNISTTask
from projbench.train import build_trainer

BASE = ["task=biased_mnist", "logger=none", "trainer.progress=false"]
TINY = ["task.model.f.kwargs.channels=[8,16]", "task.model.g.kwargs.channels=[8,16]", "task.data.batch_size=16"]


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mnist")
    write_mnist_fixture(root)
    return root


def ready_task(root: Path, *overrides: str) -> BiasedMNISTTask:
    task = BiasedMNISTTask(make_cfg(BASE + [f"task.data.root={root}", *overrides]).task)
    task.setup(DistInfo())
    return task


# -- the IDX reader ---------------------------------------------------------------------------
def test_reader_reads_official_idx_files_gzipped_or_not_as_torchvision_does(fixture_root, tmp_path):
    plain = tmp_path / "MNIST" / "raw"  # torchvision's download folder, unpacked
    plain.mkdir(parents=True)
    for name in (n for pair in IDX_FILES.values() for n in pair):
        (plain / name).write_bytes(gzip.decompress((fixture_root / f"{name}.gz").read_bytes()))
    for split, (images_name, labels_name) in IDX_FILES.items():
        images, labels = read_mnist(fixture_root, split)
        assert images.shape == ({"train": 640, "test": 200}[split], 28, 28) and images.dtype == np.uint8
        assert np.array_equal(np.bincount(labels), np.full(10, {"train": 64, "test": 20}[split]))
        assert np.array_equal(read_image_file(str(plain / images_name)).numpy(), images)
        assert np.array_equal(read_label_file(str(plain / labels_name)).numpy(), labels)
        unpacked_images, unpacked_labels = read_mnist(tmp_path, split)
        assert np.array_equal(unpacked_images, images) and np.array_equal(unpacked_labels, labels)
    assert (images[:, :2] == 0).all() and (images > 0).any(), "digits on an exact-zero background"


@pytest.mark.parametrize("damage, message", [
    ("missing", "not found"),
    ("truncated_gzip", "cannot be read"),
    ("short_data", "truncated or corrupt"),
    ("not_idx", "is not an IDX file"),
    ("label_count", "labels for the"),
    ("label_value", "MNIST's labels are 0-9"),
])
def test_damaged_files_are_one_line_data_errors_naming_the_file(damage, message, fixture_root, tmp_path):
    root = Path(shutil.copytree(fixture_root, tmp_path / "mnist"))
    images, labels = root / "train-images-idx3-ubyte.gz", root / "train-labels-idx1-ubyte.gz"
    target = labels if damage.startswith("label") else images
    if damage == "missing":
        images.unlink()
    elif damage == "truncated_gzip":
        images.write_bytes(images.read_bytes()[:100])
    elif damage == "short_data":
        data = gzip.decompress(images.read_bytes())
        images.write_bytes(gzip.compress(data[:-28]))
    elif damage == "not_idx":
        images.write_bytes(gzip.compress(b"\x1f\x8b not an idx file at all"))
    elif damage == "label_count":
        write_idx(labels, np.zeros(5, np.uint8))
    else:
        write_idx(labels, np.full(640, 10, np.uint8))
    with pytest.raises(DataError, match=message) as info:
        read_mnist(root, "train")
    text = str(info.value)
    assert str(target.with_suffix("") if damage == "missing" else target) in text and "\n" not in text


def test_missing_data_exits_2_with_one_line_before_training(tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli(BASE + [f"task.data.root={tmp_path / 'nowhere'}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert out.returncode == 2, out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "train-images-idx3-ubyte" in error[0] and "task.data.fixture=true" in error[0]
    assert "Traceback" not in out.stderr and not (run_dir / "metrics.jsonl").exists()


# -- the colour bias --------------------------------------------------------------------------
def test_colours_follow_the_class_with_the_asked_correlation():
    labels = np.repeat(np.arange(10), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])  # MNIST's train counts
    for rho in (0.999, 0.997, 0.995, 0.990):
        colours = colour_labels(labels, rho, 10, np.random.default_rng(0))
        for c in range(10):
            mine = colours[labels == c]
            assert (mine == c).sum() == int(len(mine) * rho)
            rest = len(mine) - int(len(mine) * rho)
            chunk = -(-rest // 9)  # the rest goes to other colours in chunks of ceil(rest / 9), as upstream
            other = np.bincount(mine[mine != c], minlength=10)
            assert other[c] == 0 and sorted(other[other > 0], reverse=True) == (
                [chunk] * (rest // chunk) + ([rest % chunk] if rest % chunk else []))
    test = np.repeat(np.arange(10), 1000)
    unbiased = colour_labels(test, 0.1, 10, np.random.default_rng(0))
    table = np.zeros((10, 10), int)
    np.add.at(table, (test, unbiased), 1)
    assert (table == 100).all(), "rho 0.1: every colour equally often in every class"
    assert (colour_labels(test, 1.0, 10, np.random.default_rng(0)) == test).all()


def test_task_draws_backgrounds_in_the_class_colour_at_rate_rho(fixture_root):
    task = ready_task(fixture_root, "task.data.rho=0.9", "task.data.bias_seed=3")
    palette = torch.tensor(list(task.cfg.data.colours), dtype=torch.float32) / 127.5 - 1
    image, label = task.train_dataset()[0]
    assert image.shape == (3, 28, 28) and image.min() >= -1 and image.max() <= 1
    train = task.train_dataset()
    corner = torch.stack([train[i][0][:, 0, 0] for i in range(len(train))])  # always background
    own = (corner - palette[train.labels]).abs().amax(1) < 1e-6
    assert own.sum().item() == 10 * int(64 * 0.9)
    strokes = torch.stack([train[i][0] for i in range(len(train))]).amin(1) > 0.99
    assert strokes.any(), "digits are drawn white"
    unbiased, biased, labels = task.eval_datasets()["test"][:]
    test_corner = torch.stack([unbiased[:, :, 0, 0], biased[:, :, 0, 0]])
    own_test = (test_corner - palette[labels]).abs().amax(-1) < 1e-6
    assert own_test[1].all() and own_test[0].float().mean().item() == pytest.approx(0.1, abs=0.01)
    again = ready_task(fixture_root, "task.data.rho=0.9", "task.data.bias_seed=3")
    assert torch.equal(again.train_dataset().renderings[0], train.renderings[0]), "the seed fixes the colouring"
    with pytest.raises(ConfigError, match="task.data.rho"):
        ready_task(fixture_root, "task.data.rho=1.5")
    for key, value in (("sigma", "mean"), ("sigma", "0"), ("g_lambda", "-1")):
        with pytest.raises(ConfigError, match=f"task.rebias.{key}"):
            ready_task(fixture_root, f"task.rebias.{key}={value}")


# -- training ---------------------------------------------------------------------------------
def test_fixture_settings_are_small_and_the_command_line_wins():
    assert make_cfg(BASE + ["task.data.fixture=true"]).task.data.batch_size == 32
    assert make_cfg(BASE).task.data.batch_size == 256
    assert make_cfg(BASE + ["task.data.fixture=true", "task.data.batch_size=64"]).task.data.batch_size == 64


def test_one_step_and_evaluation_end_to_end_on_the_fixture(tmp_path):
    cfg = make_cfg(BASE + TINY + ["task.data.fixture=true", f"paths.data_dir={tmp_path}", "optim=adamp",
                                  "trainer.max_steps=2", "trainer.log_every=1"])
    trainer = build_trainer(cfg, tmp_path / "run")
    assert [m.kernel_size for m in trainer.model.g.modules() if isinstance(m, torch.nn.Conv2d)] == [(1, 1)] * 2
    assert [m.kernel_size for m in trainer.model.f.modules() if isinstance(m, torch.nn.Conv2d)] == [(7, 7)] * 2
    before = [p.detach().clone() for p in trainer.model.g.parameters()]
    final = trainer.fit()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.g.parameters())), "g trains too"
    for name in ("unbiased_top1", "biased_top1", "g_unbiased_top1", "g_biased_top1"):
        assert 0 <= final[f"test/{name}"] <= 100, final
    losses = [p["value"] for p in trainer.recorder.history() if (p["split"], p["name"]) == ("train", "loss")]
    assert len(losses) == 2 and np.isfinite(losses).all() and np.isfinite(final["test/hsic"])
    assert (tmp_path / "fixtures" / "mnist" / "train-images-idx3-ubyte.gz").is_file()


# -- the Table 4b sweep -----------------------------------------------------------------------
def test_table4b_sweep_fills_each_cell_of_the_table_once_per_seed():
    cells = sweep_cells("biased_mnist_table4b")
    assert len(cells) == 24
    runs = []
    for k, cfg in enumerate(cells):
        assert (cfg.task.name, cfg.task.data.batch_size, cfg.trainer.max_epochs) == ("biased_mnist", 256, 80)
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.trainer.schedule.name, cfg.trainer.schedule.step_size) == (
            1e-3, 1e-4, "step", 20)
        assert cfg.task.data.bias_seed == cfg.seed
        runs.append(Run(id=f"run{k}", config=cfg, summary={"status": "completed", "seed": cfg.seed,
                                                           "metrics": {"test/unbiased_top1": {"final": float(k)}}}))
    table = build_table(load_spec()["table4b"], runs)
    rhos = {0.999: "rho .999", 0.997: "rho .997", 0.995: "rho .995", 0.99: "rho .990"}
    expected: dict = {}
    for k, cfg in enumerate(cells):
        expected.setdefault(({"adam": "Adam", "adamp": "AdamP"}[cfg.optim.name], rhos[cfg.task.data.rho]), []).append(k)
    assert len(expected) == 8
    for cell, ks in expected.items():
        assert table.cells[cell].n == 3 and table.cells[cell].mean == pytest.approx(np.mean(ks))
    for row in ("Adam", "AdamP"):
        assert table.cells[(row, "avg")].mean == pytest.approx(np.mean([table.cells[(row, c)].mean for c in rhos.values()]))
