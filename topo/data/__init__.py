"""Data sets by name and deterministic loaders.

``load(name, data_dir)`` returns a :class:`DataBundle` (train and val data
sets plus what the network needs to know); ``make_loader`` wraps a data set in
a loader whose order is fixed by ``seed + epoch``.
"""
from __future__ import annotations

from topo.data.folders import ImageTree, check_tree, take_skipped
from topo.data.loader import EpochLoader, ShardSampler, make_loader, resolve_device
from topo.data.sources import DATASETS, DataBundle, default_data_dir, load

__all__ = [
    "DATASETS",
    "DataBundle",
    "EpochLoader",
    "ImageTree",
    "ShardSampler",
    "check_tree",
    "default_data_dir",
    "load",
    "make_loader",
    "resolve_device",
    "take_skipped",
]
