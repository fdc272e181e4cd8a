"""WikiText (103 or 2, word level): the official token files or a local `datasets` copy, read into
Transformer-XL's vocabulary and ordered token streams, plus a tiny fixture in the same format.

Sources, either
  * `<root>/wiki.{train,valid,test}.tokens`: the official word-level files (not the *raw* ones), or
  * a Hugging Face `datasets` copy on disk (`hf_path`): a folder written by `save_to_disk`, or a
    folder of one configuration's parquet / arrow files (e.g. `wikitext-103-v1/`), with the splits
    train / validation / test and a `text` column holding one line per row. Read offline only.

Vocabulary and encoding as Transformer-XL builds them for wt103 / wt2 (utils/vocabulary.py,
`special=['<eos>'], lower_case=False`): `<eos>` is index 0, then the train split's symbols by
descending count (ties in order of first appearance); every line, stripped and split on
whitespace, is its symbols followed by `<eos>` (an empty line is one `<eos>`). `<unk>` is an
ordinary symbol of the files; symbols absent from the train split map to it. The encoded splits
and the vocabulary are cached as one .pt file keyed by the sources' paths, sizes and mtimes.

Batching is Transformer-XL's LMOrderedIterator: a split becomes `n_streams` contiguous streams
(the tail that does not fill a whole row is dropped), read in segments of `tgt_len` tokens, in
order, the last one possibly shorter; segment k+1 of a stream continues segment k. Under DDP a
rank takes its block of the streams, so all ranks together read what one process would.
"""

from __future__ import annotations

import hashlib
import os
import random
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch.utils.data import Dataset

from projbench.distributed import DistInfo
from projbench.errors import DataError

EOS, UNK = "<eos>", "<unk>"
FILES = {"train": "wiki.train.tokens", "val": "wiki.valid.tokens", "test": "wiki.test.tokens"}
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}
HINT = ("Put the official word-level files wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens "
        "(wikitext-103-v1.zip or wikitext-2-v1.zip, not the raw ones) in task.data.root, or point "
        "task.data.hf_path at a local `datasets` copy, or set task.data.fixture=true for a tiny stand-in")


@dataclass
class Corpus:
    vocab: list[str]  # index -> symbol; vocab[0] is <eos>
    splits: dict[str, torch.Tensor]  # "train" | "val" | "test" -> 1-D int32 token ids


# -- vocabulary and encoding --------------------------------------------------------------------
def tokenize(line: str) -> list[str]:
    """One line's symbols followed by <eos>, as Transformer-XL's Vocab.tokenize(add_eos=True)."""
    return line.split() + [EOS]


def build_vocab(train_lines: Iterable[str]) -> list[str]:
    counts = Counter()
    for line in train_lines:
        counts.update(line.split())
    vocab = [EOS] + [sym for sym, _ in counts.most_common() if sym != EOS]
    return vocab if UNK in counts else vocab + [UNK]


def encode(lines: Iterable[str], index: dict[str, int]) -> torch.Tensor:
    """Token ids as int32, 4 bytes a token while reading (WikiText-103's train split: 103M)."""
    unk, ids = index[UNK], array("i")
    for line in lines:
        ids.extend([index.get(sym, unk) for sym in tokenize(line)])
    return torch.frombuffer(ids, dtype=torch.int32).clone() if ids else torch.zeros(0, dtype=torch.int32)


# -- sources ------------------------------------------------------------------------------------
def token_files(root: Path) -> dict[str, Path]:
    """The three official files under `root`; DataError naming the first one missing."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "no such directory; expected the WikiText token files wiki.{train,valid,test}.tokens in it", HINT)
    paths = {split: root / name for split, name in FILES.items()}
    for path in paths.values():
        if not path.is_file():
            raise DataError(path, "missing; expected WikiText's official word-level token file", HINT)
    return paths


class _FileLines:
    """A token file's lines, streamed from disk each time it is iterated (train is read twice)."""

    def __init__(self, path: Path):
        self.path = path

    def __iter__(self) -> Iterator[str]:
        with open(self.path, encoding="utf-8") as f:
            yield from f


def _hf_lines(hf_path: Path) -> dict[str, list[str]]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read before `datasets` is first imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_HUB_OFFLINE = True  # if imported earlier
    if not Path(hf_path).is_dir():
        raise DataError(hf_path, "no such directory; expected a local `datasets` copy of WikiText", HINT)
    try:
        if (Path(hf_path) / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(hf_path))
        else:
            ds = datasets.load_dataset(str(hf_path))
    except Exception as exc:  # datasets raises many kinds; the path and the cause are what help
        raise DataError(hf_path, f"cannot be read as a `datasets` copy of WikiText ({exc})", HINT) from exc
    missing = [name for name in HF_SPLITS.values() if name not in ds]
    if missing or "text" not in ds["train"].column_names:
        raise DataError(hf_path, f"expected the splits {list(HF_SPLITS.values())} with a 'text' column; "
                                 f"found {list(ds)} with {ds[next(iter(ds))].column_names}", HINT)
    return {split: ds[name]["text"] for split, name in HF_SPLITS.items()}  # one list of lines per split


