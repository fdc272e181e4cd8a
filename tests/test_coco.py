"""COCO detection (Table 3): the reader and its checks, the dataset's box transforms and evaluation
windows, COCOeval AP, the detectors (BatchNorm SSD, plain SSD, deformable CenterNet) end to end on
the fixture, and the recipes."""

from __future__ import annotations

import importlib.util
import itertools
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from conftest import CONF, fixture_batches, fixture_cfg, make_cfg, run_cli
from projbench.data.coco import (AUGMENTATIONS, CocoDetection, collate_detection, detection_transform,
                                 letterbox_window, read_coco_split, write_coco_fixture)
from projbench.data.fixtures import write_once
from projbench.distributed import DistInfo, ShardSampler
from projbench.errors import ConfigError, DataError
from projbench.tables import Run, build_table, load_spec
from projbench.tasks.coco import CocoTask, coco_ap, coco_results
from projbench.train import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """`paths.data_dir` with the COCO fixture written once for the module, as the task writes it."""
    root = tmp_path_factory.mktemp("data")
    write_once(root / "fixtures" / "coco", write_coco_fixture)
    return root


def test_fixture_true_alone_brings_the_fixture_sizes(data_dir):
    for detector in ("centernet", "ssd"):
        cfg = fixture_cfg("coco", data_dir, f"task/model={detector}")
        assert (cfg.task.data.batch_size, cfg.task.data.image_size) == (8, 64)
        assert fixture_batches(cfg) >= 1


def fixture(data_dir: Path) -> Path:
    return data_dir / "fixtures" / "coco"


