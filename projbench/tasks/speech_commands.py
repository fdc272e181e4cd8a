"""`task=speech_commands`: keyword spotting on Google Speech Commands v0.02 (35 words) with a
Harmonic CNN: the "Keyword spotting acc." column of the paper's Table 5.

Data: the official layout under `task.data.root` (projbench/data/speech_commands.py): every
clip of a word folder trains except those of `validation_list.txt` (the "val" split) and
`testing_list.txt` (the "test" split). Clips are read by projbench/data/audio.py (soundfile,
mono, resampled to `task.data.sample_rate`) into a `clip_seconds` window (1 s, the clips'
length). A shorter clip is zero-padded; where it sits in the window is the one augmentation, as
in the Harmonic CNN authors' keyword loader: training places it at a random offset, evaluation
centres it (deterministic). `task.data.fixture=true` writes a tiny data set in the same layout
(rank 0, once, under `task.data.fixture_root`) and reads it through the same reader.

Model: projbench/models/harmonic_cnn.py with one output per word; loss: cross-entropy.
Metrics (reduced over DDP ranks by torchmetrics):
  top1  accuracy over the split's clips, x 100; the primary metric
  loss  cross-entropy per clip
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from projbench.data.audio import Clip, ClipDataset
from projbench.data.speech_commands import (FIXTURE_WORDS, SPEECH_COMMANDS_V2_WORDS, read_speech_commands,
                                            write_speech_commands_fixture)
from projbench.distributed import DistInfo
from projbench.errors import ConfigError
from projbench.tasks.base import Task
from projbench.tasks.tagging import build_harmonic_cnn


class KeywordClips(ClipDataset):
    """(waveform [num_samples], class index) per clip. The clip comes zero-padded at the end
    (ClipDataset); the padding's room is split before and after it: at random for training (a
    random time shift that never cuts the word), evenly for evaluation. Trailing digital silence
    counts as room too, which only moves silence."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        wave, target = super().__getitem__(index)
        sound = torch.nonzero(wave)
        room = wave.numel() - (int(sound[-1]) + 1 if sound.numel() else wave.numel())
        shift = int(torch.randint(room + 1, ())) if self.random_crop else room // 2
        if shift:
            wave = torch.cat([wave.new_zeros(shift), wave[:-shift]])
        return wave, target.argmax()


class SpeechCommandsTask(Task):
    metrics = {"top1": "max", "loss": "min"}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.splits: dict[str, list[Clip]] = {}

    @property
    def words(self) -> Sequence[str]:
        """The classes, sorted: `task.data.words`, else the 35 of v0.02 (the fixture's 5 on the fixture)."""
        words = self.cfg.data.words
        if words is None:
            words = FIXTURE_WORDS if self.cfg.data.fixture else SPEECH_COMMANDS_V2_WORDS
        return sorted(words)

    @property
    def num_classes(self) -> int:
        return len(self.words)

    def setup(self, dist: DistInfo) -> None:
        data = self.cfg.data
        for key in ("sample_rate", "clip_seconds"):
            if data[key] <= 0:
                raise ConfigError(f"task.data.{key}", f"must be > 0, got {data[key]}")
        words = data.words
        if words is not None and (len(words) < 2 or len(set(words)) != len(words)):
            raise ConfigError("task.data.words", f"must list two or more distinct word folders, got {list(words)}")
        root = self.prepare_fixture(dist, write_speech_commands_fixture)
        self.splits = read_speech_commands(root, self.words, log_summary=dist.is_main)

    def build_model(self) -> nn.Module:
        return build_harmonic_cnn(self.cfg, self.num_classes)

    def _dataset(self, split: str, random_shift: bool) -> Dataset:
        data = self.cfg.data
        return KeywordClips(self.splits[split], self.num_classes, int(data.sample_rate), float(data.clip_seconds),
                            random_shift)

    def train_dataset(self) -> Dataset:
        return self._dataset("train", random_shift=True)

    def eval_datasets(self) -> dict[str, Dataset]:
        return {split: self._dataset(split, random_shift=False) for split in ("val", "test")}

    def training_loss(self, model: nn.Module, batch) -> torch.Tensor:
        waves, targets = batch
        return F.cross_entropy(model(waves).float(), targets)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        top1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro").to(device)
        loss = MeanMetric().to(device)
        for waves, targets in loader:
            waves = waves.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            logits = model(waves).float()
            top1.update(logits, targets)
            loss.update(F.cross_entropy(logits, targets, reduction="none"))
        return {"top1": 100 * top1.compute().item(), "loss": loss.compute().item()}
