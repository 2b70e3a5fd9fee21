"""The statistics of a study (`topo.run.study`), its tables, its figure and its sentences.

The input is one **study row** per trained unit (arm x seed, see :class:`StudyRow`):
accuracies are fractions in [0, 1] as everywhere in `analysis`; the statistics
work in percentage points. For each arm the summary gives n, the mean and
standard deviation of top-1 and a confidence interval from the t distribution.
The discovered arm is compared with every other arm:

* Welch's t-test (`scipy.stats.ttest_ind` with ``equal_var=False``) and an
  exact permutation test of the difference of means (`scipy.stats.permutation_test`,
  Monte Carlo past ``EXACT_LIMIT`` arrangements); the verdict uses the
  permutation test when either arm has fewer than ``SMALL_N`` seeds, Welch's
  test otherwise;
* paired by seed (every arm's unit s trains with seed s, so seed s of two arms shares data order and
  initialisation stream): the mean of the per-seed differences, a paired t-test
  (`scipy.stats.ttest_rel`) and an exact sign-flip permutation test; a random arm's units of one seed
  are averaged first, so that the seed stays the unit. Reported beside the verdict, not used by it;
* two one-sided Welch tests (TOST) for equivalence within ``margin`` points;
* against the random topologies, the percentile of the discovered mean among
  their accuracies (`scipy.stats.percentileofscore`, ``kind="mean"``);
* the power of each comparison: the seed SD of each arm and the smallest difference
  its seeds detect with 80% power at alpha 0.05 (:func:`detectable_difference`, Welch's
  t-test through the noncentral t distribution), and its inverse, the seeds per arm a
  difference needs (:func:`seeds_to_detect`, :func:`plan_seeds`).

The sentences (:func:`study_findings`) state only what these tests show, with n
and p; docs/study.md gives every rule.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence, TypedDict

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import optimize, stats

from analysis.plots import save_figure
from analysis.tables import ReportError, accuracy_fraction, as_dict, is_missing, to_latex, to_markdown
from topo.common.writing import atomic_write_text

#: The arms in the order tables and figures show them (others follow, sorted).
ARM_ORDER = ("discovered", "reference", "random", "uniform", "shuffled")
ARM_PHRASES = {
    "reference": "the reference",
    "random": "the random topologies",
    "uniform": "the uniform topology",
    "shuffled": "the shuffled topologies",
}
TEST_NAMES = {"permutation": "an exact permutation test", "welch": "Welch's t-test"}
ARM_COLORS = {"discovered": "#1f77b4", "reference": "#636363", "random": "#2ca02c", "uniform": "#ff7f0e",
              "shuffled": "#9467bd"}
CONFIDENCE = 0.95
ALPHA = 0.05
POWER = 0.80              # the power a detectable difference is stated at
MAX_PLANNED = 10_000_000  # seeds_to_detect gives up (inf) beyond this many seeds per arm
SMALL_N = 5               # below this many seeds in either arm the permutation test decides
DECIMALS = 9              # points are rounded to this many decimals (an image of a billion is 1e-7 points)
EXACT_LIMIT = 100_000     # arrangements up to which the permutation test is exact
STUDY_COLUMNS = ["arm", "seed", "unit", "topology", "topology_id", "params", "macs", "macs_vs_discovered",
                 "top1", "top5", "train_time_s", "wall_time_s", "construction_time_s", "draws"]


class StudyRow(TypedDict, total=False):
    """One trained unit of a study (a line of study.csv)."""

    arm: str                       # "discovered", "reference", "random", "uniform", "shuffled"
    seed: int                      # training seed (data order, initialisation)
    unit: str                      # e.g. "random-s1-k4"
    topology: int | None           # k of a random topology, else None
    topology_id: str               # short hash of the spec: equal ids are equal networks
    params: int
    macs: int                      # multiply-adds per image at inference
    macs_vs_discovered: float | None  # macs / those of the seed's discovered network - 1
    top1: float                    # fraction in [0, 1]
    top5: float
    train_time_s: float            # training passes, evaluation excluded
    wall_time_s: float             # the whole training, evaluation included
    construction_time_s: float     # making the topology: construction, drawing or fitting
    draws: int                     # random topologies drawn until one met the cost tolerance


# --------------------------------------------------------------------------- inputs
def ordered_arms(arms: Sequence[str]) -> list[str]:
    """``arms`` without repeats, in `ARM_ORDER` (unknown arms last, sorted)."""
    present = set(arms)
    return [a for a in ARM_ORDER if a in present] + sorted(present - set(ARM_ORDER))


def _rows(rows: Sequence[Any]) -> list[dict[str, Any]]:
    out = [as_dict(r) for r in rows]
    for i, row in enumerate(out):
        for key in ("arm", "seed", "top1"):
            if is_missing(row.get(key)):
                raise ReportError(f"study row {i} lacks {key!r}; every row needs arm, seed and top1")
    return out


def _top1_points(row: Mapping[str, Any]) -> float:
    """A study row's top-1 in percentage points."""
    return 100.0 * accuracy_fraction(row["top1"], "top1", row.get("unit", row["arm"]))


