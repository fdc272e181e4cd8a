"""MagnaTagATune (Law et al., ISMIR 2009) for music auto-tagging: the reader of its official
layout, the train / val / test split, the tag choice, and a tiny fixture in that layout.

The data set, as its files unpack under `task.data.root`:

    annotations_final.csv       tab-separated, every field double-quoted; a header line
                                `clip_id`, 188 tag names, `mp3_path`, then one line per clip:
                                its id, a 0 / 1 per tag, and its mp3 path, e.g.
                                `f/american_bach_soloists-j_s__bach_solo_cantatas-01-bwv54__i_aria-30-59.mp3`
    0/ 1/ ... f/                the 25,863 clips (29.1 s, 16 kHz mono mp3), in the 16 folders the
                                mp3.zip.001-003 archives unzip into (`cat mp3.zip.* > mp3.zip`)

The folders may also sit in an `mp3/` subfolder of the root (the layout the Harmonic CNN
authors' preprocessing expects); `task.data.audio_dir` names another one.

Tags: the `num_tags` (50) most frequent tags, counted over all clips of annotations_final.csv as
Won et al.'s split script counts them (ties go to the later column, as its
`np.argsort(tag_count)[::-1]` orders them), or an explicit list.

Split, two ways:
  * `split_dir` given: the split files of Won et al. (github.com/minzwon/sota-music-tagging-models,
    split/mtat/): `train.npy`, `valid.npy`, `test.npy`, numpy string arrays of
    `"<row>\\t<mp3_path>"` entries, `<row>` the clip's 0-based data line in annotations_final.csv,
    and `tags.npy`, the 50 tag names in order. (Their `binary.npy`, the csv's 0 / 1 columns of
    those tags per row, is not needed: the targets are read from the csv itself.)
  * otherwise the conventional directory split (Dieleman & Schrauwen, ICASSP 2014), which Won et
    al.'s script makes too: folders 0-b train, c val, d-f test; clips with none of the chosen
    tags are dropped. The official archive holds a few empty (0-byte) mp3s; they are skipped and
    counted in the log, as that script skips the clips it could not decode.

Problems are DataErrors naming the path: a missing file or folder, a malformed csv line
(`file:line`), a split entry that does not match the csv, a listed mp3 that is not on disk; a
clip that cannot be decoded fails when it is loaded (projbench/data/audio.py).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import soundfile as sf

from projbench.data.audio import Clip, mix_fixture_sounds
from projbench.errors import DataError

log = logging.getLogger(__name__)

ANNOTATIONS = "annotations_final.csv"
SPLITS = ("train", "val", "test")
FOLDER_SPLIT = {**{folder: "train" for folder in "0123456789ab"}, "c": "val", **{folder: "test" for folder in "def"}}
SPLIT_FILES = {"train": "train.npy", "val": "valid.npy", "test": "test.npy"}
TAGS_FILE = "tags.npy"
HINT = ("Unpack MagnaTagATune as the official files come (annotations_final.csv and the mp3 folders 0-f; "
        "see projbench/data/mtat.py) and set task.data.root=/path/to/magnatagatune, "
        "or set task.data.fixture=true for a tiny stand-in")


class Annotations(NamedTuple):
    """annotations_final.csv: the tag names and, per clip (data line), its 0 / 1 row and mp3 path."""
    path: Path
    tags: tuple[str, ...]
    labels: np.ndarray  # (clips, tags) uint8
    mp3_paths: list[str]


def read_annotations(path: Path) -> Annotations:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "not found; expected MagnaTagATune's tab-separated annotations_final.csv", HINT)
    rows, mp3_paths = [], []
    with open(path, encoding="utf-8", newline="") as f:
        lines = csv.reader(f, delimiter="\t")
        header = next(lines, None)
        if not header or header[0] != "clip_id" or header[-1] != "mp3_path" or len(header) < 3:
            raise DataError(f"{path}:1", "expected the header `clip_id<TAB><tag>...<TAB>mp3_path`, got "
                                         f"{(header or [''])[:3]}...")
        width = len(header)
        for line in lines:
            where = f"{path}:{lines.line_num}"
            if not line:
                continue
            if len(line) != width:
                raise DataError(where, f"expected {width} tab-separated fields (clip_id, {width - 2} tags, mp3_path), "
                                       f"got {len(line)}")
            values = line[1:-1]
            if any(v not in ("0", "1") for v in values):
                bad = next(v for v in values if v not in ("0", "1"))
                raise DataError(where, f"tag values must be 0 or 1, got {bad!r}")
            if not line[-1].endswith(".mp3") or "/" not in line[-1]:
                raise DataError(where, f"expected an mp3 path `<folder>/<name>.mp3`, got {line[-1]!r}")
            rows.append([v == "1" for v in values])
            mp3_paths.append(line[-1])
    if not rows:
        raise DataError(path, "lists no clips")
    return Annotations(path, tuple(header[1:-1]), np.array(rows, dtype=np.uint8), mp3_paths)


def top_tags(annotations: Annotations, n: int) -> tuple[str, ...]:
    """The `n` most frequent tags over all clips, in that order. Equal counts put the later column
    first, as the authors' split.py (data-driven-harmonic-filters, preprocessing/mtat/split.py:
    `np.argsort(tag_count)[::-1][:50]`) does; here with a stable sort, so the order does not
    depend on numpy's sorting kernel."""
    if not 0 < n <= len(annotations.tags):
        raise DataError(annotations.path, f"cannot choose the {n} most frequent of its {len(annotations.tags)} tags")
    order = np.argsort(annotations.labels.sum(axis=0, dtype=np.int64), kind="stable")[::-1][:n]
    return tuple(annotations.tags[i] for i in order)


