"""Choosing the number of clusters, and merging the candidates into the final set.

* Inside one partition the number of groups is the *eigengap* of the
  normalised Laplacian of the affinity: k blocks that barely touch give k
  eigenvalues near 0 and then a jump.
* Across anchors, the candidates are translated copies and near-copies of the
  same units. They are canonicalised, and a candidate whose translation-aligned
  Jaccard with an already kept cluster reaches ``merge_jaccard`` is merged into
  it (its anchors add to the kept cluster's votes). Candidates are visited in
  order of votes, so the most often recovered variant represents the unit.
  Then a cluster that a larger one holds for the most part (aligned
  containment at least ``merge_containment``) is a fragment of it and is
  folded in: overlapping parents knock edges out of a clique, and partitions
  of the gapped clique return pieces of it.
* "auto" keeps every merged cluster with at least ``min_votes`` anchors (a
  real unit is recovered from several of its members; a chance coincidence
  rarely is) and at least ``min_size`` members; an integer ``n_clusters`` or
  ``max_clusters`` keeps the best by (votes / size, votes, size).
"""
from __future__ import annotations

import numpy as np
from scipy.linalg import eigh

from topo.cluster.clusters import Cluster, Member, canonical_members
from topo.cluster.metrics import codes_overlaps, member_codes


def eigengap_k(affinity: np.ndarray, k_max: int) -> int:
    """Number of groups = position of the largest gap among the smallest Laplacian eigenvalues.

    The eigenvalues come from LAPACK's divide and conquer over the whole spectrum,
    which is several times faster than a subset by index (MRRR) for the
    neighbourhoods of a dense layer's hubs (about 1800 variables).
    """
    n = affinity.shape[0]
    if n < 3 or k_max < 2:
        return 1
    deg = affinity.sum(axis=1)
    inv = 1.0 / np.sqrt(np.maximum(deg, 1e-12))
    lap = np.eye(n) - inv[:, None] * affinity * inv[None, :]
    top = min(k_max, n - 1)
    vals = eigh(lap, eigvals_only=True, driver="evd")[: top + 1]
    gaps = np.diff(vals)
    return int(np.argmax(gaps)) + 1


def merge_candidates(candidates: dict[tuple[Member, ...], set[int]], merge_jaccard: float,
                     merge_containment: float = 0.8) -> list[tuple[tuple[Member, ...], set[int]]]:
    """Greedy translation-aware merge of canonical candidates -> [(members, anchors)]."""
    order = sorted(candidates.items(), key=lambda kv: (-len(kv[1]), -len(kv[0]), kv[0]))
    n_channels = 1 + max((m[0] for members in candidates for m in members), default=0)
    kept: list[tuple[tuple[Member, ...], set[int]]] = []
    kept_codes: list[np.ndarray] = []
    counts = _ChannelCounts(n_channels)
    for members, anchors in order:
        codes = member_codes(members)
        row = counts.row_of(members)
        best, best_j = -1, 0.0
        if kept:
            # no translation shares more members than the channels allow: skip pairs that cannot win
            bound = counts.shared(row)
            sizes = counts.sizes()
            upper = bound / (len(codes) + sizes - bound)
            hopeful = np.flatnonzero(upper >= merge_jaccard)
            if len(hopeful):  # every hopeful pair at once; the first best is the earliest (most voted) cluster
                inter = codes_overlaps(codes, [kept_codes[i] for i in hopeful])
                jaccard = inter / (len(codes) + sizes[hopeful] - inter)
                top = int(np.argmax(jaccard))
                if jaccard[top] > 0:
                    best, best_j = int(hopeful[top]), float(jaccard[top])
        if best >= 0 and best_j >= merge_jaccard:
            kept[best][1].update(anchors)
            continue
        kept.append((members, set(anchors)))
        kept_codes.append(codes)
        counts.append(row)
    return _absorb_fragments(kept, kept_codes, counts, merge_containment)


class _ChannelCounts:
    """Members per channel of each kept cluster, as the rows of a growing matrix.

    The overlap of two clusters under any translation is at most the members
    they can pair channel by channel, ``sum_c min(a_c, b_c)``: one vectorised
    bound against every kept cluster prunes most exact (aligned) comparisons.
    """

    def __init__(self, n_channels: int) -> None:
        self.n_channels = n_channels
        self.rows = np.zeros((16, n_channels), dtype=np.int32)
        self.totals = np.zeros(16, dtype=np.int64)  # members per kept cluster
        self.n = 0

    def row_of(self, members) -> np.ndarray:
        return np.bincount([m[0] for m in members], minlength=self.n_channels).astype(np.int32)

    def append(self, row: np.ndarray) -> None:
        if self.n == len(self.rows):
            self.rows = np.concatenate([self.rows, np.zeros_like(self.rows)])
            self.totals = np.concatenate([self.totals, np.zeros_like(self.totals)])
        self.rows[self.n] = row
        self.totals[self.n] = row.sum()
        self.n += 1

    def shared(self, row: np.ndarray) -> np.ndarray:
        used = np.flatnonzero(row)
        return np.minimum(self.rows[: self.n, used], row[used]).sum(axis=1)

    def sizes(self) -> np.ndarray:
        return self.totals[: self.n]


def _absorb_fragments(kept, kept_codes, counts: _ChannelCounts, containment: float):
    """Fold a cluster into a larger one that holds at least ``containment`` of it (aligned)."""
    order = sorted(range(len(kept)), key=lambda i: (len(kept[i][0]), -len(kept[i][1]), kept[i][0]))
    sizes = counts.sizes()
    gone = np.zeros(len(kept), dtype=bool)
    for i in order:
        need = containment * sizes[i]
        bound = counts.shared(counts.rows[i])
        hopeful = np.flatnonzero((sizes > sizes[i]) & ~gone & (bound >= need) & (bound > 0))
        best, best_overlap = -1, 0
        if len(hopeful):
            overlaps = codes_overlaps(kept_codes[i], [kept_codes[j] for j in hopeful])
            top = int(np.argmax(overlaps))  # ties go to the earliest cluster
            if overlaps[top] > 0:
                best, best_overlap = int(hopeful[top]), int(overlaps[top])
        if best >= 0 and best_overlap >= need:
            kept[best][1].update(kept[i][1])
            gone[i] = True
    return [k for i, k in enumerate(kept) if not gone[i]]


def select_clusters(merged: list[tuple[tuple[Member, ...], set[int]]], *, min_votes: int, min_size: int,
                    n_clusters: int | str, max_clusters: int | None) -> list[Cluster]:
    """Apply the documented keep rule and order clusters by evidence."""
    clusters = [Cluster.from_members(m, votes=len(a)) for m, a in merged if len(m) >= min_size]
    clusters.sort(key=lambda c: (-c.votes / len(c), -c.votes, -len(c), c.members))
    if n_clusters == "auto":
        clusters = [c for c in clusters if c.votes >= min(min_votes, len(c))]
    else:
        clusters = clusters[: int(n_clusters)]
    if max_clusters is not None:
        clusters = clusters[: int(max_clusters)]
    return clusters


def add_candidate(candidates: dict, members, anchor: int) -> tuple[Member, ...]:
    """Record that ``anchor`` found ``members``; returns their canonical key."""
    key = canonical_members(members)
    candidates.setdefault(key, set()).add(anchor)
    return key