def annotations(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def coco_cfg(data_dir: Path, *overrides: str):
    return make_cfg(["logger=none", "trainer.progress=false", "task=coco", "task.data.fixture=true",
                     f"paths.data_dir={data_dir}", "task.data.num_workers=0", *overrides])


def _xyxy(x: float, y: float, w: float, h: float) -> list[float]:
    return [x, y, x + w, y + h]


# -- the reader ---------------------------------------------------------------------------------
def test_reader_drops_crowd_boxes_and_empty_training_images_and_maps_categories(data_dir):
    root = fixture(data_dir)
    train, val = read_coco_split(root, "train2017", training=True), read_coco_split(root, "val2017", training=False)
    raw = annotations(root, "train2017")
    assert (len(raw["images"]), len(train.images), len(val.images)) == (36, 35, 12)
    assert train.filtered == {"crowd boxes": 1, "images without boxes": 1}
    assert sum(len(img.boxes) == 0 for img in val.images) == 1, "evaluation keeps images without annotations"
    # COCO's non-contiguous category ids <-> contiguous labels, in id order, both ways
    assert train.category_ids == val.category_ids == [2, 5, 9]
    assert train.category_names == ["square", "circle", "triangle"]
    # every non-crowd box of the json is a target of its image, xywh -> xyxy, its category mapped back
    expected = Counter((a["image_id"], a["category_id"], *np.round(_xyxy(*a["bbox"]), 2))
                       for a in raw["annotations"] if not a["iscrowd"])
    got = Counter((img.id, train.category_ids[label], *np.round(box.astype(float), 2))
                  for img in train.images for box, label in zip(img.boxes, img.labels))
    assert got == expected
    assert sorted(val.coco.getImgIds()) == sorted(img.id for img in val.images)


def test_boxes_outside_the_image_are_clipped_and_empty_ones_dropped(data_dir, tmp_path):
    root = Path(shutil.copytree(fixture(data_dir), tmp_path / "coco"))
    data = annotations(root, "val2017")
    image = data["images"][3]
    w = image["width"]
    mine = [a for a in data["annotations"] if a["image_id"] == image["id"]]
    mine[0]["bbox"] = [-10.0, -5.0, w + 20.0, 30.0]   # sticks out left, top and right: clipped
    extra = [[5.0, 5.0, 0.0, 10.0],                   # zero width: dropped
             [w + 5.0, 5.0, 10.0, 10.0],              # wholly outside the image: dropped
             [5.0, 5.0, -4.0, 10.0]]                   # negative width: dropped
    for k, box in enumerate(extra):
        data["annotations"].append({**mine[0], "id": 10_000 + k, "bbox": box})
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    split = read_coco_split(root, "val2017", training=False)
    assert split.filtered == {"clipped boxes": 1, "degenerate boxes": 3}
    record = next(img for img in split.images if img.id == image["id"])
    assert len(record.boxes) == len(mine)
    assert record.boxes[0].tolist() == [0.0, 0.0, w, 25.0]


def _break(key_path: tuple, value=None, delete: bool = False):
    def damage(root: Path) -> None:
        path = root / "annotations" / "instances_train2017.json"
        data = json.loads(path.read_text())
        node = data
        for key in key_path[:-1]:
            node = node[key]
        if delete:
            del node[key_path[-1]]
        else:
            node[key_path[-1]] = value
        path.write_text(json.dumps(data))
    return damage


MALFORMED = {
    "no-categories": (_break(("categories",), delete=True), "lacks the list(s) ['categories']"),
    "ann-without-bbox": (_break(("annotations", 3, "bbox"), delete=True), "annotations[3] lacks ['bbox']"),
    "ann-without-image-id": (_break(("annotations", 0, "image_id"), delete=True), "annotations[0] lacks ['image_id']"),
    "image-without-size": (_break(("images", 2, "width"), delete=True), "images[2] lacks ['width']"),
    "unknown-category": (_break(("annotations", 4, "category_id"), 77), "has the category_id 77, which is not among"),
    "unknown-image": (_break(("annotations", 1, "image_id"), 424242), "has the image_id 424242, which is not among"),
    "bad-bbox": (_break(("annotations", 2, "bbox"), [1, 2, 3]),
                 "has the bbox [1, 2, 3]; expected [x, y, width, height]"),
    "repeated-id": (_break(("images", 1, "id"), 100), "images[1] repeats the id 100"),
    "not-json": (lambda r: (r / "annotations" / "instances_train2017.json").write_text("{\"images\": ["),
                 "cannot be read as JSON"),
    "no-json": (lambda r: (r / "annotations" / "instances_train2017.json").unlink(),
                "instances_train2017.json: not found"),
    "no-image-dir": (lambda r: shutil.rmtree(r / "train2017"), "train2017: not found"),
    "missing-image": (lambda r: (r / "train2017" / "000000000107.jpg").unlink(),
                      "1 of the 36 images listed in instances_train2017.json are missing, e.g. 000000000107.jpg"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_annotations_or_missing_files_are_data_errors_naming_the_path(case, data_dir, tmp_path):
    root = Path(shutil.copytree(fixture(data_dir), tmp_path / "coco"))
    damage, expected = MALFORMED[case]
    damage(root)
    with pytest.raises(DataError) as err:
        read_coco_split(root, "train2017", training=True)
    assert str(root) in str(err.value) and expected in str(err.value), str(err.value)


def test_an_unreadable_image_is_a_data_error_naming_the_file_also_from_a_loader_worker(data_dir, tmp_path):
    root = Path(shutil.copytree(fixture(data_dir), tmp_path / "coco"))
    split = read_coco_split(root, "val2017", training=False)
    broken = split.images[5].path
    broken.write_bytes(b"not a jpeg")
    dataset = CocoDetection(split.images, detection_transform(64, "none", training=False))
    with pytest.raises(DataError, match=f"{broken}: cannot be decoded as an image"):
        dataset[5]
    loader = DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=collate_detection)
    with pytest.raises(DataError, match=f"^{broken}: cannot be decoded as an image") as err:
        list(loader)
    # Drop the traceback's hold on the failed loader iterator: freed now, it stops its worker at
    # once, rather than in a later garbage collection that waits 5 s for it.
    err.value.__traceback__ = None
    del err
    split.images[0].path.write_bytes(b"")  # the first image of a split is decoded before training
    with pytest.raises(DataError, match="cannot be decoded"):
        read_coco_split(root, "val2017", training=False)


# -- the dataset ----------------------------------------------------------------------------------
def test_images_are_resized_squares_and_boxes_follow_every_augmentation(data_dir):
    split = read_coco_split(fixture(data_dir), "train2017", training=True)
    record = split.images[3]
    image, target = CocoDetection(split.images, detection_transform(64, "none", training=False))[3]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    scale = torch.tensor([64 / record.width, 64 / record.height] * 2)
    assert torch.allclose(target["boxes"], torch.from_numpy(record.boxes) * scale, atol=1e-4)
    assert target["labels"].tolist() == record.labels.tolist()
    assert (int(target["image_id"]), target["orig_size"].tolist()) == (record.id, [record.height, record.width])
    torch.manual_seed(0)
    for augment in ("flip", "ssd", "centernet"):
        dataset = CocoDetection(split.images, detection_transform(64, augment, training=True))
        for i in range(12):
            image, target = dataset[i]
            boxes = target["boxes"]
            assert image.shape == (3, 64, 64) and image.dtype == torch.float32, augment
            assert len(boxes) == len(target["labels"]) <= len(split.images[i].boxes), augment
            assert ((boxes >= 0) & (boxes <= 64)).all() and (boxes[:, 2:] > boxes[:, :2]).all(), augment


def test_centernet_augmentation_keeps_the_aspect_ratio_and_varies_scale_position_and_colour(data_dir):
    split = read_coco_split(fixture(data_dir), "train2017", training=True)
    dataset = CocoDetection(split.images, detection_transform(128, "centernet", training=True))
    torch.manual_seed(0)
    scales, means = [], []
    for _ in range(24):
        image, target = dataset[3]
        record = split.images[3]
        inside = (target["boxes"] > 0.5).all(1) & (target["boxes"] < 127.5).all(1)  # not cut by the crop
        for box, label in zip(target["boxes"][inside], target["labels"][inside]):
            original = [b for b, lab in zip(record.boxes, record.labels) if lab == label]
            ratios = [(b[2] - b[0]) / (b[3] - b[1]) for b in original]
            assert min(abs((box[2] - box[0]) / (box[3] - box[1]) - r) for r in ratios) < 0.05, "no stretching"
            scales.append(float(box[2] - box[0]) / max(float(b[2] - b[0]) for b in original))
        means.append(image.mean(dim=(1, 2)))
    # the crop's side is 0.6-1.3 x the longest image side, resized to 128: boxes shrink or grow
    assert max(scales) / min(scales) > 1.3
    assert torch.stack(means).std(0).min() > 0.01, "colour jitter and lighting change every channel"


def test_evaluation_windows_letterbox_for_centernet_and_stretch_otherwise(data_dir):
    split = read_coco_split(fixture(data_dir), "val2017", training=False)
    i = max(range(len(split.images)), key=lambda k: abs(split.images[k].width - split.images[k].height))
    record = split.images[i]
    stretch = CocoDetection(split.images, detection_transform(64, "ssd", training=False),
                            window=AUGMENTATIONS["ssd"].window)
    box = CocoDetection(split.images, detection_transform(64, "centernet", training=False), window=letterbox_window)
    (_, stretched), (image, boxed) = stretch[i], box[i]
    assert stretched["window"].tolist() == [0, 0, record.width, record.height]
    side = max(record.width, record.height)
    left, top = (record.width - side) // 2, (record.height - side) // 2
    assert boxed["window"].tolist() == [left, top, left + side, top + side]
    expected = (torch.from_numpy(record.boxes) - torch.tensor([left, top] * 2)) * 64 / side
    assert torch.allclose(boxed["boxes"], expected, atol=1e-4)
    # the padding is black: rows (or columns) outside the image
    pad = int(-top * 64 / side) if top < 0 else int(-left * 64 / side)
    assert pad >= 2
    edge = image[:, :pad - 1] if top < 0 else image[:, :, :pad - 1]
    assert edge.abs().max() == 0


# -- COCOeval -------------------------------------------------------------------------------------
def _ground_truth_detections(data_dir: Path, shift: float = 0.0, augment: str = "none") -> tuple:
    """Detections that are the val ground truth (optionally shifted right by `shift` x box width),
    made as the task makes them: boxes in the 64 px input of `augment`'s evaluation window, mapped
    back by coco_results."""
    split = read_coco_split(fixture(data_dir), "val2017", training=False)
    dataset = CocoDetection(split.images, detection_transform(64, augment, training=False),
                            window=AUGMENTATIONS[augment].window)
    results, per_image = [], {}
    for i in range(len(dataset)):
        _, target = dataset[i]
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] += shift * (boxes[:, 2:3] - boxes[:, 0:1])
        detections = {"boxes": boxes, "scores": torch.linspace(0.9, 0.5, len(boxes)), "labels": target["labels"]}
        image_id = int(target["image_id"])
        per_image[image_id] = coco_results(detections, image_id, target["window"].tolist(), 64, split.category_ids)
        results += per_image[image_id]
    return split, results, per_image


def test_coco_ap_of_perfect_shifted_and_missing_detections(data_dir):
    split, perfect, per_image = _ground_truth_detections(data_dir)
    image_ids = [img.id for img in split.images]
    gt = {a["id"]: a for a in annotations(fixture(data_dir), "val2017")["annotations"]}
    # the round trip through the 64 px input (stretched, or letterboxed) gives back the json's boxes and ids
    for augment in ("none", "centernet"):
        results = perfect if augment == "none" else _ground_truth_detections(data_dir, augment=augment)[1]
        assert len(results) == len(gt)
        for result in results:
            match = [a for a in gt.values() if a["image_id"] == result["image_id"] and a["category_id"]
                     == result["category_id"] and np.allclose(a["bbox"], result["bbox"], atol=1e-3)]
            assert len(match) == 1, (augment, result)
    assert coco_ap(split.coco, perfect, image_ids) == pytest.approx({"ap": 100.0, "ap50": 100.0, "ap75": 100.0})

    _, shifted, _ = _ground_truth_detections(data_dir, shift=0.2)   # IoU 0.8 / 1.2 = 0.67 with its box
    ap = coco_ap(split.coco, shifted, image_ids)
    assert ap["ap50"] == pytest.approx(100.0) and ap["ap75"] == pytest.approx(0.0)
    assert 0 < ap["ap"] < 100

    wrong_class = [{**r, "category_id": split.category_ids[(split.category_ids.index(r["category_id"]) + 1) % 3]}
                   for r in perfect]
    assert coco_ap(split.coco, wrong_class, image_ids) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    assert coco_ap(split.coco, [], image_ids) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    # scoring is restricted to the given images: perfect detections of half the images score 100 there
    half = image_ids[::2]
    assert coco_ap(split.coco, [r for i in half for r in per_image[i]], half)["ap"] == pytest.approx(100.0)
    assert coco_ap(split.coco, [r for i in half for r in per_image[i]], image_ids)["ap"] < 75


class MemorisedDetector(torch.nn.Module):
    """Answers each image of `dataset` with its ground truth, shifted right by `shift` x box width
    (the detections of _ground_truth_detections, before coco_results)."""

    def __init__(self, dataset, shift: float):
        super().__init__()
        self.answers = {}
        for i in range(len(dataset)):
            image, target = dataset[i]
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] += shift * (boxes[:, 2:3] - boxes[:, 0:1])
            self.answers[image.numpy().tobytes()] = {"boxes": boxes, "scores": torch.linspace(0.9, 0.5, len(boxes)),
                                                     "labels": target["labels"]}

    def forward(self, images):
        return [self.answers[image.numpy().tobytes()] for image in images]


