"""Audio clips for the audio tasks: loading (soundfile, mono, torchaudio resampling, fixed-length
crops), the DCASE 2017 Task 4 reader, and a tiny fixture in that layout.

The loading half (`load_clip`, `ClipDataset`; `load_chunks`, `ChunkedClipDataset` for
evaluations over a whole clip's crops) knows nothing about DCASE: a task hands it (path,
multi-hot target) pairs, so Speech Commands and MagnaTagATune readers can reuse it.

DCASE 2017 Task 4 ("Large-scale weakly supervised sound event detection for smart cars", 17
classes of AudioSet, 10 s YouTube clips at 44.1 kHz), as the official archives and the task
repository's `groundtruth_release/` folder lay it out under `task.data.root`:

    groundtruth_weak_label_training_set.csv      train  51,172 clips
    groundtruth_weak_label_testing_set.csv       val       488 clips (the development test set)
    groundtruth_weak_label_evaluation_set.csv    test    1,103 clips (the challenge evaluation set)
    unbalanced_train_segments_training_set_audio_formatted_and_segmented_downloads/Y<file>.wav
    unbalanced_train_segments_testing_set_audio_formatted_and_segmented_downloads/Y<file>.wav
    evaluation_set_formatted_audio_segments/Y<file>.wav

A label file has one tab-separated line per (clip, label): `<file>\\t<start>\\t<end>\\t<label>`,
e.g. `-5QrBL6MzLg_60.000_70.000.wav\\t60.000\\t70.000\\tTrain horn`; a clip with several labels
has several lines. The archives name each clip `Y` + `<file>`; a clip stored as `<file>` itself
is found too. The file and folder names are config values (`task.data.label_files`,
`task.data.audio_dirs`), relative to the root.

Problems are DataErrors naming the path: a missing file or folder, a malformed label line
(`file:line`), a listed clip that is not on disk, a clip that cannot be decoded.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch.utils.data import Dataset

from projbench.errors import DataError

# The 17 classes of DCASE 2017 Task 4, spelled as the label files spell them: the 9 warning
# sounds, then the 8 vehicle sounds (the task's own grouping and order).
DCASE2017_CLASSES: tuple[str, ...] = (
    "Train horn", "Air horn, truck horn", "Car alarm", "Reversing beeps", "Ambulance (siren)",
    "Police car (siren)", "Fire engine, fire truck (siren)", "Civil defense siren", "Screaming",
    "Bicycle", "Skateboard", "Car", "Car passing by", "Bus", "Truck", "Motorcycle", "Train",
)
DCASE_SPLITS = ("train", "val", "test")
DCASE_LABEL_FILES = {
    "train": "groundtruth_weak_label_training_set.csv",
    "val": "groundtruth_weak_label_testing_set.csv",
    "test": "groundtruth_weak_label_evaluation_set.csv",
}
DCASE_AUDIO_DIRS = {
    "train": "unbalanced_train_segments_training_set_audio_formatted_and_segmented_downloads",
    "val": "unbalanced_train_segments_testing_set_audio_formatted_and_segmented_downloads",
    "test": "evaluation_set_formatted_audio_segments",
}
DCASE_HINT = ("Lay DCASE 2017 Task 4 out as the official archives and groundtruth_release/ csv files "
              "do (see projbench/data/audio.py) and set task.data.root=/path/to/dcase2017_task4, "
              "or set task.data.fixture=true for a tiny stand-in")
# What soundfile raises on a missing, truncated or foreign file (LibsndfileError is a RuntimeError).
DECODE_ERRORS = (RuntimeError, OSError, ValueError)


class Clip(NamedTuple):
    path: Path
    labels: tuple[int, ...]  # class indices, sorted


class UnreadableAudioError(DataError):
    """A clip that cannot be decoded. Constructible from one string too: torch's DataLoader
    re-raises a worker's exception as `type(text)`, so the run still ends with a one-line
    DataError naming the file rather than a RuntimeError."""

    def __init__(self, path, message: str | None = None):
        # message None: rebuilt from a DataLoader worker's text, which DataError handles.
        super().__init__(path, message, "Replace or delete the file (and its label lines)" if message else None)


# -- loading ----------------------------------------------------------------------------------
def load_clip(path: Path | str, sample_rate: int, num_samples: int, position: float = 0.5) -> torch.Tensor:
    """`num_samples` mono float32 samples at `sample_rate` from the audio file at `path`.

    Only the crop is read: it starts at `position` (0: the start, 1: the end) of the room the
    clip leaves around it, e.g. a random position for training and 0.5 (centred) for evaluation.
    A clip shorter than the crop is zero-padded at the end. Channels are averaged; the crop is
    resampled with torchaudio when the file has another rate. An MP3 is decoded from its start up
    to the crop's end: a frame depends on the frames before it (the bit reservoir), so libsndfile's
    seek into an MP3 decodes the crop's first samples wrong."""
    try:
        info = sf.info(str(path))
        need = math.ceil(num_samples * info.samplerate / sample_rate)  # frames at the file's rate
        start = round(min(max(position, 0.0), 1.0) * max(info.frames - need, 0))
        skip = start if info.format == "MP3" else 0  # decoded, then dropped
        frames, rate = sf.read(str(path), start=start - skip, frames=need + skip, dtype="float32", always_2d=True)
        frames = frames[skip:]
    except DECODE_ERRORS as exc:
        raise UnreadableAudioError(path, f"cannot be read as audio ({exc})") from None
    wave = torch.from_numpy(frames).mean(dim=1)
    if rate != sample_rate:
        wave = AF.resample(wave, rate, sample_rate)
    if wave.numel() >= num_samples:
        return wave[:num_samples].contiguous()
    return torch.nn.functional.pad(wave, (0, num_samples - wave.numel()))


