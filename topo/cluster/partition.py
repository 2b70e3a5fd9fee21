"""Hard partitions: spectral, agglomerative and Louvain.

Each method splits a set of variables into groups. In the spatial mode the set
is one anchor's neighbourhood (the anchor itself is then added to every group,
since it belongs to all of its parents' clusters); in the non-spatial mode it
is every live channel.

* ``spectral``: scikit-learn ``SpectralClustering`` on the precomputed
  non-negative affinity ``max(corr, 0)``; the number of groups by the eigengap
  (`select.eigengap_k`) unless given; labels assigned by ``cluster_qr``, which
  is deterministic and fast.
* ``agglomerative``: scipy average linkage on ``1 - |corr|``, cut where the
  average correlation between two groups falls below ``min_corr`` (or into a
  given number of groups).
* ``louvain``: networkx Louvain communities of the thresholded (Hebbian) graph;
  a given number of groups is met by bisecting the resolution, and where no
  resolution gives it (disconnected parts), by joining the most densely linked
  communities (`merge_communities`).
"""
from __future__ import annotations

import warnings

import networkx as nx
import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from topo.cluster.select import eigengap_k

METHODS = ("spectral", "agglomerative", "louvain")


def spectral_labels(corr: np.ndarray, n_groups: int | None, k_max: int, seed: int) -> np.ndarray:
    from sklearn.cluster import SpectralClustering

    n = corr.shape[0]
    affinity = np.clip(corr.astype(np.float64), 0.0, None)
    affinity = (affinity + affinity.T) / 2
    np.fill_diagonal(affinity, 1.0)
    k = n_groups if n_groups is not None else eigengap_k(affinity, min(k_max, n))
    k = int(min(max(k, 1), n))
    if k == 1 or n < 3:
        return np.zeros(n, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SpectralClustering(n_clusters=k, affinity="precomputed", assign_labels="cluster_qr",
                                   random_state=seed)
        return model.fit_predict(affinity).astype(np.int64)


def agglomerative_labels(corr: np.ndarray, n_groups: int | None, min_corr: float) -> np.ndarray:
    n = corr.shape[0]
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    dist = 1.0 - np.abs(corr.astype(np.float64))
    dist = np.clip((dist + dist.T) / 2, 0.0, None)
    np.fill_diagonal(dist, 0.0)
    tree = linkage(squareform(dist, checks=False), method="average")
    if n_groups is not None:
        labels = fcluster(tree, t=int(n_groups), criterion="maxclust")
    else:
        labels = fcluster(tree, t=1.0 - min_corr, criterion="distance")
    return labels.astype(np.int64) - 1


def louvain_labels(adj: np.ndarray, weights: np.ndarray | None, n_groups: int | None, seed: int) -> np.ndarray:
    n = adj.shape[0]
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    rows, cols = np.nonzero(np.triu(adj | adj.T, k=1))
    if weights is None:
        graph.add_edges_from(zip(rows.tolist(), cols.tolist()))
    else:
        w = np.maximum((weights[rows, cols] + weights[cols, rows]) / 2, 1e-6)
        graph.add_weighted_edges_from(zip(rows.tolist(), cols.tolist(), w.tolist()))

    def run(resolution: float) -> np.ndarray:
        labels = np.empty(n, dtype=np.int64)
        comms = nx.community.louvain_communities(graph, weight="weight", resolution=resolution, seed=seed)
        for g, comm in enumerate(sorted(comms, key=min)):
            labels[list(comm)] = g
        return labels

    labels = run(1.0)
    if n_groups is None or len(np.unique(labels)) == n_groups:
        return labels
    lo, hi = (1e-3, 1.0) if len(np.unique(labels)) > n_groups else (1.0, 1e3)
    for _ in range(20):
        mid = float(np.sqrt(lo * hi))
        labels = run(mid)
        found = len(np.unique(labels))
        if found == n_groups:
            break
        lo, hi = (lo, mid) if found > n_groups else (mid, hi)
    if len(np.unique(labels)) > n_groups:  # e.g. disconnected parts no resolution joins
        labels = merge_communities(adj | adj.T, labels, n_groups)
    return labels


def merge_communities(adj: np.ndarray, labels: np.ndarray, n_groups: int) -> np.ndarray:
    """Join the two communities with the densest links between them until ``n_groups`` remain.

    Density is edges between the two over the product of their sizes (average
    linkage on the graph); ties go to the lowest labels.
    """
    _, labels = np.unique(labels, return_inverse=True)
    onehot = np.eye(labels.max() + 1)[labels]
    links = onehot.T @ adj.astype(np.float64) @ onehot
    sizes = onehot.sum(axis=0)
    while len(sizes) > n_groups:
        density = links / np.outer(sizes, sizes)
        np.fill_diagonal(density, -np.inf)
        i, j = sorted(np.unravel_index(int(np.argmax(density)), density.shape))
        links[i] += links[j]
        links[:, i] += links[:, j]
        links = np.delete(np.delete(links, j, axis=0), j, axis=1)
        sizes[i] += sizes[j]
        sizes = np.delete(sizes, j)
        labels = np.where(labels == j, i, labels)
        labels = np.where(labels > j, labels - 1, labels)
    return labels.astype(np.int64)


def partition(method: str, *, corr: np.ndarray | None, adj: np.ndarray | None, n_groups: int | None,
              k_max: int, min_corr: float, seed: int) -> np.ndarray:
    """Labels (0..g-1) for the variables behind ``corr`` / ``adj`` by one hard method."""
    if method == "spectral":
        return spectral_labels(corr, n_groups, k_max, seed)
    if method == "agglomerative":
        return agglomerative_labels(corr, n_groups, min_corr)
    if method == "louvain":
        return louvain_labels(adj, None, n_groups, seed)
    raise ValueError(f"unknown partition method {method!r}")
