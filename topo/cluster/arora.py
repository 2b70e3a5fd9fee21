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
"""
from __future__ import annotations

import numpy as np


def dense_core(adj: np.ndarray, members: np.ndarray, density: float) -> np.ndarray:
    """Peel the lowest-degree member until each remaining one meets ``density``.

    Degrees inside the set are updated as members leave, so peeling n members
    costs O(n^2), not O(n^3). Ties go to the earliest member.
    """
    members = np.asarray(members)
    sub = adj[np.ix_(members, members)].astype(np.int32)
    degree = sub.sum(axis=1)
    kept = np.ones(len(members), dtype=bool)
    remaining = len(members)
    gone = np.iinfo(np.int32).max
    while remaining > 2:
        worst = int(np.argmin(np.where(kept, degree, gone)))
        if degree[worst] >= density * (remaining - 1):
            break
        kept[worst] = False
        degree -= sub[:, worst]
        remaining -= 1
    return members[kept]


def grow(adj: np.ndarray, core: np.ndarray, density: float) -> np.ndarray:
    """Add back every node adjacent to all but at most one of the core, then peel again.

    A support member with one missing edge (to the pair's second unit) is not a
    common neighbour, yet it is adjacent to the rest of its support. Requiring
    all but one link (not merely ``density``) keeps two supports that share a
    few channels from fusing.
    """
    outside = np.setdiff1d(np.arange(adj.shape[0]), core)
    if len(outside) == 0 or len(core) < 2:
        return core
    links = adj[np.ix_(outside, core)].sum(axis=1)
    extra = outside[links >= len(core) - 1]
    if len(extra) == 0:
        return core
    grown = dense_core(adj, np.union1d(core, extra), density)
    return grown if 0 in grown else core


def anchored_groups(adj: np.ndarray, density: float) -> list[np.ndarray]:
    """Candidate clusters around the anchor (node 0) of an anchored local graph.

    ``adj`` is (n+1) x (n+1) boolean with node 0 the anchor, adjacent to every
    other node. Returns arrays of node indices, each containing the anchor.
    """
    n = adj.shape[0]
    seen: set[tuple[int, ...]] = set()
    grown: dict[bytes, np.ndarray | None] = {}  # pairs with the same common neighbourhood give the same group
    groups = []
    for k in range(1, n):
        common = np.flatnonzero(adj[k] & adj[0])
        members = np.union1d(np.array([0, k]), common)
        key = members.tobytes()
        if key not in grown:
            core = dense_core(adj, members, density)
            grown[key] = grow(adj, core, density) if 0 in core else None
        core = grown[key]
        if core is None:
            continue
        group_key = tuple(core.tolist())
        if group_key not in seen:
            seen.add(group_key)
            groups.append(core)
    return groups