def top1_by_arm(rows: Sequence[Any]) -> dict[str, np.ndarray]:
    """Top-1 in percentage points per arm (float64), in `ordered_arms` order."""
    rows = _rows(rows)
    points: dict[str, list[float]] = {}
    for row in rows:
        points.setdefault(str(row["arm"]), []).append(_top1_points(row))
    # rounded below any accuracy's resolution, so that equal accuracies compare equal after float arithmetic
    return {arm: np.round(np.asarray(points[arm], dtype=np.float64), DECIMALS) for arm in ordered_arms(list(points))}


# --------------------------------------------------------------------------- statistics
def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """``(mean, sd, low, high)``: sample mean, standard deviation (n - 1) and the t-distribution interval.

    With one value the deviation and the interval are NaN; with no spread the interval is the mean.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan,) * 4
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan, math.nan
    sd = float(x.std(ddof=1))
    if sd == 0.0:
        return mean, 0.0, mean, mean
    low, high = stats.t.interval(confidence, x.size - 1, loc=mean, scale=sd / math.sqrt(x.size))
    return mean, sd, float(low), float(high)


def permutation_pvalue(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p of the difference of means under random relabelling (exact up to `EXACT_LIMIT` arrangements)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)

    def difference(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
        return np.mean(x, axis=axis) - np.mean(y, axis=axis)

    result = stats.permutation_test((a, b), difference, permutation_type="independent", vectorized=True,
                                    n_resamples=EXACT_LIMIT, alternative="two-sided", rng=0)
    return float(result.pvalue)


def smallest_permutation_pvalue(n_a: int, n_b: int) -> float:
    """The smallest two-sided p the exact permutation test can give with ``n_a`` and ``n_b`` values."""
    return min(1.0, 2.0 / math.comb(n_a + n_b, n_a))


def tost_pvalue(a: Sequence[float], b: Sequence[float], margin: float) -> tuple[float, float, float]:
    """``(p, p_lower, p_upper)`` of two one-sided Welch tests that mean(a) - mean(b) lies within ``±margin``.

    ``p_lower`` tests H0: difference <= -margin; ``p_upper`` H0: difference >= margin; ``p`` is the larger.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    lower = stats.ttest_ind(a + margin, b, equal_var=False, alternative="greater").pvalue
    upper = stats.ttest_ind(a - margin, b, equal_var=False, alternative="less").pvalue
    return float(max(lower, upper)), float(lower), float(upper)


# --------------------------------------------------------------------------- power
def welch_df(sd_a: float, n_a: int, sd_b: float, n_b: int) -> float:
    """The Welch-Satterthwaite degrees of freedom of two arms with these SDs and sizes."""
    va, vb = sd_a ** 2 / n_a, sd_b ** 2 / n_b
    return (va + vb) ** 2 / (va ** 2 / (n_a - 1) + vb ** 2 / (n_b - 1))


def _power_at(noncentrality: float, df: float, alpha: float) -> float:
    """Power of a two-sided t-test with ``df`` degrees of freedom at this noncentrality."""
    critical = stats.t.ppf(1.0 - alpha / 2.0, df)
    lower = float(stats.nct.cdf(-critical, df, noncentrality))  # can be NaN far out in the tail, where it is 0
    return float(stats.nct.sf(critical, df, noncentrality)) + (0.0 if math.isnan(lower) else lower)


def _defined(sd_a: float, n_a: int, sd_b: float, n_b: int) -> bool:
    sds = (float(sd_a), float(sd_b))
    return min(n_a, n_b) >= 2 and all(math.isfinite(v) and v >= 0 for v in sds) and max(sds) > 0


def welch_power(difference: float, sd_a: float, n_a: int, sd_b: float, n_b: int, alpha: float = ALPHA) -> float:
    """Power of Welch's two-sided test to find a true ``difference`` (points) between arms of these SDs and sizes.

    The statistic is taken as noncentral t (`scipy.stats.nct`) with the Welch-Satterthwaite degrees of freedom
    and noncentrality ``difference / sqrt(sd_a**2 / n_a + sd_b**2 / n_b)``, the SDs as known; NaN where
    undefined (an arm with fewer than 2 seeds, or no SD in either arm).
    """
    if not _defined(sd_a, n_a, sd_b, n_b):
        return math.nan
    se = math.sqrt(sd_a ** 2 / n_a + sd_b ** 2 / n_b)
    return _power_at(abs(difference) / se, welch_df(sd_a, n_a, sd_b, n_b), alpha)


def detectable_difference(sd_a: float, n_a: int, sd_b: float, n_b: int, alpha: float = ALPHA,
                          power: float = POWER) -> float:
    """The smallest difference of means (points) Welch's two-sided test finds with ``power`` at ``alpha``.

    Solves :func:`welch_power` = ``power`` for the difference (`scipy.optimize.brentq`). NaN where
    undefined: an arm with fewer than 2 seeds, or no SD in either arm.
    """
    if not _defined(sd_a, n_a, sd_b, n_b):
        return math.nan
    df = welch_df(sd_a, n_a, sd_b, n_b)
    high = stats.t.ppf(1.0 - alpha / 2.0, df) + 4.0
    while _power_at(high, df, alpha) < power:
        high *= 2.0
    noncentrality = optimize.brentq(lambda nc: _power_at(nc, df, alpha) - power, 0.0, high, xtol=1e-10)
    return noncentrality * math.sqrt(sd_a ** 2 / n_a + sd_b ** 2 / n_b)


