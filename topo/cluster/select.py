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

from collections import Counter, defaultdict

import numpy as np
from scipy.linalg import eigh

from topo.cluster.clusters import Cluster, Member, canonical_members
from topo.cluster.metrics import aligned_jaccard, aligned_overlap


def eigengap_k(affinity: np.ndarray, k_max: int) -> int:
    """Number of groups = position of the largest gap among the smallest Laplacian eigenvalues."""
    n = affinity.shape[0]
    if n < 3 or k_max < 2:
        return 1
    deg = affinity.sum(axis=1)
    inv = 1.0 / np.sqrt(np.maximum(deg, 1e-12))
    lap = np.eye(n) - inv[:, None] * affinity * inv[None, :]
    top = min(k_max, n - 1)
    vals = eigh(lap, eigvals_only=True, subset_by_index=[0, top])
    gaps = np.diff(vals)
    return int(np.argmax(gaps)) + 1


def merge_candidates(candidates: dict[tuple[Member, ...], set[int]], merge_jaccard: float,
                     merge_containment: float = 0.8) -> list[tuple[tuple[Member, ...], set[int]]]:
    """Greedy translation-aware merge of canonical candidates -> [(members, anchors)]."""
    order = sorted(candidates.items(), key=lambda kv: (-len(kv[1]), -len(kv[0]), kv[0]))
    kept: list[tuple[tuple[Member, ...], set[int]]] = []
    kept_counts: list[Counter] = []
    by_channel: dict[int, list[int]] = defaultdict(list)
    for members, anchors in order:
        counts = Counter(m[0] for m in members)
        seen, best, best_j = set(), -1, 0.0
        for c in {m[0] for m in members}:
            for idx in by_channel[c]:
                if idx in seen:
                    continue
                seen.add(idx)
                # no translation shares more members than the channels allow: skip pairs that cannot win
                bound = _shared_channels(counts, kept_counts[idx])
                if bound / (len(members) + len(kept[idx][0]) - bound) < max(merge_jaccard, best_j + 1e-12):
                    continue
                j = aligned_jaccard(members, kept[idx][0])
                if j > best_j:
                    best, best_j = idx, j
        if best >= 0 and best_j >= merge_jaccard:
            kept[best][1].update(anchors)
            continue
        kept.append((members, set(anchors)))
        kept_counts.append(counts)
        for c in counts:
            by_channel[c].append(len(kept) - 1)
    return _absorb_fragments(kept, kept_counts, by_channel, merge_containment)


def _shared_channels(a: Counter, b: Counter) -> int:
    """An upper bound on the aligned overlap of two clusters: members they can share channel by channel."""
    if len(a) > len(b):
        a, b = b, a
    return sum(min(n, b[c]) for c, n in a.items() if c in b)


def _absorb_fragments(kept, kept_counts, by_channel, containment: float):
    """Fold a cluster into a larger one that holds at least ``containment`` of it (aligned)."""
    order = sorted(range(len(kept)), key=lambda i: (len(kept[i][0]), -len(kept[i][1]), kept[i][0]))
    gone: set[int] = set()
    for i in order:
        members, anchors = kept[i]
        best, best_overlap = -1, 0
        for c in {m[0] for m in members}:
            for j in by_channel[c]:
                if j == i or j in gone or len(kept[j][0]) <= len(members):
                    continue
                bound = _shared_channels(kept_counts[j], kept_counts[i])
                if bound <= best_overlap or bound < containment * len(members):
                    continue
                overlap = aligned_overlap(kept[j][0], members)
                if overlap > best_overlap:
                    best, best_overlap = j, overlap
        if best >= 0 and best_overlap >= containment * len(members):
            kept[best][1].update(anchors)
            gone.add(i)
    return [k for i, k in enumerate(kept) if i not in gone]


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


def add_candidate(candidates: dict, members, anchor: int) -> None:
    key = canonical_members(members)
    candidates.setdefault(key, set()).add(anchor)
