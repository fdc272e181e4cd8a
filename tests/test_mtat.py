"""MagnaTagATune music tagging (Table 5): the official layout, the directory split and Won et al.'s
split files, the top-N tags, chunked evaluation, learning on the fixture, the recipe."""

from __future__ import annotations

import csv
import gc
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import ROOT, make_cfg
from projbench.data.audio import ChunkedClipDataset, Clip, load_chunks, load_clip
from projbench.data.mtat import (ANNOTATIONS, FIXTURE_SOUNDS, FIXTURE_TAGS, Annotations, fixture_labels,
                                 read_annotations, read_mtat, top_tags, write_mtat_fixture)
from projbench.distributed import DistInfo
from projbench.errors import ConfigError, DataError
from projbench.tasks.mtat import MtatTask
from projbench.train import seed_everything, train
from test_dcase import TINY as DCASE_TINY

TINY = [o for o in DCASE_TINY if not o.startswith("task.data.eval_seconds")]  # evaluation here is in chunks instead


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """`paths.data_dir` holding the fixture, written once for the module as the task writes it."""
    root = tmp_path_factory.mktemp("data")
    write_mtat_fixture(root / "fixtures" / "mtat")
    return root


@pytest.fixture
def fixture_copy(data_dir, tmp_path) -> Path:
    return Path(shutil.copytree(data_dir / "fixtures" / "mtat", tmp_path / "magnatagatune"))


def mtat_cfg(data_dir: Path, *overrides: str):
    return make_cfg(["logger=none", "trainer.progress=false", "task=mtat", "task.data.fixture=true",
                     f"paths.data_dir={data_dir}", *TINY, "task.data.eval_chunks=4", *overrides])


def csv_rows(root: Path) -> tuple[list[str], list[list[str]]]:
    with open(root / ANNOTATIONS, newline="") as f:
        header, *rows = list(csv.reader(f, delimiter="\t"))
    return header, rows


# -- data -------------------------------------------------------------------------------------
def test_top_tags_break_ties_as_the_authors_split_script():
    # counts 2, 3, 2, 1, 2: split.py's np.argsort(tag_count)[::-1] puts the later of equal counts first
    labels = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 1], [0, 1, 0, 0, 0]], dtype=np.uint8)
    annotations = Annotations(Path("annotations_final.csv"), ("a", "b", "c", "d", "e"), labels, [])
    assert top_tags(annotations, 4) == ("b", "e", "c", "a")


def test_fixture_is_in_the_official_layout_and_the_directory_split_keeps_tagged_clips(data_dir):
    root = data_dir / "fixtures" / "mtat"
    first = (root / ANNOTATIONS).read_text().splitlines()[0]
    assert first.startswith('"clip_id"\t"guitar"\t') and first.endswith('\t"mp3_path"')  # quoted, as the real file
    header, rows = csv_rows(root)
    assert header[1:-1] == list(FIXTURE_TAGS) and all(len(r) == len(header) for r in rows)
    assert {r[-1][0] for r in rows} == set("0123456789abcdef")
    tags, splits = read_mtat(root)
    # the 50 most frequent tags, counted over all clips, the later column first on a tie (as the
    # authors' split.py): the six sounding ones, then the last 44 columns of the never-used ones
    counts = np.array([[int(v) for v in r[1:-1]] for r in rows]).sum(axis=0)
    assert list(tags) == [FIXTURE_TAGS[i] for i in sorted(range(len(FIXTURE_TAGS)), key=lambda i: (-counts[i], -i))][:50]
    assert set(tags[:6]) == set(FIXTURE_SOUNDS)
    folders = {"train": set("0123456789ab"), "val": {"c"}, "test": set("def")}
    labelled = {r[-1]: {h for h, v in zip(header[1:-1], r[1:-1]) if v == "1"} for r in rows}
    for split, clips in splits.items():
        assert {c.path.parent.name for c in clips} == folders[split]
        assert all(labelled[f"{c.path.parent.name}/{c.path.name}"] == {tags[i] for i in c.labels} for c in clips)
    assert sum(map(len, splits.values())) == sum(bool(t) for t in labelled.values()) == len(rows) - 2  # untagged dropped
    multi = [c for c in splits["train"] if len(c.labels) > 1]
    assert len(multi) >= 10 and any(len(c.labels) == 3 for c in multi)
    assert [sorted(tags[i] for i in c.labels) for c in splits["train"][:4]] == [sorted(fixture_labels(k))
                                                                               for k in range(4)]
    info = sf.info(str(splits["test"][0].path))
    assert (info.format, info.samplerate, info.channels) == ("MP3", 16000, 1) and 1.0 <= info.duration <= 2.1


