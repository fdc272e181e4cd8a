"""`task=wikitext` (WikiText-103, the paper's Table 7) and `task=wikitext2`: word-level language
modelling with Transformer-XL, metric: perplexity (lower is better).

Data: projbench/data/wikitext.py (the official token files or a local `datasets` copy, Transformer-XL's
vocabulary, ordered token streams; `task.data.fixture=true` writes a tiny corpus in the official
format once, on rank 0). Training reads each epoch's segments in order, `task.data.batch_size`
streams of `task.data.tgt_len` tokens; the model's memory (`mem_len` hidden states per layer) is
carried from one step to the next, detached, and cleared at the first segment of every epoch.
Each DDP rank reads its own streams, so its memory is its own: the task keeps it per process.

Evaluation: the split in `eval_batch_size` streams and segments of `eval_tgt_len` tokens, with
`eval_mem_len` of memory starting empty; ppl = exp(summed NLL / token count), both sums reduced
across ranks (torchmetrics SumMetric), so every token of the split (less the tail the stream
layout drops) counts once.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import SumMetric

from projbench.data.fixtures import write_once
from projbench.data.wikitext import Corpus, OrderedSegments, load_corpus, write_wikitext_fixture
from projbench.distributed import DistInfo, barrier
from projbench.models.transformer_xl import Mems, TransformerXL
from projbench.tasks.base import Task

log = logging.getLogger(__name__)


class WikiTextTask(Task):
    metrics = {"ppl": "min", "loss": "min"}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.corpus: Corpus | None = None
        self.dist = DistInfo()
        self.mems: Mems | None = None  # this rank's training memory, carried across steps

    # -- data -------------------------------------------------------------------------------------
    def setup(self, dist: DistInfo) -> None:
        self.dist = dist
        data = self.cfg.data
        root, hf_path = Path(data.root) if data.root else None, data.get("hf_path")
        if data.fixture:
            root, hf_path = Path(data.fixture_root), None
            if dist.is_main:
                write_once(root, write_wikitext_fixture)
            barrier()
        cache = data.get("cache_dir")
        if dist.is_main or not cache:
            self.corpus = load_corpus(root, hf_path, cache)  # rank 0 writes the cache ...
        barrier()
        if self.corpus is None:
            self.corpus = load_corpus(root, hf_path, cache)  # ... the others read it

    def _require_corpus(self) -> Corpus:
        if self.corpus is None:
            raise RuntimeError("WikiTextTask.setup() reads the corpus; call it first")
        return self.corpus

    def train_dataset(self) -> Dataset:
        return OrderedSegments(self._require_corpus().splits["train"], int(self.cfg.data.batch_size),
                               int(self.cfg.data.tgt_len), self.dist)

    def eval_datasets(self) -> dict[str, Dataset]:
        data, corpus = self.cfg.data, self._require_corpus()
        return {split: OrderedSegments(corpus.splits[split], int(data.eval_batch_size), int(data.eval_tgt_len), self.dist)
                for split in ("val", "test")}

    def _loader(self, dataset: Dataset) -> DataLoader:
        # one item is already a whole batch of segments, and the order is the data's own
        return DataLoader(dataset, batch_size=None, shuffle=False, pin_memory=torch.cuda.is_available())

    def train_loader(self, batch_size: int, dist: DistInfo, seed: int) -> DataLoader:
        """Segments of all `task.data.batch_size` streams, this rank's block of them (the loop's
        per-rank `batch_size` is that block's size)."""
        return self._loader(self.train_dataset())

    def eval_loaders(self, batch_size: int, dist: DistInfo) -> dict[str, DataLoader]:
        return {split: self._loader(ds) for split, ds in self.eval_datasets().items()}

    # -- model, loss, metrics ---------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        m, n_token = self.cfg.model, len(self._require_corpus().vocab)
        # cutoffs past the vocabulary (the fixture's 65 words) are dropped; none left: tied softmax
        cutoffs = [c for c in (m.get("adaptive_cutoffs") or []) if c < n_token] or None
        if m.get("adaptive_cutoffs") and cutoffs != list(m.adaptive_cutoffs):
            log.info("adaptive softmax cutoffs %s for a vocabulary of %d: using %s", list(m.adaptive_cutoffs), n_token, cutoffs)
        return TransformerXL(n_token, n_layer=m.n_layer, d_model=m.d_model,
                             n_head=m.n_head, d_head=m.d_head, d_inner=m.d_inner, dropout=m.dropout,
                             dropatt=m.dropatt, mem_len=m.mem_len, clamp_len=m.clamp_len,
                             pre_lnorm=m.pre_lnorm, adaptive_cutoffs=cutoffs, init_std=m.init_std)

    def training_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        if batch["segment"] == 0:  # a new epoch: the streams start over
            self.mems = None
        nll, self.mems = model(batch["inputs"], batch["targets"], self.mems)
        return nll.mean()

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        nll_sum = SumMetric().set_dtype(torch.float64).to(device)
        tokens = SumMetric().set_dtype(torch.float64).to(device)
        mems, mem_len = None, int(self.cfg.model.eval_mem_len)
        for batch in loader:
            targets = batch["targets"].to(device, non_blocking=True)
            nll, mems = model(batch["inputs"].to(device, non_blocking=True), targets, mems, mem_len=mem_len)
            nll_sum.update(nll.double().sum())
            tokens.update(float(targets.numel()))
        loss = (nll_sum.compute() / tokens.compute().clamp_min(1)).item()
        return {"ppl": math.exp(min(loss, 700.0)), "loss": loss}
