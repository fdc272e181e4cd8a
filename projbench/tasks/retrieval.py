"""`task=cub|cars196|sop|inshop`: deep metric learning for image retrieval (the paper's Table 6).

A timm trunk (ResNet-50 in the recipe) with global pooling, a linear embedding layer, and an
L2-normalised output, trained with a pytorch-metric-learning loss (`task/loss=triplet`: triplet
margin loss on semi-hard mined triplets; `task/loss=proxyanchor`: Proxy-Anchor), evaluated by
Recall@K with exact cosine k-NN on the test classes, which are disjoint from the training classes.

Why this task is in the paper: the loss sees only the normalised embedding (W f + b) / ||W f + b||,
so it is invariant to the scale of the embedding layer's weight (jointly with its bias; exactly
for W alone with `task.model.embedding_bias=false`), and of the ProxyAnchor proxies, which the
loss normalises too, without any normalisation layer. Those weights are the scale-invariant
weights whose effective step size AdamP keeps from shrinking.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils.common_functions import TorchInitWrapper
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from projbench.data.retrieval import GALLERY, QUERY, READERS, Sample, check_images_exist, ensure_fixture
from projbench.distributed import DistInfo, ResumableSampler, barrier
from projbench.errors import ConfigError, DataError
from projbench.tasks.base import Task

KS = (1, 2, 4, 8)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The fixture: 8 train + 8 test classes x 6 images of 64x64, in the data set's own layout.
FIXTURE = dict(classes=16, per_class=6, size=64)


# -- Recall@K -----------------------------------------------------------------------------------
@torch.no_grad()
def recall_at_k(embeddings: torch.Tensor, labels: torch.Tensor, ks=KS, query: torch.Tensor | None = None,
                gallery: torch.Tensor | None = None, chunk: int = 1024) -> dict[int, float]:
    """Recall@K in percent: the share of queries with at least one same-label item among their K
    nearest gallery items, by exact k-NN on dot products (cosine similarity for L2-normalised
    embeddings). A query never retrieves itself. `query` / `gallery` are boolean masks over the
    rows; by default every row is both (CUB, Cars-196, SOP: each test image against all the rest)."""
    n = len(labels)
    query = torch.ones(n, dtype=torch.bool, device=labels.device) if query is None else query
    gallery = torch.ones(n, dtype=torch.bool, device=labels.device) if gallery is None else gallery
    q_idx, g_idx = query.nonzero().squeeze(1), gallery.nonzero().squeeze(1)
    g_emb, g_labels = embeddings[g_idx].float(), labels[g_idx]
    kmax = min(max(ks), len(g_idx))
    hits = torch.zeros(len(ks), dtype=torch.long, device=labels.device)
    for start in range(0, len(q_idx), chunk):
        rows = q_idx[start:start + chunk]
        sims = embeddings[rows].float() @ g_emb.T
        sims.masked_fill_(rows[:, None] == g_idx[None, :], float("-inf"))  # not itself
        values, top = sims.topk(kmax, dim=1)
        match = (g_labels[top] == labels[rows, None]) & torch.isfinite(values)
        for j, k in enumerate(ks):
            hits[j] += match[:, :k].any(dim=1).sum()
    total = max(len(q_idx), 1)
    return {k: 100.0 * h / total for k, h in zip(ks, hits.tolist())}


def _all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The rows of `t` from every rank, concatenated in rank order (ranks may hold different
    numbers of rows); `t` itself without a process group."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return t
    world = torch_dist.get_world_size()
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch_dist.all_gather(sizes, size)
    longest = int(max(sizes).item())
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[:len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch_dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])


# -- data -------------------------------------------------------------------------------------
class ImageList(Dataset):
    """(image, label) for training; (image, label, role) for testing, role in QUERY | GALLERY."""

    def __init__(self, samples: list[Sample], labels: list[int], transform, with_role: bool):
        self.samples, self.labels, self.transform, self.with_role = samples, labels, transform, with_role

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        with Image.open(self.samples[i].path) as img:
            x = self.transform(img.convert("RGB"))
        return (x, self.labels[i], self.samples[i].role) if self.with_role else (x, self.labels[i])


class ClassBalancedSampler(Sampler[int]):
    """Batches of (batch / m) classes x m images each, for losses that mine pairs in the batch.

    Every global batch (all ranks) draws distinct classes, then m images of each (with replacement
    only for classes with fewer than m images); rank r takes the r-th slice, which holds whole
    classes. The order depends only on (seed, epoch), and `set_start` skips into an epoch, so a
    resumed run sees exactly the batches an uninterrupted one would (as ResumableSampler).
    An epoch has len(dataset) // global batch batches.
    """

    def __init__(self, labels: list[int], m: int, batch_size: int, info: DistInfo, seed: int):
        if m <= 0 or batch_size % m:
            raise ConfigError("task.loss.m_per_class",
                              f"the per-rank batch {batch_size} must be a multiple of m_per_class={m}")
        by_class: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            by_class.setdefault(label, []).append(i)
        self.pools = [torch.tensor(v) for _, v in sorted(by_class.items())]
        self.classes_per_batch = batch_size * info.world_size // m
        if self.classes_per_batch > len(self.pools):
            raise ConfigError("task.data.batch_size", f"a batch of {batch_size * info.world_size} with m_per_class={m} "
                              f"needs {self.classes_per_batch} classes; the training set has {len(self.pools)}")
        self.m, self.batch_size, self.rank, self.seed = m, batch_size, info.rank, seed
        self.num_batches = len(labels) // (batch_size * info.world_size)
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, index: int) -> None:
        """Skip the first `index` samples of this rank's share of the current epoch (once)."""
        self.start = index

    def _epoch(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        batches = []
        for _ in range(self.num_batches):
            picks = []
            for c in torch.randperm(len(self.pools), generator=g)[:self.classes_per_batch].tolist():
                pool = self.pools[c]
                pick = (torch.randperm(len(pool), generator=g)[:self.m] if len(pool) >= self.m
                        else torch.randint(len(pool), (self.m,), generator=g))
                picks.append(pool[pick])
            batches.append(torch.cat(picks)[mine])
        return torch.cat(batches) if batches else torch.empty(0, dtype=torch.long)

    def __iter__(self):
        indices = self._epoch()[self.start:].tolist()
        self.start = 0
        return iter(indices)

    def __len__(self) -> int:
        return self.num_batches * self.batch_size - self.start


# -- model ------------------------------------------------------------------------------------
class MinedLoss(nn.Module):
    """A pml loss on the tuples a pml miner picks from the batch."""

    def __init__(self, loss: nn.Module, miner: nn.Module):
        super().__init__()
        self.loss, self.miner = loss, miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings, labels, self.miner(embeddings, labels))


