"""The record of one module: what was measured (statistics, clusters) and decided (its widths, its budget),
shared by the construction, `analyze` and the report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np

from builders.cost import inception_macs
from builders.spec import InceptionSpec
from topo.cluster.estimator import UnitClustering
from topo.stats.layer_stats import LayerStats


class LayerRecord(TypedDict, total=False):
    """What the construction measured and decided for one module (`layer_record`; the report and the control
    read it back from ``records.json``)."""

    name: str                      # e.g. "inception3a"
    in_channels: int
    spatial_shape: list[int]       # [H, W] of the recorded map
    observations: int              # positions x images the statistics saw
    dead_units: int
    method: str                    # clustering method, e.g. "arora"
    window: int                    # the window the layer was clustered with
    n_clusters: int
    edges: int                     # Hebbian edges the clustering found (each pair of units once, up to translation)
    kernel_counts: dict[str, int]  # clusters per kernel size: {"1": .., "3": .., "5": ..}
    spec: dict[str, Any]           # the discovered InceptionSpec as a dict
    reference: dict[str, Any] | None  # the hand-designed module's InceptionSpec dict
    macs: int                      # multiply-adds of the discovered module
    budget_macs: int | None        # its share of the multiply-add budget (None: no budget)
    fallback: bool                 # no clusters: the module is the fallback's
    window_forced: bool            # the map set the window (and the largest kernel), not the data
    firing_rate: float | None      # the layer's mean per-unit firing rate
    pool_clusters: int | None      # clusters of the 3x3 max-pooled map (None: no pooling branch)
    null: str                      # what each pair was tested against: "none" or a null input's kind
    found_spec: dict[str, Any]     # the module as found, where the network was then scaled as a whole
    decoded_units: int             # --decoder threshold: the units whose threshold it set (topo.construct.decoding)
    decoded_rate: float | None     # their mean target firing rate


@dataclass
class LayerClusters:
    """What the clustering found in one recorded layer: the layer's clusters and those of its pooled map."""

    window: int
    clustering: UnitClustering
    pool_clustering: UnitClustering | None = None


def layer_record(name: str, stats: LayerStats, found: LayerClusters, module: InceptionSpec,
                 reference: InceptionSpec | None, *, budget: float | None, in_channels: int,
                 map_hw: tuple[int, int], largest_window: int = 5, null: str = "none",
                 kernel5x5: int = 5) -> LayerRecord:
    """What was measured and decided for one module (`LayerRecord`).

    ``window_forced``: the map was too small for ``largest_window``, so the window (and the largest kernel)
    was set by the map, not by the data; ``firing_rate``: the layer's mean per-unit firing rate.
    """
    clustering = found.clustering
    return {
        "name": name,
        "in_channels": in_channels,
        "spatial_shape": list(map_hw),
        "observations": int(stats.count),
        "dead_units": int(len(stats.dead_units)),
        "method": clustering.method,
        "window": found.window,
        "n_clusters": int(clustering.n_clusters_),
        "edges": int(clustering.n_edges_),
        "kernel_counts": {str(k): int(v) for k, v in clustering.kernel_counts_.items()},
        "spec": module.to_dict(),
        "reference": reference.to_dict() if reference is not None else None,
        "macs": int(inception_macs(module, *map_hw, kernel5x5=kernel5x5)),
        "budget_macs": None if budget is None else int(round(budget)),
        "fallback": not clustering.n_clusters_,
        "window_forced": found.window < largest_window,
        "firing_rate": float(np.mean(stats.firing_rate)) if stats.count else None,
        "pool_clusters": int(found.pool_clustering.n_clusters_) if found.pool_clustering is not None else None,
        "null": null,
    }


def describe(record: dict[str, Any]) -> str:
    """One line on what a module's statistics called for."""
    m = InceptionSpec.from_dict(record["spec"])
    h, w = record["spatial_shape"]
    counts = {int(k): v for k, v in record["kernel_counts"].items()}
    return (f"{record['name']}: {record['in_channels']} channels at {h}x{w}, {record['n_clusters']} clusters "
            f"{counts} -> 1x1 {m.ch1x1}, 3x3 {m.ch3x3red}->{m.ch3x3}, 5x5 {m.ch5x5red}->{m.ch5x5}, "
            f"pool {m.pool_proj}")