def _ddp_evaluate(rank: int, world: int, init_file: str, data_dir: str, out: dict) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        task = CocoTask(coco_cfg(Path(data_dir), "task.data.image_size=64", "task.data.augment=flip").task)
        task.setup(DistInfo(rank, world))
        dataset = task.eval_datasets()["val"]
        loader = DataLoader(dataset, batch_size=4, sampler=ShardSampler(dataset, DistInfo(rank, world)),
                            collate_fn=collate_detection)
        # rank 0 detects perfectly, rank 1 with boxes shifted by 0.2 x width (IoU 0.67)
        out[rank] = task.evaluate(MemorisedDetector(dataset, shift=0.2 * rank), loader, torch.device("cpu"))
    finally:
        torch_dist.destroy_process_group()


def test_evaluation_under_ddp_scores_every_ranks_detections_once(data_dir, tmp_path):
    split, perfect, _ = _ground_truth_detections(data_dir)
    _, shifted, _ = _ground_truth_detections(data_dir, shift=0.2)
    ids = [img.id for img in split.images]
    rank_of = {image_id: i % 2 for i, image_id in enumerate(ids)}  # ShardSampler: image i on rank i % 2
    expected = coco_ap(split.coco, [r for r in perfect if rank_of[r["image_id"]] == 0]
                       + [r for r in shifted if rank_of[r["image_id"]] == 1], ids)
    assert 0 < expected["ap75"] < 100, "both ranks' detections count"
    out = mp.Manager().dict()
    mp.spawn(_ddp_evaluate, args=(2, str(tmp_path / "pg"), str(data_dir), out), nprocs=2)
    assert out[0] == out[1] == pytest.approx(expected)


