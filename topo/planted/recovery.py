"""Layer-wise recovery of a planted deep network by a construction.

Module 1 of a construction on the observed data (``stem="none"``) clusters the
observed channels: its clusters are scored against hidden layer 1's supports
directly. Module l > 1 clusters the *outputs* of module l - 1, whose channels
are decoded units (with ``init="hebbian"`` and ``budget_macs="none"``, output
channel f of a branch decodes the branch's f-th cluster, `branch_of` order
1x1, 3x3, 5x5, then the pooling projection). To score module l against layer l,
layer l's supports are rewritten in the decoded channels:

* each decoded channel is matched to the true unit of layer l - 1 whose
  (rewritten) support it overlaps best (aligned Jaccard), together with the
  shift ``t`` that aligns them (cluster = support + t); a decoded unit then
  reads the true unit's map shifted by ``t``: ``d(p) ~ h(p + t)``;
* a support member ``(u, o)`` of a layer-l unit becomes ``(channel of u, o - t_u)``
  for each decoded channel matched to u (members whose unit no channel decodes
  are left out, which lowers the score: a unit that was never found cannot be
  read by the next layer).

`layer_recovery` returns, per layer, the usual `topo.cluster.recovery_scores`
of the module's clustering against that rewritten truth (the kernel class of
a rewritten support is the one its footprint in decoded channels needs: the
shifts of its members can widen it), plus the share of the layer's true units
that some decoded channel matched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from builders.from_clusters import clusters_by_branch
from topo.cluster import Cluster, aligned_jaccard, recovery_scores
from topo.cluster.clusters import canonical_members
from topo.cluster.metrics import best_shift
from topo.planted.generator import DeepPlanted, PlantedTruth

Member = tuple[int, int, int]


@dataclass(frozen=True)
class DecodedChannel:
    """What one output channel of a decoding module reads: true unit ``unit`` shifted by ``shift`` (or nothing)."""

    unit: int | None
    shift: tuple[int, int] = (0, 0)
    jaccard: float = 0.0


def decoded_clusters(clustering) -> list[Cluster | None]:
    """The cluster each output channel of the module built from ``clustering`` decodes, in channel order.

    Branch order (1x1, 3x3, 5x5) as `builders.from_clusters` builds it; the
    pooling projection's channels decode no cluster of this layer and are not
    listed (they follow after these).
    """
    by_branch = clusters_by_branch(clustering.clusters_)
    return [c for k in (1, 3, 5) for c in by_branch[k]]


def match_channels(clusters: Sequence[Cluster], truth_supports: Sequence[Sequence[Member]]) -> list[DecodedChannel]:
    """Each decoded cluster's best-matching true unit (aligned Jaccard) and the shift between them."""
    out = []
    for cluster in clusters:
        scores = [aligned_jaccard(cluster.members, support) for support in truth_supports]
        if not scores or max(scores) == 0:
            out.append(DecodedChannel(None))
            continue
        unit = int(np.argmax(scores))
        out.append(DecodedChannel(unit, best_shift(cluster.members, truth_supports[unit]), float(scores[unit])))
    return out


def rewrite_truth(truth: PlantedTruth, channels: Sequence[DecodedChannel]) -> list[tuple[Member, ...]]:
    """Layer l's supports over layer l - 1's true units, rewritten in the decoded channels of module l - 1."""
    readers: dict[int, list[tuple[int, tuple[int, int]]]] = {}
    for index, channel in enumerate(channels):
        if channel.unit is not None:
            readers.setdefault(channel.unit, []).append((index, channel.shift))
    supports = []
    for support in truth.supports:
        members = {(index, dy - ty, dx - tx) for unit, dy, dx in support for index, (ty, tx) in readers.get(unit, [])}
        supports.append(canonical_members(members) if members else ())
    return supports


@dataclass(frozen=True)
class _RewrittenTruth:
    """A PlantedTruth-like object for `recovery_scores` (supports in decoded channels)."""

    supports: tuple[tuple[Member, ...], ...]
    kernel_sizes: tuple[int, ...]

    @property
    def kernel_counts(self) -> dict[int, int]:
        return {k: sum(1 for s in self.kernel_sizes if s == k) for k in (1, 3, 5)}


def layer_recovery(planted: DeepPlanted, clusterings: Sequence) -> list[dict]:
    """Per module (bottom first), its recovery of the planted layer of the same depth (see the module docstring)."""
    rows = []
    truth: _RewrittenTruth | PlantedTruth = planted.layer_truth(1)
    for depth, clustering in enumerate(clusterings, start=1):
        if depth > planted.config.depth:
            break
        scores = recovery_scores(truth, clustering)
        channels = match_channels(decoded_clusters(clustering), truth.supports)
        found_units = {c.unit for c in channels if c.unit is not None}
        scores["layer"] = depth
        scores["units_decoded"] = len(found_units) / max(len(truth.supports), 1)
        rows.append(scores)
        if depth < planted.config.depth:
            upper = planted.layer_truth(depth + 1)
            supports = tuple(rewrite_truth(upper, channels))
            # the kernel a rewritten support needs: the shifts of its decoded members may widen its footprint
            kernels = tuple(Cluster.from_members(s).kernel_size if s else k
                            for s, k in zip(supports, upper.kernel_sizes))
            truth = _RewrittenTruth(supports, kernels)
    return rows
