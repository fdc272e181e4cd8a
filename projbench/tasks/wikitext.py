"""`task=wikitext` (WikiText-103, the paper's Table 7) and `task=wikitext2`: word-level language
modelling with Transformer-XL, metric: perplexity (lower is better).

Data: projbench/data/wikitext.py (the official token files or a local `datasets` copy, Transformer-XL's
vocabulary, ordered token streams; `task.data.fixture=true` writes a tiny corpus in the official
format once, on rank 0). Training reads each epoch's segments in order, `task.data.batch_size`
streams of `task.data.tgt_len` tokens; the model's memory (`mem_len` hidden states per layer) is
carried from one step to the next, detached, and cleared at the first segment of every epoch.
Each DDP rank reads its own block of the streams, so its memory is its own: the task keeps it per
process, and checkpoints it gathered in the global stream order (`state_dict`), so that a resumed
run continues with the memory it had, also with another number of ranks.

Evaluation, in two protocols (`EvalProtocol`, each a split in `batch_size` streams read in
segments of `tgt_len` tokens with a memory that starts empty):
  * `task.eval`: the evaluation of Transformer-XL's train.py, during training (val and test every
    `trainer.eval_every` steps): the progress metric, logged as val/ppl and test/ppl;
  * `task.final_eval`: the evaluation of its eval.py, once after the last step, which gives its
    published perplexities: val_final/ppl and test_final/ppl, Table 7's number.
ppl = exp(summed NLL / token count), both sums reduced across ranks (torchmetrics SumMetric), so
every token of the split (less the tail the stream layout drops) counts once; the same as eval.py's
mean of segment losses weighted by segment length.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import SumMetric

from projbench.data.fixtures import write_once
from projbench.data.wikitext import Corpus, OrderedSegments, load_corpus, write_wikitext_fixture
from projbench.distributed import DistInfo, all_gather_cat, barrier
from projbench.errors import ConfigError
from projbench.models.transformer_xl import Context, Mems, TransformerXL
from projbench.tasks.base import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalProtocol:
    """How a split is read for evaluation: `batch_size` streams (global, over all ranks) in
    segments of `tgt_len` tokens, each segment seeing `context`."""

    batch_size: int
    tgt_len: int
    context: Context

    @classmethod
    def from_config(cls, node: DictConfig, key: str) -> EvalProtocol:
        """From a `task.eval` / `task.final_eval` node; ConfigError naming `key` when invalid."""
        for name in ("batch_size", "tgt_len"):
            if int(node[name]) <= 0:
                raise ConfigError(f"{key}.{name}", f"must be > 0, got {node[name]}")
        try:
            context = Context(int(node.mem_len), int(node.clamp_len), bool(node.same_length))
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
        return cls(int(node.batch_size), int(node.tgt_len), context)


class EvalSegments(OrderedSegments):
    """A split's ordered segments, with the protocol they are evaluated under."""

    def __init__(self, tokens: torch.Tensor, protocol: EvalProtocol, dist: DistInfo = DistInfo()):
        super().__init__(tokens, protocol.batch_size, protocol.tgt_len, dist)
        self.protocol = protocol


