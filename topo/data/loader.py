"""Deterministic data loaders: seeded order, sharding under torchrun, a worker count that suits the machine."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from topo.common import distributed as dist_info
from topo.common.devices import available_cpus, resolve_device
from topo.common.processes import signals_held
from topo.common.seeding import derived_seed


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


@dataclass
class EpochSeed:
    """The seed of a loader's pass: its ``seed`` and the current ``epoch`` (shared by the loader and its sampler)."""

    seed: int
    epoch: int = 0


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s random transforms in pass ``epoch`` of a loader seeded with ``seed``."""
    return derived_seed(seed, epoch, index)


class SeededSampler(Sampler[tuple[int, int]]):
    """``sampler``'s indices, each with the seed of its random transforms (`sample_seed`)."""

    def __init__(self, sampler: Sampler[int], state: EpochSeed) -> None:
        self.sampler, self.state = sampler, state

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seed, epoch = self.state.seed, self.state.epoch
        return ((index, sample_seed(seed, epoch, index)) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class SeededSamples(Dataset):
    """``dataset`` read with torch's global generator seeded per sample: item ``(index, seed)`` is
    ``dataset[index]`` drawn under ``torch.manual_seed(seed)`` (the process's own state is put back after), so
    a sample's random augmentation is a function of the loader's seed, the epoch and the index, whatever the
    number of workers and whatever the process drew before."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # the wrapped data set's own attributes (classes, skipped counts)
        if name == "dataset" or name.startswith("__"):  # never its batch reader (__getitems__), nor pickling's
            raise AttributeError(name)
        return getattr(self.dataset, name)


class EpochLoader(DataLoader):
    """A ``DataLoader`` whose order, worker seeds and (for data sets that are not in-memory tensors) every
    sample's random transforms are a function of ``seed + epoch``."""

    def __init__(self, *args, seed: int = 0, state: EpochSeed | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.epoch = 0
        self.state = state

    def _get_iterator(self) -> Any:
        """A pass's iterator, its worker processes started with Ctrl-C and SIGTERM held (`signals_held`): the
        terminal's Ctrl-C never reaches them (this process stops them), and this process takes a signal only once
        they are started (during their start it was dropped, or left a half-made iterator)."""
        with signals_held():
            return super()._get_iterator()

    def set_epoch(self, epoch: int) -> None:
        """Fix the shuffling, the workers' random streams and the samples' transforms of the next pass to
        ``seed + epoch``."""
        self.epoch = epoch
        if self.state is not None:
            self.state.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.generator.manual_seed(self.seed + epoch)


def _sampler(dataset: Dataset, train: bool, replicas: int, rank: int, seed: int) -> Sampler[int]:
    """This process's indices: shuffled by ``seed`` (and the epoch), the last incomplete batch dropped, for
    training; every sample once, in order, for evaluation."""
    if train:
        return DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return ShardSampler(len(dataset), replicas, rank)


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

    A data set other than in-memory tensors is read through :class:`SeededSamples`: each sample's random
    transforms are drawn from its own seed (`sample_seed` of ``seed``, the epoch and its index), so the same
    seed gives the same batches with any number of workers (0 included) and whatever the process drew before.
    """
    device = resolve_device(device)
    if distributed is None:
        distributed = dist_info.is_distributed()
    replicas, rank = (dist_info.world_size(), dist_info.rank()) if distributed else (1, 0)
    if workers == "auto":
        workers = default_workers(dataset, device)
    workers = int(workers)
    sampler = _sampler(dataset, train, replicas, rank, seed)
    if persistent_workers is None:
        persistent_workers = device.type == "cuda"
    generator = torch.Generator()
    generator.manual_seed(seed)
    state = None
    if not isinstance(dataset, TensorDataset):  # tensors in memory have no random transforms
        state = EpochSeed(seed)
        dataset, sampler = SeededSamples(dataset), SeededSampler(sampler, state)
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
        state=state,
    )