def _triplet(cfg, num_classes: int, dim: int) -> nn.Module:
    return MinedLoss(losses.TripletMarginLoss(margin=cfg.margin),
                     miners.TripletMarginMiner(margin=cfg.margin, type_of_triplets="semihard"))


def _proxy_anchor(cfg, num_classes: int, dim: int) -> nn.Module:
    # Proxies initialised as in the Proxy-Anchor code (kaiming normal, fan_out).
    return losses.ProxyAnchorLoss(num_classes, dim, margin=cfg.margin, alpha=cfg.alpha,
                                  weight_init_func=TorchInitWrapper(nn.init.kaiming_normal_, mode="fan_out"))


LOSSES = {"triplet": _triplet, "proxyanchor": _proxy_anchor}


class EmbeddingNet(nn.Module):
    """trunk -> linear embedding -> L2 normalisation. `model(images)` gives embeddings;
    `model(images, labels)` gives the training loss. The loss lives inside the model so that
    its parameters (ProxyAnchor proxies) move to the device, are averaged by DDP and are saved in
    the checkpoint together with the network."""

    def __init__(self, trunk: nn.Module, dim: int, criterion: nn.Module, freeze_bn: bool, bias: bool = True):
        super().__init__()
        self.trunk, self.criterion, self.freeze_bn = trunk, criterion, freeze_bn
        self.embedding = nn.Linear(trunk.num_features, dim, bias=bias)
        nn.init.kaiming_normal_(self.embedding.weight, mode="fan_out")  # as the Proxy-Anchor code
        if bias:
            nn.init.zeros_(self.embedding.bias)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        embeddings = F.normalize(self.embedding(self.trunk(images)).float(), dim=1)
        if labels is None:
            return embeddings
        with torch.autocast(embeddings.device.type, enabled=False):  # exp(alpha * cos) wants fp32
            return self.criterion(embeddings, labels)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_bn:  # BatchNorm keeps its (pretrained) statistics, as in the recipe
            for m in self.trunk.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self