# -- the detectors --------------------------------------------------------------------------------
def test_centernet_targets_are_built_in_the_dataset_at_the_input_scale(data_dir):
    task = CocoTask(coco_cfg(data_dir, "task.data.image_size=64", "task.data.augment=none").task)
    task.setup(DistInfo())
    _, target = task.train_dataset()[3]
    record = task.splits["train"].images[3]
    assert target["heatmap"].shape == (3, 16, 16)
    scale = np.array([64 / record.width, 64 / record.height] * 2) / 4  # input pixels -> heatmap cells
    for box, label in zip(record.boxes * scale, record.labels):
        cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
        assert target["heatmap"][label, cy, cx] == pytest.approx(1.0), "a peak at each box centre, in its class"
    with pytest.raises(ConfigError, match="task.data.image_size: centernet needs a positive multiple of 32"):
        CocoTask(coco_cfg(data_dir, "task.data.image_size=100").task).setup(DistInfo())


@pytest.mark.parametrize("model,overrides,arch", [
    ("centernet", ["task.data.image_size=64", "task.data.batch_size=4", "task.model.flip_test=true"],
     "centernet_resnet18_dcn"),
    ("ssd", ["task.data.batch_size=2"], "ssd300_vgg16_bn"),
])
def test_each_detector_trains_and_evaluates_end_to_end_on_the_fixture(model, overrides, arch, data_dir, tmp_path):
    cfg = coco_cfg(data_dir, f"task/model={model}", "optim=adamp", "trainer.max_steps=2", "trainer.log_every=1",
                   *overrides)
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["primary_metric"] == "ap"
    assert summary["model"] == arch
    for name in ("ap", "ap50", "ap75"):
        assert 0 <= summary["metrics"][f"val/{name}"]["final"] <= 100
    points = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [p["value"] for p in points if (p["split"], p["name"]) == ("train", "loss")]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.parametrize("model,overrides,arch", [
    ("ssd_vgg16", [], "ssd300_vgg16"),
    ("centernet", ["task.model.deformable=false", "task.data.image_size=64"], "centernet_resnet18"),
])
def test_the_plain_variants_still_train_and_detect(model, overrides, arch, data_dir):
    task = CocoTask(coco_cfg(data_dir, f"task/model={model}", *overrides).task)
    task.setup(DistInfo())
    detector = task.build_model()
    assert task.model_name() == arch
    loss = task.training_loss(detector.train(), collate_detection([task.train_dataset()[i] for i in (1, 2)]))
    loss.backward()
    assert torch.isfinite(loss)
    images, _ = collate_detection([task.eval_datasets()["val"][1]])
    with torch.no_grad():
        (detections,) = detector.eval()(images)
    assert detections["boxes"].shape[1:] == (4,) and len(detections["scores"]) == len(detections["labels"])