def audio_root(root: Path, audio_dir: str | None = None) -> Path:
    """The folder that holds 0/ ... f/: `root/audio_dir`, else `root/mp3` if it exists, else `root`."""
    root = Path(root)
    if audio_dir:
        return root / audio_dir
    return root / "mp3" if (root / "mp3").is_dir() else root


def _split_file_entries(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise DataError(path, "not found; expected Won et al.'s split file (split/mtat/ of sota-music-tagging-models)")
    try:
        entries = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(path, f"cannot be read as a numpy array of strings ({exc})") from None
    out = []
    for k, entry in enumerate(np.atleast_1d(entries).tolist()):
        row, _, mp3 = str(entry).partition("\t")
        if not row.isdigit() or not mp3:
            raise DataError(path, f"entry {k} is {entry!r}; expected `<csv row>\\t<mp3 path>`")
        out.append((int(row), mp3))
    return out


def _tag_indices(annotations: Annotations, tags: Sequence[str], source: str) -> list[int]:
    index = {name: i for i, name in enumerate(annotations.tags)}
    unknown = [t for t in tags if t not in index]
    if unknown:
        raise DataError(annotations.path, f"has no column for the tags {unknown} of {source}")
    return [index[t] for t in tags]


def split_file_rows(annotations: Annotations, split_dir: Path) -> tuple[tuple[str, ...], dict[str, list[int]]]:
    """Won et al.'s split files: (their tags, {"train", "val", "test"} -> csv rows), each entry
    checked against the csv."""
    tags_path = Path(split_dir) / TAGS_FILE
    if not tags_path.is_file():
        raise DataError(tags_path, "not found; expected the split's tag names (split/mtat/tags.npy)")
    tags = tuple(str(t) for t in np.load(tags_path, allow_pickle=False).tolist())
    listed = {}
    for split in SPLITS:
        path = Path(split_dir) / SPLIT_FILES[split]
        entries = _split_file_entries(path)
        for row, mp3 in entries:
            if row >= len(annotations.mp3_paths) or annotations.mp3_paths[row] != mp3:
                found = annotations.mp3_paths[row] if row < len(annotations.mp3_paths) else "no such row"
                raise DataError(path, f"entry `{row}\\t{mp3}` does not match {annotations.path} ({found})")
        listed[split] = [row for row, _ in entries]
    return tags, listed


def folder_split_rows(annotations: Annotations, columns: Sequence[int]) -> dict[str, list[int]]:
    """The directory split: {"train", "val", "test"} -> the csv rows in folders 0-b, c, d-f that
    have at least one of the tags in `columns`."""
    tagged = annotations.labels[:, columns].any(axis=1)
    listed: dict[str, list[int]] = {split: [] for split in SPLITS}
    for row, mp3 in enumerate(annotations.mp3_paths):
        split = FOLDER_SPLIT.get(mp3.split("/", 1)[0])
        if split is None:
            raise DataError(f"{annotations.path}:{row + 2}", f"{mp3!r} is not in one of the folders 0-f")
        if tagged[row]:
            listed[split].append(row)
    return listed


def read_mtat(root: Path, tags: Sequence[str] | None = None, num_tags: int = 50, split_dir: Path | None = None,
              audio_dir: str | None = None) -> tuple[tuple[str, ...], dict[str, list[Clip]]]:
    """(the tags, {"train", "val", "test"} -> clips), each clip's labels indexing the tags: the
    split files' clips and tags with `split_dir`, else the directory split of the given `tags` or
    the `num_tags` most frequent ones."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "not found; expected annotations_final.csv and the mp3 folders 0-f", HINT)
    annotations = read_annotations(root / ANNOTATIONS)
    audio = audio_root(root, audio_dir)
    if not audio.is_dir():
        raise DataError(audio, "not found; expected the mp3 folders 0-f in it", HINT)
    if split_dir is not None:
        if tags is not None:
            raise ValueError("tags come from the split's tags.npy; pass tags=None with a split_dir")
        chosen, listed = split_file_rows(annotations, split_dir)
        columns = _tag_indices(annotations, chosen, str(Path(split_dir) / TAGS_FILE))
        sources = {split: Path(split_dir) / SPLIT_FILES[split] for split in SPLITS}
    else:
        chosen = tuple(tags) if tags is not None else top_tags(annotations, num_tags)
        columns = _tag_indices(annotations, chosen, "task.data.tags")
        listed = folder_split_rows(annotations, columns)
        sources = {split: annotations.path for split in SPLITS}
    labels = annotations.labels[:, columns]
    on_disk: dict[str, set[str]] = {}  # folder -> its file names, listed once
    splits, empty = {}, []
    for split, rows in listed.items():
        clips, missing = [], []
        for row in rows:
            folder, name = annotations.mp3_paths[row].split("/", 1)
            path = audio / folder / name
            if folder not in on_disk:
                on_disk[folder] = set(os.listdir(audio / folder)) if (audio / folder).is_dir() else set()
            if name not in on_disk[folder]:
                missing.append(str(path))
            elif split_dir is None and path.stat().st_size == 0:
                empty.append(str(path))
            else:
                clips.append(Clip(path, tuple(np.flatnonzero(labels[row]).tolist())))
        if missing:
            raise DataError(audio, f"{len(missing)} of the {len(rows)} {split} clips listed in {sources[split]} are "
                                   f"not on disk, e.g. {missing[:3]}", HINT)
        if not clips:
            raise DataError(audio, f"the {split} split has no clips")
        splits[split] = clips
    if empty:
        log.warning("%d empty (0-byte) mp3 files skipped, e.g. %s", len(empty), empty[:3])
    return chosen, splits


# -- the fixture ------------------------------------------------------------------------------
# Some of the 188 real tag names, the 50 most frequent first; the fixture's header has these.
FIXTURE_TAGS: tuple[str, ...] = (
    "guitar", "classical", "slow", "techno", "strings", "drums", "electronic", "rock", "fast", "piano", "ambient",
    "beat", "violin", "vocal", "synth", "female", "indian", "opera", "male", "singing", "vocals", "no vocals",
    "harpsichord", "loud", "quiet", "flute", "woman", "male vocal", "no vocal", "pop", "soft", "sitar", "solo", "man",
    "classic", "choir", "voice", "new age", "dance", "male voice", "female vocal", "beats", "harp", "cello",
    "no voice", "weird", "country", "female voice", "metal", "choral", "singer", "duet", "plucking", "hard rock",
    "world", "bongos",
)


def _notes(t: np.ndarray, rng: np.random.Generator, f0: float, rate: float, partials: int, decay: float) -> np.ndarray:
    """Plucked / struck notes: `rate` onsets a second, each a harmonic tone decaying at `decay`/s."""
    since = (t * rate + rng.uniform(0, 1)) % 1 / rate  # seconds since the last onset
    pitch = f0 * 2 ** (rng.integers(0, 5) / 12)
    tone = sum(np.sin(2 * np.pi * h * pitch * t) / h ** 1.5 for h in range(1, partials + 1))
    return tone * np.exp(-decay * since)


def _guitar(t, rng):
    return _notes(t, rng, 392.0, 3.0, 4, 6.0)


def _piano(t, rng):
    return _notes(t, rng, 220.0, 2.0, 8, 3.0)


def _drums(t, rng):
    since = (t * 4 + rng.uniform(0, 1)) % 1 / 4
    kick = np.sin(2 * np.pi * 60 * t) * np.exp(-30 * since)
    return kick + 0.5 * rng.standard_normal(len(t)) * np.exp(-60 * since)


def _violin(t, rng):
    f0 = 660 * 2 ** (rng.integers(0, 3) / 12) * (1 + 0.01 * np.sin(2 * np.pi * 6 * t))  # vibrato
    phase = np.cumsum(f0) * (t[1] - t[0])
    return sum(np.sin(2 * np.pi * h * phase) / h for h in range(1, 6)) / 2  # a band-limited sawtooth


def _flute(t, rng):
    tone = np.sin(2 * np.pi * 880 * 2 ** (rng.integers(0, 4) / 12) * t)
    return tone + 0.1 * np.convolve(rng.standard_normal(len(t)), np.ones(4) / 4, mode="same")


def _techno(t, rng):
    gate = (t * 8 + rng.uniform(0, 1)) % 1 < 0.5  # a 110 Hz square-wave bass, gated 8 times a second
    return 0.6 * np.sign(np.sin(2 * np.pi * 110 * t)) * gate


FIXTURE_SOUNDS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "guitar": _guitar, "piano": _piano, "drums": _drums, "violin": _violin, "flute": _flute, "techno": _techno,
}
# Clips per folder: every split has clips (0-b train, c val, d-f test).
FIXTURE_FOLDERS = {**{folder: 3 for folder in "0123456789ab"}, "c": 8, **{folder: 4 for folder in "def"}}
FIXTURE_UNTAGGED = {"0": 1, "d": 1}  # clips with no tag at all per folder (the split drops them)


def fixture_labels(index: int) -> list[str]:
    """The tags of the fixture's tagged clip `index`: each sound tag in turn, a second one on every
    other clip, and a third on every fifth."""
    names = list(FIXTURE_SOUNDS)
    first = index % len(names)
    labels = [names[first]]
    if index % 2 == 1:
        labels.append(names[(first + 1 + index // len(names) % (len(names) - 1)) % len(names)])
    if index % 5 == 4:
        labels.append(next(n for n in reversed(names) if n not in labels))
    return labels


def write_mtat_fixture(root: Path, sample_rate: int = 16000, seed: int = 0) -> None:
    """A tiny MagnaTagATune tree at `root` in the official layout: annotations_final.csv (every field
    quoted, the header of FIXTURE_TAGS) and mp3s of 1-2 s in folders 0-f, mixes of one to three of
    FIXTURE_SOUNDS over faint noise; the samples depend only on (seed, clip)."""
    root = Path(root)
    lines = [["clip_id", *FIXTURE_TAGS, "mp3_path"]]
    tagged = 0
    for folder, count in FIXTURE_FOLDERS.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for k in range(count + FIXTURE_UNTAGGED.get(folder, 0)):
            clip_id = len(lines) * 7  # the real ids are sparse too
            labels = fixture_labels(tagged) if k < count else []
            tagged += k < count
            rng = np.random.default_rng([seed, clip_id])
            seconds = 1.0 + 0.5 * (clip_id % 3)
            t = np.arange(round(seconds * sample_rate)) / sample_rate
            wave = mix_fixture_sounds(t, labels, FIXTURE_SOUNDS, rng)
            name = f"fixture_artist-fixture_album-{clip_id:03d}-fixture_track-0-{seconds:.0f}.mp3"  # artist-album-n-title-from-to
            sf.write(root / folder / name, wave.astype(np.float32), sample_rate, format="MP3", subtype="MPEG_LAYER_III")
            lines.append([str(clip_id), *("1" if tag in labels else "0" for tag in FIXTURE_TAGS), f"{folder}/{name}"])
    with open(root / ANNOTATIONS, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(lines)