def test_top_n_and_explicit_tags_choose_the_targets_and_drop_clips_without_them(data_dir):
    root = data_dir / "fixtures" / "mtat"
    tags, splits = read_mtat(root, num_tags=2)
    assert len(tags) == 2
    _, rows = csv_rows(root)
    index = [FIXTURE_TAGS.index(t) + 1 for t in tags]
    kept = sorted(r[-1] for r in rows if any(r[i] == "1" for i in index))
    assert sorted(f"{c.path.parent.name}/{c.path.name}" for s in splits.values() for c in s) == kept
    tags, splits = read_mtat(root, tags=["violin", "guitar"])
    assert tags == ("violin", "guitar")
    dataset = ChunkedClipDataset(splits["val"], 2, 16000, 0.5, num_chunks=3)
    targets = {tuple(t.tolist()) for t in dataset.targets}  # multi-hot in the given order
    assert targets <= {(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)} and len(targets) >= 2
    assert dataset[0][0].shape == (3, 8000)
    with pytest.raises(DataError, match=rf"{root / ANNOTATIONS}: has no column for the tags \['banjo music'\]"):
        read_mtat(root, tags=["guitar", "banjo music"])


def test_split_files_of_won_et_al_pick_clips_and_tags(fixture_copy, tmp_path):
    _, rows = csv_rows(fixture_copy)
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    chosen = {"train": [0, 3, 5, 40], "val": [1, 2], "test": [50, 10]}  # any csv rows, as the files list them
    for name, split in (("train", "train"), ("valid", "val"), ("test", "test")):
        np.save(split_dir / f"{name}.npy", np.array([f"{i}\t{rows[i][-1]}" for i in chosen[split]]))
    np.save(split_dir / "tags.npy", np.array(["piano", "drums", "flute"]))
    tags, splits = read_mtat(fixture_copy, split_dir=split_dir)
    assert tags == ("piano", "drums", "flute")
    for split, picked in chosen.items():
        assert [f"{c.path.parent.name}/{c.path.name}" for c in splits[split]] == [rows[i][-1] for i in picked]
        expected = [tuple(k for k, t in enumerate(tags) if rows[i][1 + FIXTURE_TAGS.index(t)] == "1") for i in picked]
        assert [c.labels for c in splits[split]] == expected
    np.save(split_dir / "valid.npy", np.array([f"1\t{rows[2][-1]}"]))  # row and path disagree
    with pytest.raises(DataError, match=rf"{split_dir / 'valid.npy'}: entry `1\\t{rows[2][-1]}` does not match"):
        read_mtat(fixture_copy, split_dir=split_dir)


def test_mp3_folders_may_sit_in_an_mp3_subfolder(fixture_copy):
    (fixture_copy / "mp3").mkdir()
    for folder in "0123456789abcdef":
        (fixture_copy / folder).rename(fixture_copy / "mp3" / folder)
    _, splits = read_mtat(fixture_copy)
    assert splits["train"][0].path.parent.parent == fixture_copy / "mp3"


def test_empty_mp3s_of_the_official_archive_are_skipped_and_counted(fixture_copy, caplog):
    _, before = read_mtat(fixture_copy)
    before["train"][5].path.write_bytes(b"")  # the archive holds a few 0-byte mp3s
    _, after = read_mtat(fixture_copy)
    assert after["train"] == before["train"][:5] + before["train"][6:]
    assert "1 empty (0-byte) mp3 files skipped" in caplog.text