class ClipDataset(Dataset):
    """(waveform [num_samples], multi-hot target [num_classes]) per clip. Training crops start at
    a random position (torch's RNG: seeded per run and per loader worker); evaluation crops are
    centred, so an evaluation sees the same samples every time."""

    def __init__(self, clips: Sequence[Clip], num_classes: int, sample_rate: int, seconds: float,
                 random_crop: bool):
        self.paths = [clip.path for clip in clips]
        self.targets = torch.zeros(len(clips), num_classes)
        for i, clip in enumerate(clips):
            self.targets[i, list(clip.labels)] = 1.0
        self.sample_rate = int(sample_rate)
        self.num_samples = round(seconds * sample_rate)
        self.random_crop = random_crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        position = float(torch.rand(())) if self.random_crop else 0.5
        return load_clip(self.paths[index], self.sample_rate, self.num_samples, position), self.targets[index]


def load_chunks(path: Path | str, sample_rate: int, num_samples: int, num_chunks: int) -> torch.Tensor:
    """(num_chunks, num_samples): the whole clip cut into `num_chunks` crops that start `hop`
    samples apart, hop = (clip length - num_samples) // num_chunks, as the Harmonic CNN authors'
    evaluation cuts a song; a clip no longer than a crop gives identical zero-padded crops."""
    try:
        info = sf.info(str(path))
    except DECODE_ERRORS as exc:
        raise UnreadableAudioError(path, f"cannot be read as audio ({exc})") from None
    length = info.frames * sample_rate // info.samplerate
    wave = load_clip(path, sample_rate, max(length, num_samples), position=0.0)
    hop = max(length - num_samples, 0) // num_chunks
    return torch.stack([wave[i * hop:i * hop + num_samples] for i in range(num_chunks)])


class ChunkedClipDataset(ClipDataset):
    """(crops [num_chunks, num_samples], multi-hot target) per clip, for evaluations that average
    a model's outputs over crops covering the whole clip (load_chunks)."""

    def __init__(self, clips: Sequence[Clip], num_classes: int, sample_rate: int, seconds: float, num_chunks: int):
        super().__init__(clips, num_classes, sample_rate, seconds, random_crop=False)
        self.num_chunks = int(num_chunks)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return load_chunks(self.paths[index], self.sample_rate, self.num_samples, self.num_chunks), self.targets[index]


