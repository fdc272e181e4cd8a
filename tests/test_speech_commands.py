"""Speech Commands keyword spotting (Table 5): the official layout and split lists, the clear
errors, the 1 s window and its shift, accuracy, learning on the fixture, the recipe's config."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import ROOT, make_cfg
from projbench.data.audio import Clip
from projbench.data.speech_commands import (BACKGROUND_NOISE, FIXTURE_WORDS, SPEECH_COMMANDS_V2_WORDS, SPLIT_LISTS,
                                            read_speech_commands, write_speech_commands_fixture)
from projbench.distributed import DistInfo
from projbench.errors import ConfigError, DataError
from projbench.tasks.speech_commands import KeywordClips, SpeechCommandsTask
from projbench.train import seed_everything, train

# The DCASE tests' Harmonic CNN of a few thousand weights: 3 harmonics, 1 band a semitone.
TINY = ["task.model.n_fft=256", "task.model.n_harmonic=3", "task.model.semitone_scale=1", "task.model.f_min=100",
        "task.model.channels=[8,16]", "task.model.residual=[false,false]", "task.model.pools=[[2,2],[2,2]]",
        "task.model.dropout=0", "task.data.num_workers=0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """`paths.data_dir` holding the fixture, written once for the module as the task writes it."""
    root = tmp_path_factory.mktemp("data")
    write_speech_commands_fixture(root / "fixtures" / "speech_commands")
    return root


@pytest.fixture()
def fixture_copy(data_dir, tmp_path) -> Path:
    """A copy of the fixture tree to break."""
    return Path(shutil.copytree(data_dir / "fixtures" / "speech_commands", tmp_path / "speech_commands_v0.02"))


def kws_cfg(data_dir: Path, *overrides: str):
    return make_cfg(["logger=none", "trainer.progress=false", "task=speech_commands", "task.data.fixture=true",
                     f"paths.data_dir={data_dir}", *TINY, *overrides])


# -- data -------------------------------------------------------------------------------------
def test_splits_are_exactly_the_lists_and_the_rest_of_the_word_folders(data_dir):
    root = data_dir / "fixtures" / "speech_commands"
    splits = read_speech_commands(root, FIXTURE_WORDS)
    words = sorted(FIXTURE_WORDS)
    listed = {split: (root / name).read_text().split() for split, name in SPLIT_LISTS.items()}
    for split in ("val", "test"):
        assert [str(c.path.relative_to(root)) for c in splits[split]] == listed[split]  # list order kept
    every = sorted(f"{w}/{n}" for w in words for n in os.listdir(root / w))
    assert sorted(str(c.path.relative_to(root)) for c in splits["train"]) == sorted(
        set(every) - set(listed["val"]) - set(listed["test"]))
    assert {split: len(clips) for split, clips in splits.items()} == {"train": 60, "val": 10, "test": 10}
    for clips in splits.values():
        assert all(c.labels == (words.index(c.path.parent.name),) for c in clips)
        assert {c.path.parent.name for c in clips} == set(words)  # every word in every split
        assert not any(BACKGROUND_NOISE in str(c.path) for c in clips)
    speakers = {split: {c.path.name.split("_nohash_")[0] for c in clips} for split, clips in splits.items()}
    assert not (speakers["train"] & speakers["val"]) and not (speakers["val"] & speakers["test"])  # split by speaker
    assert (root / BACKGROUND_NOISE).is_dir() and list((root / BACKGROUND_NOISE).glob("*.wav"))
    lengths = [sf.info(str(c.path)).frames for c in splits["train"]]
    assert sf.info(str(splits["train"][0].path)).samplerate == 16000 and 8000 <= min(lengths) < max(lengths) <= 16000


def test_a_subset_of_words_keeps_their_official_splits_and_renumbers_the_classes(data_dir):
    root = data_dir / "fixtures" / "speech_commands"
    full = read_speech_commands(root, FIXTURE_WORDS)
    subset = read_speech_commands(root, ["yes", "go"])
    for split, clips in subset.items():
        assert [c.path for c in clips] == [c.path for c in full[split] if c.path.parent.name in ("go", "yes")]
        assert {c.labels for c in clips} == {(0,), (1,)}
        assert all(c.labels == (("go", "yes").index(c.path.parent.name),) for c in clips)


def test_a_tree_without_all_35_words_of_v002_names_the_missing_folder(data_dir):
    root = data_dir / "fixtures" / "speech_commands"
    with pytest.raises(DataError, match=rf"{root / 'backward'}: not found: 30 of the 35 words .*task.data.words"):
        read_speech_commands(root)
    assert len(SPEECH_COMMANDS_V2_WORDS) == 35 and list(SPEECH_COMMANDS_V2_WORDS) == sorted(SPEECH_COMMANDS_V2_WORDS)


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + line + "\n")


@pytest.mark.parametrize("breakage", ["root", "list file", "listed clip gone", "background line", "unknown folder",
                                      "empty word", "nested line"])
def test_each_data_problem_is_one_data_error_naming_the_path(fixture_copy, breakage):
    root, val = fixture_copy, fixture_copy / SPLIT_LISTS["val"]
    expected = {
        "root": (root / "nowhere", rf"{root / 'nowhere'}: not found; expected Speech Commands word folders"),
        "list file": (root / SPLIT_LISTS["test"], rf"{root / SPLIT_LISTS['test']}: not found; expected one"),
        "listed clip gone": (root / val.read_text().split()[3],
                             rf"{root / val.read_text().split()[3]}: listed in {val} but not on disk \(1 of its 10"),
        "background line": (None, rf"{val}:11: '{BACKGROUND_NOISE}/white_noise.wav' is not a clip in a word folder"),
        "unknown folder": (None, rf"{val}:11: 'maybe/0a1b2c3d_nohash_0.wav' is not a clip in a word folder"),
        "empty word": (root / "stop", rf"{root / 'stop'}: has no training clip"),
        "nested line": (None, rf"{val}:11: 'go/x/0a1b2c3d_nohash_0.wav' is not a clip"),
    }
    target, message = expected[breakage]
    if breakage in ("list file", "listed clip gone"):
        target.unlink()
    elif breakage == "background line":
        _append(val, f"{BACKGROUND_NOISE}/white_noise.wav")
    elif breakage == "unknown folder":
        _append(val, "maybe/0a1b2c3d_nohash_0.wav")
    elif breakage == "nested line":
        _append(val, "go/x/0a1b2c3d_nohash_0.wav")
    elif breakage == "empty word":  # every clip of the word that no list names
        listed = set(val.read_text().split()) | set((root / SPLIT_LISTS["test"]).read_text().split())
        for wav in target.glob("*.wav"):
            if f"stop/{wav.name}" not in listed:
                wav.unlink()
    with pytest.raises(DataError, match=message):
        read_speech_commands(target if breakage == "root" else root, FIXTURE_WORDS)


def test_missing_data_set_fails_in_setup_with_the_hint_and_bad_words_are_config_errors(tmp_path):
    task = SpeechCommandsTask(kws_cfg(tmp_path, "task.data.fixture=false").task)
    with pytest.raises(DataError, match=rf"{tmp_path / 'speech_commands_v0.02'}: not found.*task.data.fixture=true"):
        task.setup(DistInfo())
    task = SpeechCommandsTask(kws_cfg(tmp_path, "task.data.words=[go,go]").task)
    with pytest.raises(ConfigError, match=r"task.data.words: must list two or more distinct"):
        task.setup(DistInfo())


def test_short_clips_are_centred_for_evaluation_and_shifted_at_random_for_training(tmp_path):
    wave = torch.linspace(0.1, 1.0, 4000)  # 0.25 s of sound in a 0.5 s window: 4000 samples of room
    sf.write(tmp_path / "a_nohash_0.wav", wave.numpy(), 16000, subtype="FLOAT")
    clips = [Clip(tmp_path / "a_nohash_0.wav", (2,))]
    x, y = KeywordClips(clips, 3, 16000, 0.5, random_crop=False)[0]
    assert x.shape == (8000,) and y.dtype == torch.long and y.item() == 2
    assert torch.equal(x[2000:6000], wave) and x[:2000].abs().max() == 0 and x[6000:].abs().max() == 0
    training = KeywordClips(clips, 3, 16000, 0.5, random_crop=True)
    torch.manual_seed(0)
    starts = set()
    for _ in range(20):
        x, _ = training[0]
        start = int(torch.nonzero(x)[0])
        assert torch.equal(x[start:start + 4000], wave)  # moved, never cut
        starts.add(start)
    assert len(starts) > 10 and max(starts) <= 4000


def test_an_unreadable_clip_is_a_data_error_naming_it(tmp_path):
    bad = tmp_path / "0a1b2c3d_nohash_0.wav"
    bad.write_bytes(b"RIFF\x00\x00 this is no wav")
    with pytest.raises(DataError, match=rf"{bad}: cannot be read as audio"):
        KeywordClips([Clip(bad, (0,))], 2, 16000, 1.0, random_crop=True)[0]


# -- metrics ----------------------------------------------------------------------------------
def test_top1_and_loss_match_a_hand_computation(data_dir):
    logits = torch.tensor([[3.0, 1, 0, 0, 0], [0, 2, 1, 0, 0], [0, 0, 0, 0, 5], [1, 0, 0, 2, 0], [0, 0, 4, 0, 1]])
    targets = torch.tensor([0, 2, 4, 3, 1])  # right, wrong, right, right, wrong
    task = SpeechCommandsTask(kws_cfg(data_dir).task)
    loader = DataLoader(TensorDataset(logits, targets), batch_size=2)  # three batches: the metrics accumulate
    got = task.evaluate(nn.Identity(), loader, torch.device("cpu"))
    ce = torch.nn.functional.cross_entropy(logits, targets).item()
    assert got == pytest.approx({"top1": 60.0, "loss": ce}, rel=1e-6)


# -- training ---------------------------------------------------------------------------------
def test_a_few_dozen_steps_take_top1_far_above_chance(data_dir, tmp_path):
    cfg = kws_cfg(data_dir, "optim=adamp", "optim.lr=3e-3", "optim.weight_decay=0", "task.data.batch_size=10",
                  "trainer.max_steps=36", "trainer.eval_every=36", "trainer.log_every=6", "trainer.ckpt_every=1000")
    seed_everything(int(cfg.seed))  # the same initial weights as the run below
    task = SpeechCommandsTask(cfg.task)
    task.setup(DistInfo())
    assert task.num_classes == len(FIXTURE_WORDS)
    with torch.no_grad():
        untrained = task.evaluate(task.build_model().eval(), task.eval_loaders(10, DistInfo())["test"],
                                  torch.device("cpu"))

    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["primary_metric"] == "top1"
    trained = {name: summary["metrics"][f"test/{name}"]["final"] for name in SpeechCommandsTask.metrics}
    assert 0 <= trained["top1"] <= 100
    assert trained["top1"] >= 60 and trained["loss"] < untrained["loss"], (untrained, trained)  # chance: 20
    points = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {p["split"] for p in points} >= {"train", "val", "test"}


# -- the Table 5 recipe -----------------------------------------------------------------------
def test_the_recipe_composes_and_its_harmonic_cnn_fits_a_one_second_clip():
    cfg = make_cfg(["task=speech_commands", "optim=adamp"])
    data = cfg.task.data
    assert (cfg.task.name, cfg.optim.lr, cfg.optim.weight_decay, data.batch_size) == ("speech_commands", 1e-4, 1e-4, 16)
    assert data.root.endswith("speech_commands_v0.02") and data.fixture_root.endswith("fixtures/speech_commands")
    assert (data.sample_rate, data.clip_seconds, data.words) == (16000, 1.0, None)
    task = SpeechCommandsTask(cfg.task)
    assert task.num_classes == 35
    model = task.build_model().eval()
    with torch.no_grad():
        maps = model.input_bn(model.frontend(torch.randn(2, 16000)))
        assert maps.shape == (2, 6, 128, 63)  # 6 harmonics x 128 bands x 63 frames
        for block in model.blocks:
            assert block.pool[0] <= maps.shape[2] and block.pool[1] <= maps.shape[3]  # no pool has to shrink
            maps = block(maps)
    assert maps.shape[2:] == (1, 1)  # the pools use up bands and frames
    column = yaml.safe_load((ROOT / "results" / "paper.yaml").read_text())["tables"]["table5"]["columns"][
        "Keyword spotting acc."]
    assert column == {"select": {"task.name": "speech_commands"}, "metric": "test/top1"}
    assert next(iter(SpeechCommandsTask.metrics)) == "top1"
