"""9-class ImageNet (Table 4c): the super-class mapping, the readers of the ImageNet subset, the
texture clusters and ImageNet-A with their errors, ReBias's unbiased accuracy, one training step
and evaluation end to end, and the Table 4c sweep."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from conftest import make_cfg, sweep_cells
from projbench.data.imagenet9 import IMAGENET_A_OTHER, OTHER_WNIDS
from projbench.distributed import DistInfo
from projbench.errors import ConfigError, DataError
from projbench.tables import Run, build_table, load_spec
from projbench.tasks.imagenet9 import ClusterBalancedAccuracy, ImageNet9Task
from projbench.tasks.rebias import epoch_median_sigmas
from projbench.train import build_trainer

BASE = ["task=imagenet9", "logger=none", "trainer.progress=false", "task.data.image_size=32"]
TIMM_INFO = Path(timm.__file__).parent / "data" / "_info"


def fixture_cfg(data_dir: Path, *overrides: str):
    return make_cfg(BASE + ["task.data.fixture=true", f"paths.data_dir={data_dir}", *overrides])


def ready_task(cfg) -> ImageNet9Task:
    task = ImageNet9Task(cfg.task)
    task.setup(DistInfo())
    return task


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """`paths.data_dir` whose 9-class fixture the task itself wrote (once for the module)."""
    root = tmp_path_factory.mktemp("data")
    ready_task(fixture_cfg(root))
    return root


@pytest.fixture
def real(data_dir, tmp_path):
    """A copy of the fixture used as real data: (overrides pointing at it, its root)."""
    root = Path(shutil.copytree(data_dir / "fixtures" / "imagenet9", tmp_path / "copy"))
    return [f"task.data.root={root}", f"task.data.imagenet_a={root / 'imagenet-a'}",
            f"task.data.clusters={root / '9class_imagenet_val.csv'}", "task.unbiased_min_images=1"], root


# -- the mapping ------------------------------------------------------------------------------
def test_superclasses_are_rebias_index_ranges_over_imagenets_sorted_wnids():
    """Upstream datasets/imagenet.py picks its 42 classes by index in the sorted list of the 1,000
    ImageNet wnids (RESTRICTED_RANGES, with a few kept of the dog, bird and monkey ranges); the
    config lists them by wnid. timm ships the sorted list."""
    wnids = (TIMM_INFO / "imagenet_synsets.txt").read_text().split()
    assert len(wnids) == 1000 and wnids == sorted(wnids)
    ranges = {"dog": [151, 207, 234, 235, 254], "cat": range(281, 286), "frog": range(30, 33),
              "turtle": range(33, 38), "bird": [89, 90, 94, 96, 97], "monkey": [372, 373, 374, 375, 378],
              "fish": range(393, 398), "crab": range(118, 122), "insect": range(306, 311)}
    superclasses = make_cfg(["task=imagenet9"]).task.superclasses
    assert list(superclasses) == list(ranges)
    for name, indices in ranges.items():
        assert list(superclasses[name]) == [wnids[i] for i in indices], name
    imagenet_a = set((TIMM_INFO / "imagenet_a_synsets.txt").read_text().split())
    assert len(imagenet_a) == 200
    assert len(imagenet_a & {w for ws in superclasses.values() for w in ws}) == 21


# -- readers ----------------------------------------------------------------------------------
def test_fixture_layout_is_read_as_nine_classes_with_clusters_and_imagenet_a(data_dir):
    root = data_dir / "fixtures" / "imagenet9"
    assert {p.name for p in (root / "train").iterdir()} >= set(OTHER_WNIDS)
    assert (root / "imagenet-a" / "README.txt").is_file() and (root / "imagenet-a" / IMAGENET_A_OTHER).is_dir()
    task = ready_task(fixture_cfg(data_dir))
    superclasses = task.cfg.superclasses
    assert task.num_classes == 9
    train = task.train_dataset()
    assert len(train) == 42 * 3 and not any(w in path for path, _ in train.samples for w in OTHER_WNIDS)
    for path, label in train.samples:
        assert Path(path).parent.name in superclasses[list(superclasses)[label]]
    val, imagenet_a = task.eval_datasets()["test"].datasets
    assert len(val) == 42 * 2 and val.source == 0 and imagenet_a.source == 1
    image, label, clusters, source = val[5]
    assert image.shape == (3, 32, 32) and clusters.shape == (3,) and source == 0
    assert (imagenet_a.clusters == -1).all()
    mapped = {w for ws in superclasses.values() for w in ws}
    folders = {Path(path).parent.name for path, _ in imagenet_a.folder.samples}
    assert folders == {p.name for p in (root / "imagenet-a").iterdir() if p.is_dir()} - {IMAGENET_A_OTHER}
    assert folders < mapped and task.cluster_shape[0] == 3
    lines = (root / "9class_imagenet_val.csv").read_text().splitlines()
    assert lines[0] == "path,category,cluster1,cluster2,cluster3" and len(lines) == 1 + 42 * 2
    by_path = {line.split(",")[0]: [int(v) for v in line.split(",")[2:]] for line in lines[1:]}
    for k, (path, _) in enumerate(val.folder.samples):
        assert val.clusters[k].tolist() == by_path["/".join(Path(path).parts[-2:])]


def _edit_csv(path: Path, edit) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


@pytest.mark.parametrize("damage, where, message", [
    ("missing_val_class", "val", "lacks 1 of the 42 class folders"),
    ("missing_clusters", "csv", "not found"),
    ("csv_header", "csv", "expected path,category,cluster1"),
    ("csv_category", "csv", "is labelled 'cat'"),
    ("csv_unlisted_image", "csv", "has no line for"),
    ("csv_not_integer", "csv", "are not integers"),
    ("missing_imagenet_a", "imagenet-a", "not found"),
    ("empty_imagenet_a", "imagenet-a", "lacks"),
])
def test_damaged_data_is_a_data_error_naming_the_path(damage, where, message, real):
    overrides, root = real
    csv = root / "9class_imagenet_val.csv"
    if damage == "missing_val_class":
        shutil.rmtree(root / "val" / "n02085620")
    elif damage == "missing_clusters":
        csv.unlink()
    elif damage == "csv_header":
        _edit_csv(csv, lambda lines: ["file,category,cluster1"] + lines[1:])
    elif damage == "csv_category":
        _edit_csv(csv, lambda lines: lines[:1] + [lines[1].replace(",frog,", ",cat,")] + lines[2:])
    elif damage == "csv_unlisted_image":
        _edit_csv(csv, lambda lines: lines[:-1])
    elif damage == "csv_not_integer":
        _edit_csv(csv, lambda lines: lines[:1] + [lines[1].rsplit(",", 1)[0] + ",x"] + lines[2:])
    elif damage == "missing_imagenet_a":
        shutil.rmtree(root / "imagenet-a")
    else:
        for folder in (root / "imagenet-a").iterdir():
            if folder.is_dir() and folder.name != IMAGENET_A_OTHER:
                shutil.rmtree(folder)
    with pytest.raises(DataError, match=message) as info:
        ready_task(make_cfg(BASE + overrides))
    path = {"val": root / "val", "csv": csv, "imagenet-a": root / "imagenet-a"}[where]
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_imagenet_is_one_line_naming_the_folder_and_the_fixture(tmp_path):
    # The CLI turns this DataError into `error: <the line>` and exit code 2 (tests/test_biased_mnist.py
    # checks that path for the ReBias tasks' configs).
    with pytest.raises(DataError) as info:
        ready_task(make_cfg(BASE + [f"paths.data_dir={tmp_path}"]))
    text = str(info.value)
    assert text.startswith(f"{tmp_path}/imagenet/train: not found") and "task.data.fixture=true" in text
    assert "\n" not in text


# -- metrics ----------------------------------------------------------------------------------
def test_unbiased_accuracy_averages_the_cells_with_enough_images_equally():
    """Two clusterings, 2 classes x 2 clusters. Clustering 1: cells (0, 0) 3/4 right, (0, 1) 1
    image (left out at min 2), (1, 1) 0/2 -> (0.75 + 0) / 2. Clustering 2: (0, 0) 4/5, (1, 0)
    0/2 -> 0.4. Mean: 0.3875."""
    metric = ClusterBalancedAccuracy(num_classes=2, num_clusters=2, clusterings=2, min_images=2)
    targets = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    preds = torch.tensor([0, 0, 0, 1, 0, 0, 0])
    clusters = torch.tensor([[0, 0], [0, 0], [0, 0], [0, 0], [1, 0], [1, 0], [1, 0]])
    metric.update(preds[:4], targets[:4], clusters[:4])
    metric.update(preds[4:], targets[4:], clusters[4:])
    assert metric.compute().item() == pytest.approx((0.75 / 2 + 0.4) / 2)
    plain = (preds == targets).float().mean().item()
    assert plain == pytest.approx(4 / 7)


def test_one_step_and_evaluation_end_to_end_on_the_fixture(data_dir, tmp_path):
    cfg = fixture_cfg(data_dir, "optim=adamp", "trainer.max_steps=1", "task.data.batch_size=8")
    trainer = build_trainer(cfg, tmp_path / "run")
    assert type(trainer.model.g).__name__ == "BagNet18" and trainer.task.model_name() == "resnet18_vs_bagnet18"
    final = trainer.fit()
    for name in ImageNet9Task.metrics:
        assert f"test/{name}" in final, (name, final)
        assert name == "hsic" or 0 <= final[f"test/{name}"] <= 100
    without = fixture_cfg(data_dir, "trainer.max_steps=1", "task.data.batch_size=8", "task.data.imagenet_a=null",
                          "task.data.clusters=null")
    final = build_trainer(without, tmp_path / "run2").fit()
    assert "test/biased_top1" in final and not {"test/imagenet_a_top1", "test/unbiased_top1"} & set(final)


# -- the Table 4c sweep -----------------------------------------------------------------------
class _Features(torch.nn.Module):
    """A stand-in ReBiasPair: f's features are the inputs, g's twice them; counts its batches."""

    def __init__(self):
        super().__init__()
        self.batches = 0

    def forward(self, x):
        self.batches += 1
        return None, x, None, 2 * x


def test_epoch_bandwidths_are_the_median_over_a_quarter_of_the_training_set_as_upstream():
    points = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(points, torch.zeros(12, dtype=torch.long))
    # one batch of all 12 points: the median of all 144 squared distances, the 12 zeros included
    model = _Features()
    loader = torch.utils.data.DataLoader(data, batch_size=12)
    sigma_f, sigma_g = epoch_median_sigmas(model, loader, 0.25, seed=0, device=torch.device("cpu"))
    expected = np.sqrt(np.median(((points[:, None] - points[None]) ** 2).sum(-1).numpy()))
    assert (sigma_f, sigma_g) == pytest.approx((expected, 2 * expected), rel=1e-5)
    # 6 batches of 2: upstream stops after index int(6 * 0.25) = 1, so 2 batches are read
    model = _Features()
    epoch_median_sigmas(model, torch.utils.data.DataLoader(data, batch_size=2), 0.25, seed=0,
                        device=torch.device("cpu"))
    assert model.batches == 2
    model = _Features()
    epoch_median_sigmas(model, torch.utils.data.DataLoader(data, batch_size=2), 1.0, seed=0, device=torch.device("cpu"))
    assert model.batches == 6


def test_imagenet9_takes_its_bandwidths_once_per_epoch_and_checkpoints_them(data_dir, tmp_path):
    cfg = fixture_cfg(data_dir, "optim=adamp", "trainer.max_steps=3", "task.data.batch_size=8")
    assert (cfg.task.rebias.sigma, cfg.task.rebias.median_over, cfg.task.rebias.median_fraction) == ("median", "epoch", 0.25)
    trainer = build_trainer(cfg, tmp_path / "run")
    seen = []
    original = trainer.task.epoch_start

    def spy(model, epoch, *args):
        original(model, epoch, *args)
        seen.append((epoch, trainer.task.sigmas))

    trainer.task.epoch_start = spy
    trainer.fit()
    steps_per_epoch = trainer.steps_per_epoch
    assert [epoch for epoch, _ in seen] == list(range(-(-3 // steps_per_epoch)))  # once per epoch begun
    sigmas = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["task"]["sigmas"]
    assert list(seen[-1][1]) == sigmas and all(s > 0 for s in sigmas)
    resumed = ImageNet9Task(cfg.task)
    resumed.load_state_dict({"sigmas": sigmas})
    assert resumed.sigmas == tuple(sigmas)
    with pytest.raises(ConfigError, match="task.rebias.median_over"):
        ImageNet9Task(fixture_cfg(data_dir, "task.rebias.median_over=step").task)


def test_table4c_sweep_fills_each_cell_of_the_table_once():
    cells = sweep_cells("imagenet9_table4c", "paths.data_dir=/datasets")
    assert sorted(c.optim.name for c in cells) == ["adam", "adamp"]
    runs = []
    for k, cfg in enumerate(cells):
        assert (cfg.task.name, cfg.task.data.batch_size, cfg.task.data.image_size) == ("imagenet9", 128, 224)
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.trainer.max_epochs, cfg.trainer.schedule.name) == (
            1e-3, 1e-4, 120, "cosine")
        assert (cfg.task.data.imagenet_a, cfg.task.data.clusters) == (
            "/datasets/imagenet-a", "/datasets/rebias/9class_imagenet_val.csv")
        metrics = {f"test/{name}": {"final": 10.0 * k + i}
                   for i, name in enumerate(("biased_top1", "unbiased_top1", "imagenet_a_top1"))}
        runs.append(Run(id=f"run{k}", config=cfg, summary={"status": "completed", "seed": 0, "metrics": metrics}))
    table = build_table(load_spec()["table4c"], runs)
    assert len(table.cells) == 6 and all(cell.n == 1 for cell in table.cells.values())
    for k, cfg in enumerate(cells):
        row = {"adam": "Adam", "adamp": "AdamP"}[cfg.optim.name]
        for i, column in enumerate(("Biased", "Unbiased", "ImageNet-A")):
            assert table.cells[(row, column)].mean == 10.0 * k + i


def test_fixture_settings_are_small():
    cfg = make_cfg(["task=imagenet9", "task.data.fixture=true"])
    assert (cfg.task.data.batch_size, cfg.task.data.image_size, cfg.task.unbiased_min_images) == (16, 64, 1)
    assert cfg.task.data.imagenet_a.endswith("fixtures/imagenet9/imagenet-a")
