"""Google Speech Commands (Warden 2018) as its tar archive unpacks, the reader of its official
split lists, and a tiny fixture in that layout.

v0.02 (`speech_commands_v0.02.tar.gz`, 105,829 one-second 16 kHz clips of 35 words) under
`task.data.root`:

    <word>/<speaker>_nohash_<n>.wav    one folder per word (backward ... zero), a clip per utterance
    validation_list.txt                val   9,981 clips, one `<word>/<file>.wav` a line
    testing_list.txt                   test 11,005 clips, same form
    _background_noise_/*.wav           long noise recordings: not a word, in no split

Every clip of a word folder that neither list names trains (84,843 clips). The lists split by
speaker hash, so a speaker's clips share a split. The classes are `words` (default the 35 of
v0.02; v0.01's 30 words or any subset can be passed), sorted; each must be a folder under the
root. Folders that are not among `words` (and `_background_noise_`) are no class: their clips are
in no split and list lines naming them are skipped, so a subset of the words trains on their
official splits.

Problems are DataErrors naming the path: a missing root, list file or word folder, a list line
outside the word folders (`file:line`), a listed clip that is not on disk, a word with no
training clip. Audio is read by projbench/data/audio.py (`load_clip`, `ClipDataset`).
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

from projbench.data.audio import FIXTURE_SOUNDS, Clip
from projbench.errors import DataError

log = logging.getLogger(__name__)

SPEECH_COMMANDS_V2_WORDS: tuple[str, ...] = (
    "backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward", "four", "go",
    "happy", "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one", "right", "seven", "sheila",
    "six", "stop", "three", "tree", "two", "up", "visual", "wow", "yes", "zero",
)
SPLIT_LISTS = {"val": "validation_list.txt", "test": "testing_list.txt"}
BACKGROUND_NOISE = "_background_noise_"
HINT = ("Unpack speech_commands_v0.02.tar.gz into a folder and set task.data.root=/path/to/it (v0.01: also set "
        "task.data.words to its 30 words), or set task.data.fixture=true for a tiny stand-in")


def word_folders(root: Path) -> list[str]:
    """The folders under `root` that can hold a word: all but `_background_noise_` and hidden ones."""
    with os.scandir(root) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith(("_", ".")))


def read_split_list(path: Path, folders: Sequence[str]) -> list[str]:
    """The `<word>/<file>.wav` lines of a split list, in order, duplicates and blank lines dropped;
    each line must name a clip in one of `folders`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "not found; expected one `<word>/<speaker>_nohash_<n>.wav` line per clip", HINT)
    known, lines = set(folders), {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            folder, _, name = line.partition("/")
            if folder not in known or not name or "/" in name:
                raise DataError(f"{path}:{number}", f"{line!r} is not a clip in a word folder of {path.parent} "
                                                    f"(expected <word>/<file>.wav, <word> one of {sorted(known)})")
            lines.setdefault(line, number)
    return list(lines)


def read_speech_commands(root: Path, words: Sequence[str] = SPEECH_COMMANDS_V2_WORDS,
                         log_summary: bool = True) -> dict[str, list[Clip]]:
    """{"train", "val", "test"} -> clips labelled with their word's index in sorted(words): the
    two lists' clips (in list order) and every other clip of the word folders (sorted). Logs the
    counts when `log_summary` (one rank of a DDP run does)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "not found; expected Speech Commands word folders and validation_list.txt / "
                              "testing_list.txt", HINT)
    classes = sorted(set(words))
    folders = word_folders(root)
    missing = [word for word in classes if word not in folders]
    if missing:
        raise DataError(root / missing[0], f"not found: {len(missing)} of the {len(classes)} words have no folder "
                                           f"under {root} ({missing[:5]}); folders found: {folders[:10]}"
                                           f"{' ...' if len(folders) > 10 else ''}", HINT)
    index = {word: i for i, word in enumerate(classes)}
    listed = {split: read_split_list(root / name, folders) for split, name in SPLIT_LISTS.items()}
    both = set(listed["val"]) & set(listed["test"])
    if both:
        raise DataError(root / SPLIT_LISTS["test"], f"{len(both)} clips are also in {SPLIT_LISTS['val']}, "
                                                    f"e.g. {sorted(both)[:3]}; a clip belongs to one split")
    on_disk = {word: {name for name in os.listdir(root / word) if name.endswith(".wav")} for word in classes}
    splits: dict[str, list[Clip]] = {"train": []}
    for split, lines in listed.items():
        pairs = [line.split("/") for line in lines]
        mine = [(word, name) for word, name in pairs if word in index]  # other folders' lines: no class here
        gone = [f"{word}/{name}" for word, name in mine if name not in on_disk[word]]
        if gone:
            raise DataError(root / gone[0], f"listed in {root / SPLIT_LISTS[split]} but not on disk ({len(gone)} of "
                                            f"its {len(mine)} clips of these words are missing)", HINT)
        splits[split] = [Clip(root / word / name, (index[word],)) for word, name in mine]
    held_out = set(listed["val"]) | set(listed["test"])
    for word in classes:
        train = [Clip(root / word / name, (index[word],)) for name in sorted(on_disk[word])
                 if f"{word}/{name}" not in held_out]
        if not train:
            raise DataError(root / word, f"has no training clip ({len(on_disk[word])} .wav files, all in the split "
                                         f"lists or none at all); every word needs clips to train on")
        splits["train"] += train
    if log_summary:
        ignored = [folder for folder in folders if folder not in index]
        log.info("Speech Commands at %s: %d words, %s train / %s val / %s test clips%s", root, len(classes),
                 f"{len(splits['train']):,}", f"{len(splits['val']):,}", f"{len(splits['test']):,}",
                 f" (folders not among the words, in no split: {ignored})" if ignored else "")
    return {split: splits[split] for split in ("train", "val", "test")}


# -- the fixture ------------------------------------------------------------------------------
# Five of the 35 words, each voiced by one of the DCASE fixture's sounds (a harmonic complex, a
# warble, beeps, a chirp, low noise); every clip varies pitch phase, level, length and onset.
FIXTURE_WORDS: tuple[str, ...] = ("down", "go", "no", "stop", "yes")
FIXTURE_SPEAKERS = {"train": 6, "val": 1, "test": 1}  # speakers per word and split, 2 clips each
FIXTURE_UTTERANCES = 2


def fixture_speaker(k: int) -> str:
    """Speaker k's 8-hex-digit id, as the archive's file names have; speaker k says every word and
    is in the same split for all of them, as the official lists split by speaker."""
    return f"{zlib.crc32(f'speaker{k}'.encode()):08x}"


def write_speech_commands_fixture(root: Path, sample_rate: int = 16000, seed: int = 0) -> None:
    """A tiny Speech Commands v0.02 tree at `root` in the official layout: FIXTURE_WORDS folders of
    16-bit `<speaker>_nohash_<n>.wav` clips of 0.5-1 s (16 a word: 12 train, 2 val, 2 test, split
    by speaker as the lists are), the two list files, and `_background_noise_/white_noise.wav`.
    The samples depend only on (seed, word, speaker, utterance)."""
    root = Path(root)
    sounds = dict(zip(FIXTURE_WORDS, FIXTURE_SOUNDS.values()))
    lists: dict[str, list[str]] = {split: [] for split in FIXTURE_SPEAKERS}
    for w, word in enumerate(FIXTURE_WORDS):
        (root / word).mkdir(parents=True, exist_ok=True)
        k = 0
        for split, speakers in FIXTURE_SPEAKERS.items():
            for _ in range(speakers):
                for n in range(FIXTURE_UTTERANCES):
                    rng = np.random.default_rng([seed, w, k, n])
                    length = round(rng.uniform(0.5, 1.0) * sample_rate)
                    voiced = round(rng.uniform(0.6, 0.9) * length)  # the word, then silence, at a random onset
                    onset = int(rng.integers(0, length - voiced + 1))
                    wave = 0.01 * rng.standard_normal(length)
                    wave[onset:onset + voiced] += rng.uniform(0.3, 0.8) * sounds[word](
                        np.arange(voiced) / sample_rate, rng)
                    wave *= 0.9 / max(np.abs(wave).max(), 1e-8)
                    name = f"{word}/{fixture_speaker(k)}_nohash_{n}.wav"
                    sf.write(root / name, wave.astype(np.float32), sample_rate, subtype="PCM_16")
                    if split != "train":
                        lists[split].append(name)
                k += 1
    for split, name in SPLIT_LISTS.items():
        (root / name).write_text("\n".join(lists[split]) + "\n", encoding="utf-8")
    (root / BACKGROUND_NOISE).mkdir(exist_ok=True)
    noise = 0.1 * np.random.default_rng([seed, 99]).standard_normal(2 * sample_rate)
    sf.write(root / BACKGROUND_NOISE / "white_noise.wav", noise.astype(np.float32), sample_rate, subtype="PCM_16")
