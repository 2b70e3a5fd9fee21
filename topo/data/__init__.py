"""Data sets by name and deterministic loaders.

``load(name, data_dir)`` returns a :class:`DataBundle` (train and val data
sets plus what the network needs to know); ``load("tensors", "FILE.npz")``
reads arrays and ``load("planted")`` generates a planted deep network's data.
``make_loader`` wraps a data set in a loader whose order is fixed by
``seed + epoch``.
"""
from __future__ import annotations

from topo.common.devices import resolve_device
from topo.data.bundle import DataBundle
from topo.data.folders import ImageTree, check_tree, take_skipped
from topo.data.loader import EpochLoader, ShardSampler, make_loader
from topo.data.second import second_source
from topo.data.sources import DATASETS, default_data_dir, load
from topo.data.tensors import load_npz, planted_data

__all__ = [
    "DATASETS",
    "DataBundle",
    "EpochLoader",
    "ImageTree",
    "ShardSampler",
    "check_tree",
    "default_data_dir",
    "load",
    "load_npz",
    "make_loader",
    "planted_data",
    "resolve_device",
    "second_source",
    "take_skipped",
]