def load_trunk_weights(trunk: nn.Module, path: str | Path) -> None:
    """A local state dict (plain, or under 'state_dict' / 'model') into the trunk; the
    classifier's weights are dropped. Nothing is downloaded."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "pretrained weights not found; expected a state dict saved with torch.save",
                        "Set task.model.pretrained=null to train from scratch")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    head = (getattr(trunk, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k.split(".")[0] != head}
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(path, f"does not fit the trunk: missing {list(missing)[:4]}, unexpected {list(unexpected)[:4]}"
                        f" ({len(missing)} / {len(unexpected)} keys)")


# -- the task ---------------------------------------------------------------------------------
class RetrievalTask(Task):
    metrics = {f"recall_at_{k}": "max" for k in KS}

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.loss.name not in LOSSES:
            raise ConfigError("task.loss.name", f"unknown loss {cfg.loss.name!r}; choose one of {sorted(LOSSES)}")
        if cfg.data.layout not in READERS:
            raise ConfigError("task.data.layout",
                              f"unknown layout {cfg.data.layout!r}; choose one of {sorted(READERS)}")
        if cfg.model.head_only_epochs < 0:
            raise ConfigError("task.model.head_only_epochs", f"must be >= 0, got {cfg.model.head_only_epochs}")
        self.splits: dict[str, list[Sample]] = {}
        self.train_classes: list[int] = []

    def setup(self, dist: DistInfo) -> None:
        data = self.cfg.data
        if data.fixture and dist.is_main:
            ensure_fixture(data.layout, self.data_root(), **FIXTURE)
        barrier()
        self.splits = READERS[data.layout](self.data_root())
        for split, samples in self.splits.items():
            if not samples:
                raise DataError(self.data_root(), f"the {split} split is empty")
        check_images_exist(self.splits)
        self.train_classes = sorted({s.label for s in self.splits["train"]})

    def _transform(self, train: bool):
        size = int(self.cfg.data.image_size)
        scale = tuple(self.cfg.data.crop_scale)
        head = ([transforms.RandomResizedCrop(size, scale=scale), transforms.RandomHorizontalFlip()] if train else
                [transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)])
        return transforms.Compose(head + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def train_dataset(self) -> Dataset:
        index = {c: i for i, c in enumerate(self.train_classes)}  # contiguous labels for the proxies
        samples = self.splits["train"]
        return ImageList(samples, [index[s.label] for s in samples], self._transform(True), with_role=False)

    def eval_datasets(self) -> dict[str, Dataset]:
        samples = self.splits["test"]
        return {"test": ImageList(samples, [s.label for s in samples], self._transform(False), with_role=True)}

    def train_loader(self, batch_size: int, dist: DistInfo, seed: int) -> DataLoader:
        """Shuffled batches, or class-balanced ones when the loss sets `m_per_class`. The loader's
        own generator (which the loop seeds per epoch) keeps its per-epoch seed draw off the
        global RNG, so a run resumed mid-epoch (num_workers=0) augments exactly as an
        uninterrupted one; with workers the batches are still exact, their augmentations not."""
        dataset = self.train_dataset()
        m = self.cfg.loss.get("m_per_class")
        sampler = (ClassBalancedSampler(dataset.labels, int(m), batch_size, dist, seed) if m else
                   ResumableSampler(dataset, dist, shuffle=True, seed=seed, drop_last=True))
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, generator=torch.Generator(),
                          **self.loader_kwargs())

    def build_model(self) -> nn.Module:
        model_cfg = self.cfg.model
        kwargs = OmegaConf.to_container(model_cfg.get("kwargs", {}), resolve=True)
        trunk = timm.create_model(model_cfg.arch, pretrained=False, num_classes=0,
                                  global_pool=model_cfg.global_pool, **kwargs)
        if model_cfg.pretrained:
            load_trunk_weights(trunk, model_cfg.pretrained)
        dim = int(model_cfg.embedding_dim)
        criterion = LOSSES[self.cfg.loss.name](self.cfg.loss, len(self.train_classes), dim)
        return EmbeddingNet(trunk, dim, criterion, bool(model_cfg.freeze_bn), bool(model_cfg.embedding_bias))

    def optimizer_groups(self, model: nn.Module) -> list[dict]:
        """The loss's own parameters (ProxyAnchor proxies) at base lr x `task.loss.proxy_lr_scale`."""
        params = list(model.criterion.parameters())
        if not params:
            return []
        return [{"params": params, "lr": float(self.cfg.loss.base_lr) * float(self.cfg.loss.proxy_lr_scale)}]

    def frozen_parameters(self, model: nn.Module, epoch: int) -> list[nn.Parameter]:
        """During the first `task.model.head_only_epochs` epochs only the embedding layer and the
        loss's proxies train; the trunk (BatchNorm weights included) takes no step, as the
        Proxy-Anchor code's `--warm` epochs (its train.py turns requires_grad off for everything
        else). Frozen BatchNorm statistics are `task.model.freeze_bn`'s business, in every epoch."""
        if epoch >= int(self.cfg.model.head_only_epochs):
            return []
        head = {id(p) for p in (*model.embedding.parameters(), *model.criterion.parameters())}
        return [p for p in model.parameters() if id(p) not in head]

    def training_loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, labels = batch
        return model(images, labels)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        embeddings, labels, roles = [], [], []
        for images, y, role in loader:
            embeddings.append(model(images.to(device, non_blocking=True)))
            labels.append(y.to(device))
            roles.append(role.to(device))
        dim = int(self.cfg.model.embedding_dim)
        emb = _all_gather_rows(torch.cat(embeddings) if embeddings else torch.empty(0, dim, device=device))
        labels = _all_gather_rows(torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=device))
        roles = _all_gather_rows(torch.cat(roles) if roles else torch.empty(0, dtype=torch.long, device=device))
        recalls = recall_at_k(emb, labels, KS, query=(roles & QUERY) > 0, gallery=(roles & GALLERY) > 0)
        return {f"recall_at_{k}": value for k, value in recalls.items()}
