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
* Before merging, a candidate that holds *significantly stronger* candidates
  is replaced by them (`drop_unions`): stronger by its strength tier, the mean
  excess co-firing among its members (`TierTest`: significantly at the Hebbian
  test's Bonferroni bar), and held for at least ``merge_containment`` of their
  members (aligned). Such a group is the union of units of this layer and of
  members attached to them only at a weaker tier: siblings' supports under
  their shared parent (a unit of the layer above, found after decoding this
  one), or a support with a sibling's member stuck to it. The members of one
  support co-fire as often as one another (about the density of their unit),
  so a fragment of a support is not significantly stronger than the support
  and never replaces it. Only the candidates found on the whole graph (the
  untiered procedure's) and the parts that replace them go on to the merge,
  where the parts come last, so a layer whose candidates hold no
  significantly stronger ones gives exactly the untiered clusters.
* "auto" keeps every merged cluster with at least ``min_votes`` anchors (a
  real unit is recovered from several of its members; a chance coincidence
  rarely is) and at least ``min_size`` members; an integer ``n_clusters`` or
  ``max_clusters`` keeps the best by (votes / size, votes, size).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import eigh

from topo.cluster.clusters import Cluster, Member
from topo.cluster.metrics import codes_best_shifts, codes_covered, codes_overlaps, many_member_codes, member_codes
from topo.common.processes import forked_map


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
                     merge_containment: float = 0.8,
                     parts: set[tuple[Member, ...]] = frozenset()) -> list[tuple[tuple[Member, ...], set[int]]]:
    """Greedy translation-aware merge of canonical candidates -> [(members, anchors)].

    ``parts`` (the parts that replaced unions, `drop_unions`) come after the other candidates, so
    a part only represents a unit that no candidate of the whole graph represents.
    """
    order = sorted(candidates.items(), key=lambda kv: (kv[0] in parts, -len(kv[1]), -len(kv[0]), kv[0]))
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
    """Members per channel of each kept cluster, as the columns of a growing channel-major matrix.

    The overlap of two clusters under any translation is at most the members
    they can pair channel by channel, ``sum_c min(a_c, b_c)``: one vectorised
    bound against every kept cluster prunes most exact (aligned) comparisons.
    Stored channel-major (C, clusters) as uint16 (member offsets lie within +-63, so a channel holds at most
    127**2 members of a cluster), so that the bound reads only the rows of the channels one cluster uses.
    """

    def __init__(self, n_channels: int, columns: np.ndarray | None = None) -> None:
        self.n_channels = n_channels
        self.columns = np.zeros((n_channels, 16), dtype=np.uint16) if columns is None else columns
        self.totals = self.columns.sum(axis=0, dtype=np.int64)  # members per kept cluster
        self.n = 0 if columns is None else columns.shape[1]

    @classmethod
    def of_codes(cls, codes: list[np.ndarray]) -> "_ChannelCounts":
        """The counts of many member sets at once, from their `member_codes`."""
        channels = np.concatenate(codes) >> 16
        n_channels = 1 + int(channels.max())
        owner = np.repeat(np.arange(len(codes)), [len(c) for c in codes])
        flat = np.bincount(channels * len(codes) + owner, minlength=n_channels * len(codes))
        return cls(n_channels, flat.reshape(n_channels, len(codes)).astype(np.uint16))

    def row_of(self, members) -> np.ndarray:
        return np.bincount([m[0] for m in members], minlength=self.n_channels).astype(np.uint16)

    def row(self, i: int) -> np.ndarray:
        return self.columns[:, i]

    def append(self, row: np.ndarray) -> None:
        if self.n == self.columns.shape[1]:
            self.columns = np.concatenate([self.columns, np.zeros_like(self.columns)], axis=1)
            self.totals = np.concatenate([self.totals, np.zeros_like(self.totals)])
        self.columns[:, self.n] = row
        self.totals[self.n] = row.sum()
        self.n += 1

    def shared(self, row: np.ndarray, among: np.ndarray | None = None) -> np.ndarray:
        """The bound against every kept cluster, or against the clusters ``among`` (indices)."""
        used = np.flatnonzero(row)
        if among is None:
            cols = self.columns[used, : self.n]
        else:  # one flat take of the entries needed: faster than a fancy index, and copies no whole row
            cols = self.columns.reshape(-1).take(used[:, None] * self.columns.shape[1] + among[None, :])
        return np.minimum(cols, row[used][:, None]).sum(axis=0, dtype=np.int64)

    def sizes(self) -> np.ndarray:
        return self.totals[: self.n]


def _absorb_fragments(kept, kept_codes, counts: _ChannelCounts, containment: float):
    """Fold a cluster into a larger one that holds at least ``containment`` of it (aligned)."""
    order = sorted(range(len(kept)), key=lambda i: (len(kept[i][0]), -len(kept[i][1]), kept[i][0]))
    sizes = counts.sizes()
    gone = np.zeros(len(kept), dtype=bool)
    for i in order:
        need = containment * sizes[i]
        bound = counts.shared(counts.row(i))
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


@dataclass(frozen=True)
class TierTest:
    """When one strength tier is *significantly* above another.

    Tiers are excess co-firing probabilities estimated from ``observations``
    position pairs; a pair co-firing with probability q is counted about
    Poisson(q n), so an estimate's variance is about ``q / n``, with ``q`` the
    tier plus ``expected`` (a typical pair's co-firing by chance). Tier ``hi``
    is above ``lo`` when ``(hi - lo) / sqrt((hi + lo + 2 expected) / n)``
    passes the one-sided normal bar ``z`` (the Hebbian test's Bonferroni bar), so
    two groups of one support, equal up to sampling error, are one tier.
    """

    observations: float
    expected: float
    z: float

    def above(self, hi: np.ndarray, lo: float) -> np.ndarray:
        sd = np.sqrt(np.maximum(hi + lo + 2 * self.expected, 1e-300) / max(self.observations, 1.0))
        return (hi - lo) >= self.z * sd

    def bar(self, lo: float) -> float:
        """The smallest tier `above` ``lo``, in closed form (`above` is ``u >= z sqrt((u + 2 lo + 2 e) / n)``
        in ``u = hi - lo``, a quadratic); exact up to rounding, which callers allow for."""
        n, z2 = max(self.observations, 1.0), self.z * self.z
        return lo + 0.5 * (z2 / n + np.sqrt((z2 / n) ** 2 + 8.0 * z2 * max(lo + self.expected, 0.0) / n))


def drop_unions(candidates: dict[tuple[Member, ...], set[int]], tiers: dict[tuple[Member, ...], float],
                base: set[tuple[Member, ...]], containment: float,
                test: TierTest | None = None, processes: int = 1) -> dict[tuple[Member, ...], set[int]]:
    """The ``base`` candidates (found on the whole graph), each that holds significantly stronger candidates
    replaced by those (see the module docstring); without a ``test``, the ``base`` candidates themselves.
    ``processes``: the base candidates' parts are searched in that many forked workers (the same result)."""
    keys = list(candidates)
    if test is None or len({tiers.get(k, 0.0) for k in keys}) < 2:
        return {k: candidates[k] for k in keys if k in base}
    index = _UnionIndex(keys, tiers, containment, test)
    roots = [i for i, k in enumerate(keys) if k in base]
    index.find_parts(roots, processes)
    out: dict[tuple[Member, ...], set[int]] = {}
    for root in roots:
        for part in index.resolve(root):
            out[keys[part]] = candidates[keys[part]]
    return out


class _UnionIndex:
    """Candidates (by their index in ``keys``) with their tiers, sizes, codes and channel counts, for
    `drop_unions`."""

    def __init__(self, keys, tiers, containment: float, test: TierTest) -> None:
        self.containment, self.test = containment, test
        self.tier = np.array([tiers.get(k, 0.0) for k in keys])
        self.sizes = np.array([len(k) for k in keys])
        self.codes = many_member_codes(keys)
        self.counts = _ChannelCounts.of_codes(self.codes)
        self._by_tier = np.argsort(-self.tier, kind="stable")  # strongest first
        self._falling = -self.tier[self._by_tier]  # ascending, for searchsorted
        self._parts: dict[int, np.ndarray] = {}
        self._resolved: dict[int, list[int]] = {}

    def stronger(self, g: int) -> np.ndarray:
        """Indices (ascending) of the candidates smaller than ``g`` and significantly stronger: a prefix of the
        tier order, cut at the closed-form bar (with a margin for rounding), then tested exactly."""
        lo = float(self.tier[g])
        bar = self.test.bar(lo)
        prefix = self._by_tier[: np.searchsorted(self._falling, -(bar - 1e-9 * (abs(bar) + 1.0)), side="right")]
        found = np.sort(prefix[self.test.above(self.tier[prefix], lo)])
        return found[self.sizes[found] < self.sizes[g]]

    def parts(self, g: int) -> np.ndarray:
        """The significantly stronger candidates ``g`` holds, strongest first, each adding members (empty: none)."""
        c = self.containment
        hopeful = self.stronger(g)
        if not len(hopeful):
            return hopeful
        bound = self.counts.shared(self.counts.row(g), hopeful)  # no shift shares more members than this
        hopeful = hopeful[bound >= c * self.sizes[hopeful]]
        if not len(hopeful):
            return hopeful
        overlaps, shifts = codes_best_shifts(self.codes[g], [self.codes[h] for h in hopeful])
        held = overlaps >= c * self.sizes[hopeful]
        if not held.any():
            return hopeful[held]
        order = np.argsort(-self.tier[hopeful[held]], kind="stable")
        parts, shifts = hopeful[held][order], shifts[held][order]
        others = [self.codes[h] for h in parts]
        inside = codes_covered(self.codes[g], others, shifts)  # (parts, members of g)
        # greedy cover, strongest first: a part is taken when it holds a member no stronger part holds (a part
        # not taken adds nothing, so what the taken ones cover is what all the stronger ones cover)
        before = np.zeros_like(inside)
        np.logical_or.accumulate(inside[:-1], axis=0, out=before[1:])
        return parts[(inside & ~before).any(axis=1)]

    def find_parts(self, candidates: list[int], processes: int) -> None:
        """`parts` of every one of ``candidates``, kept for `resolve`; side by side in ``processes`` forked
        workers (`parts` is pure)."""
        found = forked_map(_parts_of, self, candidates, processes)
        self._parts.update(zip(candidates, found))

    def resolve(self, g: int) -> list[int]:
        """``g`` itself, or the stronger candidates it holds, resolved in turn (tiers rise, so this ends).

        Each candidate is resolved once: the parts of the candidates of one layer are shared by many of them.
        """
        if g not in self._resolved:
            if g not in self._parts:
                self._parts[g] = self.parts(g)
            parts = self._parts[g]
            self._resolved[g] = [g] if not len(parts) else [p for part in parts.tolist() for p in self.resolve(part)]
        return self._resolved[g]


def _parts_of(index: _UnionIndex, g: int) -> np.ndarray:
    """`_UnionIndex.parts`, for `forked_map`."""
    return index.parts(g)


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
