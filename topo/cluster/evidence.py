"""What the observations can support: the power of the Hebbian test, and the firing regime.

An edge needs a pair's co-firing count to pass a Bonferroni bar (see
`topo.cluster.window`). For a typical pair (both units at the layer's median
firing rate) that bar is a count; a pair whose lift sits at the floor shows, on
average, ``floor * p**2 * observations`` co-firings. When that is below the
bar, only pairs coupled far above the floor can become edges: the statistics
are *underpowered*, and more observations (images, positions) are the fix.
Units that fire more than half the time are the *dense* regime, where the
largest possible lift ``1 / p`` approaches 1 and recovery fails on planted data
(docs/clustering.md); a higher firing threshold is the fix.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from topo.cluster.window import bonferroni_log_alpha, lift_floor, pairs_at

#: Median firing rate above which a layer is in the dense regime.
DENSE_RATE = 0.5
_MAX_COUNT = 1 << 50  # no count needed above this is searched for (the bar is then out of reach)


@dataclass(frozen=True)
class Evidence:
    """The power of the Hebbian test on one layer's statistics (`UnitClustering.evidence_`).

    ``needed`` is the co-firing count a typical pair must reach to pass the
    test (``inf`` when none does), ``expected_at_floor`` the count a typical
    pair at the lift floor shows; ``powered`` is whether the second reaches the
    first. ``null_observations`` and ``null_silent`` (live units that never
    fire in the null) are set when the pairs were tested against a null.
    ``pairs_short``: the pairs per offset expected at the farthest offset where the statistics' cost bound
    left fewer than their positions rule wanted (`topo.stats.LayerStats.pairs_short`; None: it did not).
    """

    observations: int
    median_rate: float
    lift_floor: float
    alpha: float
    tests: float
    needed: float
    expected_at_floor: float
    powered: bool
    dense: bool
    null_observations: int | None = None
    null_silent: int = 0
    pairs_short: float | None = None

    def to_dict(self) -> dict:
        """The fields as JSON-able data (a count that no observation could reach, ``inf``, becomes None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def assess(stats, alive: np.ndarray, n_offsets: int, *, min_lift: float | str, alpha: float,
           null=None) -> Evidence:
    """The `Evidence` of ``stats`` for the test `build_window_graph` runs with these settings."""
    rate = np.asarray(stats.firing_rate, dtype=np.float64)[alive]
    p = float(np.median(rate)) if len(rate) else 0.0
    floor = float(lift_floor(np.array([p]), np.array([p]))[0, 0]) if min_lift == "auto" else float(min_lift)
    log_alpha, tests = bonferroni_log_alpha(int(alive.sum()), n_offsets, alpha)
    pairs = pairs_at(stats, 0, 0)
    expected = min(floor * p * p, p) * pairs  # a pair cannot co-fire more often than either unit fires
    extra = {"pairs_short": getattr(stats, "pairs_short", None)}
    if null is None:
        needed = needed_independent(pairs * p * p, log_alpha)
    else:
        null_rate = np.asarray(null.firing_rate, dtype=np.float64)[alive]
        p0 = float(np.median(null_rate)) if len(null_rate) else 0.0
        needed = needed_against_null(pairs, p, pairs_at(null, 0, 0), p0, log_alpha)
        extra.update(null_observations=int(null.count), null_silent=int((null_rate <= 0).sum()))
    return Evidence(observations=int(stats.count), median_rate=p, lift_floor=floor, alpha=float(alpha),
                    tests=float(tests), needed=needed, expected_at_floor=float(expected),
                    powered=bool(expected >= needed), dense=bool(p > DENSE_RATE), **extra)


def needed_independent(mu: float, log_alpha: float) -> float:
    """Smallest co-firing count whose Poisson(``mu``) upper tail is at most ``exp(log_alpha)``."""
    from scipy.stats import poisson

    return smallest_passing(lambda k: float(poisson.logsf(k - 1, mu)), log_alpha)


def needed_against_null(pairs: float, rate: float, null_pairs: float, null_rate: float, log_alpha: float) -> float:
    """Smallest count that passes `topo.cluster.window.null_edges` for a typical pair (both units at
    ``rate``, at ``null_rate`` in the null, which co-fire there as if independent)."""
    from scipy.stats import binom

    if null_rate <= 0 or rate <= 0:
        return float("inf")
    k0 = float(np.rint(null_pairs * null_rate ** 2))
    weight = pairs * (rate / null_rate) ** 2
    pi = weight / (weight + null_pairs)
    return smallest_passing(lambda k: float(binom.logsf(k - 1, k + k0, pi)), log_alpha)


def smallest_passing(log_pvalue: Callable[[int], float], log_alpha: float) -> float:
    """Smallest k >= 1 with ``log_pvalue(k) <= log_alpha`` (``log_pvalue`` decreasing in k), else inf."""
    if log_pvalue(1) <= log_alpha:
        return 1.0
    low, high = 1, 2  # log_pvalue(low) fails
    while log_pvalue(high) > log_alpha:
        if high >= _MAX_COUNT:
            return float("inf")
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if log_pvalue(mid) <= log_alpha else (mid, high)
    return float(high)


def warn_if_weak(evidence: Evidence, stacklevel: int = 2) -> None:
    """One-line `UserWarning`s for underpowered statistics and for the dense regime."""
    e = evidence
    if not e.powered:
        against = f" against a null of {e.null_observations} observations" if e.null_observations is not None else ""
        bound = ("; the statistics' cost bound cut their positions, so raise it (cost_multiple, --stats-cost) or "
                 "record more images" if e.pairs_short is not None else
                 "; record more images or more positions per map (positions=None for all)")
        warnings.warn(
            f"UnitClustering: {e.observations} observations at a median firing rate of {e.median_rate:.3g} give a "
            f"pair at the lift floor {e.lift_floor:.3g} about {e.expected_at_floor:.3g} co-firings, but the Hebbian "
            f"test{against} needs {e.needed:.0f} (alpha {e.alpha:g} over {e.tests:.3g} tests), so only far stronger "
            f"couplings can become edges{bound}", UserWarning, stacklevel=stacklevel + 1)
    if e.dense:
        warnings.warn(
            f"UnitClustering: the units fire a median {e.median_rate:.0%} of the time, the dense regime (over "
            f"{DENSE_RATE:.0%}) where co-firing by chance and by cause are hard to tell apart and recovery fails "
            "on planted data (docs/clustering.md); record with a higher firing threshold, e.g. each unit's "
            "0.9-quantile", UserWarning, stacklevel=stacklevel + 1)
    if e.null_silent:
        warnings.warn(
            f"UnitClustering: {e.null_silent} live units never fire in the null recording, so their pairs cannot "
            "be tested against it and get no edges; record the null on more inputs with the same firing threshold",
            UserWarning, stacklevel=stacklevel + 1)
