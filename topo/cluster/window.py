"""The windowed variables: (channel, offset) pairs inside a k x k window.

The correlation of (i, a) with (j, b) is ``cross_corr(b - a)[i, j]`` of the
statistics (translation invariance), so everything the clustering needs is the
stack of C x C matrices for the offsets ``d`` with ``|dy|, |dx| <= k - 1``
(every displacement between two positions of one window). The full
(C k^2) x (C k^2) matrix is never formed: a candidate cluster is *anchored* on
a channel at offset (0, 0), its other members are that anchor's neighbours in
the offset stack, and the pairwise relations among those neighbours are
gathered from the stack on demand. Anchoring removes translation: translated
copies of one cluster seen from the same anchor channel coincide.

An edge is tested against independence (`hebbian_edges`), or, given statistics
of the same layer on a null input, against what the null shows for that pair
and offset (`null_edges`).

Every edge also carries its *strength*, the excess co-firing probability
``prob - expected`` (``expected = p_i p_j`` under independence, the null's
co-firing carried over to the observed rates with a null): in a sparse
generative network it is about the density of the pair's nearest shared cause,
a direct parent (Arora et al.'s rho_{l+1}) for two members of one support,
only a grandparent (rho_{l+2}) for two siblings' members (`topo.cluster.arora`
uses it to tell them apart).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_MIN_LIFT = 2.0
DEFAULT_ALPHA = 0.01
AUTO_LIFT_SHARE = 0.25


@dataclass
class WindowGraph:
    """Hebbian edges (and optionally correlations) for every offset in reach.

    ``edges[o, i, j]`` is True when unit i at p and unit j at p + offsets[o]
    fire together more than chance allows; ``strength[o, i, j]`` is that edge's
    excess co-firing probability (float32, 0 where there is no edge), present
    when a method needs it; ``corr[o, i, j]`` is the matching cross-correlation
    (float32), present when a method needs it.
    """

    reach: int
    offsets: np.ndarray  # (O, 2) int
    edges: np.ndarray  # (O, C, C) bool
    corr: np.ndarray | None  # (O, C, C) float32
    alive: np.ndarray  # (C,) bool
    lift_threshold: float
    strength: np.ndarray | None = None  # (O, C, C) float32

    @property
    def side(self) -> int:
        return 2 * self.reach + 1

    def index(self, dy, dx):
        """Index into the offset stack (works element-wise on arrays)."""
        return (np.asarray(dy) + self.reach) * self.side + (np.asarray(dx) + self.reach)

    @property
    def n_edges(self) -> int:
        """Distinct edges up to translation: (i, p)-(j, p + d) and (j, p)-(i, p - d) are one."""
        return int(self.edges.sum()) // 2

    @property
    def centre(self) -> int:
        return int(self.index(0, 0))

    def neighbours(self, anchor: int) -> tuple[np.ndarray, np.ndarray]:
        """The anchor's neighbours: (channels (n,), offsets (n, 2)), anchor and its own translates excluded.

        A channel paired with its own translate carries the map's smoothness,
        not a shared cause, so those pairs are never members of one cluster.
        """
        o_idx, chans = np.nonzero(self.edges[:, anchor, :])
        keep = chans != anchor
        return chans[keep], self.offsets[o_idx[keep]]

    def local(self, stack: np.ndarray, chans: np.ndarray, offs: np.ndarray, fill) -> np.ndarray:
        """Pairwise entries among windowed variables: out[k, l] = stack[offs[l] - offs[k]][chans[k], chans[l]].

        Pairs further apart than the reach get ``fill``.
        """
        r, C = self.reach, stack.shape[1]
        dy = offs[None, :, 0] - offs[:, None, 0]
        dx = offs[None, :, 1] - offs[:, None, 1]
        valid = (np.abs(dy) <= r) & (np.abs(dx) <= r)
        # one flat index into the contiguous stack: several times faster than three index arrays
        flat = (self.index(dy.clip(-r, r), dx.clip(-r, r)) * C + chans[:, None]) * C + chans[None, :]
        return np.where(valid, np.ascontiguousarray(stack).reshape(-1).take(flat), fill)


def mean_strength(local_strength: np.ndarray) -> float:
    """A group's tier: the mean strength of the edges among its members, from their local strength matrix
    (`WindowGraph.local` of `WindowGraph.strength`, 0 off the edges); 0 without edges."""
    values = local_strength[local_strength > 0]
    return float(values.mean()) if len(values) else 0.0


def lift_floor(rate_i: np.ndarray, rate_j: np.ndarray, min_lift: float | None = None) -> np.ndarray:
    """The "auto" lift floor: ``DEFAULT_MIN_LIFT``, or a quarter of the way from 1 to the
    largest lift two firing rates allow (``1 / max(p_i, p_j)``), whichever is smaller.

    Units that fire half the time can never reach a lift of 2, however tightly
    they are coupled; the second term keeps the rule meaningful for them.
    """
    min_lift = DEFAULT_MIN_LIFT if min_lift is None else min_lift
    top = 1.0 / np.maximum(np.maximum.outer(rate_i, rate_j), 1e-12)
    return np.minimum(min_lift, 1.0 + AUTO_LIFT_SHARE * (top - 1.0))


def bonferroni_log_alpha(n_alive: int, n_offsets: int, alpha: float) -> tuple[float, float]:
    """``(log(alpha / tests), tests)``: the per-test bar for every pair of live units at every offset.

    Offsets d and -d are one test, so there are ``n_alive**2 * n_offsets / 2`` of them.
    """
    tests = max(n_alive ** 2 * n_offsets / 2, 1.0)
    return float(np.log(alpha) - np.log(tests)), tests


def hebbian_edges(prob: np.ndarray, rate_i: np.ndarray, rate_j: np.ndarray, pairs: float,
                  min_lift: float | np.ndarray, log_alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Edges where two units fire together more than chance allows.

    Under independence the number of co-firings among ``pairs`` position pairs
    is close to Poisson with mean ``mu = pairs p_i p_j`` (conservative next to
    the binomial). An edge needs both an effect (lift ``prob / (p_i p_j) >=
    min_lift``) and evidence: the Poisson tail ``P(K >= k) <= exp(log_alpha)``,
    where ``log_alpha`` already carries the multiple-testing correction.
    Returns (edges, lift).
    """
    e = np.outer(rate_i, rate_j)
    lift = independence_lift(prob, rate_i, rate_j)
    edges = (lift >= min_lift) & (prob > 0)
    rows, cols = np.nonzero(edges)
    if len(rows):
        significant = poisson_tail_at_most(np.rint(prob[rows, cols] * pairs), e[rows, cols] * pairs, log_alpha)
        edges[rows[~significant], cols[~significant]] = False
    return edges, lift