@pytest.mark.parametrize("line,problem", [
    ("3\t0\t1\tf/x.mp3", "expected 58 tab-separated fields"),
    ("3\t" + "0\t" * 55 + "yes\tf/x.mp3", "tag values must be 0 or 1, got 'yes'"),
    ("3\t" + "0\t" * 56 + "x.wav", "expected an mp3 path"),
])
def test_malformed_csv_line_names_the_file_and_line(fixture_copy, line, problem):
    path = fixture_copy / ANNOTATIONS
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:3], line, *lines[3:]]) + "\n")
    with pytest.raises(DataError, match=rf"{path}:4: {problem}"):
        read_annotations(path)


def test_eval_chunks_must_be_a_positive_count(tmp_path):
    # null is DCASE's one-pass evaluation; MTAT has no such evaluation and says so in one line
    for value in ("null", "0"):
        with pytest.raises(ConfigError, match="task.data.eval_chunks: must be > 0"):
            MtatTask(mtat_cfg(tmp_path, f"task.data.eval_chunks={value}").task).setup(DistInfo())


def test_missing_data_set_csv_or_mp3_fails_in_setup_naming_the_path(fixture_copy, tmp_path):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"{nowhere / 'magnatagatune'}: not found.*task.data.fixture=true"):
        MtatTask(mtat_cfg(nowhere, "task.data.fixture=false").task).setup(DistInfo())
    task = MtatTask(mtat_cfg(tmp_path, "task.data.fixture=false").task)  # root: fixture_copy
    gone = next((fixture_copy / "c").iterdir())
    gone.unlink()
    with pytest.raises(DataError, match=rf"1 of the 8 val clips listed .* not on disk.*{gone.name}"):
        task.setup(DistInfo())
    (fixture_copy / ANNOTATIONS).unlink()
    with pytest.raises(DataError, match=rf"{fixture_copy / ANNOTATIONS}: not found"):
        task.setup(DistInfo())


def test_undecodable_mp3_is_a_data_error_naming_it_also_from_a_loader_worker(tmp_path, monkeypatch):
    bad = tmp_path / "broken.mp3"
    bad.write_bytes(b"ID3 this is no mp3" * 8)
    dataset = ChunkedClipDataset([Clip(bad, (0,))], 50, 16000, 0.5, num_chunks=4)
    with pytest.raises(DataError, match=rf"{bad}: cannot be read as audio"):
        dataset[0]
    batches = iter(DataLoader(dataset, batch_size=1, num_workers=1))
    with pytest.raises(DataError, match=rf"{bad}: cannot be read as audio"):  # re-raised from the worker's text
        next(batches)
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.1)  # see test_dcase
    del batches
    gc.collect()


# -- evaluation -------------------------------------------------------------------------------
def test_chunks_start_hop_apart_and_a_short_clip_gives_identical_padded_crops(tmp_path):
    ramp = np.arange(32000, dtype=np.float32) / 32000  # 2 s: a crop's first sample tells where it starts
    sf.write(tmp_path / "ramp.wav", ramp, 16000, subtype="FLOAT")
    chunks = load_chunks(tmp_path / "ramp.wav", 16000, 8000, 4)  # hop (32000 - 8000) // 4 = 6000
    assert chunks.shape == (4, 8000)
    assert chunks[:, 0].tolist() == pytest.approx([0, 6000 / 32000, 12000 / 32000, 18000 / 32000])
    short = load_chunks(tmp_path / "ramp.wav", 16000, 40000, 3)
    assert short.shape == (3, 40000) and torch.equal(short[0], short[2]) and short[0, 32000:].abs().max() == 0


def test_mp3_crops_are_the_decoded_clip_wherever_they_start(data_dir):
    _, splits = read_mtat(data_dir / "fixtures" / "mtat")
    path = next(c.path for c in splits["train"] if sf.info(str(c.path)).duration > 1.9)
    full = torch.from_numpy(sf.read(str(path), dtype="float32")[0])
    for position in (0.3, 1.0):  # a seek into an mp3 would decode the crop's first frame wrong
        start = round(position * (sf.info(str(path)).frames - 8000))
        assert torch.equal(load_clip(path, 16000, 8000, position), full[start:start + 8000])


