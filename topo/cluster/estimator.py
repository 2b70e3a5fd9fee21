"""`UnitClustering`: from layer statistics to clusters with spatial footprints."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from joblib import effective_n_jobs
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from threadpoolctl import threadpool_limits

from topo.cluster.arora import MAX_LEVELS, anchored_groups, tiered_groups
from topo.cluster.clusters import Cluster, canonical_members
from topo.cluster.evidence import assess, warn_if_weak
from topo.cluster.partition import METHODS as PARTITION_METHODS
from topo.cluster.partition import partition
from topo.cluster.select import TierTest, drop_unions, merge_candidates, select_clusters
from topo.cluster.window import DEFAULT_ALPHA, bonferroni_log_alpha, build_window_graph, mean_strength, pairs_at
from topo.common.errors import ParameterError, StatsError, UserError
from topo.common.processes import forked_map
from topo.stats.layer_stats import LayerStats

METHODS = ("arora",) + PARTITION_METHODS
#: ``n_jobs`` acts on graphs of at least this many Hebbian edges: starting forked workers costs about 45 ms,
#: more than clustering a smaller layer takes (a 300-edge layer of the default construction: 0.17 s in all).
MIN_FORKED_EDGES = 500


class UnitClustering(BaseEstimator):
    """Group the units of one layer into candidate units of the next.

    Parameters
    ----------
    method : "arora" (overlapping, Arora et al. 2014), "spectral", "agglomerative" or "louvain".
    window : side k of the window a next-layer unit looks at (odd; 5 covers 1x1, 3x3, 5x5).
        Needs statistics with ``max_offset >= k - 1``. Ignored (treated as 1) for
        non-spatial statistics of (N, C) activations.
    n_clusters : "auto" (the documented keep rule, see `topo.cluster.select`) or an int.
    max_clusters : optional cap on the number of clusters kept (the best by evidence).
    random_state : seed for the randomised steps (Louvain, spectral); same seed, same clusters.
    min_lift, alpha, max_degree : the Hebbian edge rule (`topo.cluster.window`).
    density : Arora's clean-up: each member adjacent to at least this share of the others.
    tiers : Arora only: run the procedure at every strength level of each anchor's edges (at most
        ``max_levels``) and drop groups that are unions of stronger ones (siblings' supports under a
        shared parent: a unit of the next layer), `topo.cluster.arora.tiered_groups`. False: one level.
    min_size : smallest cluster kept (a pair is an edge, not evidence of a shared cause).
    min_votes : anchors that must recover a cluster for the "auto" rule.
    merge_jaccard : aligned Jaccard at which two candidates are one unit.
    merge_containment : share of a cluster a larger one must hold to absorb it as a fragment.
    min_corr : agglomerative cut (groups whose average |corr| falls below it stay apart).
    direct_only : drop the edges a stronger co-firing of the same pair at another offset explains through the
        map's smoothness (`topo.cluster.window.through_translates`): a unit seen beside a partner's translate.
        On by default since the study of 2026-12-07 (docs/clustering.md); False gives the graph before.
    min_observations : fewer recorded observations than this is an error.
    n_jobs : arora only: worker processes for the per-anchor search and the union check (forked, so they
        share the statistics without copies; joblib's convention: None is 1, -1 every core), on graphs of at
        least `MIN_FORKED_EDGES` edges. Any value gives the same clusters.
    progress : show a progress bar over the anchors (False to turn it off).

    Fitted attributes
    -----------------
    clusters_ : list of `Cluster`, best evidence first.
    n_clusters_ : len(clusters_).
    kernel_counts_ : {1: n, 3: n, 5: n} clusters per kernel size.
    channel_labels_ : (C,) index into ``clusters_`` of each channel's primary cluster
        (the first, i.e. best-evidenced, cluster containing it), -1 for none or dead.
    labels_ : hard methods only (None for "arora", whose memberships overlap): per
        channel, the same as ``channel_labels_``. In the non-spatial mode the hard
        methods partition the channels, so this is the partition itself.
    channel_order_ : a permutation of all channels grouping them by primary cluster
        (unassigned, then dead channels last), for cluster-ordered correlation plots.
    dead_units_ : channels left out as dead.
    lift_threshold_ : the lift threshold the Hebbian graph used.
    n_edges_ : Hebbian edges of the window graph (each pair of variables once, up to translation).
    evidence_ : `topo.cluster.evidence.Evidence`: observations, median firing rate, the co-firings a
        typical pair needs to pass the test against those a pair at the lift floor shows, whether
        the test is powered, whether the layer is dense (``fit`` warns about both).
    n_candidates_ : candidate groups found over all anchors (before merging).
    n_window_cuts_ : of those, how many had a footprint wider than the window and were cut to it.
    cut_kernel_counts_ : {1: n, 3: n, 5: n} clusters per kernel whose footprint some anchor found as such a cut.
    """

    def __init__(self, method: str = "arora", window: int = 5, n_clusters: int | str = "auto",
                 max_clusters: int | None = None, random_state=None, *, min_lift: float | str = "auto",
                 alpha: float = DEFAULT_ALPHA, max_degree: int = 64, density: float = 0.5,
                 tiers: bool = True, max_levels: int = MAX_LEVELS,
                 min_size: int = 3, min_votes: int = 2, merge_jaccard: float = 0.5, merge_containment: float = 0.8,
                 min_corr: float = 0.1, direct_only: bool = True,
                 min_observations: int = 100, n_jobs: int | None = None, progress: bool = True):
        self.method = method
        self.window = window
        self.n_clusters = n_clusters
        self.max_clusters = max_clusters
        self.random_state = random_state
        self.min_lift = min_lift
        self.alpha = alpha
        self.max_degree = max_degree
        self.density = density
        self.tiers = tiers
        self.max_levels = max_levels
        self.min_size = min_size
        self.min_votes = min_votes
        self.merge_jaccard = merge_jaccard
        self.merge_containment = merge_containment
        self.min_corr = min_corr
        self.direct_only = direct_only
        self.min_observations = min_observations
        self.n_jobs = n_jobs
        self.progress = progress

    # ------------------------------------------------------------------ checks
    def _check_params(self) -> None:
        if self.method not in METHODS:
            raise ParameterError(f"UnitClustering: unknown method {self.method!r}; "
                                 f"choose one of {', '.join(METHODS)}")
        if not isinstance(self.window, (int, np.integer)) or self.window < 1 or self.window % 2 == 0:
            raise ParameterError(f"UnitClustering: window must be an odd positive int (1, 3, 5, ...), "
                                 f"got {self.window!r}")
        if self.n_clusters != "auto" and (not isinstance(self.n_clusters, (int, np.integer)) or self.n_clusters < 1):
            raise ParameterError(f"UnitClustering: n_clusters must be 'auto' or a positive int, "
                                 f"got {self.n_clusters!r}")
        if not isinstance(self.max_levels, (int, np.integer)) or self.max_levels < 1:
            raise ParameterError(f"UnitClustering: max_levels must be a positive int (strength levels per anchor), "
                                 f"got {self.max_levels!r}")
        if self.n_jobs is not None and (isinstance(self.n_jobs, bool) or not isinstance(self.n_jobs, (int, np.integer))
                                        or self.n_jobs == 0):
            raise ParameterError(f"UnitClustering: n_jobs must be None, a positive int or a negative one (-1: every "
                                 f"core), got {self.n_jobs!r}")
        if self.max_clusters is not None and self.max_clusters < 1:
            raise ParameterError(f"UnitClustering: max_clusters must be None or >= 1, got {self.max_clusters!r}")

    def _check_stats(self, stats) -> tuple[bool, np.ndarray]:
        if not isinstance(stats, LayerStats):
            raise UserError(f"UnitClustering.fit takes a topo.stats.LayerStats (from topo.record or "
                            f"topo.stats.from_activations), not {type(stats).__name__}")
        count = int(stats.count)
        if count < self.min_observations:
            raise StatsError(
                f"UnitClustering: the statistics hold only {count} observations; record at least "
                f"{self.min_observations} (more images, or all positions of each map) before clustering"
            )
        dead = np.asarray(stats.dead_units, dtype=np.int64).reshape(-1)
        if len(dead) >= stats.num_channels:
            raise StatsError(
                f"UnitClustering: all {stats.num_channels} units are dead (constant); record statistics on "
                "varied inputs, or from a trained (not freshly initialised) layer"
            )
        spatial = bool(getattr(stats, "spatial", True)) and self.window > 1
        need = self._reach(stats, spatial)
        if spatial and int(stats.max_offset) < need:
            raise StatsError(
                f"UnitClustering: window {self.window} needs statistics with max_offset >= {need}, "
                f"these have {stats.max_offset}; record with max_offset={need} or use a smaller window"
            )
        return spatial, dead

    def _reach(self, stats, spatial: bool) -> int:
        """The largest offset the window needs: ``window - 1``, less on a smaller map, 0 without space."""
        if not spatial:
            return 0
        if getattr(stats, "spatial_shape", None):
            return min(self.window - 1, min(stats.spatial_shape) - 1)  # a small map holds no pairs further apart
        return self.window - 1

    def _check_null(self, stats, null, reach: int) -> None:
        """The null must describe the same layer (units, map) with enough observations and offsets."""
        if not isinstance(null, LayerStats):
            raise UserError(f"UnitClustering.fit: null must be a topo.stats.LayerStats of the same layer "
                            f"recorded on a null input, not {type(null).__name__}")
        mine = (stats.num_channels, getattr(stats, "spatial_shape", None))
        theirs = (null.num_channels, getattr(null, "spatial_shape", None))
        if mine != theirs:
            raise StatsError(f"UnitClustering: the null statistics have (C, map) = {theirs}, the layer's are {mine}; "
                             "record the null from the same layer on inputs of the same size")
        if int(null.count) < self.min_observations:
            raise StatsError(f"UnitClustering: the null statistics hold only {int(null.count)} observations; "
                             f"record at least {self.min_observations} before testing against them")
        if int(null.max_offset) < reach:
            raise StatsError(f"UnitClustering: the null statistics have max_offset {null.max_offset}, window "
                             f"{self.window} needs {reach}; record the null with max_offset={reach}")

    # -------------------------------------------------------------------- fit
    def fit(self, stats, null=None) -> "UnitClustering":
        """Cluster the units described by ``stats`` (a `topo.stats.LayerStats`).

        ``null``: statistics of the same layer recorded on a null input (matched-moment
        noise, or the data with its pixels shuffled); each pair is then tested against
        what the null shows for it instead of against independence (docs/clustering.md).
        """
        self._check_params()
        spatial, dead = self._check_stats(stats)
        reach = self._reach(stats, spatial)
        if null is not None:
            self._check_null(stats, null, reach)
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        graph = build_window_graph(stats, reach, min_lift=self.min_lift, alpha=self.alpha,
                                   max_degree=self.max_degree,
                                   need_corr=self.method in ("spectral", "agglomerative"),
                                   need_strength=self._tiered, dead=dead, null=null,
                                   direct_only=self.direct_only)
        self.evidence_ = assess(stats, graph.alive, len(graph.offsets), min_lift=self.min_lift, alpha=self.alpha,
                                null=null)
        warn_if_weak(self.evidence_, stacklevel=2)
        if not spatial and self.method != "arora":
            clusters, cuts = self._global_partition(graph, seed), WindowCuts()
        else:
            clusters, cuts = self._anchored(graph, seed, self._tier_test(stats, graph))
        self._finish(clusters, stats.num_channels, dead, graph, cuts)
        return self

    @property
    def _tiered(self) -> bool:
        return self.method == "arora" and bool(self.tiers)

    def fit_predict(self, stats, null=None) -> np.ndarray:
        return self.fit(stats, null=null).channel_labels_

    def _global_partition(self, graph, seed: int) -> list[Cluster]:
        """Non-spatial hard methods: partition all live channels at once."""
        alive = np.flatnonzero(graph.alive)
        corr = graph.corr[graph.centre][np.ix_(alive, alive)] if graph.corr is not None else None
        adj = graph.edges[graph.centre][np.ix_(alive, alive)]
        n_groups = None if self.n_clusters == "auto" else int(self.n_clusters)
        k_max = max(2, len(alive) // max(self.min_size, 1))  # the cap applies to the result, not the search
        labels = partition(self.method, corr=corr, adj=adj, n_groups=n_groups, k_max=k_max,
                           min_corr=self.min_corr, seed=seed)
        groups = [alive[labels == g] for g in np.unique(labels)]
        groups = [g for g in groups if len(g) >= self.min_size]
        clusters = [Cluster.from_members([(int(c), 0, 0) for c in g], votes=len(g)) for g in groups]
        clusters.sort(key=lambda c: (-len(c), c.members))
        if self.max_clusters is not None:
            clusters = clusters[: self.max_clusters]
        return clusters

    def _tier_test(self, stats, graph) -> TierTest | None:
        """`TierTest` at the Hebbian test's Bonferroni bar, chance co-firing at the median live rate."""
        if not self._tiered:
            return None
        from scipy.stats import norm

        rate = float(np.median(np.asarray(stats.firing_rate, dtype=np.float64)[graph.alive]))
        log_alpha, _ = bonferroni_log_alpha(int(graph.alive.sum()), len(graph.offsets), self.alpha)
        return TierTest(observations=pairs_at(stats, 0, 0), expected=rate * rate, z=float(norm.isf(np.exp(log_alpha))))

    def _anchored(self, graph, seed: int, test: TierTest | None = None) -> tuple[list[Cluster], "WindowCuts"]:
        """Anchor every live channel at offset 0, find its clusters locally, merge translated copies."""
        candidates: dict = {}
        tiers: dict = {}
        base: set = set()
        cuts = WindowCuts()
        anchors = np.flatnonzero(graph.alive).tolist()
        processes = effective_n_jobs(self.n_jobs) if graph.n_edges >= MIN_FORKED_EDGES else 1
        # local problems are small: several BLAS threads on them mostly wait for each other (on a shared
        # machine 6-12x slower spectral clustering of a dense layer than one thread, docs/benchmarks/cluster.md)
        with threadpool_limits(limits=1, user_api="blas"):
            found = forked_map(_search_anchor, (self, graph, seed), anchors, processes,
                               desc=f"clustering ({self.method})", progress=self.progress)
        kept = _Candidates(candidates, tiers, base)
        for anchor, groups in zip(anchors, found):  # in anchor order, whoever computed them
            for key, tier, whole, cut in groups:
                cuts.groups += whole
                cuts.cut += cut and whole
                if key is not None:
                    kept.add(key, anchor, tier, whole)
                    if cut and whole:
                        cuts.keys.add(key)
        candidates = drop_unions(candidates, tiers, base, self.merge_containment, test, processes=processes)
        merged = merge_candidates(candidates, self.merge_jaccard, self.merge_containment,
                                  parts=set(candidates) - base)
        clusters = select_clusters(merged, min_votes=self.min_votes, min_size=self.min_size,
                                   n_clusters=self.n_clusters, max_clusters=self.max_clusters)
        return clusters, cuts

    def _anchor_candidates(self, graph, anchor: int, seed: int) -> list[tuple[tuple, float, bool, bool]]:
        """The candidate groups around one anchor channel, cut to the window: (canonical members, tier, found on
        the whole graph, cut) of each group that keeps at least ``min_size`` members. A pure function of its
        arguments, so that anchors can be searched in any process."""
        chans, offs = graph.neighbours(anchor)
        if len(chans) < self.min_size - 1:
            return []
        all_chans = np.concatenate([[anchor], chans])
        all_offs = np.concatenate([np.zeros((1, 2), dtype=np.int64), offs])
        groups, strength = self._local_groups(graph, chans, offs, all_chans, all_offs, seed)
        def weight() -> np.ndarray:  # the links among the neighbourhood, asked for only where a channel repeats
            return strength if strength is not None else graph.local(graph.edges, all_chans, all_offs, False)

        out = []
        for group, whole in groups:
            group = one_offset_per_channel(group, all_chans, weight)
            keep, cut = _window_mask(all_offs[group], self.window)
            kept = group[keep]
            if len(kept) >= self.min_size:
                members = zip(all_chans[kept].tolist(), all_offs[kept, 0].tolist(), all_offs[kept, 1].tolist())
                tier = mean_strength(strength[np.ix_(kept, kept)]) if strength is not None and len(kept) > 1 else 0.0
                out.append((canonical_members(members), tier, bool(whole), cut))
            elif whole:
                out.append((None, 0.0, True, cut))  # counted among the candidates, too small to keep
        return out

    def _local_groups(self, graph, chans, offs, all_chans, all_offs, seed: int):
        """Groups of one anchor's neighbourhood, as indices into (anchor, neighbours...), with whether the
        whole graph gives them (without tiers, every group); and, with tiers, the neighbourhood's local
        edge strengths (else None)."""
        if self.method == "arora":
            adj = graph.local(graph.edges, all_chans, all_offs, False)
            if self._tiered:
                strength = graph.local(graph.strength, all_chans, all_offs, 0.0)
                return tiered_groups(adj, strength, self.density, self.max_levels), strength
            return [(g, True) for g in anchored_groups(adj, self.density)], None
        corr = graph.local(graph.corr, chans, offs, 0.0) if graph.corr is not None else None
        adj = graph.local(graph.edges, chans, offs, False) if self.method == "louvain" else None
        labels = partition(self.method, corr=corr, adj=adj, n_groups=None,
                           k_max=max(2, len(chans) // 2), min_corr=self.min_corr, seed=seed)
        return [(np.concatenate([[0], 1 + np.flatnonzero(labels == g)]), True) for g in np.unique(labels)], None

    def _finish(self, clusters: list[Cluster], C: int, dead: np.ndarray, graph, cuts: "WindowCuts") -> None:
        if self.n_clusters != "auto" and len(clusters) < int(self.n_clusters):
            warnings.warn(f"UnitClustering: n_clusters={self.n_clusters} asked, but the statistics support only "
                          f"{len(clusters)} clusters ({self.method}); keeping those", UserWarning, stacklevel=3)
        self.clusters_ = clusters
        self.n_clusters_ = len(clusters)
        sizes = sorted({1, 3, 5} | {c.kernel_size for c in clusters})
        self.kernel_counts_ = {k: sum(1 for c in clusters if c.kernel_size == k) for k in sizes}
        labels = np.full(C, -1, dtype=np.int64)
        for idx in range(len(clusters) - 1, -1, -1):  # earlier (better) clusters win
            labels[list(clusters[idx].channels)] = idx
        labels[dead] = -1
        self.channel_labels_ = labels
        self.labels_ = None if self.method == "arora" else labels.copy()
        self.dead_units_ = dead
        is_dead = np.zeros(C, dtype=bool)
        is_dead[dead] = True
        big = len(clusters)
        key = np.where(labels >= 0, labels, big) + is_dead * (big + 1)
        self.channel_order_ = np.lexsort((np.arange(C), key))
        self.lift_threshold_ = graph.lift_threshold
        self.n_edges_ = graph.n_edges
        self.n_candidates_ = cuts.groups
        self.n_window_cuts_ = cuts.cut
        self.cut_kernel_counts_ = {k: sum(1 for c in clusters if c.kernel_size == k and c.members in cuts.keys)
                                   for k in sizes}


@dataclass
class _Candidates:
    """Candidate groups over all anchors: who found each (``anchors``), its strength tier, and the set of
    those found on the whole graph (``base``)."""

    anchors: dict
    tiers: dict
    base: set

    def add(self, key: tuple, anchor: int, tier: float, whole: bool) -> None:
        """``anchor`` found the group of canonical members ``key``."""
        self.anchors.setdefault(key, set()).add(anchor)
        self.tiers[key] = tier  # the mean strength among the members: the same from every anchor
        if whole:
            self.base.add(key)


@dataclass
class WindowCuts:
    """Candidate groups seen over all anchors, how many were wider than the window, and the cut keys."""

    groups: int = 0
    cut: int = 0
    keys: set = field(default_factory=set)


def _search_anchor(shared: tuple, anchor: int) -> list[tuple[tuple, float, bool, bool]]:
    """`UnitClustering._anchor_candidates` of ``shared`` = (estimator, graph, seed), for `forked_map`."""
    estimator, graph, seed = shared
    return estimator._anchor_candidates(graph, anchor, seed)


def one_offset_per_channel(group: np.ndarray, chans: np.ndarray,
                           weight: np.ndarray | Callable[[], np.ndarray]) -> np.ndarray:
    """``group`` (indices into an anchored neighbourhood, the anchor first) with each channel at one offset: of a
    channel's translates the one most strongly linked to the rest of the group (``weight``, the neighbourhood's
    link matrix or a function giving it, called only where a channel repeats; the first of equals).
    A channel's translate carries the map's smoothness, not a shared cause, and in the model a support holds each
    channel once; the density rule of a dense core lets one translate in beside another."""
    if len(np.unique(chans[group])) == len(group):
        return group
    weight = weight() if callable(weight) else weight
    links = np.asarray(weight[np.ix_(group, group)], dtype=np.float64).sum(axis=1)
    order = np.lexsort((np.arange(len(group)), -links))
    _, first = np.unique(chans[group][order], return_index=True)
    return np.sort(group[order[first]])


def _window_mask(offs: np.ndarray, window: int) -> tuple[np.ndarray, bool]:
    """Which members (offsets ``offs``, the anchor's first) the k x k placement holding the anchor and the most
    of them keeps, and whether the footprint had to be cut (it was wider than the window). Of equally full
    placements the first (top-most, then left-most) wins."""
    keep = np.ones(len(offs), dtype=bool)
    if len(offs) == 0:
        return keep, False
    cut = bool((offs.max(axis=0) - offs.min(axis=0)).max() + 1 > window)
    if cut:
        corner = np.arange(-(window - 1), 1)  # placements [t, t + window) that hold offset 0
        in_y = (offs[None, :, 0] >= corner[:, None]) & (offs[None, :, 0] < corner[:, None] + window)
        in_x = (offs[None, :, 1] >= corner[:, None]) & (offs[None, :, 1] < corner[:, None] + window)
        held = in_y[:, None, :] & in_x[None, :, :]  # (ty, tx, member)
        best = np.unravel_index(int(held.sum(axis=2).argmax()), held.shape[:2])
        keep = held[best]
    return keep, cut