def poisson_tail_at_most(k: np.ndarray, mu: np.ndarray, log_alpha: float) -> np.ndarray:
    """``poisson.logsf(k - 1, mu) <= log_alpha``, the exact tail evaluated only where two bounds disagree.

    The tail is at least the point mass ``P(K = k)`` and, for ``k > mu``, at most
    Chernoff's ``exp(-mu) (e mu / k)**k``; both are cheap closed forms, and on a
    dense layer they settle nine pairs in ten.
    """
    from scipy.special import gammaln
    from scipy.stats import poisson

    margin = 1e-9  # leave pairs within rounding of the bar to the exact tail
    with np.errstate(divide="ignore", invalid="ignore"):
        log_point = k * np.log(mu) - mu - gammaln(k + 1)
        log_chernoff = np.where(k > mu, -mu + k * (1.0 + np.log(mu / k)), 0.0)
    fails = log_point > log_alpha + margin
    passes = log_chernoff < log_alpha - margin
    out = passes & ~fails
    unsure = np.flatnonzero(~fails & ~passes)
    out[unsure] = poisson.logsf(k[unsure] - 1, mu[unsure]) <= log_alpha
    return out


def null_edges(prob: np.ndarray, null_prob: np.ndarray, rate: np.ndarray, null_rate: np.ndarray, pairs: float,
               null_pairs: float, min_lift: float | np.ndarray, log_alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Edges where two units fire together more than they do in a null recording of the same layer.

    The null's co-firing probability of the pair, carried over to the observed
    firing rates (``q = null_prob * p_i p_j / (p0_i p0_j)``, equal to
    ``null_prob`` when the rates match), is what the network's own structure
    gives. An edge needs an effect, ``prob / q >= min_lift``, and evidence: with
    ``k`` observed and ``k0`` null co-firings, under "no excess over the null"
    both are Poisson with means in the ratio ``pairs s : null_pairs`` (``s`` the
    rate scale), so given ``k + k0``, ``k`` is binomial with ``pi = pairs s /
    (pairs s + null_pairs)``. This conditional test carries the null's own
    sampling error; its tail must be at most ``exp(log_alpha)``. Pairs with a
    unit that never fires in the null cannot be tested and get no edge.
    Returns (edges, lift relative to the null).
    """
    from scipy.stats import binom

    testable = np.outer(null_rate > 0, null_rate > 0)
    scale = np.outer(rate, rate) / np.where(testable, np.outer(null_rate, null_rate), 1.0)
    expected = null_prob * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = np.where(expected > 0, prob / np.where(expected > 0, expected, 1.0), np.where(prob > 0, np.inf, 0.0))
    lift = np.where(testable, lift, 0.0)
    edges = (lift >= min_lift) & (prob > 0)
    rows, cols = np.nonzero(edges)
    if len(rows):
        k = np.rint(prob[rows, cols] * pairs)
        k0 = np.rint(null_prob[rows, cols] * null_pairs)
        weight = pairs * scale[rows, cols]
        significant = binom.logsf(k - 1, k + k0, weight / (weight + null_pairs)) <= log_alpha
        edges[rows[~significant], cols[~significant]] = False
    return edges, lift


def pairs_at(stats, dy: int, dx: int) -> float:
    """Position pairs at offset (dy, dx) inside the map (sampled anchors thin all offsets alike)."""
    height, width = stats.spatial_shape if getattr(stats, "spatial_shape", None) else (1, 1)
    return float(stats.count) * (height - abs(dy)) * (width - abs(dx)) / (height * width)


def build_window_graph(stats, reach: int, *, min_lift: float | str = "auto", alpha: float = DEFAULT_ALPHA,
                       max_degree: int = 64, need_corr: bool = False, need_strength: bool = False,
                       dead: np.ndarray | None = None, null=None, direct_only: bool = False) -> WindowGraph:
    """Query the statistics for every offset within ``reach`` and build the edge stack.

    Offsets d and -d come from one query (``M(-d) = M(d).T``). With
    ``min_lift="auto"`` the lift floor is `lift_floor` per pair, and the
    threshold is raised if needed so the mean number of anchored neighbours
    stays at most ``max_degree`` (dense graphs say nothing about who fires
    *together*); ``lift_threshold`` records the raised value (or the default
    floor when none was needed). With ``null`` (statistics of the same layer on
    a null input) each pair is tested against the null (`null_edges`) instead of
    against independence, and the correlations are the excess over the null's.
    ``need_strength`` keeps every edge's excess co-firing probability (`WindowGraph.strength`).
    ``direct_only`` drops the edges `through_translates` explains (before the degree cap).
    """
    C = stats.num_channels
    side = 2 * reach + 1
    offsets = np.array([(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)],
                       dtype=np.int64).reshape(-1, 2)
    alive = np.ones(C, dtype=bool)
    if dead is not None and len(dead):
        alive[np.asarray(dead, dtype=np.int64)] = False
    rate = np.asarray(stats.firing_rate, dtype=np.float64)
    floor = lift_floor(rate, rate) if min_lift == "auto" else float(min_lift)
    log_alpha, _ = bonferroni_log_alpha(int(alive.sum()), len(offsets), alpha)
    edges = np.zeros((len(offsets), C, C), dtype=bool)
    edge_lift: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(offsets)
    corr = np.zeros((len(offsets), C, C), dtype=np.float32) if need_corr else None
    strength = np.zeros((len(offsets), C, C), dtype=np.float32) if need_strength else None
    mask = np.outer(alive, alive)
    for o, (dy, dx) in enumerate(offsets):
        if (dy, dx) < (0, 0):
            continue  # filled from the mirrored offset
        o_neg = (-dy + reach) * side + (-dx + reach)
        ok, lift, prob = _offset_edges(stats, null, int(dy), int(dx), rate, floor, log_alpha)
        ok &= mask
        np.fill_diagonal(ok, False)  # a channel and its own translate: the map's smoothness, never an edge
        edges[o], edge_lift[o] = ok, lift[ok].astype(np.float32)
        if need_strength:
            strength[o] = np.where(ok, excess(prob, lift), 0.0)
            strength[o_neg] = strength[o].T
        if need_corr:
            corr[o] = np.where(mask, _offset_corr(stats, null, int(dy), int(dx)), 0.0)
        if o != o_neg:
            edges[o_neg], edge_lift[o_neg] = ok.T, lift.T[ok.T].astype(np.float32)
            if need_corr:
                corr[o_neg] = corr[o].T
    if direct_only:
        _drop_edges(edges, edge_lift, through_translates(edges, independence_lifts(stats, reach), offsets, reach))
    threshold = DEFAULT_MIN_LIFT if min_lift == "auto" else float(min_lift)
    if min_lift == "auto":
        threshold = _cap_degree(edges, edge_lift, max_degree * max(int(alive.sum()), 1), threshold)
    if need_strength:
        strength[~edges] = 0.0  # edges the degree cap removed
    return WindowGraph(reach=reach, offsets=offsets, edges=edges, corr=corr, alive=alive,
                       lift_threshold=threshold, strength=strength)


def independence_lift(prob: np.ndarray, rate_i: np.ndarray, rate_j: np.ndarray) -> np.ndarray:
    """``prob / (p_i p_j)``: how much more often two units fire together than if they were independent
    (0 where a unit never fires)."""
    expected = np.outer(rate_i, rate_j)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(expected > 0, prob / np.where(expected > 0, expected, 1.0), 0.0)


def independence_lifts(stats, reach: int) -> np.ndarray:
    """(O, C, C) `independence_lift` at every offset within ``reach`` (in `build_window_graph`'s order), each
    channel with its own translate on the diagonals."""
    side = 2 * reach + 1
    rate = np.asarray(stats.firing_rate, dtype=np.float64)
    lifts = np.zeros((side * side, len(rate), len(rate)), dtype=np.float32)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            if (dy, dx) >= (0, 0):
                prob, _ = stats.coactivation(dy, dx)
                o = (dy + reach) * side + dx + reach
                lifts[o] = independence_lift(np.asarray(prob, np.float64), rate, rate)
                lifts[side * side - 1 - o] = lifts[o].T  # the mirrored offset, (-dy, -dx)
    return lifts


def through_translates(edges: np.ndarray, lift: np.ndarray, offsets: np.ndarray, reach: int) -> np.ndarray:
    """The edges a stronger co-firing of the same pair explains through the map's own smoothness: (i at p, j at
    p + d) is explained where the pair co-fires more at another offset d' and one of its two channels co-fires
    with itself across the gap d - d' at least as much as the pair does at d. In the triangle (i, j at d', j at
    d), or (i, i at d - d', j at d), the edge is then the weakest side, and the data processing inequality
    (ARACNE's rule, Margolin et al. 2006) calls it indirect: one unit seen beside a partner's translate. Only
    triangles through a translate are tested, so a cluster of distinct channels keeps its edges. ``lift``:
    (O, C, C) co-firing against independence, self-translates on the diagonals; gaps beyond ``reach`` are not
    looked at. Returns the (O, C, C) mask of the explained edges (symmetric under d -> -d as ``edges`` is)."""
    side = 2 * reach + 1
    own = np.stack([np.diagonal(lift[o]) for o in range(len(offsets))])  # (O, C): each channel with its translate
    explained = np.zeros_like(edges)
    for o, (dy, dx) in enumerate(offsets):
        rows, cols = np.nonzero(edges[o])
        if not len(rows):
            continue
        here = lift[o, rows, cols]
        weakest = np.zeros(len(rows), dtype=bool)
        for other, (ey, ex) in enumerate(offsets):
            gy, gx = int(dy - ey), int(dx - ex)
            if other == o or abs(gy) > reach or abs(gx) > reach:
                continue
            gap = (gy + reach) * side + (gx + reach)
            bridge = np.maximum(own[gap, rows], own[gap, cols])
            weakest |= (lift[other, rows, cols] > here) & (bridge >= here)
        explained[o, rows[weakest], cols[weakest]] = True
    return explained


def _drop_edges(edges: np.ndarray, edge_lift: list[np.ndarray], drop: np.ndarray) -> None:
    """Remove the ``drop`` edges from ``edges`` and their lifts from ``edge_lift`` (kept in `np.nonzero` order)."""
    for o in range(len(edges)):
        rows, cols = np.nonzero(edges[o])
        keep = ~drop[o, rows, cols]
        edge_lift[o] = edge_lift[o][keep]
        edges[o, rows[~keep], cols[~keep]] = False


def excess(prob: np.ndarray, lift: np.ndarray) -> np.ndarray:
    """Excess co-firing probability ``prob - expected`` from ``lift = prob / expected`` (``prob`` where
    nothing was expected, an infinite lift)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(lift > 0, prob - prob / np.where(lift > 0, lift, 1.0), 0.0)


def _offset_edges(stats, null, dy: int, dx: int, rate: np.ndarray, floor, log_alpha: float):
    """(edges, lift, co-firing probability) at one offset: against independence, or against the null."""
    prob, _ = stats.coactivation(dy, dx)
    prob = np.asarray(prob, dtype=np.float64)
    if null is None:
        return (*hebbian_edges(prob, rate, rate, pairs_at(stats, dy, dx), floor, log_alpha), prob)
    null_prob, _ = null.coactivation(dy, dx)
    null_rate = np.asarray(null.firing_rate, dtype=np.float64)
    return (*null_edges(prob, np.asarray(null_prob, dtype=np.float64), rate, null_rate, pairs_at(stats, dy, dx),
                        pairs_at(null, dy, dx), floor, log_alpha), prob)


def _offset_corr(stats, null, dy: int, dx: int) -> np.ndarray:
    """Cross-correlation at one offset, less the null's (the excess over the network's own) with a null."""
    cc = np.asarray(stats.cross_corr(dy, dx), dtype=np.float64)
    if null is not None:
        cc = np.clip(cc - np.asarray(null.cross_corr(dy, dx), dtype=np.float64), -1.0, 1.0)
    return cc.astype(np.float32)


def _cap_degree(edges: np.ndarray, edge_lift: list[np.ndarray], keep: int, threshold: float) -> float:
    """Keep the ``keep`` strongest edges (by lift) if there are more; returns the lift threshold used."""
    if edges.sum() <= keep:
        return threshold
    values = np.concatenate(edge_lift)
    threshold = float(np.partition(values, len(values) - keep)[len(values) - keep])
    for o in range(len(edges)):
        if len(edge_lift[o]):
            rows, cols = np.nonzero(edges[o])
            weak = edge_lift[o] < threshold
            edges[o, rows[weak], cols[weak]] = False
    return threshold