def test_scores_average_the_crops_sigmoids_and_aucs_match_sklearn(data_dir):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, 4, generator=gen) * 2  # 6 clips x 3 crops x 4 tags; the "model" is the identity
    logits[:, 2] = logits[:, 1]  # equal crops: computed once
    targets = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0.]])
    calls = []
    model = nn.Identity()
    model.register_forward_hook(lambda *args: calls.append(1))
    task = MtatTask(mtat_cfg(data_dir).task)
    task.classes = ("a", "b", "c", "d")
    got = task.evaluate(model, DataLoader(TensorDataset(logits, targets), batch_size=4), torch.device("cpu"))
    assert len(calls) == 4  # two batches x two distinct crops
    scores = logits.sigmoid().mean(dim=1)
    ranked = [0, 1, 2]  # tag "d" has no positive clip: its AUCs are undefined and left out
    roc = np.mean([roc_auc_score(targets[:, c], scores[:, c]) for c in ranked])
    ap = np.mean([average_precision_score(targets[:, c], scores[:, c]) for c in ranked])
    bce = nn.functional.binary_cross_entropy_with_logits(logits, targets[:, None].expand_as(logits)).item()
    assert got == pytest.approx({"roc_auc": 100 * roc, "pr_auc": 100 * ap, "loss": bce}, rel=1e-5)


# -- training ---------------------------------------------------------------------------------
def test_a_few_dozen_steps_raise_roc_auc_far_above_the_untrained_model(data_dir, tmp_path):
    cfg = mtat_cfg(data_dir, "optim=adamp", "optim.lr=3e-3", "optim.weight_decay=0", "task.data.batch_size=8",
                   "trainer.max_steps=60", "trainer.eval_every=60", "trainer.log_every=10", "trainer.ckpt_every=1000")
    seed_everything(int(cfg.seed))  # the same initial weights as the run below
    task = MtatTask(cfg.task)
    task.setup(DistInfo())
    model = task.build_model().eval()
    assert model.head[-1].out_features == 50
    with torch.no_grad():
        untrained = task.evaluate(model, task.eval_loaders(8, DistInfo())["test"], torch.device("cpu"))

    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["primary_metric"] == "roc_auc"
    trained = {name: summary["metrics"][f"test/{name}"]["final"] for name in MtatTask.metrics}
    assert 0 <= trained["pr_auc"] <= 100 and trained["roc_auc"] <= 100
    assert trained["roc_auc"] > 80 and trained["roc_auc"] > untrained["roc_auc"] + 15, (untrained, trained)  # 87-94 over seeds
    assert trained["pr_auc"] > untrained["pr_auc"] and trained["loss"] < untrained["loss"], (untrained, trained)
    points = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {p["split"] for p in points} >= {"train", "val", "test"}


# -- the recipe -------------------------------------------------------------------------------
def test_config_composes_with_the_recipe_and_the_tables_keys():
    cfg = make_cfg(["task=mtat", "optim=adam"])
    data = cfg.task.data
    assert (cfg.task.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.trainer.max_epochs) == ("mtat", 1e-4, 1e-4, 80)
    assert (data.sample_rate, data.crop_seconds * data.sample_rate, data.eval_chunks, data.batch_size) == (
        16000, 80000, 16, 16)
    assert data.root.endswith("/magnatagatune") and data.fixture_root.endswith("/fixtures/mtat")
    assert (data.num_tags, data.tags, data.split_dir) == (50, None, None)
    columns = yaml.safe_load((ROOT / "results" / "paper.yaml").read_text())["tables"]["table5"]["columns"]
    assert columns["Music tagging ROC-AUC"] == {"select": {"task.name": "mtat"}, "metric": "test/roc_auc"}
    assert columns["Music tagging PR-AUC"] == {"select": {"task.name": "mtat"}, "metric": "test/pr_auc"}
    assert next(iter(MtatTask.metrics)) == "roc_auc" and "pr_auc" in MtatTask.metrics