def seeds_to_detect(difference: float, sd_a: float, sd_b: float, alpha: float = ALPHA,
                    power: float = POWER) -> float:
    """The smallest n (seeds in each arm, at least 2) at which :func:`welch_power` of ``difference`` reaches
    ``power``; inf past `MAX_PLANNED`, NaN where undefined (no SD in either arm, or ``difference`` not positive).
    """
    if not difference > 0 or not _defined(sd_a, 2, sd_b, 2):
        return math.nan

    def enough(n: int) -> bool:
        return welch_power(difference, sd_a, n, sd_b, n, alpha) >= power

    low, high = 1, 2  # enough(low) is False (n = 1 is no test), then double high until it is enough
    while not enough(high):
        if high >= MAX_PLANNED:
            return math.inf
        low, high = high, min(2 * high, MAX_PLANNED)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return float(high)


def verdict_detectable(sd_a: float, n_a: int, sd_b: float, n_b: int, alpha: float = ALPHA) -> float:
    """What the verdict's test detects at 80% power: :func:`detectable_difference`, or inf where the permutation
    test decides (an arm below `SMALL_N`) and cannot give p below ``alpha`` with these n; NaN where undefined."""
    if not _defined(sd_a, n_a, sd_b, n_b):
        return math.nan
    if min(n_a, n_b) < SMALL_N and smallest_permutation_pvalue(n_a, n_b) >= alpha:
        return math.inf
    return detectable_difference(sd_a, n_a, sd_b, n_b, alpha)


@dataclass(frozen=True)
class Comparison:
    """The discovered arm (``a``) against another arm (``b``), in percentage points of top-1.

    ``n`` counts the arm's units: seeds for the arms with one unit per seed, topologies for the random arm
    (each one draw of a topology and its training, so its SD is the spread over both). ``detectable`` is
    the smallest difference the verdict's test finds with 80% power at alpha 0.05
    (:func:`verdict_detectable`): inf where the permutation test decides and cannot reach alpha, NaN where
    undefined (an arm with fewer than 2 units, or no SD in either).
    """

    arm: str
    baseline: str
    n: int
    n_baseline: int
    mean: float
    mean_baseline: float
    sd: float                  # seed SD (n - 1) of each arm
    sd_baseline: float
    detectable: float          # points, at 80% power
    difference: float          # mean - mean_baseline
    ci_low: float              # Welch interval of the difference
    ci_high: float
    welch_t: float
    welch_df: float
    welch_p: float
    permutation_p: float
    test: str                  # "permutation" or "welch": the test the verdict uses
    p: float
    tost_p: float
    margin: float
    percentile: float | None   # of the baseline's mean among this arm's values (random pool only)
    paired_n: int = 0          # seeds both arms trained (`paired_by_seed`)
    paired_difference: float = math.nan  # mean over those seeds of baseline - arm
    paired_sd: float = math.nan          # SD of the per-seed differences
    paired_t_p: float = math.nan         # paired t-test
    paired_permutation_p: float = math.nan  # exact sign-flip test of the per-seed differences

    def differs(self, alpha: float = ALPHA) -> bool:
        return bool(self.p < alpha)

    def equivalent(self, alpha: float = ALPHA) -> bool:
        return bool(self.tost_p < alpha)


def _welch(a: np.ndarray, b: np.ndarray, margin: float, confidence: float) -> tuple[float, ...]:
    """``(t, df, p, ci_low, ci_high, tost_p)`` of Welch's test, all NaN where it is undefined."""
    if a.size < 2 or b.size < 2 or not (a.std() > 0 or b.std() > 0):
        return (math.nan,) * 6
    with warnings.catch_warnings():  # one arm without spread is a common tie (accuracies are counts), not a loss
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        welch = stats.ttest_ind(a, b, equal_var=False)
        interval = welch.confidence_interval(confidence)
        tost = tost_pvalue(a, b, margin)[0]
    return (float(welch.statistic), float(welch.df), float(welch.pvalue), float(interval.low),
            float(interval.high), tost)


