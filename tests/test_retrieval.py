"""Image retrieval (Table 6): the four official layouts, Recall@K, the losses, the recipe configs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import CONF, fixture_batches, fixture_cfg, make_cfg
from projbench.data.retrieval import BOTH, GALLERY, QUERY, READERS, ensure_fixture
from projbench.distributed import DistInfo, ShardSampler
from projbench.errors import DataError
from projbench.optim import build_optimizer
from projbench.tasks.retrieval import (FIXTURE, ClassBalancedSampler, RetrievalTask, load_trunk_weights,
                                       recall_at_k)
from projbench.train import build_trainer, train

LAYOUTS = sorted(READERS)
CLASSES, PER_CLASS = FIXTURE["classes"], FIXTURE["per_class"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """`paths.data_dir` with every fixture written once for the module, as the task writes them."""
    root = tmp_path_factory.mktemp("data")
    for layout in LAYOUTS:
        ensure_fixture(layout, root / "fixtures" / layout, **FIXTURE)
    return root



def copy_fixture(data_dir: Path, layout: str, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(data_dir / "fixtures" / layout, tmp_path / layout))


def retrieval_cfg(data_dir: Path, *overrides: str):
    return make_cfg(["logger=none", "trainer.progress=false", "task=cub", "task.data.fixture=true",
                     f"paths.data_dir={data_dir}", "task.model.arch=resnet10t", "task.data.image_size=32",
                     "task.data.num_workers=0", *overrides])


# -- readers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reader_splits_each_official_layout_by_class(layout, data_dir):
    splits = READERS[layout](data_dir / "fixtures" / layout)
    half = CLASSES // 2
    train_labels = {s.label for s in splits["train"]}
    test_labels = {s.label for s in splits["test"]}
    assert (len(train_labels), len(test_labels)) == (half, half)
    assert not train_labels & test_labels, "retrieval tests on classes never seen in training"
    assert len(splits["train"]) == len(splits["test"]) == half * PER_CLASS
    assert all(s.path.is_file() for split in splits.values() for s in split)
    roles = [s.role for s in splits["test"]]
    if layout == "inshop":  # query images against a gallery of the same items
        assert roles.count(QUERY) == roles.count(GALLERY) == half * PER_CLASS // 2
        query_items = {s.label for s in splits["test"] if s.role == QUERY}
        assert query_items == {s.label for s in splits["test"] if s.role == GALLERY}
    else:
        assert set(roles) == {BOTH}
    if layout in ("cub", "cars196"):  # the official rule: the first half of the class ids trains
        assert train_labels == set(range(1, half + 1))


def _break_line(path: Path, line: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")


MALFORMED = {
    "cub-columns": ("cub", lambda r: _break_line(r / "images.txt", 3, "3"), "images.txt:3"),
    "cub-unknown-id": ("cub", lambda r: _break_line(r / "image_class_labels.txt", 5, "9999 1"),
                       "image_class_labels.txt:5"),
    "cub-missing": ("cub", lambda r: (r / "image_class_labels.txt").unlink(), "image_class_labels.txt: not found"),
    "sop-class": ("sop", lambda r: _break_line(r / "Ebay_test.txt", 4, "4 x 1 a/b.JPG"), "Ebay_test.txt:4"),
    "sop-header": ("sop", lambda r: _break_line(r / "Ebay_train.txt", 1, "id class path"), "Ebay_train.txt:1"),
    "inshop-status": ("inshop", lambda r: _break_line(r / "list_eval_partition.txt", 7, "img/a.jpg id_1 val"),
                      "list_eval_partition.txt:7"),
    "inshop-count": ("inshop", lambda r: _break_line(r / "list_eval_partition.txt", 1, "5"),
                     "list_eval_partition.txt:1"),
    "cars-field": ("cars196", lambda r: scipy.io.savemat(r / "cars_annos.mat", {"annotations": np.zeros(
        (1, 2), dtype=[("relative_im_path", object), ("test", object)])}), "cars_annos.mat: 'annotations' lacks"),
    "cars-entry": ("cars196", lambda r: _break_cars_entry(r / "cars_annos.mat", 4), "cars_annos.mat: annotation 4"),
}


def _break_cars_entry(path: Path, number: int) -> None:
    annotations = scipy.io.loadmat(path)["annotations"]
    annotations[0, number - 1]["class"] = np.array([[1, 2]])
    scipy.io.savemat(path, {"annotations": annotations})


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_or_missing_files_name_the_file_and_line(case, data_dir, tmp_path):
    layout, damage, expected = MALFORMED[case]
    root = copy_fixture(data_dir, layout, tmp_path)
    damage(root)
    with pytest.raises(DataError) as err:
        READERS[layout](root)
    assert str(root) in str(err.value) and expected in str(err.value), str(err.value)


def test_a_missing_image_late_in_a_list_stops_the_run_in_setup(data_dir, tmp_path):
    root = copy_fixture(data_dir, "sop", tmp_path)
    last = (root / "Ebay_test.txt").read_text().split()[-1]
    (root / last).unlink()
    cfg = retrieval_cfg(tmp_path, "task=sop", "task.data.fixture=false", f"task.data.root={root}")
    with pytest.raises(DataError, match=f"{last}: listed for the test split but missing .1 of the 48 images"):
        RetrievalTask(cfg.task).setup(DistInfo())


@pytest.mark.parametrize("unpacked", ["at the root", "inside Img", "nowhere"])
def test_inshop_images_are_found_where_the_download_unzips_them(unpacked, data_dir, tmp_path):
    root = copy_fixture(data_dir, "inshop", tmp_path)
    (root / "Img").mkdir()
    (root / "Img" / "img.zip").write_bytes(b"PK")  # the download's archive, unzipped somewhere
    if unpacked == "inside Img":
        (root / "img").rename(root / "Img" / "img")
    elif unpacked == "nowhere":
        (root / "img").rename(root / "elsewhere")
    if unpacked == "nowhere":
        with pytest.raises(DataError, match=f"in neither {root / 'Img'}/ nor {root}/. Unzip the download's Img/img.zip"):
            READERS["inshop"](root)
        return
    splits = READERS["inshop"](root)
    assert all(s.path.is_file() for samples in splits.values() for s in samples)


def test_the_missing_data_hint_names_a_readme_section():
    readme = (Path(CONF).parent / "README.md").read_text()
    with pytest.raises(DataError, match='README.md, "Image retrieval .Table 6.", Data') as err:
        READERS["cars196"](Path("/nonexistent/cars196"))
    assert "### Image retrieval (Table 6)" in readme and "**Data.**" in readme.split("### Image retrieval")[1]
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("task", ["cub", "cars196", "sop", "inshop"])
def test_fixture_true_alone_brings_the_fixture_sizes(task, data_dir):
    cfg = fixture_cfg(task, data_dir)
    assert (cfg.task.data.batch_size, cfg.task.data.image_size, cfg.task.model.arch) == (24, 32, "resnet10t")
    assert fixture_batches(cfg) >= 1
    assert fixture_cfg(task, data_dir, "task.data.batch_size=12").task.data.batch_size == 12  # the command line wins


def test_missing_data_set_fails_in_setup_naming_the_path(tmp_path):
    cfg = retrieval_cfg(tmp_path, "task=sop", "task.data.fixture=false")
    with pytest.raises(DataError, match="Stanford_Online_Products/Ebay_train.txt: not found"):
        RetrievalTask(cfg.task).setup(DistInfo())


# -- Recall@K ---------------------------------------------------------------------------------
def test_recall_at_k_on_a_hand_computed_case():
    # Unit vectors at these angles (degrees); neighbours by cosine = by angular distance.
    angles = torch.tensor([0.0, 10.0, 25.0, 90.0, 100.0, 180.0])
    labels = torch.tensor([0, 1, 0, 1, 1, 2])
    rad = torch.deg2rad(angles)
    emb = torch.stack([rad.cos(), rad.sin()], dim=1)
    # Neighbour orders (self excluded):
    #   0: 10(1) 25(0) ...          hit at rank 2
    #   10: 0(0) 25(0) 90(1)        hit at rank 3
    #   25: 10(1) 0(0) 90(1)        hit at rank 2
    #   90: 100(1)                  hit at rank 1
    #   100: 90(1)                  hit at rank 1
    #   180: no other label 2       never
    r = recall_at_k(emb, labels, ks=(1, 2, 4, 8))
    assert r == pytest.approx({1: 100 * 2 / 6, 2: 100 * 4 / 6, 4: 100 * 5 / 6, 8: 100 * 5 / 6})
    # In-Shop style: queries 0 and 3 against the gallery {10, 25, 100, 180}.
    query = torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool)
    r = recall_at_k(emb, labels, ks=(1, 2), query=query, gallery=~query)
    assert r == pytest.approx({1: 50.0, 2: 100.0})  # 0: 10(1) then 25(0); 90: 100(1) first
    # Chunking does not change the answer.
    assert recall_at_k(emb, labels, chunk=2) == recall_at_k(emb, labels)


def _ddp_evaluate(rank: int, world: int, init_file: str, data: tuple, out: dict) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ds = TensorDataset(*data)
        loader = DataLoader(ds, batch_size=3, sampler=ShardSampler(ds, DistInfo(rank, world)))
        task = RetrievalTask(make_cfg(["task=cub"]).task)
        out[rank] = task.evaluate(nn.Identity(), loader, torch.device("cpu"))
    finally:
        torch_dist.destroy_process_group()


def test_evaluation_under_ddp_gathers_every_rank(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 13  # uneven shards: 7 and 6
    emb = torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=1)
    labels = torch.randint(0, 3, (n,), generator=g)
    roles = torch.tensor([QUERY, GALLERY] * 6 + [GALLERY])
    expected = recall_at_k(emb, labels, query=roles == QUERY, gallery=roles == GALLERY)
    out = mp.Manager().dict()
    mp.spawn(_ddp_evaluate, args=(2, str(tmp_path / "pg"), (emb, labels, roles), out), nprocs=2)
    for rank in (0, 1):
        assert out[rank] == pytest.approx({f"recall_at_{k}": v for k, v in expected.items()})


# -- sampling ---------------------------------------------------------------------------------
def test_class_balanced_batches_hold_whole_classes_and_resume_exactly():
    labels = [c for c in range(10) for _ in range(5 + c % 3)]
    one = ClassBalancedSampler(labels, 4, 12, DistInfo(), seed=3)
    one.set_epoch(2)
    order = list(one)
    assert len(order) == len(one) == len(labels) // 12 * 12
    for b in range(0, len(order), 12):
        batch = [labels[i] for i in order[b:b + 12]]
        assert sorted(batch.count(c) for c in set(batch)) == [4, 4, 4]
    again = ClassBalancedSampler(labels, 4, 12, DistInfo(), seed=3)
    again.set_epoch(2)
    again.set_start(12)
    assert list(again) == order[12:], "resuming mid-epoch replays the same batches"
    one.set_epoch(3)
    assert list(one) != order
    # Two ranks split each global batch of 24 into whole classes.
    ranks = [ClassBalancedSampler(labels, 4, 12, DistInfo(r, 2), seed=3) for r in (0, 1)]
    shards = [list(s) for s in ranks]
    assert len(shards[0]) == len(shards[1]) == len(labels) // 24 * 12
    for shard in shards:
        for b in range(0, len(shard), 12):
            batch = [labels[i] for i in shard[b:b + 12]]
            assert all(batch.count(c) == 4 for c in batch)


def test_triplet_batches_are_shuffled_images_as_the_upstream_baseline(data_dir):
    """The Proxy-Anchor code trains its triplet baseline on random batches (no --IPC): every
    training image once an epoch, in a random order; m_per_class still asks for balanced ones."""
    cfg = retrieval_cfg(data_dir, "task/loss=triplet")
    assert cfg.task.loss.m_per_class is None and cfg.task.loss.sources.m_per_class
    task = RetrievalTask(cfg.task)
    task.setup(DistInfo())
    sampler = task.train_loader(24, DistInfo(), seed=0).sampler
    assert not isinstance(sampler, ClassBalancedSampler)
    sampler.set_epoch(1)
    order = list(sampler)
    assert sorted(order) == list(range(CLASSES // 2 * PER_CLASS)) and order != sorted(order)
    task = RetrievalTask(retrieval_cfg(data_dir, "task/loss=triplet", "task.loss.m_per_class=4").task)
    task.setup(DistInfo())
    assert isinstance(task.train_loader(24, DistInfo(), seed=0).sampler, ClassBalancedSampler)


# -- model and optimizer ----------------------------------------------------------------------
def test_proxies_get_their_own_lr_group(data_dir):
    cfg = retrieval_cfg(data_dir, "optim=adamp", "optim.lr=2e-4")
    task = RetrievalTask(cfg.task)
    task.setup(DistInfo())
    model = task.build_model()
    opt = build_optimizer(cfg.optim, model, task.optimizer_groups(model))
    proxies = model.criterion.proxies
    assert proxies.shape == (CLASSES // 2, 512)
    (group,) = [g for g in opt.param_groups if any(p is proxies for p in g["params"])]
    assert group["lr"] == pytest.approx(2e-4 * 100) and len(group["params"]) == 1
    others = [p for g in opt.param_groups if g is not group for p in g["params"]]
    assert {id(p) for p in others} == {id(p) for p in model.parameters() if p is not proxies}
    assert "criterion.proxies" in model.state_dict(), "proxies are checkpointed with the model"

    cfg = retrieval_cfg(data_dir, "task/loss=triplet")
    task = RetrievalTask(cfg.task)
    task.setup(DistInfo())
    assert task.optimizer_groups(task.build_model()) == []


def test_embeddings_are_unit_norm_and_invariant_to_the_embedding_weight_scale(data_dir):
    cfg = retrieval_cfg(data_dir, "task.model.embedding_bias=false")
    task = RetrievalTask(cfg.task)
    task.setup(DistInfo())
    model = task.build_model().eval()
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        e, loss = model(x), model(x, labels)
        model.embedding.weight.mul_(7.0)  # the paper's point: no normalisation layer needed
        assert torch.allclose(model(x), e, atol=1e-5)
        assert torch.allclose(model(x, labels), loss, atol=1e-5)
    assert torch.allclose(e.norm(dim=1), torch.ones(4))


def test_pretrained_trunk_weights_load_from_a_local_file(data_dir, tmp_path):
    import timm

    source = timm.create_model("resnet10t", num_classes=10)
    path = tmp_path / "resnet10t.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    cfg = retrieval_cfg(data_dir, f"task.model.pretrained={path}")
    task = RetrievalTask(cfg.task)
    task.setup(DistInfo())
    trunk = task.build_model().trunk
    assert torch.equal(trunk.conv1[0].weight, source.conv1[0].weight)
    with pytest.raises(DataError, match="missing.pth: pretrained weights not found"):
        load_trunk_weights(trunk, tmp_path / "missing.pth")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(DataError, match="does not fit the trunk"):
        load_trunk_weights(trunk, tmp_path / "other.pth")


def test_head_only_epochs_train_the_embedding_and_proxies_and_leave_the_trunk(data_dir, tmp_path):
    """Proxy-Anchor's --warm: in the first epoch only the embedding layer and the proxies move;
    the trunk keeps its weights exactly (AdamP's weight decay included; its BatchNorm statistics
    are frozen on CUB) and trains from the second epoch on."""
    cfg = retrieval_cfg(data_dir, "optim=adamp", "optim.lr=1e-3", "task.data.batch_size=24",
                        "trainer.max_epochs=2", "task.model.head_only_epochs=1", "trainer.ckpt_every=1000")
    assert make_cfg(["task=cub"]).task.model.head_only_epochs == 5
    assert make_cfg(["task=sop"]).task.model.head_only_epochs == 1
    trainer = build_trainer(cfg, tmp_path / "run")
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trunk = [k for k in start if k.startswith("trunk.")]
    head = ["embedding.weight", "embedding.bias", "criterion.proxies"]
    trainer.total_steps = trainer.steps_per_epoch      # the first epoch
    trainer.fit()
    now = trainer.model.state_dict()
    assert all(torch.equal(start[k], now[k]) for k in trunk)
    assert not any(torch.equal(start[k], now[k]) for k in head)
    trainer.total_steps = 2 * trainer.steps_per_epoch  # the second
    trainer.fit()
    now = trainer.model.state_dict()
    assert not all(torch.equal(start[k], now[k]) for k in trunk if k.endswith("weight"))


# -- training ---------------------------------------------------------------------------------
@pytest.mark.parametrize("task_name,loss", [("cub", "triplet"), ("cars196", "proxyanchor")])
def test_a_few_steps_of_fine_tuning_learn_and_retrieve_above_chance(task_name, loss, data_dir, tmp_path):
    """Chance: with every test image a query against the 47 others, a random top neighbour has the
    query's class (5 of them) with probability 5/47, about 10.6%. An untrained trunk already ranks
    above chance on the fixture (the class colour shows in the pooled features) and 48 queries
    move Recall@1 in steps of 2%, so learning is checked on the training loss, and retrieval
    against 3 x chance. (In-Shop's query/gallery protocol has the hand case and the DDP test.)"""
    chance = 100 * 5 / 47
    cfg = retrieval_cfg(data_dir, f"task={task_name}", f"task/loss={loss}", "optim=adamp", "optim.lr=1e-3",
                        "task.data.batch_size=24", "task.data.crop_scale=[0.5,1]", "trainer.max_steps=30",
                        "trainer.schedule.name=constant", "trainer.log_every=10", "trainer.ckpt_every=1000")
    summary = train(cfg, tmp_path / "run")
    points = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [p["value"] for p in points if p["split"] == "train" and p["name"] == "loss"]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert summary["primary_metric"] == "recall_at_1"
    recall = {k: summary["metrics"][f"test/recall_at_{k}"]["final"] for k in (1, 2, 4, 8)}
    assert recall[1] > 3 * chance, recall
    assert recall[1] <= recall[2] <= recall[4] <= recall[8]


def test_resume_mid_epoch_matches_an_uninterrupted_run(data_dir, tmp_path):
    """ProxyAnchor: the proxies and their optimizer state come back from the checkpoint, and the
    shuffled batches and their augmentations continue where they stopped (step 3 of 2-step epochs)."""
    common = ["task.data.batch_size=24", "trainer.schedule.name=constant", "trainer.log_every=1",
              "trainer.eval_every=3", "trainer.ckpt_every=3", "optim=adamp", "task.model.head_only_epochs=1"]

    def losses(run: Path) -> list[float]:
        points = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [p["value"] for p in points if p["split"] == "train" and p["name"] == "loss"]

    train(retrieval_cfg(data_dir, *common, "trainer.max_steps=6"), tmp_path / "full")
    train(retrieval_cfg(data_dir, *common, "trainer.max_steps=3"), tmp_path / "part")
    train(retrieval_cfg(data_dir, *common, "trainer.max_steps=6", "resume=true"), tmp_path / "part")
    assert losses(tmp_path / "part") == pytest.approx(losses(tmp_path / "full"), rel=1e-6)


# -- configs ----------------------------------------------------------------------------------
def test_table6_experiment_covers_the_table_with_the_agreed_keys():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        params = compose(config_name="config", overrides=["+experiment=retrieval_table6"],
                         return_hydra_config=True).hydra.sweeper.params
    assert params["task"].split(",") == ["cub", "cars196", "sop", "inshop"]
    assert params["task/loss"].split(",") == ["triplet", "proxyanchor"]
    assert params["optim"].split(",") == ["adamw", "adamp"]
    for task, loss, optim in itertools.product(["cub", "cars196", "sop", "inshop"], ["triplet", "proxyanchor"],
                                               ["adamw", "adamp"]):
        cfg = make_cfg(["+experiment=retrieval_table6", f"task={task}", f"task/loss={loss}", f"optim={optim}"])
        assert (cfg.task.name, cfg.task.loss.name, cfg.optim.name) == (task, loss, optim)
        assert cfg.task.model.arch == "resnet50" and cfg.task.model.embedding_dim == 512
        assert cfg.optim.weight_decay == 1e-4 and cfg.trainer.max_epochs == 60
        # decoupled weight decay in both columns: AdamW for the page's Adam, as the recipe
        assert cfg.optim._target_ == {"adamw": "torch.optim.AdamW", "adamp": "projbench.optim.AdamP"}[optim]
    assert cfg.optim.lr == 6e-4 and make_cfg(["task=cub"]).optim.lr == 1e-4
