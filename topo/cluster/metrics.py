"""Recovery scores: translation-aligned Jaccard, best-match Jaccard, kernel counts, ARI."""
from __future__ import annotations

from itertools import chain
from typing import Iterable, Sequence

import numpy as np

Member = tuple[int, int, int]


# A member (c, dy, dx) as one integer: c * 2**16 + (dy + 64) * 2**8 + (dx + 64): ``code >> 16`` is the
# channel, and two codes of one channel differ by dy' * 2**8 + dx' (their shift).
_OFFSET_LIMIT = 64
_BINCOUNT_LIMIT = 1 << 22  # (set, shift) bins counted densely up to this many


def member_codes(members: Iterable[Member]) -> np.ndarray:
    """Sorted integer codes of a member set; the difference of two same-channel codes encodes their shift."""
    return _encode(np.array(sorted(set(members)), dtype=np.int64).reshape(-1, 3))


def _encode(arr: np.ndarray) -> np.ndarray:
    """The codes of members given as rows (c, dy, dx) of an int64 array."""
    if arr.size and np.abs(arr[:, 1:]).max() >= _OFFSET_LIMIT:
        raise ValueError(f"member offsets must lie within +-{_OFFSET_LIMIT - 1}")
    return (arr[:, 0] << 16) + ((arr[:, 1] + _OFFSET_LIMIT) << 8) + (arr[:, 2] + _OFFSET_LIMIT)


def many_member_codes(sets: Sequence[Iterable[Member]]) -> list[np.ndarray]:
    """``[member_codes(s) for s in sets]``, in one pass (sorted and deduplicated per set)."""
    sizes = np.array([len(s) for s in sets], dtype=np.int64)
    flat = np.fromiter(chain.from_iterable(chain.from_iterable(sets)), dtype=np.int64, count=3 * int(sizes.sum()))
    codes = _encode(flat.reshape(-1, 3))
    owner = np.repeat(np.arange(len(sets)), sizes)
    order = np.lexsort((codes, owner))
    codes, owner = codes[order], owner[order]
    first = np.r_[True, (codes[1:] != codes[:-1]) | (owner[1:] != owner[:-1])]
    codes, owner = codes[first], owner[first]
    return np.split(codes, np.cumsum(np.bincount(owner, minlength=len(sets)))[:-1])


def codes_overlap(a: np.ndarray, b: np.ndarray) -> int:
    """`aligned_overlap` of two sets given as `member_codes`."""
    return int(codes_overlaps(a, [b])[0])


def _joined_shifts(a: np.ndarray, others: Sequence[np.ndarray]):
    """``(group, dy, dx)`` of every same-channel couple of a member of ``a`` and one of ``others[group]``:
    the shift that carries the second onto the first (None where no couple exists).

    Only same-channel members can line up, so the members are joined on the
    channel (a sorted search) rather than paired all with all.
    """
    if not len(a) or not len(others):
        return None
    a = np.sort(a)
    flat = np.concatenate(others)
    a_chan, flat_chan = a >> 16, flat >> 16
    lo = np.searchsorted(a_chan, flat_chan, side="left")
    count = np.searchsorted(a_chan, flat_chan, side="right") - lo
    total = int(count.sum())
    if not total:
        return None
    b_idx = np.repeat(np.arange(len(flat)), count)
    diff = a[np.repeat(lo - (np.cumsum(count) - count), count) + np.arange(total)] - flat[b_idx]
    group = np.repeat(np.arange(len(others)), [len(b) for b in others])[b_idx]
    # a same-channel difference is dy * 2**8 + dx, |dy|, |dx| < 2**7
    dy = (diff + 128) >> 8
    return group, dy, diff - (dy << 8)


def _vote_keys(group: np.ndarray, dy: np.ndarray, dx: np.ndarray):
    """One integer per (set, dy, dx), counted in a small box per set: ``(keys, box, decode)``, where
    ``decode(keys)`` gives back ``(group, dy, dx)``."""
    y0, x0 = int(dy.min()), int(dx.min())
    width = int(dx.max()) - x0 + 1
    box = (int(dy.max()) - y0 + 1) * width

    def decode(keys: np.ndarray):
        return keys // box, (keys % box) // width + y0, keys % width + x0

    return group * box + (dy - y0) * width + (dx - x0), box, decode


