"""Deterministic data loaders: seeded order, sharding under torchrun, a worker count that suits the machine."""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from topo.common import distributed as dist_info
from topo.common.devices import available_cpus, resolve_device


def default_workers(dataset: Dataset, device: torch.device) -> int:
    """Worker processes for ``dataset``: none for in-memory tensors; on CUDA up to 8 per process;
    on CPU, where the model competes for the same cores, a quarter of the cores (at most 4)."""
    if isinstance(dataset, TensorDataset):
        return 0
    cpus = max(1, available_cpus() // dist_info.world_size())
    if device.type == "cuda":
        return min(8, cpus)
    return min(4, cpus // 4)


class ShardSampler(Sampler[int]):
    """This process's share of ``range(n)`` for evaluation: ``rank, rank + world, ...``.

    Unlike ``DistributedSampler`` it never pads with duplicates, so summing
    correct counts and sample counts over processes gives unbiased metrics.
    """

    def __init__(self, n: int, num_replicas: int, rank: int) -> None:
        self.n, self.num_replicas, self.rank = n, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return max(0, math.ceil((self.n - self.rank) / self.num_replicas))


class EpochLoader(DataLoader):
    """A ``DataLoader`` whose order and worker seeds are a function of ``seed + epoch``."""

    def __init__(self, *args, seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Fix the shuffling and the workers' random streams of the next pass to ``seed + epoch``."""
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.generator.manual_seed(self.seed + epoch)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    workers: int | str = "auto",
    device: str | torch.device | None = "auto",
    distributed: bool | None = None,
    persistent_workers: bool | None = None,
) -> EpochLoader:
    """A loader over ``dataset`` for this process (``batch_size`` is per process).

    Training loaders shuffle (order fixed by ``seed + epoch``, see
    :meth:`EpochLoader.set_epoch`) and drop the last incomplete batch;
    evaluation loaders keep the order and every sample. With ``distributed``
    (default: whether torch.distributed is initialised with several processes)
    each process sees its own shard: ``DistributedSampler`` for training, a
    non-padding :class:`ShardSampler` for evaluation.

    Defaults by device: ``workers="auto"`` (see :func:`default_workers`),
    pinned memory on CUDA, persistent workers on CUDA only (on CPU fresh
    workers each epoch keep augmentation exactly reproducible across resumes).
    """
    device = resolve_device(device)
    if distributed is None:
        distributed = dist_info.is_distributed()
    replicas, rank = (dist_info.world_size(), dist_info.rank()) if distributed else (1, 0)
    if workers == "auto":
        workers = default_workers(dataset, device)
    workers = int(workers)
    if train:
        sampler: Sampler[int] = DistributedSampler(
            dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
    else:
        sampler = ShardSampler(len(dataset), replicas, rank)
    if persistent_workers is None:
        persistent_workers = device.type == "cuda"
    generator = torch.Generator()
    generator.manual_seed(seed)
    return EpochLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=bool(persistent_workers) and workers > 0,
        generator=generator,
        seed=seed,
    )
