"""Recovery scores: translation-aligned Jaccard, best-match Jaccard, kernel counts, ARI."""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import numpy as np

Member = tuple[int, int, int]


def aligned_overlap(a: Iterable[Member], b: Iterable[Member]) -> int:
    """Most members two sets share under any translation of ``b``.

    Under a shift s, member (c, p) of ``b`` is shared exactly when (c, p + s)
    is in ``a``; so the overlap at s is the number of same-channel pairs whose
    offsets differ by s, and one pass over those pairs counts every shift.
    """
    by_chan: dict[int, list[tuple[int, int]]] = {}
    for c, dy, dx in set(a):
        by_chan.setdefault(c, []).append((dy, dx))
    shifts: Counter[tuple[int, int]] = Counter()
    for c, dy, dx in set(b):
        for ay, ax in by_chan.get(c, ()):
            shifts[(ay - dy, ax - dx)] += 1
    return max(shifts.values(), default=0)


def aligned_jaccard(a: Iterable[Member], b: Iterable[Member]) -> float:
    """Jaccard of two member sets, maximised over translations of ``b``."""
    a, b = set(a), set(b)
    if not a or not b:
        return 0.0
    inter = aligned_overlap(a, b)
    return inter / (len(a) + len(b) - inter)


def best_match_jaccard(truth: Sequence[Iterable[Member]], found: Sequence[Iterable[Member]]) -> np.ndarray:
    """For each true support, the best aligned Jaccard over the found clusters."""
    found = [tuple(f) for f in found]
    return np.array([max((aligned_jaccard(t, f) for f in found), default=0.0) for t in truth])


def recovery_scores(truth, clustering) -> dict:
    """Scores of a fitted `UnitClustering` against a `topo.planted.PlantedTruth`.

    ``jaccard`` (mean best match of each true support, recall-like),
    ``precision_jaccard`` (mean best match of each found cluster among the truth),
    per-kernel counts and their relative errors.
    """
    found = [c.members for c in clustering.clusters_]
    recall = best_match_jaccard(truth.supports, found)
    precision = best_match_jaccard(found, truth.supports)
    true_counts = truth.kernel_counts
    got = clustering.kernel_counts_
    rel = {k: abs(got.get(k, 0) - n) / max(n, 1) for k, n in true_counts.items()}
    return {
        "jaccard": float(recall.mean()) if len(recall) else 0.0,
        "precision_jaccard": float(precision.mean()) if len(precision) else 0.0,
        "n_true": len(truth.supports),
        "n_found": len(found),
        "true_counts": dict(true_counts),
        "found_counts": {k: got.get(k, 0) for k in true_counts},
        "count_error": rel,
        "max_count_error": max(rel.values()) if rel else 0.0,
    }


def adjusted_rand(truth_labels: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's adjusted Rand index between two per-channel labelings."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(truth_labels), np.asarray(labels)))
