"""Hebbian initialisation: start each filter of a new module on the units it should wire to.

"Neurons that fire together, wire together": a cluster is a group of units of
the previous layer that fire together, and the filter that covers it starts
with its weight on exactly those units.

- A 1x1 filter of a 1x1 cluster: equal weight on the cluster's channels. The
  carry path (the 1x1 branch's last filters, `builders.from_clusters`): the
  leading principal components of the correlation of the channels no cluster
  draws on.
- A branch's 1x1 reduction: the leading principal components of the correlation
  of the channels that the branch's clusters draw on (zero elsewhere), so the
  reduction keeps what those clusters share. Where the reduction is as wide as
  those channels (``--budget none``), each reduced channel is one of them: the
  principal components would span the same space, but the ReLU after the
  reduction would clip their negative parts; the selection passes every
  channel's activity through as it is (the exact Hebbian decoding).
- A 3x3 or 5x5 filter of a cluster: at each member's offset, the member's
  channel expressed in the reduced space.

Clusters go to branches by `builders.from_clusters.branch_of` (wider than 5x5:
the 5x5 branch, with members outside its window clipped to the window's edge).
Each filter keeps the norm of its random initialisation, so activations keep
their scale; filters beyond the number of clusters reuse the clusters in turn.
- The pooling projection: with the pooled map's clusters, each filter sums its
  cluster's channels (as a 1x1 filter does); without them it stays random.
"""
from __future__ import annotations

import numpy as np
import torch

from builders.from_clusters import clusters_by_branch, reduction_width, uncovered_channels
from builders.inception import Inception
from topo.cluster import Cluster, UnitClustering
from topo.stats.layer_stats import LayerStats


def hebbian_init_(module: Inception, clustering: UnitClustering, stats: LayerStats,
                  pool_clustering: UnitClustering | None = None, *, carry: bool = True) -> Inception:
    """Initialise ``module``'s filters from ``clustering`` of ``stats`` in place; returns ``module``.

    ``carry``: the module was built with a carry path (`builders.from_clusters`, ``carry=True``), whose
    filters are the last of its 1x1 branch.

    With ``pool_clustering`` (the clusters of the 3x3 max-pooled map, 1x1 window), each filter of the
    pooling projection sums its cluster's channels as the 1x1 branch does; without, it stays random.
    """
    by_branch = clusters_by_branch(clustering.clusters_)
    pool = module.pool_weight()
    if pool is not None and pool_clustering is not None and pool_clustering.clusters_:
        with torch.no_grad():
            _set_filters(pool, [_channel_vector(c, module.spec.in_channels) for c in pool_clustering.clusters_])
    inputs = module.input_weights()
    corr = stats.corr()
    with torch.no_grad():
        if inputs[1] is not None:
            carried = _carry_basis(stats, clustering.clusters_, corr, module.spec.ch1x1 if carry else 0)
            units = module.spec.ch1x1 - len(carried)
            _set_filters(inputs[1][:units], [_channel_vector(c, module.spec.in_channels) for c in by_branch[1]])
            _set_filters(inputs[1][units:], list(carried[:, :, None, None]))
        for kernel in (3, 5):
            reduce_w, spatial = inputs[kernel], module.spatial_weight(kernel)
            if reduce_w is None or spatial is None or not by_branch[kernel]:
                continue
            basis = _reduction_basis(corr, by_branch[kernel], reduce_w.shape[0])
            _set_filters(reduce_w, list(basis))
            _set_filters(spatial, [_spatial_filter(c, basis, spatial.shape[-1]) for c in by_branch[kernel]])
    return module


def _carry_basis(stats: LayerStats, clusters: list[Cluster], corr: np.ndarray, ch1x1: int) -> np.ndarray:
    """The carry path's filters (`builders.from_clusters`, the last of the 1x1 branch): the leading principal
    components of the correlation of the live channels no cluster draws on, as many as their principal
    dimension (at most ``ch1x1``)."""
    uncovered = uncovered_channels(clusters, stats)
    if not clusters or not uncovered:
        return np.zeros((0, corr.shape[0]))
    width = min(reduction_width(np.asarray(stats.cov(), dtype=np.float64), uncovered), ch1x1)
    return _principal_basis(corr, uncovered, width)


def _channel_vector(cluster: Cluster, channels: int) -> np.ndarray:
    vector = np.zeros(channels)
    for channel, _, _ in cluster.members:
        vector[channel] += 1.0
    return vector[:, None, None]


def _reduction_basis(corr: np.ndarray, clusters: list[Cluster], width: int) -> np.ndarray:
    """``width`` unit vectors over all channels: leading eigenvectors of the clusters' channels' correlation."""
    drawn = sorted({channel for c in clusters for channel, _, _ in c.members})
    if width >= len(drawn):  # as wide as the channels read: select them (see the module docstring)
        basis = np.zeros((width, corr.shape[0]))
        basis[np.arange(len(drawn)), drawn] = 1.0
        return basis
    return _principal_basis(corr, drawn, width)


def _principal_basis(corr: np.ndarray, drawn: list[int], width: int) -> np.ndarray:
    """``width`` unit vectors over all channels: the leading eigenvectors of ``corr`` over the channels
    ``drawn`` (zero elsewhere), each signed to sum to at least 0."""
    basis = np.zeros((width, corr.shape[0]))
    eigenvalues, eigenvectors = np.linalg.eigh(corr[np.ix_(drawn, drawn)])
    order = np.argsort(eigenvalues)[::-1]
    for row, column in enumerate(order[:width]):
        vector = eigenvectors[:, column]
        basis[row, drawn] = vector if vector.sum() >= 0 else -vector
    return basis


def _spatial_filter(cluster: Cluster, basis: np.ndarray, kernel: int) -> np.ndarray:
    """A (reduced channels, k, k) filter with each member's channel, in the reduced space, at its offset."""
    radius = kernel // 2
    weight = np.zeros((basis.shape[0], kernel, kernel))
    for channel, dy, dx in cluster.members:
        y, x = int(np.clip(dy, -radius, radius)) + radius, int(np.clip(dx, -radius, radius)) + radius
        weight[:, y, x] += basis[:, channel]
    return weight


def _set_filters(weight: torch.Tensor, vectors: list[np.ndarray]) -> None:
    """Filter ``f`` of ``weight`` becomes ``vectors[f % len(vectors)]``, rescaled to the filter's current norm."""
    if not vectors:
        return
    for f in range(weight.shape[0]):
        target = torch.as_tensor(vectors[f % len(vectors)], dtype=weight.dtype).reshape(weight.shape[1:])
        norm = target.norm()
        if norm > 0:
            weight[f].copy_(target * (weight[f].norm() / norm))