def _fingerprint(paths: Iterable[Path]) -> str:
    h = hashlib.sha1(b"wikitext-v1")  # bump when the encoding changes
    for path in sorted(Path(p).resolve() for p in paths):
        st = path.stat()
        h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_corpus(root: Path | None = None, hf_path: Path | None = None, cache_dir: Path | None = None) -> Corpus:
    """The encoded corpus from the token files under `root` (or the `datasets` copy at
    `hf_path`), through the cache in `cache_dir` (null: no cache) when its key still matches."""
    if hf_path is not None:
        sources = [p for p in Path(hf_path).rglob("*") if p.is_file()] if Path(hf_path).is_dir() else []
    else:
        files = token_files(root)
        sources = list(files.values())
    cache = Path(cache_dir) / f"wikitext-{_fingerprint(sources)}.pt" if cache_dir and sources else None
    if cache is not None and cache.is_file():
        state = torch.load(cache, weights_only=True)
        return Corpus(state["vocab"], state["splits"])
    if hf_path is not None:
        lines = _hf_lines(Path(hf_path))
    else:
        lines = {split: _FileLines(path) for split, path in files.items()}
    vocab = build_vocab(lines["train"])
    index = {sym: i for i, sym in enumerate(vocab)}
    corpus = Corpus(vocab, {split: encode(split_lines, index) for split, split_lines in lines.items()})
    if not bool((corpus.splits["train"] != index[EOS]).any()):
        raise DataError(hf_path or files["train"], "holds no tokens", HINT)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"vocab": corpus.vocab, "splits": corpus.splits}, tmp)
        os.replace(tmp, cache)
    return corpus


# -- ordered segments ---------------------------------------------------------------------------
def stream_matrix(tokens: torch.Tensor, n_streams: int, dist: DistInfo = DistInfo()) -> torch.Tensor:
    """This rank's rows of the corpus laid out as `n_streams` contiguous streams: (rows, length)."""
    length = tokens.numel() // n_streams
    streams = tokens[: n_streams * length].view(n_streams, length)
    return streams.tensor_split(dist.world_size)[dist.rank].clone()  # own copy: the rest can be freed


class OrderedSegments(Dataset):
    """Item k: {"inputs", "targets": (streams, L) long, "segment": k}, L = tgt_len except maybe
    for the last; targets are the inputs shifted by one token. Use with DataLoader(batch_size=None)."""

    def __init__(self, tokens: torch.Tensor, n_streams: int, tgt_len: int, dist: DistInfo = DistInfo()):
        self.data = stream_matrix(tokens, n_streams, dist)
        self.tgt_len = tgt_len
        self.starts = list(range(0, self.data.size(1) - 1, tgt_len)) if self.data.size(0) else []

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, k: int) -> dict:
        i = self.starts[k]
        n = min(self.tgt_len, self.data.size(1) - 1 - i)
        return {"inputs": self.data[:, i:i + n].long(), "targets": self.data[:, i + 1:i + 1 + n].long(), "segment": k}


# -- fixture ------------------------------------------------------------------------------------
_NOUNS = [("cat", "cats"), ("dog", "dogs"), ("king", "kings"), ("river", "rivers"), ("city", "cities"),
          ("ship", "ships"), ("song", "songs"), ("army", "armies")]
_VERBS = [("sees", "see"), ("likes", "like"), ("finds", "find"), ("builds", "build"), ("follows", "follow")]
_ADJS = ["old", "small", "red", "northern", "famous"]
_NAMES = ["Alba", "Boreas", "Corvin", "Delmar", "<unk>"]


def _sentence(rng: random.Random) -> str:
    """Subject-verb number agreement, optional adjectives, a number with WikiText's @,@ marker."""
    plural = rng.random() < 0.5
    words = [rng.choice(["the", "a"]) if not plural else "the"]
    if rng.random() < 0.4:
        words.append(rng.choice(_ADJS))
    words += [rng.choice(_NOUNS)[plural], rng.choice(_VERBS)[plural], "the"]
    words.append(rng.choice(_NOUNS)[rng.random() < 0.5])
    if rng.random() < 0.3:
        words += ["of", rng.choice(_NAMES)]
    if rng.random() < 0.2:
        words += ["in", str(rng.randint(1, 9)), "@,@", f"{rng.randint(0, 9)}00"]
    return " ".join(words + ["."])


def _article(rng: random.Random) -> list[str]:
    name = rng.choice(_NAMES[:-1])
    lines = [f" = {name} {rng.choice(_NOUNS)[0]} = ", " "]
    for section in ("History", "Legacy"):
        lines += [f" = = {section} = = ", " "]
        for _ in range(2):
            lines += [" " + " ".join(_sentence(rng) for _ in range(rng.randint(3, 6))) + " ", " "]
    return lines


def write_wikitext_fixture(root: Path, articles: dict[str, int] | None = None, seed: int = 0) -> None:
    """wiki.{train,valid,test}.tokens in the official format (a leading blank line, ` = Title = `
    and ` = = Section = = ` headings, space-padded lines, blank ` ` lines between blocks, `<unk>`),
    about 5,000 / 700 / 700 tokens from a small grammar with learnable structure."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (articles or {"train": 30, "val": 4, "test": 4}).items():
        lines = [" "] + [line for _ in range(n) for line in _article(rng)]
        (root / FILES[split]).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
