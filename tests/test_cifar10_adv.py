"""Adversarial training on CIFAR-10 (Table 4a): the official python layout and its fixture, clear
data errors, the PGD attack's guarantees, one adversarial training run through the CLI, and
the Table 4a sweep."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from conftest import CONF, make_cfg, read_summary, run_cli
from projbench.attacks import pgd, random_start
from projbench.data.cifar import LABEL_NAMES, META_FILE, TEST_FILE, TRAIN_FILES, read_cifar10, write_cifar10_fixture
from projbench.data.fixtures import class_image
from projbench.distributed import DistInfo
from projbench.errors import ConfigError, DataError
from projbench.models.wide_resnet import WideResNet
from projbench.tables import Run, build_table, load_spec
from projbench.tasks.cifar10_adv import FIXTURE, Cifar10AdvTask, Normalize

BASE = ["task=cifar10_adv", "logger=none", "trainer.progress=false"]


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "cifar-10-batches-py"
    write_cifar10_fixture(root, **FIXTURE)
    return root


def corrupt_copy(fixture_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fixture_root, tmp_path / "cifar-10-batches-py"))


# -- layout, fixture, reader ------------------------------------------------------------------
def test_fixture_is_the_official_layout_and_reads_back_pixel_for_pixel(fixture_root):
    assert sorted(p.name for p in fixture_root.iterdir()) == sorted([META_FILE, TEST_FILE, *TRAIN_FILES])
    with (fixture_root / "data_batch_2").open("rb") as f:
        raw = pickle.load(f, encoding="latin1")
    assert {"data", "labels", "filenames", "batch_label"} <= set(raw)
    assert raw["data"].dtype == np.uint8 and raw["data"].shape == (FIXTURE["train_per_batch"], 3072)
    # A row is the red plane, then green, then blue, each row-major.
    first = class_image(raw["labels"][0], raw["filenames"][0], 32)
    assert np.array_equal(raw["data"][0], first.transpose(2, 0, 1).reshape(-1))

    splits, names = read_cifar10(fixture_root.parent)  # the folder above, as torchvision's root
    assert names == list(LABEL_NAMES)
    assert splits["train"].images.shape == (5 * FIXTURE["train_per_batch"], 3, 32, 32)
    assert splits["test"].images.shape == (FIXTURE["test"], 3, 32, 32)
    assert np.array_equal(splits["train"].images[FIXTURE["train_per_batch"]], first.transpose(2, 0, 1))
    assert np.bincount(splits["train"].labels).tolist() == [32] * 10


@pytest.mark.parametrize("damage, message", [
    ("missing", "not found; expected CIFAR-10's python layout"),
    ("truncated", "cannot be read as a CIFAR-10 python batch"),
    ("not_a_dict", "holds a pickled list"),
    ("no_labels", "has no 'labels' entry"),
    ("wrong_shape", "'data' must be a uint8 array of shape (N, 3072)"),
    ("bad_label", "'labels' must lie in 0..9"),
    ("code", "refuses to build posix.system"),
])
def test_each_broken_batch_file_is_a_data_error_naming_it(damage, message, fixture_root, tmp_path):
    root = corrupt_copy(fixture_root, tmp_path)
    path = root / "data_batch_3"
    with path.open("rb") as f:
        batch = pickle.load(f, encoding="latin1")
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        if damage == "not_a_dict":
            batch = [batch]
        elif damage == "no_labels":
            del batch["labels"]
        elif damage == "wrong_shape":
            batch["data"] = batch["data"][:, :1024]
        elif damage == "bad_label":
            batch["labels"][5] = 10
        else:  # a pickle that would run a command when loaded
            batch = type("Payload", (), {"__reduce__": lambda self: (__import__("os").system, ("exit 0",))})()
        path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        read_cifar10(root)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_missing_data_set_exits_2_with_one_line_naming_the_file(fixture_root, tmp_path):
    root = corrupt_copy(fixture_root, tmp_path)
    (root / TEST_FILE).unlink()
    run_dir = tmp_path / "run"
    out = run_cli(BASE + [f"task.data.root={root}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(root / TEST_FILE) in errors[0] and "task.data.fixture=true" in errors[0]
    assert "Traceback" not in out.stderr and not (run_dir / "metrics.jsonl").exists()


# -- the attack -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(fixture_root):
    """A WRN-10-1 trained (without attacks) for 40 steps on the fixture, and the test images."""
    torch.manual_seed(0)
    splits, _ = read_cifar10(fixture_root)
    images = torch.from_numpy(splits["train"].images).float() / 255
    labels = torch.from_numpy(splits["train"].labels)
    model = torch.nn.Sequential(Normalize([0.5] * 3, [0.25] * 3), WideResNet(10, 1))
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(40):
        batch = torch.randint(0, len(labels), (64,))
        optimizer.zero_grad()
        F.cross_entropy(model(images[batch]), labels[batch]).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    test = torch.from_numpy(splits["test"].images).float() / 255, torch.from_numpy(splits["test"].labels)
    return model, test


def _accuracy(model, images, labels) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


@pytest.mark.parametrize("norm, eps", [("linf", 16 / 255), ("l2", 2.0)])
def test_pgd_lowers_accuracy_stays_in_the_ball_and_in_pixel_range(norm, eps, trained):
    model, (images, labels) = trained
    clean = _accuracy(model, images, labels)
    assert clean >= 0.6, "the briefly trained model learned the fixture"
    parameters = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():  # evaluation calls the attack under no_grad
        adversarial = pgd(model, images, labels, norm=norm, eps=eps, step_size=eps / 4, steps=10)
    delta = (adversarial - images).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps + 1e-6 and size.mean() > 0.5 * eps
    assert adversarial.min() >= 0 and adversarial.max() <= 1 and not adversarial.requires_grad
    noise = (images + random_start(images, norm, eps)).clamp(0, 1)
    attacked, noisy = _accuracy(model, adversarial, labels), _accuracy(model, noise, labels)
    assert attacked <= clean - 0.25 and attacked < noisy - 0.15, (clean, noisy, attacked)
    assert all(p.grad is None for p in model.parameters()), "the attack gives the model no gradients"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), parameters))
    # More restarts keep, per image, the perturbation of highest loss.
    torch.manual_seed(1)
    once = pgd(model, images, labels, norm=norm, eps=eps, step_size=eps / 4, steps=2)
    torch.manual_seed(1)
    best = pgd(model, images, labels, norm=norm, eps=eps, step_size=eps / 4, steps=2, restarts=3)
    with torch.no_grad():
        losses = [F.cross_entropy(model(x), labels, reduction="none") for x in (once, best)]
    assert torch.all(losses[1] >= losses[0] - 1e-5)


def test_random_start_fills_the_ball_and_a_zero_budget_changes_nothing(trained):
    model, (images, labels) = trained
    linf = random_start(images, "linf", 0.1).flatten(1)
    assert linf.abs().max() <= 0.1 and linf.abs().max() > 0.09
    radius = random_start(images, "l2", 0.5).flatten(1).norm(dim=1)
    assert radius.max() <= 0.5 + 1e-6 and radius.min() < 0.25 < radius.max()
    unchanged = pgd(model, images, labels, norm="l2", eps=0.0, step_size=0.1, steps=3)
    assert torch.equal(unchanged, images)


# -- the task ---------------------------------------------------------------------------------
def task_cfg(fixture_root: Path, *overrides: str):
    return make_cfg(BASE + ["task.data.fixture=true", f"task.data.fixture_root={fixture_root}", *overrides])


@pytest.mark.parametrize("bn_mode, updates", [("train", 4), ("eval", 1)])
def test_training_attack_runs_in_the_chosen_batchnorm_mode(bn_mode, updates, fixture_root):
    cfg = task_cfg(fixture_root, f"task.attack.bn_mode={bn_mode}", "task.attack.steps=3")
    task = Cifar10AdvTask(cfg.task)
    task.setup(DistInfo())
    model = task.build_model().train()
    images, labels = next(iter(torch.utils.data.DataLoader(task.train_dataset(), batch_size=16)))
    loss = task.training_loss(model, (images, labels))
    loss.backward()
    assert model.training and torch.isfinite(loss)
    bn = model[1].bn
    assert bn.num_batches_tracked.item() == updates, "3 attack forwards + 1 training forward, or the latter only"
    assert all(p.grad is not None for p in model.parameters())


def test_fixture_values_replace_the_recipe_and_bad_attack_settings_are_config_errors(fixture_root):
    task = Cifar10AdvTask(task_cfg(fixture_root).task)
    assert task.model_name() == "wrn-10-1" and (task.cfg.model.depth, task.cfg.model.width) == (10, 1)
    assert task.train_attack.eps == pytest.approx(4 / 255) and task.train_attack.step_size == pytest.approx(1 / 255)
    assert list(task.metrics) == ["top1", "pgd10_top1", "loss", "pgd10_loss"]
    real = Cifar10AdvTask(make_cfg(BASE + ["task.attack.norm=l2", "task.eval_attack.steps=20"]).task)
    assert real.model_name() == "wrn-34-10" and real.eval_attack.eps == pytest.approx(80 / 255)
    assert real.eval_attack.steps == 20 and "pgd20_top1" in real.metrics
    for override, key in [("task.attack.norm=l1", "task.attack.norm"), ("task.attack.eps=4//255", "task.attack.eps"),
                          ("task.attack.eps=8", "task.attack.eps"),
                          ("task.eval_attack.steps=0", "task.eval_attack.steps"),
                          ("task.attack.bn_mode=frozen", "task.attack.bn_mode")]:
        with pytest.raises(ConfigError, match=key):
            Cifar10AdvTask(make_cfg(BASE + [override]).task)


def test_adversarial_training_step_and_evaluation_through_the_cli(fixture_root, tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli(BASE + ["optim=adamp", "task.data.fixture=true", f"task.data.fixture_root={fixture_root}",
                          "trainer.max_steps=2", "task.data.batch_size=32", "task.eval_attack.steps=3",
                          f"hydra.run.dir={run_dir}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["model"] == "wrn-10-1" and summary["steps"] == 2
    metrics = {key: entry["final"] for key, entry in summary["metrics"].items()}
    assert set(metrics) == {"test/top1", "test/pgd3_top1", "test/loss", "test/pgd3_loss"}
    assert 0 <= metrics["test/pgd3_top1"] <= metrics["test/top1"] <= 100
    assert metrics["test/pgd3_loss"] >= metrics["test/loss"]


# -- the Table 4a sweep -----------------------------------------------------------------------
def test_table4a_sweep_fills_each_cell_of_the_table_once():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        params = compose(config_name="config", overrides=["+experiment=cifar10_adv_table4a"],
                         return_hydra_config=True).hydra.sweeper.params
    norms, optims = params["task.attack.norm"].split(","), params["optim"].split(",")
    assert norms == ["linf", "l2"] and optims == ["adam", "adamp"]
    runs = []
    for k, (norm, optim) in enumerate((n, o) for n in norms for o in optims):
        cfg = make_cfg(["+experiment=cifar10_adv_table4a", f"task.attack.norm={norm}", f"optim={optim}"])
        eps = {"linf": "4/255", "l2": "80/255"}[norm]
        assert (cfg.task.attack.eps, cfg.task.eval_attack.eps, cfg.task.eval_attack.steps) == (eps, eps, 10)
        assert (cfg.task.model.depth, cfg.task.model.width, cfg.task.data.batch_size) == (34, 10, 128)
        assert (cfg.optim.name, cfg.optim.lr, cfg.trainer.max_epochs) == (optim, 1e-3, 200)
        metrics = {"test/top1": {"final": float(k)}, "test/pgd10_top1": {"final": 100.0 + k}}
        runs.append(Run(id=f"run{k}", config=cfg, summary={"status": "completed", "seed": 0, "metrics": metrics}))
    table = build_table(load_spec()["table4a"], runs)
    assert len(table.cells) == 8 and all(cell.n == 1 for cell in table.cells.values())
    for k, run in enumerate(runs):
        row = {"linf": "l_inf, eps 4/255", "l2": "l_2, eps 80/255"}[run.config.task.attack.norm]
        optim = {"adam": "Adam", "adamp": "AdamP"}[run.config.optim.name]
        assert table.cells[(row, f"{optim} standard")].mean == float(k)
        assert table.cells[(row, f"{optim} attacked")].mean == 100.0 + k