def compare(a: Sequence[float], b: Sequence[float], *, arm: str, baseline: str, margin: float,
            confidence: float = CONFIDENCE, percentile: bool = False) -> Comparison:
    """Compare the values ``b`` of ``arm`` with those of ``baseline`` (``a``); NaN where a test is undefined."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    nan = math.nan
    welch_t, welch_df, welch_p, ci_low, ci_high, tost_p = _welch(a, b, margin, confidence)
    perm_p = permutation_pvalue(a, b) if min(a.size, b.size) >= 2 else nan
    small = min(a.size, b.size) < SMALL_N
    sd_a, sd_b = mean_ci(a)[1], mean_ci(b)[1]
    return Comparison(
        arm=arm, baseline=baseline, n=int(b.size), n_baseline=int(a.size),
        mean=float(b.mean()) if b.size else nan, mean_baseline=float(a.mean()) if a.size else nan,
        sd=sd_b, sd_baseline=sd_a, detectable=verdict_detectable(sd_a, int(a.size), sd_b, int(b.size)),
        difference=round(float(a.mean() - b.mean()), DECIMALS) if a.size and b.size else nan,
        ci_low=ci_low, ci_high=ci_high, welch_t=welch_t, welch_df=welch_df, welch_p=welch_p,
        permutation_p=perm_p, test="permutation" if small else "welch", p=perm_p if small else welch_p,
        tost_p=tost_p, margin=float(margin),
        percentile=float(stats.percentileofscore(b, round(a.mean(), DECIMALS), kind="mean"))
        if percentile and a.size and b.size
        else None,
    )


def compare_arms(rows: Sequence[Any], *, margin: float, baseline: str = "discovered",
                 confidence: float = CONFIDENCE) -> list[Comparison]:
    """``baseline`` against every other arm of ``rows`` (none without the baseline), unpaired and paired by seed."""
    values = top1_by_arm(rows)
    if baseline not in values:
        return []
    return [replace(compare(values[baseline], v, arm=arm, baseline=baseline, margin=margin, confidence=confidence,
                            percentile=arm == "random"),
                    **paired_test(*paired_by_seed(rows, baseline, arm)))
            for arm, v in values.items() if arm != baseline]


def paired_by_seed(rows: Sequence[Any], baseline: str, arm: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 (points) of ``baseline`` and of ``arm`` on each seed both trained, in seed order; an arm's units of
    one seed (random topologies k with k mod seeds = s) averaged, so that each seed counts once."""
    by_seed: dict[str, dict[int, list[float]]] = {baseline: {}, arm: {}}
    for row in _rows(rows):
        if row["arm"] in by_seed:
            by_seed[row["arm"]].setdefault(int(row["seed"]), []).append(_top1_points(row))
    seeds = sorted(set(by_seed[baseline]) & set(by_seed[arm]))
    a = np.array([np.mean(by_seed[baseline][s]) for s in seeds], dtype=np.float64)
    b = np.array([np.mean(by_seed[arm][s]) for s in seeds], dtype=np.float64)
    return np.round(a, DECIMALS), np.round(b, DECIMALS)


