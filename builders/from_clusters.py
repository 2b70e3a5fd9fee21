"""From clusters to an Inception module: `from_clusters(clustering, stats) -> InceptionSpec`.

The clustering is done by the caller (`topo.cluster.UnitClustering`, fitted on
the layer and, for the pooling branch, on its 3x3 max-pooled map); this module
only turns what was found into widths. The rules (docs/clustering.md explains
each one and why):

* ``ch3x3``, ``ch5x5``: the number of clusters whose footprint needs a 3x3 or 5x5
  kernel (`branch_of`): one output channel per candidate unit of the next layer.
  Clusters of a wider window, 7x7 and up, are counted with the 5x5 branch, the
  widest the module has.
* ``ch1x1``: the 1x1 clusters, plus a **carry path** (``carry=True``): the
  principal dimension (components explaining ``variance_share``) of the live
  channels no cluster draws on. Arora et al.'s construction keeps what no
  cluster covers; without it a layer's unclustered variance ends at the module.
* ``ch3x3red``, ``ch5x5red``: the 1x1 reduction in front of a k x k branch only
  has to carry what that branch's clusters read. It is the number of principal
  components of the covariance of the channels those clusters draw on that
  explain ``variance_share`` (default 0.9) of their variance, and never more than
  the number of those channels (with ``reduce_to_channels``: exactly that number).
* ``pool_proj``: ``pool_units``, the number of clusters found on the 3x3
  max-pooled map with a 1x1 window (the projection is a 1x1 convolution of the
  pooled map, so it covers groups that fire together at one pooled position;
  the pooling already supplies the 3x3 spread). Without it, ``POOL_SHARE`` of
  the module's output (the paper's modules give the pool branch 12-15% of their
  output: 32 of 256 in 3a, 128 of 1024 in 5b).
* A ``budget`` of multiply-adds at ``stats.spatial_shape`` is met by the
  **outputs** (one scale factor on the clusters' units and the pool projection,
  found by bisection on `builders.cost.inception_macs`); the reductions and the
  carry path keep the dimension the data gives them. Where even one unit per
  branch does not fit beside them, the weakest clusters (the last, by evidence)
  are dropped, as few as the budget needs (found by bisection); with none left
  the module is the "data" fallback below. The result has at most ``budget``
  multiply-adds.
* Widths are rounded to multiples of ``round_to`` (a positive width never
  becomes 0, a capped reduction never exceeds its cap).
* No clusters at all: with ``fallback="data"`` (`DATA_FALLBACK`), a 1x1-only
  module as wide as the layer's principal dimension (the components explaining
  ``variance_share`` of its variance: the units the layer carries, when none fire
  together), plus the pooled map's clusters as a pooling projection; with a
  ``fallback`` spec, that spec's proportions scaled to the budget by one factor
  (whole channels, not multiples of ``round_to``: at the spec's own cost it is
  the spec itself; the caller records that it did); with none, a `StatsError`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterable

import numpy as np

from builders.budget import ROUND_TO, fit_to_budget, largest_scale, round_width, scaled_widths
from builders.cost import inception_macs
from builders.spec import InceptionSpec
from topo.common.errors import StatsError

log = logging.getLogger(__name__)

VARIANCE_SHARE = 0.9
POOL_SHARE = 1 / 8
BRANCH_KERNELS = (1, 3, 5)
DATA_FALLBACK = "data"


def branch_of(cluster) -> int:
    """The kernel of the Inception branch that covers ``cluster``: 1, 3 or 5.

    A footprint wider than 5x5 (a window of 7 or more) goes to the 5x5 branch,
    the widest the module has.
    """
    return min(int(cluster.kernel_size), BRANCH_KERNELS[-1])


def clusters_by_branch(clusters: Iterable) -> dict[int, list]:
    """``{1: [...], 3: [...], 5: [...]}``: the clusters each branch covers (`branch_of`), in their order."""
    by_branch: dict[int, list] = {k: [] for k in BRANCH_KERNELS}
    for cluster in clusters:
        by_branch[branch_of(cluster)].append(cluster)
    return by_branch


def reduction_width(cov: np.ndarray, channels, variance_share: float = VARIANCE_SHARE) -> int:
    """Principal components of ``cov[channels, channels]`` explaining ``variance_share``, at most len(channels)."""
    channels = np.asarray(sorted(set(int(c) for c in channels)), dtype=np.int64)
    if len(channels) == 0:
        return 0
    sub = cov[np.ix_(channels, channels)]
    eig = np.clip(np.linalg.eigvalsh((sub + sub.T) / 2), 0.0, None)[::-1]
    total = eig.sum()
    if total <= 0:
        return 1
    needed = int(np.searchsorted(np.cumsum(eig) / total, variance_share - 1e-12) + 1)
    return int(min(max(needed, 1), len(channels)))


@dataclasses.dataclass(frozen=True)
class Widths:
    """What a set of clusters calls for: the outputs a budget scales, and the widths it keeps (the reductions
    and the carry path: the data's dimension), with the caps of the reductions."""

    outputs: dict[str, float]
    kept: dict[str, int]
    caps: dict[str, int]

    def spec(self, scale: float, round_to: int | None, in_channels: int, name: str) -> InceptionSpec:
        """The module at ``scale`` on the outputs, the kept widths as they are."""
        out = {k: round_width(v * scale, round_to) for k, v in self.outputs.items()}
        kept = {k: round_width(v, round_to, self.caps.get(k)) for k, v in self.kept.items()}
        return InceptionSpec(in_channels=in_channels, name=name, ch1x1=out["ch1x1"] + kept["carry"],
                             ch3x3red=kept["ch3x3red"], ch3x3=out["ch3x3"], ch5x5red=kept["ch5x5red"],
                             ch5x5=out["ch5x5"], pool_proj=out["pool_proj"])


def uncovered_channels(clusters: Iterable, stats) -> list[int]:
    """The live channels no cluster draws on (dead ones carry nothing)."""
    covered = {c for cluster in clusters for c in cluster.channels}
    dead = {int(c) for c in np.asarray(getattr(stats, "dead_units", []), dtype=np.int64).reshape(-1)}
    return [c for c in range(int(stats.num_channels)) if c not in covered and c not in dead]


def cluster_widths(clusters: list, stats, pool_units: float | None, variance_share: float = VARIANCE_SHARE,
                   pool_share: float = POOL_SHARE, reduce_to_channels: bool = False, carry: bool = True,
                   cov: np.ndarray | None = None) -> Widths:
    """The widths ``clusters`` call for (the rules of the module docstring), before any budget; ``cov``:
    ``stats.cov()`` where the caller has it already."""
    by_branch = clusters_by_branch(clusters)
    counts = {k: len(found) for k, found in by_branch.items()}
    cov = np.asarray(stats.cov() if cov is None else cov, dtype=np.float64)
    reductions, caps = {}, {}
    for k in (3, 5):
        channels = {c for cluster in by_branch[k] for c in cluster.channels}
        caps[f"ch{k}x{k}red"] = len(channels)
        if not counts[k]:
            reductions[k] = 0
        else:
            reductions[k] = len(channels) if reduce_to_channels else reduction_width(cov, channels, variance_share)
    carried = reduction_width(cov, uncovered_channels(clusters, stats), variance_share) if carry else 0
    pool = pool_units if pool_units is not None else pool_share / (1 - pool_share) * sum(counts.values())
    outputs = {"ch1x1": counts[1], "ch3x3": counts[3], "ch5x5": counts[5], "pool_proj": pool}
    if not clusters:  # the "data" fallback: the layer's dimension as 1x1 units, scaled with the module
        outputs["ch1x1"], carried = carried, 0
    return Widths(outputs, {"carry": carried, "ch3x3red": reductions[3], "ch5x5red": reductions[5]}, caps)


def from_clusters(clustering, stats, *, budget: float | None = None, round_to: int | None = ROUND_TO,
                  in_channels: int | None = None, pool_units: float | None = None,
                  variance_share: float = VARIANCE_SHARE, pool_share: float = POOL_SHARE, name: str = "",
                  fallback: InceptionSpec | str | None = None, reduce_to_channels: bool = False,
                  kernel5x5: int = 5, max_scale: float | None = None, carry: bool = True) -> InceptionSpec:
    """Map a fitted `topo.cluster.UnitClustering` (and its statistics) onto an `InceptionSpec`.

    ``pool_units``: clusters found on the pooled map (see the module docstring).
    ``fallback``: what a layer without clusters becomes: ``"data"`` (its principal
    dimension as 1x1 units) or a spec whose proportions are kept.
    ``max_scale``: the budget is a ceiling, not a target: the outputs grow to at
    most ``max_scale`` times what the clusters call for (one channel per
    cluster), so a layer with one cluster does not become one huge branch; what
    is not spent is left to the later modules.
    ``kernel5x5``: the kernel of the 5x5 branch the budget is counted with
    (3 for torchvision's GoogLeNet, whose "5x5" branch is a 3x3 convolution).
    ``reduce_to_channels``: each reduction as wide as the channels its branch's
    clusters read (one reduced channel per input channel: the exact decoding a
    planted network's recovery needs) instead of their principal components.
    ``carry``: a carry path in the 1x1 branch for the live channels no cluster draws on.
    """
    if not hasattr(clustering, "clusters_"):
        raise StatsError("from_clusters: the clustering is not fitted; call UnitClustering(...).fit(stats) first")
    c_in = int(in_channels if in_channels is not None else stats.num_channels)
    height, width = stats.spatial_shape if getattr(stats, "spatial_shape", None) else (1, 1)
    clusters = list(clustering.clusters_)
    if not clusters:
        if fallback is None:
            raise StatsError(
                "from_clusters: the clustering found no clusters, so every branch would be empty; "
                "record more observations or lower UnitClustering(min_lift=...)"
            )
        if fallback != DATA_FALLBACK:
            return _fallback_module(fallback, budget, c_in, name, height, width, kernel5x5)
        log.info("no clusters in the statistics: the layer's principal dimension at %.0f%% of its variance as "
                 "1x1 units", 100 * variance_share)

    cov = np.asarray(stats.cov(), dtype=np.float64)  # once: the bisection over dropped clusters asks often

    def widths_of(kept_clusters: list) -> Widths:  # without clusters the layer's whole dimension is carried
        return cluster_widths(kept_clusters, stats, pool_units, variance_share, pool_share, reduce_to_channels,
                              carry=carry or not kept_clusters, cov=cov)

    def cost(widths: Widths, scale: float) -> int:
        return inception_macs(widths.spec(scale, round_to, c_in, name), height, width, kernel5x5=kernel5x5)

    widths = widths_of(clusters)
    if budget is None:
        return widths.spec(1.0, round_to, c_in, name)
    if max_scale is not None:  # the budget is a ceiling: no cluster becomes more than max_scale units
        budget = min(budget, cost(widths, max_scale))
    if cost(widths, SMALLEST) > budget:
        widths = _weakest_dropped(clusters, widths_of, lambda w: cost(w, SMALLEST), budget, name)
    if cost(widths, SMALLEST) > budget:
        raise StatsError(f"from_clusters: budget {budget:.0f} multiply-adds is below the smallest module these "
                         f"widths allow ({cost(widths, SMALLEST)}); raise the budget or lower round_to")
    return widths.spec(largest_scale(lambda s: cost(widths, s), budget), round_to, c_in, name)


#: The scale at which every present branch keeps one unit (or ``round_to``): the smallest module.
SMALLEST = 1e-9


def _weakest_dropped(clusters: list, widths_of, smallest_cost, budget: float, name: str) -> Widths:
    """The widths of the most clusters (the first, best evidenced; their number found by bisection) whose
    smallest module fits ``budget``; with none, the layer's dimension alone."""
    lo, hi = 0, len(clusters)  # lo: fits (or nothing is left), hi: does not fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if smallest_cost(widths_of(clusters[:mid])) <= budget else (lo, mid)
    log.info("%s: %d of %d clusters fit the budget beside the reductions and the carry path (the weakest "
             "dropped)", name or "module", lo, len(clusters))
    return widths_of(clusters[:lo])


def _fallback_module(shape: InceptionSpec, budget: float | None, in_channels: int, name: str, height: int,
                     width: int, kernel5x5: int = 5) -> InceptionSpec:
    """``shape``'s proportions on ``in_channels`` inputs, scaled to ``budget`` (where the data suggests none).

    The spec's widths are whole already: one scale factor in whole channels, not the ``round_to`` grid, which
    at the spec's own cost would change the hand-chosen widths.
    """
    log.info("%s: no clusters in the statistics (no units fire together); keeping the proportions of %s",
             name or "module", shape.name or "the fallback module")
    shape = dataclasses.replace(shape, in_channels=in_channels)
    if budget is None:
        return dataclasses.replace(shape, name=name)
    module = fit_to_budget(lambda scale: scaled_widths(shape, scale, None), budget, height, width,
                           kernel5x5=kernel5x5)
    return dataclasses.replace(module, name=name, in_channels=in_channels)