def codes_overlaps(a: np.ndarray, others: Sequence[np.ndarray]) -> np.ndarray:
    """`codes_overlap` of ``a`` with each of ``others``, in one pass (int64, one entry per other set).

    Each same-channel couple (`_joined_shifts`) votes for its shift, and an
    overlap is the most voted shift's count.
    """
    out = np.zeros(len(others), dtype=np.int64)
    joined = _joined_shifts(a, others)
    if joined is None:
        return out
    key, box, _ = _vote_keys(*joined)
    if len(others) * box > _BINCOUNT_LIMIT:  # far-apart offsets: count the keys present only
        key, counts = np.unique(key, return_counts=True)
        np.maximum.at(out, key // box, counts)
        return out
    return np.bincount(key, minlength=len(others) * box).reshape(len(others), box).max(axis=1)


def codes_best_shifts(a: np.ndarray, others: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """`best_shift` of ``a`` against each of ``others`` (`member_codes`), in one pass:
    ``(overlaps, shifts)``, shapes (G,) and (G, 2); a set sharing no channel gets overlap 0 and shift (0, 0)."""
    overlaps = np.zeros(len(others), dtype=np.int64)
    shifts = np.zeros((len(others), 2), dtype=np.int64)
    joined = _joined_shifts(a, others)
    if joined is None:
        return overlaps, shifts
    keys, box, decode = _vote_keys(*joined)
    if len(others) * box <= _BINCOUNT_LIMIT:
        return _dense_best_shifts(keys, box, decode, len(others))
    keys, votes = np.unique(keys, return_counts=True)
    group, dy, dx = decode(keys)
    # per set: the most votes, then the smallest |t|, then the smallest t (the last key sorts first)
    order = np.lexsort((dx, dy, np.abs(dy) + np.abs(dx), -votes, group))
    first = order[np.r_[True, group[order][1:] != group[order][:-1]]]
    overlaps[group[first]] = votes[first]
    shifts[group[first]] = np.stack([dy[first], dx[first]], axis=1)
    return overlaps, shifts


def _dense_best_shifts(keys: np.ndarray, box: int, decode, n_sets: int) -> tuple[np.ndarray, np.ndarray]:
    """`codes_best_shifts` by counting every (set, shift) bin of a small box: the box's shifts ordered by the
    tie rule (smallest |t|, then smallest t) once, so that each set's first maximum is its best shift."""
    _, dy, dx = decode(np.arange(box))
    tie_order = np.lexsort((dx, dy, np.abs(dy) + np.abs(dx)))
    votes = np.bincount(keys, minlength=n_sets * box).reshape(n_sets, box)[:, tie_order]
    best = votes.argmax(axis=1)
    overlaps = votes[np.arange(n_sets), best]
    shifts = np.stack([dy[tie_order][best], dx[tie_order][best]], axis=1)
    shifts[overlaps == 0] = 0  # a set sharing no channel
    return overlaps.astype(np.int64), shifts.astype(np.int64)


def shifted_codes(codes: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """The members ``codes`` moved by ``shifts`` (one (dy, dx), or one per member: shape (n, 2)), as codes;
    a member moved out of the codes' range becomes -1 (no member's code)."""
    shifts = np.asarray(shifts, dtype=np.int64)
    dy = ((codes >> 8) & 0xFF) - _OFFSET_LIMIT + shifts[..., 0]
    dx = (codes & 0xFF) - _OFFSET_LIMIT + shifts[..., 1]
    moved = ((codes >> 16) << 16) + ((dy + _OFFSET_LIMIT) << 8) + (dx + _OFFSET_LIMIT)
    return np.where((np.abs(dy) < _OFFSET_LIMIT) & (np.abs(dx) < _OFFSET_LIMIT), moved, -1)


def best_shift(a: Iterable[Member], b: Iterable[Member]) -> tuple[int, int]:
    """The shift ``t`` that makes ``b + t`` share the most members with ``a`` (ties: the smallest |t|, then t)."""
    shift = codes_best_shifts(member_codes(a), [member_codes(b)])[1][0]
    return int(shift[0]), int(shift[1])


def codes_covered(a: np.ndarray, others: Sequence[np.ndarray], shifts: np.ndarray) -> np.ndarray:
    """(G, len(a)) boolean: which members of ``a`` (sorted codes) each of ``others``, moved by its row of
    ``shifts`` (G, 2), holds (with the shifts of `codes_best_shifts`: what each set, best aligned, covers)."""
    inside = np.zeros((len(others), len(a)), dtype=bool)
    if not len(others) or not len(a):
        return inside
    row = np.repeat(np.arange(len(others)), [len(b) for b in others])
    moved = shifted_codes(np.concatenate(others), np.asarray(shifts)[row])
    at = np.searchsorted(a, moved).clip(max=len(a) - 1)
    hit = a[at] == moved
    inside[row[hit], at[hit]] = True
    return inside


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
    """Scores of a fitted `UnitClustering` against a `topo.planted.generator.PlantedTruth`.

    ``jaccard`` (mean best match of each true support, recall-like),
    ``precision_jaccard`` (mean best match of each found cluster among the truth),
    per-kernel counts and their relative errors; the clusters equal to no true support (`unmatched_clusters`):
    how many, per kernel, and their mean size.
    """
    found = [c.members for c in clustering.clusters_]
    unmatched = unmatched_clusters(truth.supports, clustering.clusters_)
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
        "n_unmatched": len(unmatched),
        "unmatched_counts": {k: sum(1 for c in unmatched if c.kernel_size == k) for k in true_counts},
        "unmatched_mean_size": float(np.mean([len(c) for c in unmatched])) if unmatched else float("nan"),
    }


def unmatched_clusters(supports: Sequence[Iterable[Member]], clusters: Sequence) -> list:
    """The found clusters (`Cluster`) equal to no true support up to translation. One that equals a support has
    its kernel by construction (both are the bounding box of the same footprint), so what these carry is the
    part of the found kernel mix that is not the truth's."""
    codes = [member_codes(s) for s in supports]
    return [c for c in clusters if not any(codes_jaccard(t, member_codes(c.members)) == 1.0 for t in codes)]


def adjusted_rand(truth_labels: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's adjusted Rand index between two per-channel labelings."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(truth_labels), np.asarray(labels)))