def paired_test(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """The `Comparison` fields of the per-seed differences ``a - b``: their number, mean and SD, the paired
    t-test's p and the exact sign-flip test's (NaN with fewer than 2 seeds; the t-test also without spread)."""
    n = int(a.size)
    if n < 2:
        return {"paired_n": n}
    d = a - b
    t_p = math.nan
    if d.std() > 0:
        t_p = float(stats.ttest_rel(a, b).pvalue)

    def mean_difference(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
        return np.mean(x - y, axis=axis)

    flips = stats.permutation_test((a, b), mean_difference, permutation_type="samples", vectorized=True,
                                   n_resamples=EXACT_LIMIT, alternative="two-sided", rng=0)
    return {"paired_n": n, "paired_difference": round(float(d.mean()), DECIMALS),
            "paired_sd": float(d.std(ddof=1)), "paired_t_p": t_p, "paired_permutation_p": float(flips.pvalue)}


def smallest_sign_flip_pvalue(n: int) -> float:
    """The smallest two-sided p the exact sign-flip test can give with ``n`` paired seeds."""
    return min(1.0, 2.0 / 2 ** n)


@dataclass(frozen=True)
class SeedNeed:
    """What one comparison of the pilot needs to detect the planned difference (points)."""

    arm: str
    sd_baseline: float         # the pilot's SD of the baseline arm
    sd: float                  # and of this arm
    needed: float              # seeds per arm (seeds_to_detect); NaN undefined, inf past MAX_PLANNED
    detectable: float          # what the planned units detect (verdict_detectable), points at 80% power


@dataclass(frozen=True)
class SeedPlan:
    """The seeds a study runs to detect ``detect`` points, chosen from its pilot's SDs (:func:`plan_seeds`)."""

    detect: float
    pilot: int                 # the pilot's seeds, kept
    max_seeds: int
    wanted: int                # what the comparisons ask for (at least SMALL_N), before the cap
    seeds: int                 # seeds per arm the study runs
    random: int | None         # random topologies it runs (None: no random arm)
    needs: tuple[SeedNeed, ...]
    baseline: str = "discovered"

    @property
    def capped(self) -> bool:
        return self.wanted > self.seeds


def plan_seeds(rows: Sequence[Any], *, detect: float, pilot: int, max_seeds: int, random: int | None = None,
               baseline: str = "discovered") -> SeedPlan:
    """The seeds per arm (and random topologies) that detect ``detect`` points in every comparison of the pilot.

    ``rows``: the pilot's units. Each comparison of ``baseline`` with another arm asks for
    :func:`seeds_to_detect` at the pilot's two SDs; the study takes the largest (and at least `SMALL_N`,
    where Welch's test, whose power this is, decides), keeps the pilot's seeds and stops at ``max_seeds``.
    The random arm gets at least as many topologies as the arms get seeds. A comparison whose need is
    undefined (no SD) asks for nothing; with none defined the study keeps its pilot.
    """
    values = top1_by_arm(rows)
    sd_base = mean_ci(values.get(baseline, []))[1]
    sds = {arm: mean_ci(v)[1] for arm, v in values.items() if arm != baseline}
    needed = {arm: seeds_to_detect(detect, sd_base, sd) for arm, sd in sds.items()}
    defined = [n for n in needed.values() if not math.isnan(n)]
    wanted = max([SMALL_N, *defined]) if defined else pilot
    wanted = int(min(wanted, MAX_PLANNED))
    seeds = max(pilot, min(wanted, max_seeds))
    topologies = None if random is None else max(random, seeds)
    needs = tuple(SeedNeed(arm, sd_base, sd, needed[arm],
                           verdict_detectable(sd_base, seeds, sd, topologies if arm == "random" and topologies
                                              else seeds))
                  for arm, sd in sds.items())
    return SeedPlan(float(detect), pilot, max_seeds, max(wanted, pilot), seeds, topologies, needs, baseline)


def _seeds(n: float) -> str:
    return "an undefined number of seeds (no SD)" if math.isnan(n) else (
        f"more than {MAX_PLANNED:,} seeds" if math.isinf(n) else f"{n:.0f} seeds")


def plan_sentence(plan: SeedPlan) -> str:
    """The seeds chosen for a detectable difference: the difference, the pilot's SDs, the seeds, the cap."""
    level = f"{round(100 * POWER)}% power, alpha {ALPHA:g}"
    sds = "; ".join(f"{ARM_PHRASES.get(n.arm, n.arm)} {n.sd:.2f}" for n in plan.needs)
    asks = ", ".join(f"{_seeds(n.needed)} against {ARM_PHRASES.get(n.arm, n.arm)}" for n in plan.needs)
    text = (f"Seeds chosen to detect a difference of {plan.detect:g} points ({level}) from the SDs of a "
            f"{plan.pilot}-seed pilot (the {plan.baseline} network {plan.needs[0].sd_baseline:.2f} points; "
            f"{sds}): Welch's test needs {asks}" if plan.needs else
            f"Seeds chosen to detect a difference of {plan.detect:g} points ({level}): the pilot has no comparison")
    runs = f"the study runs {plan.seeds} seeds (the pilot's {plan.pilot} kept)"
    if plan.random is not None:
        runs += f" and {plan.random} random topologies"
    text += f"; {runs}."
    defined = [n.needed for n in plan.needs if not math.isnan(n.needed)]
    if not defined:
        text += " No need is defined (no SD in the pilot), so the study keeps its pilot."
    elif max(defined) < SMALL_N and plan.pilot < SMALL_N:
        text += (f" At least {SMALL_N} seeds are asked for, so that Welch's t-test, whose power this is, "
                 "decides (below that the permutation test does).")
    if plan.capped:
        short = [n for n in plan.needs if n.needed > plan.seeds or n.detectable > plan.detect]
        finite = [n for n in short if math.isfinite(n.detectable)]
        if finite:
            text += (f" The cap of {plan.max_seeds} seeds detects only " + ", ".join(
                f"{n.detectable:.2f} points against {ARM_PHRASES.get(n.arm, n.arm)}" for n in finite) + ".")
        if len(finite) < len(short):
            arms = " and ".join(ARM_PHRASES.get(n.arm, n.arm) for n in short if not math.isfinite(n.detectable))
            text += (f" At the cap of {plan.max_seeds} seeds the permutation test decides against {arms} and "
                     f"cannot reach alpha {ALPHA:g}: no difference is detectable there.")
    return text


def cost_deviations(rows: Sequence[Any], baseline: str = "discovered") -> pd.DataFrame:
    """Per unit: its multiply-adds against those of the baseline network of the same seed (``deviation``, a fraction).

    Units whose seed has no baseline row get NaN.
    """
    frame = pd.DataFrame(_rows(rows))
    base = frame[frame["arm"] == baseline].groupby("seed")["macs"].first()
    frame["deviation"] = frame["macs"].astype("float64") / frame["seed"].map(base).astype("float64") - 1.0
    return frame[["unit", "arm", "seed", "macs", "deviation"]]


# --------------------------------------------------------------------------- tables
def study_frame(rows: Sequence[Any]) -> pd.DataFrame:
    """study.csv: one row per unit, in arm order then seed and topology."""
    frame = pd.DataFrame(_rows(rows)).reindex(columns=STUDY_COLUMNS)
    rank = {arm: i for i, arm in enumerate(ordered_arms(frame["arm"].tolist()))}
    frame["_rank"] = frame["arm"].map(rank)
    frame["_k"] = frame["topology"].fillna(-1)
    return frame.sort_values(["_rank", "seed", "_k"], kind="stable").drop(columns=["_rank", "_k"]).reset_index(
        drop=True)


def summary_frame(rows: Sequence[Any], confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per arm: n, top-1 mean, SD and confidence interval (%), top-5, params, MACs, training and construction time."""
    frame = study_frame(rows)
    values = top1_by_arm(rows)
    level = f"{round(100 * confidence)}%"
    table = []
    for arm, top1 in values.items():
        part = frame[frame["arm"] == arm]
        mean, sd, low, high = mean_ci(top1, confidence)
        table.append({
            "Arm": arm, "n": int(top1.size), "Top-1 (%)": mean, "SD (points)": sd,
            f"{level} CI low (%)": low, f"{level} CI high (%)": high,
            "Top-5 (%)": 100 * pd.to_numeric(part["top5"], errors="coerce").mean(),
            "Params (M)": pd.to_numeric(part["params"], errors="coerce").mean() / 1e6,
            "MACs (M)": pd.to_numeric(part["macs"], errors="coerce").mean() / 1e6,
            "Train time (s)": pd.to_numeric(part["train_time_s"], errors="coerce").mean(),
            "Construction time (s)": pd.to_numeric(part["construction_time_s"], errors="coerce").mean(),
        })
    out = pd.DataFrame(table)
    if not out.empty:
        out["n"] = out["n"].astype("int64")
    return out


def units_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """The report's per-unit table (from :func:`study_frame`): topology, cost against the discovered network,
    accuracy, times."""
    return pd.DataFrame({
        "Unit": rows["unit"], "Topology id": rows["topology_id"],
        "Params (M)": rows["params"].astype("float64") / 1e6, "MACs (M)": rows["macs"].astype("float64") / 1e6,
        "MACs vs discovered (%)": 100 * pd.to_numeric(rows["macs_vs_discovered"], errors="coerce"),
        "Top-1 (%)": 100 * rows["top1"].astype("float64"), "Top-5 (%)": 100 * rows["top5"].astype("float64"),
        "Train time (s)": rows["train_time_s"].astype("float64"),
        "Construction time (s)": rows["construction_time_s"].astype("float64"),
    })


def _pair(a: float, b: float) -> str:
    return " vs ".join("undefined" if math.isnan(v) else f"{v:.2f}" for v in (a, b))


def comparisons_frame(comparisons: Sequence[Comparison]) -> pd.DataFrame:
    """One row per comparison: n and SD of both arms, the difference and its Welch interval, the difference the
    seeds detect at 80% power, every p-value, the test used, percentile."""
    return pd.DataFrame([{
        "Comparison": f"{c.baseline} vs {c.arm}", "n": f"{c.n_baseline} vs {c.n}",
        "SD (points)": _pair(c.sd_baseline, c.sd),
        "Difference (points)": c.difference, "CI low (points)": c.ci_low, "CI high (points)": c.ci_high,
        f"Detectable (points, {round(100 * POWER)}% power)": c.detectable,
        "Welch p": c.welch_p, "Permutation p": c.permutation_p, "Test": c.test, "p": c.p,
        f"TOST p (±{c.margin:g})": c.tost_p,
        "Percentile": math.nan if c.percentile is None else c.percentile,
        "Paired seeds": c.paired_n, "Paired difference (points)": c.paired_difference,
        "Paired t p": c.paired_t_p, "Sign-flip p": c.paired_permutation_p,
    } for c in comparisons])


def write_tables(frame: pd.DataFrame, stem: Path) -> list[Path]:
    """``stem``.csv, .md and .tex of ``frame``, atomically."""
    paths = [stem.with_name(f"{stem.name}.{ext}") for ext in ("csv", "md", "tex")]
    atomic_write_text(paths[0], frame.to_csv(index=False, float_format="%.10g"))
    atomic_write_text(paths[1], to_markdown(frame) + "\n")
    atomic_write_text(paths[2], to_latex(frame))
    return paths


# --------------------------------------------------------------------------- figure
def study_figure(rows: Sequence[Any], path_stem: str | Path, confidence: float = CONFIDENCE) -> list[Path]:
    """Top-1 by arm (every unit a point, mean and interval beside) and against multiply-adds, as PNG and PDF."""
    frame = study_frame(rows)
    if frame.empty:
        return []
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    by_arm, by_cost = fig.subplots(1, 2)
    rng = np.random.default_rng(0)  # horizontal jitter only
    for i, (arm, top1) in enumerate(top1_by_arm(rows).items()):
        part = frame[frame["arm"] == arm]
        color, cloud = ARM_COLORS.get(arm, f"C{i}"), arm == "random"
        style = {"s": 18 if cloud else 30, "alpha": 0.45 if cloud else 0.9, "color": color, "zorder": 3}
        by_arm.scatter(i + rng.uniform(-0.12, 0.12, top1.size), top1, **style)
        mean, _, low, high = mean_ci(top1, confidence)
        by_arm.errorbar([i + 0.3], [mean], yerr=[[mean - low], [high - mean]] if not math.isnan(low) else None,
                        fmt="D", color=color, capsize=4, zorder=4)
        by_cost.scatter(part["macs"].astype("float64") / 1e6, 100 * part["top1"].astype("float64"),
                        label=f"{arm} (n = {top1.size})", **style)
    arms = list(top1_by_arm(rows))
    by_arm.set_xticks(range(len(arms)), arms)
    by_arm.set_ylabel("top-1 accuracy (%)")
    by_arm.set_title(f"Top-1 by arm: each unit, mean and {round(100 * confidence)}% interval")
    by_cost.set_xlabel("multiply-adds per image (M)")
    by_cost.set_ylabel("top-1 accuracy (%)")
    by_cost.set_title("Top-1 against multiply-adds")
    by_cost.legend(fontsize=8, frameon=False)
    for ax in (by_arm, by_cost):
        ax.grid(True, alpha=0.3)
    return save_figure(fig, path_stem)


# --------------------------------------------------------------------------- sentences
def _p(value: float) -> str:
    return "undefined" if math.isnan(value) else (f"{value:.2g}" if value >= 0.001 else "< 0.001")


def comparison_sentence(c: Comparison, alpha: float = ALPHA) -> str:
    """What the tests of one comparison show, with n and p, and nothing they do not show."""
    phrase = ARM_PHRASES.get(c.arm, f"the {c.arm} arm")
    sizes = f"n = {c.n_baseline}" if c.n == c.n_baseline else f"n = {c.n_baseline} and {c.n}"
    if math.isnan(c.p):
        return (f"At {sizes}, the {c.baseline} network cannot be tested against {phrase}: "
                "the test is undefined (too few seeds or no spread between them).")
    named = f"{TEST_NAMES[c.test]}, p = {_p(c.p)}"
    if c.differs(alpha):
        side = "higher" if c.difference > 0 else "lower"
        text = (f"At {sizes}, the {c.baseline} network's top-1 is {side} than {phrase}'s ({named}; "
                f"difference of means {c.difference:+.2f} points, {round(100 * CONFIDENCE)}% CI "
                f"{c.ci_low:+.2f} to {c.ci_high:+.2f}).")
    else:
        floor = smallest_permutation_pvalue(c.n_baseline, c.n)
        limit = (f"; with these n the permutation test cannot give p below {floor:.2g}"
                 if c.test == "permutation" and floor >= alpha else "")
        welch = f"; Welch's t-test p = {_p(c.welch_p)}" if c.test == "permutation" else ""
        text = f"At {sizes}, the {c.baseline} network is not distinguishable from {phrase} ({named}{welch}{limit})."
        text += " " + power_sentence(c, alpha)
    if not math.isnan(c.tost_p):
        shown = "is shown" if c.equivalent(alpha) else "is not shown"
        text += f" Equivalence within ±{c.margin:g} points {shown} (TOST p = {_p(c.tost_p)})."
    if c.percentile is not None:
        text += (f" The {c.baseline} mean lies at the {c.percentile:.0f}th percentile of the {c.n} random "
                 "topologies' accuracies.")
    return text + paired_sentence(c)


def paired_sentence(c: Comparison) -> str:
    """The comparison paired by seed, as a sentence after the unpaired verdict ("" with fewer than 2 seeds)."""
    if c.paired_n < 2:
        return ""
    averaged = " (its units of one seed averaged)" if c.arm == "random" else ""
    return (f" Paired by seed{averaged} over {c.paired_n} seeds: mean difference {c.paired_difference:+.2f} points "
            f"(SD {c.paired_sd:.2f}), paired t-test p = {_p(c.paired_t_p)}, exact sign-flip p = "
            f"{_p(c.paired_permutation_p)} (the smallest it can give: {smallest_sign_flip_pvalue(c.paired_n):.2g}).")


def power_sentence(c: Comparison, alpha: float = ALPHA) -> str:
    """Whether a comparison's seeds could have detected a difference of the observed size (80% power)."""
    level = f"{round(100 * POWER)}% power"
    if math.isnan(c.detectable):
        return "What these seeds can detect is undefined: neither arm's top-1 varies over its units."
    if math.isinf(c.detectable):
        welch = detectable_difference(c.sd_baseline, c.n_baseline, c.sd, c.n, alpha)
        would = (f"; Welch's t-test would detect only differences of {welch:.2f} points or more at {level}"
                 if math.isfinite(welch) else "")
        return (f"These seeds detect no difference at alpha = {alpha:g}: the permutation test that decides at "
                f"these n cannot reach it{would}.")
    observed = abs(c.difference)
    source = " (from Welch's t-test; the permutation test that decides at these n has less)" \
        if c.test == "permutation" else ""
    if observed < c.detectable:
        return (f"These seeds detect only differences of {c.detectable:.2f} points or more at {level}{source}, "
                f"more than the observed {observed:.2f} points: a difference of that size can go undetected.")
    return (f"These seeds detect differences of {c.detectable:.2f} points or more at {level}{source}; the observed "
            f"{observed:.2f} points is of that size, yet the test does not find it at alpha = {alpha:g}.")


def _cost_sentence(deviations: pd.DataFrame, tolerance: float) -> str:
    known = deviations.dropna(subset=["deviation"])
    if known.empty:
        return ""
    outside = known[known["deviation"].abs() > tolerance]
    worst = known.loc[known["deviation"].abs().idxmax()]
    if outside.empty:
        return (f"All {len(known)} units cost within {100 * tolerance:g}% of the multiply-adds of their seed's "
                f"discovered network (largest deviation {100 * worst['deviation']:+.1f}%, {worst['unit']}).")
    listed = ", ".join(f"{u} ({100 * d:+.1f}%)" for u, d in zip(outside["unit"], outside["deviation"], strict=True))
    return (f"{len(outside)} of {len(known)} units miss the {100 * tolerance:g}% cost tolerance: {listed}; "
            "their comparison is not at equal cost.")


def _search_sentence(summary: pd.DataFrame) -> str:
    rows = summary.set_index("Arm")
    if "discovered" not in rows.index:
        return ""
    build, train = rows.loc["discovered", "Construction time (s)"], rows.loc["discovered", "Train time (s)"]
    if is_missing(build):
        return ""
    text = (f"The search cost: constructing the discovered network took {build:.1f} s per seed (wall time), "
            f"beside {train:.1f} s of training")
    if "random" in rows.index and not is_missing(rows.loc["random", "Construction time (s)"]):
        text += f"; drawing and fitting a random topology took {rows.loc['random', 'Construction time (s)']:.2f} s"
    return text + "."


def _seed_cost_sentence(rows: Sequence[Any]) -> str:
    """What one more seed costs: the mean time of a unit (its construction, then its training with evaluation) of
    each arm with one unit per seed, summed, and what one more random topology costs."""
    frame = study_frame(rows)
    if frame.empty:
        return ""
    unit_s = (pd.to_numeric(frame["wall_time_s"], errors="coerce")
              + pd.to_numeric(frame["construction_time_s"], errors="coerce").fillna(0.0))
    means = unit_s.groupby(frame["arm"]).mean().dropna()
    per_seed = means.drop("random", errors="ignore")
    if per_seed.empty:
        return ""
    parts = ", ".join(f"{arm} {seconds:.0f} s" for arm, seconds in per_seed.items())
    text = (f"Each added seed costs about {per_seed.sum() / 60:.1f} min of unit time on this machine ({parts}: each "
            "unit's construction and training with evaluation, mean over its seeds; units run side by side "
            "(--side-by-side) each take longer than alone, and the study's wall time per seed is about this sum "
            "divided by the units side by side)")
    if "random" in means.index:
        text += f"; each added random topology {means['random']:.0f} s"
    return text + "."


def study_findings(rows: Sequence[Any], comparisons: Sequence[Comparison], *, tolerance: float,
                   alpha: float = ALPHA, missing: Sequence[str] = (), plan: SeedPlan | str | None = None
                   ) -> list[str]:
    """The report's paragraphs: one per comparison, the seeds chosen (``plan``, or a sentence on why none
    are yet), then cost, search cost and missing units."""
    paragraphs = [comparison_sentence(c, alpha) for c in comparisons]
    if not comparisons:
        paragraphs.append("No comparison can be made yet: the discovered arm has no finished unit.")
    if any(c.p < alpha for c in comparisons if not math.isnan(c.p)) and len(comparisons) > 1:
        paragraphs.append(f"The p-values are not adjusted for the {len(comparisons)} comparisons.")
    if plan is not None:
        paragraphs.append(plan if isinstance(plan, str) else plan_sentence(plan))
    paragraphs.append(_cost_sentence(cost_deviations(rows), tolerance))
    paragraphs.append(_search_sentence(summary_frame(rows)))
    paragraphs.append(_seed_cost_sentence(rows))
    if missing:
        paragraphs.append(f"{len(missing)} unit{'s are' if len(missing) != 1 else ' is'} not finished "
                          f"({', '.join(missing)}); the statistics cover the finished units only.")
    return [p for p in paragraphs if p]


def write_study_report(path: Path, paragraphs: Sequence[str], tables: Mapping[str, pd.DataFrame],
                       figure: Sequence[Path], config: Mapping[str, Any] | None = None) -> Path:
    """report.md of a study: findings, then each table (title -> frame), the figure and the configuration."""
    lines = ["# topo-build study", "", "## Findings", ""]
    for paragraph in paragraphs:
        lines += [paragraph, ""]
    for title, frame in tables.items():
        if not frame.empty:
            lines += [f"## {title}", "", to_markdown(frame), ""]
    png = next((p for p in figure if p.suffix == ".png"), None)
    if png is not None:
        rel = png.relative_to(path.parent).as_posix()
        caption = ("Every unit is a point (the random topologies a cloud); diamonds are arm means with their "
                   f"{round(100 * CONFIDENCE)}% intervals.")
        lines += ["## Figure", "", f"![Top-1 by arm and against multiply-adds]({rel})", "", caption, ""]
    if config is not None:
        lines += ["## Configuration", "", "```json", json.dumps(config, indent=2, default=str), "```", ""]
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
