"""ImageNet (Tables 1 and 2): the class-folder layout and its fixture, clear data errors, bad
images, learning on the fixture, CutMix, and the table recipes."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from conftest import fixture_batches, fixture_cfg, make_cfg, run_cli
from projbench.data.image_folder import BadImageError
from projbench.data.transforms import IMAGENET_EIGENVALUES, IMAGENET_EIGENVECTORS, PCALighting
from projbench.distributed import DistInfo
from projbench.errors import ConfigError, DataError
from projbench.sweeps import compose_cells
from projbench.tasks.imagenet import FIXTURE, ImageNetTask, imagenet_transforms
from projbench.train import build_trainer

SIZE = 32  # image_size of the tests: a tiny ResNet at 32x32 trains in seconds on a CPU
BASE = ["task=imagenet", "logger=none", "trainer.progress=false", "task.model.arch=resnet10t",
        f"task.data.image_size={SIZE}", "task.data.batch_size=16", "task.data.num_workers=0"]


def imagenet_cfg(data_dir: Path, *overrides: str):
    return make_cfg(BASE + ["task.data.fixture=true", f"paths.data_dir={data_dir}", *overrides])


def ready_task(cfg) -> ImageNetTask:
    task = ImageNetTask(cfg.task)
    task.setup(DistInfo())
    return task



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """`paths.data_dir` whose ImageNet fixture the task itself wrote (once for the module)."""
    root = tmp_path_factory.mktemp("data")
    ready_task(imagenet_cfg(root))
    return root


def test_fixture_true_alone_brings_the_fixture_sizes(data_dir):
    cfg = fixture_cfg("imagenet", data_dir)
    assert (cfg.task.data.batch_size, cfg.task.data.image_size, cfg.task.model.arch) == (16, 32, "resnet10t")
    assert fixture_batches(cfg) >= 1


def real_copy(data_dir: Path, tmp_path: Path) -> Path:
    """A copy of the fixture to use as a real data set (task.data.fixture=false)."""
    return Path(shutil.copytree(data_dir / "fixtures" / "imagenet", tmp_path / "imagenet"))


def real_cfg(root: Path, *overrides: str):
    return make_cfg(BASE + [f"task.data.root={root}", "task.num_classes=4", *overrides])


# -- layout, fixture, reader ------------------------------------------------------------------
def test_fixture_is_written_in_the_official_layout_and_read_by_the_reader(data_dir):
    root = data_dir / "fixtures" / "imagenet"
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert len(classes) == FIXTURE["classes"]
    assert all(len(c) == 9 and c[0] == "n" and c[1:].isdigit() for c in classes), classes
    assert sorted(p.name for p in (root / "val").iterdir()) == classes
    for c in classes:
        assert len(list((root / "train" / c).glob("*.JPEG"))) == FIXTURE["train_per_class"]
        assert len(list((root / "val" / c).glob("ILSVRC2012_val_*.JPEG"))) == FIXTURE["val_per_class"]

    mtime = (root / "train").stat().st_mtime_ns
    task = ready_task(imagenet_cfg(data_dir))  # a second run reads the cached fixture
    assert (root / "train").stat().st_mtime_ns == mtime
    assert task.num_classes == FIXTURE["classes"]
    train, val = task.train_dataset(), task.eval_datasets()["val"]
    assert len(train) == FIXTURE["classes"] * FIXTURE["train_per_class"]
    assert len(val) == FIXTURE["classes"] * FIXTURE["val_per_class"]
    assert train.class_to_idx == val.class_to_idx == {c: i for i, c in enumerate(classes)}
    image, label = val[len(val) - 1]
    assert image.shape == (3, SIZE, SIZE) and label == FIXTURE["classes"] - 1
    assert torch.equal(val[0][0], val[0][0]), "evaluation transforms are deterministic"
    assert train[0][0].shape == (3, SIZE, SIZE)


def test_missing_split_exits_2_naming_the_path(data_dir, tmp_path):
    root = real_copy(data_dir, tmp_path)
    shutil.rmtree(root / "val")
    run_dir = tmp_path / "run"
    out = run_cli(BASE + [f"task.data.root={root}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert out.returncode == 2, out.stderr
    assert str(root / "val") in out.stderr
    assert "task.data.fixture=true" in out.stderr and "Traceback" not in out.stderr
    assert not (run_dir / "metrics.jsonl").exists(), "training must not start"


@pytest.mark.parametrize("damage, message", [
    ("no_train", "not found"),
    ("flat_val", "holds no class folders"),
    ("unknown_val_class", "not among the training classes"),
    ("empty_class", "Found no valid file"),
])
def test_malformed_layout_is_a_data_error_naming_the_folder(damage, message, data_dir, tmp_path):
    root = real_copy(data_dir, tmp_path)
    first = sorted((root / "val").iterdir())[0]
    if damage == "no_train":
        shutil.rmtree(root / "train")
    elif damage == "flat_val":  # the official val archive before sorting into class folders
        for image in (root / "val").rglob("*.JPEG"):
            image.rename(root / "val" / image.name)
        for folder in [p for p in (root / "val").iterdir() if p.is_dir()]:
            folder.rmdir()
    elif damage == "unknown_val_class":
        first.rename(root / "val" / "n99999999")
    else:
        for image in first.iterdir():
            image.unlink()
    with pytest.raises(DataError, match=message) as info:
        ready_task(real_cfg(root))
    split = "train" if damage == "no_train" else "val"
    assert str(root / split) in str(info.value)


def test_real_data_must_have_the_configured_class_count(data_dir, tmp_path):
    root = real_copy(data_dir, tmp_path)
    with pytest.raises(DataError, match="holds 4 class folders; task.num_classes expects 1000"):
        ready_task(real_cfg(root, "task.num_classes=1000"))
    assert ready_task(real_cfg(root, "task.num_classes=null")).num_classes == 4


# -- unreadable images ------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_jpeg_is_skipped_with_one_warning_naming_it(data_dir, tmp_path, caplog):
    root = real_copy(data_dir, tmp_path)
    val = ready_task(real_cfg(root)).eval_datasets()["val"]
    bad_path, _ = val.samples[3]
    _truncate(Path(bad_path))
    with caplog.at_level(logging.WARNING, logger="projbench.data.image_folder"):
        image, label = val[3]
        assert torch.equal(image, val[4][0]) and label == val[4][1], "the next sample takes its place"
        val[3]
    warnings = [r for r in caplog.records if bad_path in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "skipped" in warnings[0].getMessage()


def test_corrupt_jpeg_raises_naming_it_in_raise_mode(data_dir, tmp_path):
    root = real_copy(data_dir, tmp_path)
    val = ready_task(real_cfg(root, "task.data.on_bad_image=raise")).eval_datasets()["val"]
    bad_path, _ = val.samples[0]
    Path(bad_path).write_bytes(b"not a JPEG")
    with pytest.raises(BadImageError, match="cannot be decoded") as info:
        val[0]
    assert bad_path in str(info.value)
    # From a DataLoader worker process it arrives as the same one-line user error.
    with pytest.raises(BadImageError) as info:
        next(iter(DataLoader(val, batch_size=4, num_workers=1)))
    assert str(info.value).startswith(f"{bad_path}: cannot be decoded") and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="task.data.on_bad_image"):
        ready_task(real_cfg(root, "task.data.on_bad_image=ignore"))


# -- training ---------------------------------------------------------------------------------
def test_training_on_the_fixture_beats_chance(data_dir, tmp_path):
    cfg = imagenet_cfg(data_dir, "optim=adam", "trainer.max_steps=20", "trainer.eval_every=20",
                       "trainer.log_every=10", "trainer.diagnostics_every=10")
    trainer = build_trainer(cfg, tmp_path / "run")
    final = trainer.fit()
    chance = 100 / FIXTURE["classes"]
    assert final["val/top1"] >= 2 * chance, final
    assert 0 <= final["val/top1"] <= final["val/top5"] <= 100
    assert {"diag/weight_norm", "diag/effective_step", "diag/projected_fraction"} <= set(final)


def test_cutmix_trains_on_soft_targets(data_dir, tmp_path):
    cfg = imagenet_cfg(data_dir, "task.recipe=resnet50_cutmix", "task.model.arch=resnet10t", "optim=sgdp",
                       "trainer.max_steps=3", "trainer.log_every=1")
    assert cfg.task.cutmix is True
    trainer = build_trainer(cfg, tmp_path / "run")
    seen = []
    loss_fn = trainer.task._soft_target_loss
    trainer.task._soft_target_loss = lambda logits, target: seen.append(target) or loss_fn(logits, target)
    final = trainer.fit()
    assert len(seen) == 3 and "val/top1" in final
    target = seen[0]
    assert target.shape == (16, FIXTURE["classes"]) and target.dtype.is_floating_point
    assert torch.allclose(target.sum(1), torch.ones(16))
    assert ((target > 0).sum(1) == 2).any(), "CutMix mixes two classes per image"
    with pytest.raises(ConfigError, match="must be even"):
        build_trainer(imagenet_cfg(data_dir, "task.cutmix=true", "task.data.batch_size=15"), tmp_path / "odd")


# -- recipes ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def table1() -> list:
    """Every cell of `-m +experiment=imagenet_table1`, composed once."""
    return [cell.cfg for cell in compose_cells(["+experiment=imagenet_table1"])]


def test_table1_sweep_has_every_row_and_optimizer_with_its_recipe(table1):
    cells = table1
    rows = {(c.task.model.arch, c.task.cutmix, c.optim.name) for c in cells}
    assert rows == {(arch, cutmix, optim) for arch, cutmix in
                    [("mobilenetv2_100", False), ("resnet18", False), ("resnet50", False), ("resnet50", True)]
                    for optim in ("sgd", "sgdp", "adamw", "adamp")}
    assert len(cells) == 16
    for c in cells:
        assert c.task.name == "imagenet" and c.task.data.batch_size == 256
        sgd_like = c.optim.name in ("sgd", "sgdp")
        mobilenet = c.task.model.arch == "mobilenetv2_100"
        assert c.optim.lr == ({True: 0.05, False: 0.1} if sgd_like else {True: 2e-3, False: 1e-3})[mobilenet]
        assert c.trainer.max_epochs == (150 if mobilenet else 300 if c.task.cutmix else 90)
        assert c.trainer.schedule.name == ("step" if sgd_like and not mobilenet else "cosine")
        assert c.trainer.schedule.step_size == (75 if c.task.cutmix else 30)
        assert dict(c.task.model.kwargs) == ({} if mobilenet else {"zero_init_last": False})


def test_cutmix_row_follows_the_cutmix_code_and_the_other_rows_do_not(table1):
    """clovaai/CutMix-PyTorch train.py: SGD with Nesterov momentum, ColorJitter 0.4, PCA lighting 0.1."""
    for c in table1:
        sgd_like = c.optim.name in ("sgd", "sgdp")
        assert c.optim.get("nesterov") == ((c.task.cutmix if sgd_like else False) if c.optim.name != "adamw" else None)
        assert (c.task.data.color_jitter, c.task.data.lighting) == ((0.4, 0.1) if c.task.cutmix else (None, 0.0))
        assert (c.task.cutmix_alpha, c.task.cutmix_prob) == (1.0, 1.0)
        if c.task.cutmix and sgd_like:
            assert (c.optim.lr, c.optim.momentum, c.optim.decay.value, c.optim.decay.convention) == (
                0.1, 0.9, 1e-4, "coupled")
    train_tf, _ = imagenet_transforms(make_cfg(["task=imagenet", "task.recipe=resnet50_cutmix"]).task.data)
    names = [type(t).__name__ for t in train_tf.transforms]
    assert names[names.index("PCALighting") + 1] == "Normalize" and "ColorJitter" in names
    train_tf, _ = imagenet_transforms(make_cfg(["task=imagenet"]).task.data)
    assert not {"PCALighting", "ColorJitter"} & {type(t).__name__ for t in train_tf.transforms}


def test_pca_lighting_shifts_each_image_along_the_imagenet_colour_components():
    torch.manual_seed(0)
    image = torch.rand(3, 8, 8)
    shifts = torch.stack([(PCALighting(0.1)(image) - image)[:, 0, 0] for _ in range(4000)])
    per_pixel = PCALighting(0.1)(image) - image
    assert torch.allclose(per_pixel, per_pixel[:, :1, :1].expand_as(per_pixel)), "one shift for the whole image"
    vectors = torch.tensor(IMAGENET_EIGENVECTORS)
    values = torch.tensor(IMAGENET_EIGENVALUES)
    alphas = torch.linalg.solve(vectors, shifts.T).T / values   # back to the random coefficients
    assert alphas.mean(0).abs().max() < 0.01 and torch.allclose(alphas.std(0), torch.full((3,), 0.1), rtol=0.05)
    assert torch.equal(PCALighting(0.0)(image), image)
    with pytest.raises(ValueError):
        PCALighting(-0.1)


def test_table2_sweep_is_resnet18_with_and_without_each_optimizers_decay():
    cells = [cell.cfg for cell in compose_cells(["+experiment=imagenet_table2"])]
    got = sorted((c.optim.name, c.table2_column, c.optim.weight_decay) for c in cells)
    assert got == sorted([(o, "baseline", wd) for o, wd in (("sgd", 1e-4), ("sgdp", 1e-4), ("adamw", 0.1),
                                                          ("adamp", 0.1))]
                         + [(o, "no_decay", 0.0) for o in ("sgd", "sgdp", "adamw", "adamp")])
    assert {(c.task.name, c.task.model.arch, c.task.cutmix) for c in cells} == {("imagenet", "resnet18", False)}


def test_experiment_cfg_job_resolves_through_the_cli(tmp_path):
    out = run_cli(["+experiment=imagenet_table1", "task.recipe=resnet50_cutmix", "optim=adamp",
                   "--cfg", "job", "--resolve"], tmp_path)
    assert out.returncode == 0, out.stderr
    job = OmegaConf.create(out.stdout)
    assert (job.task.model.arch, job.task.cutmix, job.optim.name) == ("resnet50", True, "adamp")
    assert (job.optim.lr, job.optim.weight_decay, job.trainer.max_epochs) == (1e-3, 0.1, 300)
    assert (job.optim.decay.value, job.optim.decay.convention, job.optim.decay_per_step) == (1e-4, "decoupled", 1e-4)
    assert job.optim.sources.decay.startswith("paper: 1e-4 in the AdamW paper's notation")
