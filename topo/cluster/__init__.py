"""Correlation clustering: units of one layer -> candidate units of the next.

`UnitClustering` (scikit-learn conventions) turns `topo.stats.LayerStats` into
`Cluster` objects: groups of (channel, dy, dx) with a kernel size (1, 3, 5);
``fit(stats, null=null_stats)`` tests each pair against a null recording of the
layer instead of against independence, and `Evidence` (``evidence_``) says
whether the statistics can support the test. See docs/clustering.md for the
methods and every rule.
"""
from __future__ import annotations

from topo.cluster.clusters import Cluster, canonical_members, kernel_for_extent
from topo.cluster.estimator import METHODS, UnitClustering
from topo.cluster.evidence import Evidence
from topo.cluster.metrics import adjusted_rand, aligned_jaccard, best_match_jaccard, recovery_scores

__all__ = [
    "Cluster",
    "Evidence",
    "METHODS",
    "UnitClustering",
    "adjusted_rand",
    "aligned_jaccard",
    "best_match_jaccard",
    "canonical_members",
    "kernel_for_extent",
    "recovery_scores",
]
