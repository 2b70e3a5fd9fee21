"""Arora et al.'s recovery: a hidden unit is the dense common neighbourhood of its members.

Arora, Bhaskara, Ge and Ma, "Provable bounds for learning some deep
representations" (2014), build the Hebbian graph (an edge where two observed
units fire together more than chance) and recover each hidden unit from a pair
of its members: in the sparse regime the common neighbourhood of two units
that share a parent is essentially that parent's support. Here every pair is
(anchor at offset 0, one of its neighbours); the common neighbourhood is read
from the anchored local graph and cleaned by repeatedly dropping the member
with the fewest edges inside the set until every member is adjacent to at
least ``density`` of the others.
"""
from __future__ import annotations

import numpy as np


def dense_core(adj: np.ndarray, members: np.ndarray, density: float) -> np.ndarray:
    """Peel the lowest-degree member until each remaining one meets ``density``."""
    members = members.copy()
    while len(members) > 2:
        sub = adj[np.ix_(members, members)]
        deg = sub.sum(axis=1)
        worst = int(np.argmin(deg))
        if deg[worst] >= density * (len(members) - 1):
            break
        members = np.delete(members, worst)
    return members


def anchored_groups(adj: np.ndarray, density: float) -> list[np.ndarray]:
    """Candidate clusters around the anchor (node 0) of an anchored local graph.

    ``adj`` is (n+1) x (n+1) boolean with node 0 the anchor, adjacent to every
    other node. Returns arrays of node indices, each containing the anchor.
    """
    n = adj.shape[0]
    seen: set[tuple[int, ...]] = set()
    groups = []
    for k in range(1, n):
        common = np.flatnonzero(adj[k] & adj[0])
        members = np.union1d(np.array([0, k]), common)
        core = dense_core(adj, members, density)
        if 0 not in core:
            continue
        key = tuple(core.tolist())
        if key not in seen:
            seen.add(key)
            groups.append(core)
    return groups
