"""torch.distributed set-up for runs launched with torchrun, and the samplers the loop uses.

Without torchrun (no WORLD_SIZE in the environment) everything here degrades to one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _export_slurm_environment() -> None:
    """Under SLURM with several tasks (hydra/launcher=slurm) and no torchrun, derive RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from the SLURM variables (submitit)."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group torchrun (or SLURM via submitit) set up: gloo on CPU, nccl on CUDA."""
    _export_slurm_environment()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return info


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def current_rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_gather_list(items: list) -> list:
    """The concatenation of every rank's `items` (picklable), in rank order, on every rank
    (`items` itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return items
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def all_gather_cat(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every rank's `tensor` (the same shape on all ranks) concatenated along `dim` in rank order,
    on every rank (`tensor` itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


class ResumableSampler(DistributedSampler):
    """DistributedSampler (also for one process) that can start an epoch part-way through.

    The order depends only on (seed, epoch), so a run resumed at batch k of an epoch sees the
    same remaining batches as an uninterrupted run.
    """

    def __init__(self, dataset: Dataset, info: DistInfo, shuffle: bool, seed: int, drop_last: bool):
        super().__init__(dataset, num_replicas=info.world_size, rank=info.rank,
                         shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0

    def set_start(self, index: int) -> None:
        """Skip the first `index` samples of this rank's share of the current epoch (once)."""
        self.start = index

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        self.start = 0
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank r takes samples r, r + world, ... with no padding, so metrics
    reduced across ranks count every sample exactly once."""

    def __init__(self, dataset: Dataset, info: DistInfo):
        self.indices = range(info.rank, len(dataset), info.world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
