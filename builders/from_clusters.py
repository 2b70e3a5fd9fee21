"""From clusters to an Inception module: `from_clusters(clustering, stats) -> InceptionSpec`.

The rules (docs/clustering.md explains each one and why):

* ``ch1x1``, ``ch3x3``, ``ch5x5``: the number of clusters whose footprint needs a
  1x1, 3x3 or 5x5 kernel: one output channel per candidate unit of the next layer.
  (Clusters of a wider window, 7x7 and up, are counted with the 5x5 branch, the
  widest the module has.)
* ``ch3x3red``, ``ch5x5red``: the 1x1 reduction in front of a k x k branch only
  has to carry what that branch's clusters read. It is the number of principal
  components of the covariance of the channels those clusters draw on that
  explain ``variance_share`` (default 0.9) of their variance, and never more than
  the number of those channels.
* ``pool_proj``: with ``pool_stats`` (statistics of the 3x3 max-pooled map, the
  module's parallel pooling path), the number of clusters the same clustering
  finds there with a 1x1 window: the projection is a 1x1 convolution of the
  pooled map, so it covers groups that fire together at one pooled position
  (the pooling already supplies the 3x3 spread). Without it, ``POOL_SHARE`` of the module's output (the
  paper's modules give the pool branch 12-15% of their output: 32 of 256 in 3a,
  128 of 1024 in 5b).
* A ``budget`` of multiply-adds at ``stats.spatial_shape`` is met by one scale
  factor on all widths (reductions stay capped), found by bisection on
  `analysis.cost.inception_macs`; the result has at most ``budget`` multiply-adds
  and is the largest such spec the bisection finds.
* Widths are rounded to multiples of ``round_to`` (a positive width never
  becomes 0, a capped reduction never exceeds its cap).
"""
from __future__ import annotations

import numpy as np
from sklearn.base import clone

from builders.budget import fit_to_budget, round_width
from builders.spec import InceptionSpec
from topo.errors import StatsError

VARIANCE_SHARE = 0.9
POOL_SHARE = 1 / 8


def _branch_counts(clusters) -> dict[int, int]:
    counts = {1: 0, 3: 0, 5: 0}
    for c in clusters:
        counts[min(c.kernel_size, 5)] += 1
    return counts


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


def from_clusters(clustering, stats, *, budget: int | None = None, round_to: int | None = 8,
                  in_channels: int | None = None, pool_stats=None, variance_share: float = VARIANCE_SHARE,
                  pool_share: float = POOL_SHARE, name: str = "") -> InceptionSpec:
    """Map a fitted `topo.cluster.UnitClustering` (and its statistics) onto an `InceptionSpec`."""
    if not hasattr(clustering, "clusters_"):
        raise StatsError("from_clusters: the clustering is not fitted; call UnitClustering(...).fit(stats) first")
    counts = _branch_counts(clustering.clusters_)
    if sum(counts.values()) == 0:
        raise StatsError(
            "from_clusters: the clustering found no clusters, so every branch would be empty; "
            "record more observations or lower UnitClustering(min_lift=...)"
        )
    cov = np.asarray(stats.cov(), dtype=np.float64)
    caps = {}
    reds = {}
    for k in (3, 5):
        chans = {c for cl in clustering.clusters_ if min(cl.kernel_size, 5) == k for c in cl.channels}
        caps[k] = len(chans)
        reds[k] = reduction_width(cov, chans, variance_share) if counts[k] else 0
    if pool_stats is not None:
        # the projection is 1x1 on the pooled map: cluster it with a 1x1 window
        pool = clone(clustering).set_params(window=1).fit(pool_stats).n_clusters_
    else:
        pool = pool_share / (1 - pool_share) * sum(counts.values())
    raw = {"ch1x1": counts[1], "ch3x3red": reds[3], "ch3x3": counts[3], "ch5x5red": reds[5],
           "ch5x5": counts[5], "pool_proj": pool}
    cap = {"ch3x3red": caps[3], "ch5x5red": caps[5]}
    c_in = int(in_channels if in_channels is not None else stats.num_channels)

    def make(scale: float) -> InceptionSpec:
        widths = {k: round_width(v * scale, round_to, cap.get(k)) for k, v in raw.items()}
        return InceptionSpec(in_channels=c_in, name=name, **widths)

    if budget is None:
        return make(1.0)
    height, width = stats.spatial_shape if getattr(stats, "spatial_shape", None) else (1, 1)
    try:
        return fit_to_budget(make, budget, height, width)
    except StatsError as e:
        raise StatsError(f"from_clusters: {e}") from None