def test_ssd_config_errors_name_the_key(data_dir):
    with pytest.raises(ConfigError, match="task.data.batch_size: ssd300_vgg16_bn trains on at least 2 images per rank"):
        CocoTask(coco_cfg(data_dir, "task/model=ssd", "task.data.batch_size=1").task).setup(DistInfo())
    CocoTask(coco_cfg(data_dir, "task/model=ssd_vgg16", "task.data.batch_size=1").task).setup(DistInfo())
    with pytest.raises(ConfigError, match="task.model.backbone: SSD300 is built on"):
        CocoTask(coco_cfg(data_dir, "task/model=ssd", "task.model.backbone=resnet50").task).setup(DistInfo())


def test_scale_invariance_script_counts_the_weights_before_batchnorm(data_dir):
    path = Path(CONF).parent / "scripts" / "scale_invariance.py"
    spec = importlib.util.spec_from_file_location("scale_invariance", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    counts = script.first_step_scale_invariance(["task=coco", "task.data.fixture=true", f"paths.data_dir={data_dir}",
                                                 "task.data.image_size=64", "task.data.batch_size=4"])
    # ResNet-18's 20 convolutions and the 6 up-sampling ones; not the 6 head convolutions, and
    # the 3 offset / mask convolutions (all zeros at the start) only as vacuous passes
    assert (counts["invariant_tensors"], counts["vacuous_tensors"], counts["weight_tensors"]) == (26, 3, 35)
    assert 0.97 < counts["invariant_params"] / counts["params"] < 1


# -- the recipes ----------------------------------------------------------------------------------
def test_detector_files_set_their_recipe_and_the_command_line_still_wins():
    centernet = make_cfg(["task=coco", "optim=adam"])
    model = centernet.task.model
    assert (model.detector, model.backbone, model.deformable, model.flip_test) == ("centernet", "resnet18", True, False)
    data = centernet.task.data
    assert (data.image_size, data.batch_size, data.augment) == (512, 128, "centernet")
    assert (centernet.optim.lr, centernet.optim.weight_decay, centernet.trainer.max_epochs) == (5e-4, 0.0, 140)
    assert list(centernet.trainer.schedule.milestones) == [90, 120] and centernet.trainer.schedule.name == "multistep"
    for name, backbone in (("ssd", "vgg16_bn"), ("ssd_vgg16", "vgg16")):  # the plain SSD shares the recipe
        ssd = make_cfg(["task=coco", f"task/model={name}", "optim=adamp"])
        assert (ssd.task.model.detector, ssd.task.model.backbone) == ("ssd", backbone)
        assert (ssd.task.data.image_size, ssd.task.data.batch_size, ssd.task.data.augment) == (300, 32, "ssd")
        assert (ssd.optim.lr, ssd.optim.weight_decay, ssd.trainer.max_epochs) == (1e-3, 5e-4, 120)
        assert list(ssd.trainer.schedule.milestones) == [80, 110] and ssd.trainer.schedule.warmup_epochs == 0.27
    for cfg in (centernet, ssd):  # every recipe value names its source
        assert set(cfg.task.model.recipe) - {"sources"} == set(cfg.task.model.recipe.sources)
    mine = make_cfg(["task=coco", "task/model=ssd", "optim.lr=2e-4", "trainer.max_epochs=12",
                     "task.data.image_size=320"])
    assert (mine.optim.lr, mine.trainer.max_epochs, mine.task.data.image_size) == (2e-4, 12, 320)


def _table3_cells() -> list:
    """Every job config of `-m +experiment=coco_table3`: the product of hydra.sweeper.params."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        primary = compose(config_name="config", overrides=["+experiment=coco_table3"], return_hydra_config=True)
        params = OmegaConf.to_container(primary.hydra.sweeper.params, resolve=True)
        choices = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
        return [compose(config_name="config", overrides=["+experiment=coco_table3", *cell])
                for cell in itertools.product(*choices)]


def test_table3_sweep_fills_each_cell_of_the_table_once():
    cells = _table3_cells()
    assert len(cells) == 8
    runs = []
    for k, cfg in enumerate(cells):
        assert cfg.task.name == "coco"
        detector = cfg.task.model.detector
        assert (cfg.optim.lr, cfg.trainer.max_epochs) == {"centernet": (5e-4, 140), "ssd": (1e-3, 120)}[detector]
        assert cfg.task.model.get("deformable", True) and cfg.task.model.backbone in ("resnet18", "vgg16_bn")
        if cfg.coco_init == "imagenet":
            assert Path(cfg.task.model.pretrained).name == {"centernet": "resnet18-f37072fd.pth",
                                                            "ssd": "vgg16_bn-6c64b313.pth"}[detector]
        runs.append(Run(id=f"run{k}", config=cfg, summary={"status": "completed", "seed": 0,
                                                           "metrics": {"val/ap": {"final": float(k)}}}))
    # runs of the plain variants are not Table 3's detectors: they fill no cell
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for k, variant in enumerate((["task/model=ssd_vgg16"], ["task.model.deformable=false"])):
            cfg = compose(config_name="config", overrides=["+experiment=coco_table3", "optim=adam", *variant])
            runs.append(Run(id=f"plain{k}", config=cfg, summary={"status": "completed", "seed": 0,
                                                                 "metrics": {"val/ap": {"final": -1.0}}}))
    table = build_table(load_spec()["table3"], runs)
    assert all(cell.n == 1 for cell in table.cells.values()) and len(table.cells) == 8
    for k, cfg in enumerate(cells):
        row = {"centernet": "CenterNet", "ssd": "SSD"}[cfg.task.model.detector]
        row += {"scratch": ", scratch", "imagenet": ", ImageNet"}[cfg.coco_init]
        assert table.cells[(row, {"adam": "Adam", "adamp": "AdamP"}[cfg.optim.name])].mean == float(k)


def test_experiment_cfg_job_resolves_through_the_cli(tmp_path):
    out = run_cli(["+experiment=coco_table3", "task/model=ssd", "coco_init=imagenet", "optim=adamp",
                   f"paths.data_dir={tmp_path}", "--cfg", "job", "--resolve"], tmp_path)
    assert out.returncode == 0, out.stderr
    job = OmegaConf.create(out.stdout)
    assert (job.task.name, job.task.model.detector, job.optim.name) == ("coco", "ssd", "adamp")
    assert job.task.model.pretrained == f"{tmp_path}/pretrained/vgg16_bn-6c64b313.pth"
    assert (job.optim.lr, job.optim.weight_decay, job.trainer.max_epochs) == (1e-3, 5e-4, 120)
    assert job.task.data.image_size == 300
