"""Arora et al.'s recovery: a hidden unit is the dense common neighbourhood of its members.

Arora, Bhaskara, Ge and Ma, "Provable bounds for learning some deep
representations" (2014), build the Hebbian graph (an edge where two observed
units fire together more than chance) and recover each hidden unit from a pair
of its members: in the sparse regime the common neighbourhood of two units
that share a parent is essentially that parent's support. Here every pair is
(anchor at offset 0, one of its neighbours); the common neighbourhood is read
from the anchored local graph and cleaned by repeatedly dropping the member
with the fewest edges inside the set until every member is adjacent to at
least ``density`` of the others. Nodes adjacent to all but at most one
member of the cleaned set are then added back (a member with one missing edge to the
pair is still a member) and the set is peeled once more.

**Strength tiers.** In a deep network the units of one layer are not
independent: two members of *sibling* supports (units with a shared parent
one layer up) fire together whenever that parent is on, so the Hebbian graph
holds, beside each support's clique, a weaker clique over the union of the
siblings' supports, and the common neighbourhood of two members of one support
is that whole union. The edges tell them apart by strength, not by presence:
an edge's excess co-firing probability (`topo.cluster.window.excess`) is about
the density of the pair's nearest shared cause, a parent for two members of
one support, a grandparent for siblings' members (Arora et al.'s rho_{l+1}
against rho_{l+2}). `tiered_groups` therefore runs the procedure at every
strength level the anchor's own edges define (strongest first; at level tau
only edges at least tau strong count). A group's *tier* is the mean strength of
the edges among its members (`topo.cluster.window.mean_strength`).
A support then appears as its own clique at a high level, the union of
siblings' supports only at the weaker level of their parent and with a lower
tier, and `topo.cluster.select.drop_unions` replaces a group that holds
significantly stronger ones by those (the union itself belongs to the next
layer, which the construction finds after decoding this one). At the weakest
level the groups are exactly those of the untiered procedure, so a layer
without such groups gives what it gave before.

The peeling is sequential for each set (who goes next depends on who went
before), but the sets of one anchor are independent: `dense_cores` peels them
side by side, one vectorised step removing the next member of every set still
peeling, so a dense neighbourhood costs as many NumPy steps as its largest set
has members rather than one Python step per member of every set.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import sparse

_GONE = np.iinfo(np.int32).max
_BATCH_BYTES = 1 << 24  # at most this many bytes of stacked sub-adjacency per peeling batch
_BATCH_SPREAD = 2.0  # a batch holds sets of at most this ratio of sizes (padding stays cheap)
_DENSE_LINKS = 1 << 24  # `_links_into` multiplies densely up to this many multiply-adds
#: Strength levels per anchor at most (beyond, quantiles of the anchor's edge strengths): a bound on the work.
MAX_LEVELS = 8


def dense_core(adj: np.ndarray, members: np.ndarray, density: float) -> np.ndarray:
    """Peel the lowest-degree member until each remaining one meets ``density``.

    ``adj`` is a symmetric boolean adjacency (an undirected graph, as the Hebbian
    graph is); ``members`` are sorted node indices; ties go to the earliest
    member, and peeling stops at two members.
    """
    return dense_cores(adj, [np.asarray(members)], density)[0]


def dense_cores(adj: np.ndarray, member_sets: Sequence[np.ndarray], density: float) -> list[np.ndarray]:
    """`dense_core` of every set in ``member_sets``, peeled in batches of similar size."""
    sizes = np.array([len(m) for m in member_sets], dtype=np.int64)
    cores: list[np.ndarray] = [np.asarray(m) for m in member_sets]
    order = np.argsort(sizes, kind="stable")
    start = 0
    while start < len(order):
        smallest = max(int(sizes[order[start]]), 1)
        stop = start + 1
        while (stop < len(order) and sizes[order[stop]] <= _BATCH_SPREAD * smallest
               and (stop - start + 1) * int(sizes[order[stop]]) ** 2 <= _BATCH_BYTES):
            stop += 1
        batch = order[start:stop]
        kept = _peel([cores[i] for i in batch], adj, density)
        for row, i in enumerate(batch):
            cores[i] = cores[i][kept[row, : sizes[i]]]
        start = stop
    return cores


def _peel(sets: list[np.ndarray], adj: np.ndarray, density: float) -> np.ndarray:
    """Kept-member masks (S, m) of the sets, padded to the largest size m, peeled side by side."""
    width = max(len(s) for s in sets)
    kept = np.zeros((len(sets), width), dtype=bool)
    sub = np.zeros((len(sets), width, width), dtype=bool)
    for row, s in enumerate(sets):
        kept[row, : len(s)] = True
        sub[row, : len(s), : len(s)] = adj.take(s, axis=0).take(s, axis=1)  # faster than one fancy index
    degree = sub.sum(axis=2, dtype=np.int32)
    remaining = kept.sum(axis=1)
    active = np.flatnonzero(remaining > 2)
    while len(active):
        masked = np.where(kept[active], degree[active], _GONE)
        worst = masked.argmin(axis=1)  # the first minimum: ties go to the earliest member
        low = masked[np.arange(len(active)), worst] < density * (remaining[active] - 1)
        active, worst = active[low], worst[low]
        kept[active, worst] = False
        degree[active] -= sub[active, worst]  # the row is the column: the graph is undirected
        remaining[active] -= 1
        active = active[remaining[active] > 2]
    return kept


def grow(adj: np.ndarray, core: np.ndarray, density: float) -> np.ndarray:
    """Add back every node adjacent to all but at most one of the core, then peel again.

    A support member with one missing edge (to the pair's second unit) is not a
    common neighbour, yet it is adjacent to the rest of its support. Requiring
    all but one link (not merely ``density``) keeps two supports that share a
    few channels from fusing. The core must contain node 0 (the anchor); a
    regrown set that loses it keeps the core.
    """
    return grow_all(adj, [np.asarray(core)], density)[0]


def grow_all(adj: np.ndarray, cores: Sequence[np.ndarray], density: float) -> list[np.ndarray]:
    """`grow` of every core (each containing node 0), the second peeling batched."""
    if not cores:
        return []
    sizes = np.array([len(c) for c in cores])
    links, member = _links_into(adj, cores, sizes)
    extra = (links >= sizes[:, None] - 1) & ~member
    rows = np.flatnonzero((sizes >= 2) & extra.any(axis=1))
    unions = [np.flatnonzero(extra[r] | member[r]) for r in rows]
    distinct = _distinct(unions)  # e.g. every pair core {0, k} grows back to the whole neighbourhood
    peeled = dict(zip((u.tobytes() for u in distinct), dense_cores(adj, distinct, density)))
    out = list(cores)
    for r, union in zip(rows, unions):
        grown = peeled[union.tobytes()]
        if len(grown) and grown[0] == 0:
            out[r] = grown
    return out


def _links_into(adj: np.ndarray, cores: Sequence[np.ndarray], sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``links[r, v]``, the edges from node v into core r, and ``member[r, v]``, whether v is in it. Exact either
    way: a dense float32 product where it is small (most neighbourhoods; integer counts far below 2**24), a
    sparse one for the hubs of a dense layer, where the dense one would cost (cores x nodes x nodes)."""
    n = adj.shape[0]
    if len(cores) * n * n <= _DENSE_LINKS:
        member = np.zeros((len(cores), n), dtype=bool)
        member[np.repeat(np.arange(len(cores)), sizes), np.concatenate(cores)] = True
        return member.astype(np.float32) @ adj.astype(np.float32), member  # adj is symmetric
    inside = sparse.csr_matrix((np.ones(sizes.sum(), dtype=np.int32), np.concatenate(cores),
                                np.concatenate([[0], np.cumsum(sizes)])), shape=(len(cores), n))
    return (inside @ sparse.csr_matrix(adj.T, dtype=np.int32)).toarray(), inside.toarray() > 0


def pair_sets(adj: np.ndarray) -> list[np.ndarray]:
    """The distinct sets {0, k} plus the common neighbours of 0 and k, k = 1..n-1, in order of first k."""
    n = adj.shape[0]
    if n < 2:
        return []
    rows = adj[1:] & adj[0][None, :]
    rows[:, 0] = True
    rows[np.arange(n - 1), np.arange(1, n)] = True
    _, first = np.unique(np.packbits(rows, axis=1), axis=0, return_index=True)
    return [np.flatnonzero(rows[i]) for i in np.sort(first)]


def anchored_groups(adj: np.ndarray, density: float) -> list[np.ndarray]:
    """Candidate clusters around the anchor (node 0) of an anchored local graph.

    ``adj`` is (n+1) x (n+1) boolean with node 0 the anchor, adjacent to every
    other node. Returns distinct arrays of node indices, each containing the
    anchor, in the order of the first pair (0, k) that gives them.
    """
    sets = pair_sets(adj)
    cores = [c for c in dense_cores(adj, sets, density) if c[0] == 0]
    distinct = _distinct(cores)
    grown = dict(zip((c.tobytes() for c in distinct), grow_all(adj, distinct, density)))
    return _distinct([grown[c.tobytes()] for c in cores])


def _distinct(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The distinct arrays of ``arrays``, in order of first appearance."""
    seen: set[bytes] = set()
    out = []
    for a in arrays:
        key = a.tobytes()
        if key not in seen:
            seen.add(key)
            out.append(a)
    return out


def strength_levels(strengths: np.ndarray, max_levels: int = MAX_LEVELS) -> np.ndarray:
    """The levels of `tiered_groups`, strongest first: the distinct positive ``strengths`` (an anchor's
    edges), or, where there are more than ``max_levels``, that many of their quantiles from the
    largest to the smallest (the weakest level always keeps every edge)."""
    values = np.unique(strengths[strengths > 0])[::-1]
    if len(values) > max_levels:
        values = np.quantile(values, np.linspace(1.0, 0.0, max_levels), method="inverted_cdf")
        values = np.unique(values)[::-1]
    return values


def tiered_groups(adj: np.ndarray, strength: np.ndarray, density: float,
                  max_levels: int = MAX_LEVELS) -> list[tuple[np.ndarray, bool]]:
    """`anchored_groups` at every strength level of the anchor's edges: [(group, base)].

    ``strength`` is the anchored local graph's edge strength (positive exactly on
    the edges of ``adj``). At level tau the anchor keeps the neighbours it links to
    at least tau strongly, and they keep the edges at least tau strong among
    them; the weakest level keeps every edge. ``base`` says whether that level
    (the whole graph: `anchored_groups` of ``adj``) finds the group. Groups are listed in order of
    first appearance (strongest level first).
    """
    found: dict[bytes, list] = {}
    levels = np.append(strength_levels(strength[0, 1:], max_levels)[:-1], 0.0)  # the weakest: every edge
    for level, tau in enumerate(levels):
        keep = np.concatenate([[0], 1 + np.flatnonzero(strength[0, 1:] >= tau)])
        sub = adj[np.ix_(keep, keep)] & (strength[np.ix_(keep, keep)] >= tau)
        for group in anchored_groups(sub, density):
            entry = found.setdefault(keep[group].tobytes(), [keep[group], False])
            entry[1] |= level == len(levels) - 1
    return [tuple(entry) for entry in found.values()]