# -- the DCASE 2017 Task 4 reader -------------------------------------------------------------
def read_weak_labels(path: Path, classes: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """file name -> sorted class indices, from a weak-label file (`file\\tstart\\tend\\tlabel`
    lines); clips keep the order of their first line. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "not found; expected a DCASE weak-label file of `file<TAB>start<TAB>end<TAB>label` lines",
                        DCASE_HINT)
    index = {name: i for i, name in enumerate(classes)}
    labels: dict[str, set[int]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            where = f"{path}:{number}"
            fields = line.split("\t")
            if len(fields) != 4:
                raise DataError(where, f"expected 4 tab-separated fields (file, start, end, label), "
                                       f"got {len(fields)}: {line!r}")
            name, start, end, label = (field.strip() for field in fields)
            try:
                float(start), float(end)
            except ValueError:
                raise DataError(where, f"start and end must be seconds, got {start!r} and {end!r}") from None
            if label not in index:
                raise DataError(where, f"unknown label {label!r}; the task's classes are {list(classes)}")
            if not name:
                raise DataError(where, "the file name is empty")
            labels.setdefault(name, set()).add(index[label])
    if not labels:
        raise DataError(path, "lists no clips")
    return {name: tuple(sorted(found)) for name, found in labels.items()}


def read_dcase_split(root: Path, label_file: str, audio_dir: str,
                     classes: Sequence[str] = DCASE2017_CLASSES) -> list[Clip]:
    """The clips of one split, each listed clip checked to be on disk (as `Y<file>` or `<file>`)."""
    root = Path(root)
    labels = read_weak_labels(root / label_file, classes)
    directory = root / audio_dir
    if not directory.is_dir():
        raise DataError(directory, f"not found; expected the audio of {label_file} in it", DCASE_HINT)
    on_disk = set(os.listdir(directory))
    clips, missing = [], []
    for name, found in labels.items():
        stored = next((n for n in ("Y" + name, name) if n in on_disk), None)
        if stored is None:
            missing.append(name)
        else:
            clips.append(Clip(directory / stored, found))
    if missing:
        raise DataError(directory, f"{len(missing)} of the {len(labels)} clips listed in {root / label_file} are "
                                   f"missing (as Y<file> or <file>), e.g. {missing[:3]}", DCASE_HINT)
    return clips


def read_dcase(root: Path, label_files: dict[str, str] | None = None, audio_dirs: dict[str, str] | None = None,
               classes: Sequence[str] = DCASE2017_CLASSES) -> dict[str, list[Clip]]:
    """{"train", "val", "test"} -> clips: the training, testing and evaluation sets."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "not found; expected the DCASE 2017 Task 4 label files and audio folders", DCASE_HINT)
    label_files = {**DCASE_LABEL_FILES, **(label_files or {})}
    audio_dirs = {**DCASE_AUDIO_DIRS, **(audio_dirs or {})}
    return {split: read_dcase_split(root, label_files[split], audio_dirs[split], classes) for split in DCASE_SPLITS}


# -- the fixture ------------------------------------------------------------------------------
def _horn(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    f0 = 250 * rng.uniform(0.97, 1.03)  # a harmonic complex: fundamental and three overtones
    return sum(np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 5)) / 2


def _alarm(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    high = (np.floor(t * 8 + rng.uniform(0, 1)) % 2).astype(bool)  # warbles 700 / 1000 Hz, 8 times a second
    return np.sin(2 * np.pi * np.cumsum(np.where(high, 1000.0, 700.0)) * (t[1] - t[0]))


def _beeps(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gate = np.sin(2 * np.pi * 4 * t + rng.uniform(0, 2 * np.pi)) > 0  # 1.8 kHz, 4 beeps a second
    return gate * np.sin(2 * np.pi * 1800 * t)


def _siren(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sweep = 300 + 600 * ((t / t[-1] + rng.uniform(0, 1)) % 1)  # a 300 -> 900 Hz chirp, phase-continuous
    return np.sin(2 * np.pi * np.cumsum(sweep) * (t[1] - t[0]))


def _engine(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = np.convolve(rng.standard_normal(len(t)), np.ones(24) / 24, mode="same")  # noise below ~600 Hz
    return noise / (noise.std() + 1e-8) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))


# Five of the 17 classes, each with a sound of its own.
FIXTURE_SOUNDS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "Train horn": _horn, "Car alarm": _alarm, "Reversing beeps": _beeps, "Civil defense siren": _siren, "Car": _engine,
}
FIXTURE_CLIPS = {"train": 40, "val": 15, "test": 15}


def fixture_labels(index: int) -> list[str]:
    """The fixture clip `index`'s labels: every class in turn, and a second one on every third clip."""
    names = list(FIXTURE_SOUNDS)
    first = index % len(names)
    if index % 3 != 2:
        return [names[first]]
    return [names[first], names[(first + 1 + index // len(names) % (len(names) - 1)) % len(names)]]


def mix_fixture_sounds(t: np.ndarray, labels: Sequence[str], sounds: dict[str, Callable], rng: np.random.Generator
                       ) -> np.ndarray:
    """A fixture clip at times `t`: faint white noise plus the sound of each of `labels` (from
    `sounds`) at a random level, peak-normalised to 0.9."""
    wave = 0.02 * rng.standard_normal(len(t))
    for label in labels:
        wave += rng.uniform(0.3, 0.6) * sounds[label](t, rng)
    return wave * (0.9 / max(np.abs(wave).max(), 1e-8))


def write_dcase_fixture(root: Path, sample_rate: int = 16000, seconds: float = 1.0,
                        clips: dict[str, int] | None = None, seed: int = 0) -> None:
    """A tiny DCASE 2017 Task 4 tree at `root` in the official layout (label files and audio
    folders as named above, clips stored as `Y<file>`): 16-bit wav clips of `seconds` with one or
    two of FIXTURE_SOUNDS over faint white noise; the samples depend only on (seed, split, clip)."""
    root = Path(root)
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    for code, split in enumerate(DCASE_SPLITS):
        directory = root / DCASE_AUDIO_DIRS[split]
        directory.mkdir(parents=True, exist_ok=True)
        lines = []
        for k in range((clips or FIXTURE_CLIPS)[split]):
            rng = np.random.default_rng([seed, code, k])
            name = f"fixture{split[:2]}{k:03d}_30.000_{30 + seconds:.3f}.wav"  # <youtube id>_<start>_<end>.wav
            labels = fixture_labels(k)
            wave = mix_fixture_sounds(t, labels, FIXTURE_SOUNDS, rng)
            sf.write(directory / ("Y" + name), wave.astype(np.float32), sample_rate, subtype="PCM_16")
            lines += [f"{name}\t30.000\t{30 + seconds:.3f}\t{label}" for label in labels]
        (root / DCASE_LABEL_FILES[split]).write_text("\n".join(lines) + "\n", encoding="utf-8")