class WikiTextTask(Task):
    metrics = {"ppl": "min", "loss": "min"}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.corpus: Corpus | None = None
        self.dist = DistInfo()
        self.mems: Mems | None = None  # this rank's training memory, carried across steps
        self.eval_protocol = EvalProtocol.from_config(cfg.eval, "task.eval")
        self.final_protocol = EvalProtocol.from_config(cfg.final_eval, "task.final_eval")

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

    def _eval_segments(self, protocol: EvalProtocol) -> dict[str, EvalSegments]:
        splits = self._require_corpus().splits
        return {split: EvalSegments(splits[split], protocol, self.dist) for split in ("val", "test")}

    def eval_datasets(self) -> dict[str, Dataset]:
        return self._eval_segments(self.eval_protocol)

    def _loader(self, dataset: Dataset) -> DataLoader:
        # One item is already a whole batch of segments, and the order is the data's own. Its own
        # generator: starting an iterator must not draw from the global RNG (dropout's), or a
        # resumed run, which starts one mid-epoch, would drop out other units than an uninterrupted one.
        return DataLoader(dataset, batch_size=None, shuffle=False, pin_memory=torch.cuda.is_available(),
                          generator=torch.Generator())

    def train_loader(self, batch_size: int, dist: DistInfo, seed: int) -> DataLoader:
        """Segments of all `task.data.batch_size` streams, this rank's block of them (the loop's
        per-rank `batch_size` is that block's size)."""
        return self._loader(self.train_dataset())

    def eval_loaders(self, batch_size: int, dist: DistInfo) -> dict[str, DataLoader]:
        return {split: self._loader(ds) for split, ds in self.eval_datasets().items()}

    def final_eval_loaders(self, batch_size: int, dist: DistInfo) -> dict[str, DataLoader]:
        """eval.py's protocol (`task.final_eval`), logged as val_final / test_final."""
        return {f"{split}_final": self._loader(ds) for split, ds in self._eval_segments(self.final_protocol).items()}

    # -- model, loss, metrics ---------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        m, n_token = self.cfg.model, len(self._require_corpus().vocab)
        # cutoffs past the vocabulary (the fixture's 65 words) are dropped; none left: a plain softmax
        cutoffs = [c for c in (m.get("adaptive_cutoffs") or []) if c < n_token]
        if m.get("adaptive_cutoffs") and cutoffs != list(m.adaptive_cutoffs):
            log.info("adaptive softmax cutoffs %s for a vocabulary of %d: using %s", list(m.adaptive_cutoffs), n_token, cutoffs)
        wn = m.weight_norm
        layers = list(wn.layers) if wn.enabled else []
        if wn.enabled and not layers:
            raise ConfigError("task.model.weight_norm.layers", "weight_norm.enabled=true needs at least one layer")
        try:
            return TransformerXL(n_token, n_layer=m.n_layer, d_model=m.d_model, n_head=m.n_head, d_head=m.d_head,
                                 d_inner=m.d_inner, dropout=m.dropout, dropatt=m.dropatt, mem_len=m.mem_len,
                                 clamp_len=m.clamp_len, same_length=m.same_length, pre_lnorm=m.pre_lnorm,
                                 adaptive_cutoffs=cutoffs, tie_weight=m.tie_weight, weight_norm=layers,
                                 init_std=m.init_std)
        except ValueError as exc:  # the model names the argument at fault (weight_norm, cutoffs)
            raise ConfigError("task.model", str(exc)) from None

    def training_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        if batch["segment"] == 0:  # a new epoch: the streams start over
            self.mems = None
        nll, self.mems = model(batch["inputs"], batch["targets"], self.mems)
        return nll.mean()

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        context = loader.dataset.protocol.context
        nll_sum = SumMetric().set_dtype(torch.float64).to(device)
        tokens = SumMetric().set_dtype(torch.float64).to(device)
        mems = None
        for batch in loader:
            targets = batch["targets"].to(device, non_blocking=True)
            nll, mems = model(batch["inputs"].to(device, non_blocking=True), targets, mems, context=context)
            nll_sum.update(nll.double().sum())
            tokens.update(float(targets.numel()))
        loss = (nll_sum.compute() / tokens.compute().clamp_min(1)).item()
        return {"ppl": math.exp(min(loss, 700.0)), "loss": loss}

    # -- state carried across steps: the training memory ---------------------------------------------
    def state_dict(self) -> dict:
        """The memory of every rank, concatenated in the global stream order (rank r holds block r
        of the streams), on the CPU; collective under DDP."""
        if self.mems is None:
            return {"mems": None}
        return {"mems": [all_gather_cat(m, dim=0).cpu() for m in self.mems]}

    def load_state_dict(self, state: dict) -> None:
        """This rank's block of the saved memory (the same streams whatever the number of ranks)."""
        mems = state.get("mems")
        self.mems = None if mems is None else [m.tensor_split(self.dist.world_size)[self.dist.rank].clone()
                                               for m in mems]
