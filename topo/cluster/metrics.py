"""Recovery scores: translation-aligned Jaccard, best-match Jaccard, kernel counts, ARI."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

Member = tuple[int, int, int]


# A member (c, dy, dx) as one integer: c * 2**16 + (dy + 64) * 2**8 + (dx + 64): ``code >> 16`` is the
# channel, and two codes of one channel differ by dy' * 2**8 + dx' (their shift).
_OFFSET_LIMIT = 64
_BINCOUNT_LIMIT = 1 << 22  # (set, shift) bins counted densely up to this many


def member_codes(members: Iterable[Member]) -> np.ndarray:
    """Sorted integer codes of a member set; the difference of two same-channel codes encodes their shift."""
    arr = np.array(sorted(set(members)), dtype=np.int64).reshape(-1, 3)
    if arr.size and np.abs(arr[:, 1:]).max() >= _OFFSET_LIMIT:
        raise ValueError(f"member offsets must lie within +-{_OFFSET_LIMIT - 1}")
    return (arr[:, 0] << 16) + ((arr[:, 1] + _OFFSET_LIMIT) << 8) + (arr[:, 2] + _OFFSET_LIMIT)


def codes_overlap(a: np.ndarray, b: np.ndarray) -> int:
    """`aligned_overlap` of two sets given as `member_codes`."""
    return int(codes_overlaps(a, [b])[0])


def codes_overlaps(a: np.ndarray, others: Sequence[np.ndarray]) -> np.ndarray:
    """`codes_overlap` of ``a`` with each of ``others``, in one pass (int64, one entry per other set).

    Only same-channel members can line up, so the members of ``a`` and of the
    others are joined on the channel (a sorted search) rather than paired all
    with all; each joined couple votes for its shift, and an overlap is the
    most voted shift's count.
    """
    out = np.zeros(len(others), dtype=np.int64)
    if not len(a) or not len(others):
        return out
    a = np.sort(a)
    flat = np.concatenate(others)
    a_chan, flat_chan = a >> 16, flat >> 16
    lo = np.searchsorted(a_chan, flat_chan, side="left")
    count = np.searchsorted(a_chan, flat_chan, side="right") - lo
    total = int(count.sum())
    if not total:
        return out
    b_idx = np.repeat(np.arange(len(flat)), count)
    diff = a[np.repeat(lo - (np.cumsum(count) - count), count) + np.arange(total)] - flat[b_idx]
    group = np.repeat(np.arange(len(others)), [len(b) for b in others])[b_idx]
    # a same-channel difference is dy * 2**8 + dx, |dy|, |dx| < 2**7: count each (set, dy, dx) in a small box
    dy = (diff + 128) >> 8
    dx = diff - (dy << 8)
    width = int(dx.max() - dx.min()) + 1
    box = (int(dy.max() - dy.min()) + 1) * width
    key = group * box + (dy - dy.min()) * width + (dx - dx.min())
    if len(others) * box > _BINCOUNT_LIMIT:  # far-apart offsets: count the keys present only
        key, counts = np.unique(key, return_counts=True)
        np.maximum.at(out, key // box, counts)
        return out
    return np.bincount(key, minlength=len(others) * box).reshape(len(others), box).max(axis=1)


def best_shift(a: Iterable[Member], b: Iterable[Member]) -> tuple[int, int]:
    """The shift ``t`` that makes ``b + t`` share the most members with ``a`` (ties: the smallest |t|, then t)."""
    votes: dict[tuple[int, int], int] = {}
    channels_b: dict[int, list[tuple[int, int]]] = {}
    for c, dy, dx in b:
        channels_b.setdefault(c, []).append((dy, dx))
    for c, dy, dx in a:
        for by, bx in channels_b.get(c, []):
            t = (dy - by, dx - bx)
            votes[t] = votes.get(t, 0) + 1
    if not votes:
        return (0, 0)
    return min(votes, key=lambda t: (-votes[t], abs(t[0]) + abs(t[1]), t))


def covered_members(a: Iterable[Member], b: Iterable[Member]) -> set[Member]:
    """The members of ``a`` that ``b``, translated by `best_shift`, holds."""
    ty, tx = best_shift(a, b)
    return set(a) & {(c, dy + ty, dx + tx) for c, dy, dx in b}


def aligned_overlap(a: Iterable[Member], b: Iterable[Member]) -> int:
    """Most members two sets share under any translation of ``b``.

    Under a shift s, member (c, p) of ``b`` is shared exactly when (c, p + s)
    is in ``a``; so the overlap at s is the number of same-channel pairs whose
    offsets differ by s, and one pass over those pairs counts every shift.
    """
    return codes_overlap(member_codes(a), member_codes(b))


def codes_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """`aligned_jaccard` of two sets given as `member_codes`."""
    if not len(a) or not len(b):
        return 0.0
    inter = codes_overlap(a, b)
    return inter / (len(a) + len(b) - inter)


def aligned_jaccard(a: Iterable[Member], b: Iterable[Member]) -> float:
    """Jaccard of two member sets, maximised over translations of ``b``."""
    return codes_jaccard(member_codes(a), member_codes(b))


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
