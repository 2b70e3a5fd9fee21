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
    fire together more than chance allows; ``corr[o, i, j]`` is the matching
    cross-correlation (float32), present when a method needs it.
    """

    reach: int
    offsets: np.ndarray  # (O, 2) int
    edges: np.ndarray  # (O, C, C) bool
    corr: np.ndarray | None  # (O, C, C) float32
    alive: np.ndarray  # (C,) bool
    lift_threshold: float

    @property
    def side(self) -> int:
        return 2 * self.reach + 1

    def index(self, dy, dx):
        """Index into the offset stack (works element-wise on arrays)."""
        return (np.asarray(dy) + self.reach) * self.side + (np.asarray(dx) + self.reach)

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
        diff = offs[None, :, :] - offs[:, None, :]
        valid = np.abs(diff).max(axis=2) <= self.reach
        idx = self.index(np.clip(diff[..., 0], -self.reach, self.reach),
                         np.clip(diff[..., 1], -self.reach, self.reach))
        out = stack[idx, chans[:, None], chans[None, :]]
        return np.where(valid, out, fill)


def lift_floor(rate_i: np.ndarray, rate_j: np.ndarray, min_lift: float | None = None) -> np.ndarray:
    """The "auto" lift floor: ``DEFAULT_MIN_LIFT``, or a quarter of the way from 1 to the
    largest lift two firing rates allow (``1 / max(p_i, p_j)``), whichever is smaller.

    Units that fire half the time can never reach a lift of 2, however tightly
    they are coupled; the second term keeps the rule meaningful for them.
    """
    min_lift = DEFAULT_MIN_LIFT if min_lift is None else min_lift
    top = 1.0 / np.maximum(np.maximum.outer(rate_i, rate_j), 1e-12)
    return np.minimum(min_lift, 1.0 + AUTO_LIFT_SHARE * (top - 1.0))


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
    from scipy.stats import poisson

    e = np.outer(rate_i, rate_j)
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = np.where(e > 0, prob / np.where(e > 0, e, 1.0), 0.0)
    edges = (lift >= min_lift) & (prob > 0)
    rows, cols = np.nonzero(edges)
    if len(rows):
        k = np.rint(prob[rows, cols] * pairs)
        mu = e[rows, cols] * pairs
        significant = poisson.logsf(k - 1, mu) <= log_alpha
        edges[rows[~significant], cols[~significant]] = False
    return edges, lift


def build_window_graph(stats, reach: int, *, min_lift: float | str = "auto", alpha: float = DEFAULT_ALPHA,
                       max_degree: int = 64, need_corr: bool = False,
                       dead: np.ndarray | None = None) -> WindowGraph:
    """Query the statistics for every offset within ``reach`` and build the edge stack.

    Offsets d and -d come from one query (``M(-d) = M(d).T``). With
    ``min_lift="auto"`` the lift floor is `lift_floor` per pair, and the
    threshold is raised if needed so the mean number of anchored neighbours
    stays at most ``max_degree`` (dense graphs say nothing about who fires
    *together*); ``lift_threshold`` records the raised value (or the default
    floor when none was needed).
    """
    C = stats.num_channels
    side = 2 * reach + 1
    offsets = np.array([(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)],
                       dtype=np.int64).reshape(-1, 2)
    alive = np.ones(C, dtype=bool)
    if dead is not None and len(dead):
        alive[np.asarray(dead, dtype=np.int64)] = False
    rate = _firing_rate(stats)
    min_lift_floor = lift_floor(rate, rate) if min_lift == "auto" else float(min_lift)
    edges = np.zeros((len(offsets), C, C), dtype=bool)
    edge_lift: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(offsets)
    corr = np.zeros((len(offsets), C, C), dtype=np.float32) if need_corr else None
    count = float(stats.count)
    mask = np.outer(alive, alive)
    height, width = stats.spatial_shape if getattr(stats, "spatial_shape", None) else (1, 1)
    n_tests = max(int(alive.sum()) ** 2 * len(offsets) / 2, 1.0)
    log_alpha = float(np.log(alpha) - np.log(n_tests))  # Bonferroni over every tested pair
    centre = reach * side + reach
    for o, (dy, dx) in enumerate(offsets):
        if (dy, dx) < (0, 0):
            continue  # filled from the mirrored offset
        mirror = not (dy == 0 and dx == 0)
        o_neg = (-dy + reach) * side + (-dx + reach)
        prob, _ = stats.coactivation(int(dy), int(dx))
        # position pairs at this offset inside the map (sampled anchors thin all offsets alike)
        pairs = count * (height - abs(dy)) * (width - abs(dx)) / (height * width)
        ok, lift = hebbian_edges(np.asarray(prob), rate, rate, pairs, min_lift_floor, log_alpha)
        ok &= mask
        if o == centre:
            np.fill_diagonal(ok, False)
        edges[o] = ok
        edge_lift[o] = lift[ok].astype(np.float32)
        if mirror:
            edges[o_neg] = ok.T
            edge_lift[o_neg] = lift.T[ok.T].astype(np.float32)
        if need_corr:
            cc = np.where(mask, np.asarray(stats.cross_corr(int(dy), int(dx))), 0.0).astype(np.float32)
            corr[o] = cc
            if mirror:
                corr[o_neg] = cc.T
    threshold = DEFAULT_MIN_LIFT if min_lift == "auto" else float(min_lift)
    n_alive = max(int(alive.sum()), 1)
    if min_lift == "auto" and edges.sum() / n_alive > max_degree:
        # keep the max_degree * n_alive strongest edges (by lift)
        values = np.concatenate(edge_lift)
        keep = max_degree * n_alive
        threshold = float(np.partition(values, len(values) - keep)[len(values) - keep])
        for o in range(len(offsets)):
            if len(edge_lift[o]):
                rows, cols = np.nonzero(edges[o])
                weak = edge_lift[o] < threshold
                edges[o, rows[weak], cols[weak]] = False
    return WindowGraph(reach=reach, offsets=offsets, edges=edges, corr=corr, alive=alive,
                       lift_threshold=threshold)


def _firing_rate(stats) -> np.ndarray:
    rate = getattr(stats, "firing_rate", None)
    if rate is not None:
        rate = rate() if callable(rate) else rate
        return np.asarray(rate, dtype=np.float64)
    prob, _ = stats.coactivation(0, 0)
    return np.diag(np.asarray(prob, dtype=np.float64)).copy()
