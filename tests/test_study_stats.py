"""The study's statistics (analysis.study_stats) against scipy and hand computations on known inputs."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.study_stats import (
    ALPHA,
    SMALL_N,
    compare,
    compare_arms,
    comparison_sentence,
    cost_deviations,
    mean_ci,
    permutation_pvalue,
    smallest_permutation_pvalue,
    study_figure,
    study_findings,
    study_frame,
    summary_frame,
    comparisons_frame,
    top1_by_arm,
    tost_pvalue,
)
from analysis.tables import ReportError

A = [97.5, 98.1, 98.6, 97.8]
B = [98.9, 99.2, 98.4, 99.4, 98.8]


def _welch_by_hand(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    return a.mean() - b.mean(), se, df


def _rows(values_by_arm, macs=None):
    rows = []
    for arm, values in values_by_arm.items():
        for seed, value in enumerate(values):
            rows.append({"arm": arm, "seed": seed, "unit": f"{arm}-s{seed}", "topology": None,
                         "topology_id": "x", "params": 1000, "macs": (macs or {}).get(arm, 1_000_000),
                         "top1": value / 100, "top5": 1.0, "train_time_s": 2.0, "wall_time_s": 3.0,
                         "construction_time_s": 5.0 if arm == "discovered" else 0.01, "draws": None})
    return rows


def test_mean_ci_is_the_t_interval():
    x = np.array(A)
    mean, sd, low, high = mean_ci(x)
    half = stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    assert mean == pytest.approx(x.mean()) and sd == pytest.approx(x.std(ddof=1))
    assert (low, high) == pytest.approx((x.mean() - half, x.mean() + half))
    assert all(math.isnan(v) for v in mean_ci([98.0])[1:])
    assert mean_ci([98.0, 98.0, 98.0]) == (98.0, 0.0, 98.0, 98.0)


def test_welch_matches_scipy_and_the_hand_formula():
    c = compare(A, B, arm="reference", baseline="discovered", margin=0.5)
    diff, se, df = _welch_by_hand(A, B)
    assert c.difference == pytest.approx(diff)
    assert c.welch_t == pytest.approx(diff / se) and c.welch_df == pytest.approx(df)
    assert c.welch_p == pytest.approx(2 * stats.t.sf(abs(diff / se), df))
    assert c.welch_p == pytest.approx(stats.ttest_ind(A, B, equal_var=False).pvalue)
    half = stats.t.ppf(0.975, df) * se
    assert (c.ci_low, c.ci_high) == pytest.approx((diff - half, diff + half))


def _permutation_by_hand(a, b):
    pooled = np.array(list(a) + list(b))
    observed = np.mean(a) - np.mean(b)
    diffs = []
    for chosen in itertools.combinations(range(pooled.size), len(a)):
        mask = np.zeros(pooled.size, bool)
        mask[list(chosen)] = True
        diffs.append(pooled[mask].mean() - pooled[~mask].mean())
    diffs = np.array(diffs)
    eps = 1e-12
    greater, less = np.mean(diffs >= observed - eps), np.mean(diffs <= observed + eps)
    return min(1.0, 2 * min(greater, less))


@pytest.mark.parametrize("a, b", [(A, B), ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]), ([98.0, 98.3, 97.2], B[:3])])
def test_permutation_test_is_exact(a, b):
    assert permutation_pvalue(a, b) == pytest.approx(_permutation_by_hand(a, b))


def test_smallest_permutation_p():
    assert permutation_pvalue([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
    assert smallest_permutation_pvalue(3, 3) == pytest.approx(2 / 20)
    assert smallest_permutation_pvalue(3, 8) == pytest.approx(2 / math.comb(11, 3))
    assert smallest_permutation_pvalue(1, 1) == 1.0


def test_tost_by_hand_and_its_verdicts():
    diff, se, df = _welch_by_hand(A, B)
    p, lower, upper = tost_pvalue(A, B, 0.5)
    assert lower == pytest.approx(stats.t.sf((diff + 0.5) / se, df))
    assert upper == pytest.approx(stats.t.cdf((diff - 0.5) / se, df))
    assert p == max(lower, upper)
    rng = np.random.default_rng(0)
    close = rng.normal(98.0, 0.1, 40), rng.normal(98.05, 0.1, 40)
    assert tost_pvalue(*close, 0.5)[0] < 1e-6  # equivalent within half a point
    assert tost_pvalue(np.array(A) - 5, B, 0.5)[0] > 0.99  # five points apart: not equivalent


def test_compare_uses_the_permutation_test_below_small_n():
    small = compare(A[:3], B[:3], arm="reference", baseline="discovered", margin=0.5)
    assert small.test == "permutation" and small.p == small.permutation_p
    rng = np.random.default_rng(1)
    a, b = rng.normal(98, 0.5, SMALL_N), rng.normal(97, 0.5, SMALL_N)
    large = compare(a, b, arm="reference", baseline="discovered", margin=0.5)
    assert large.test == "welch" and large.p == large.welch_p


def test_percentile_among_the_random_pool():
    pool = [96.0, 97.0, 97.5, 98.0, 98.0, 99.0]
    c = compare([98.0, 98.0], pool, arm="random", baseline="discovered", margin=0.5, percentile=True)
    below, at = sum(v < 98.0 for v in pool), sum(v <= 98.0 for v in pool)
    assert c.percentile == pytest.approx(50 * (below + at) / len(pool))
    assert c.percentile == pytest.approx(stats.percentileofscore(pool, 98.0, kind="mean"))


def test_equal_accuracies_compare_equal_after_float_arithmetic():
    # 37/360 as a mean of fractions and as a single fraction differ in the last bits
    rows = _rows({"discovered": [100 * 37 / 360, 100 * 37 / 360], "random": [100 * 37 / 360] * 3})
    rows[0]["top1"], rows[1]["top1"] = 0.1 + 37 / 360 - 0.1, 37 / 360
    values = top1_by_arm(rows)
    assert len(set(values["discovered"])) == 1 and values["discovered"][0] == values["random"][0]
    (c,) = compare_arms(rows, margin=0.5)
    assert c.percentile == 50.0 and c.difference == 0.0


def test_summary_frame_against_numpy():
    rows = _rows({"discovered": A, "reference": B})
    summary = summary_frame(rows).set_index("Arm")
    assert list(summary.index) == ["discovered", "reference"]
    for arm, values in (("discovered", A), ("reference", B)):
        mean, sd, low, high = mean_ci(values)
        assert summary.loc[arm, "n"] == len(values)
        assert summary.loc[arm, "Top-1 (%)"] == pytest.approx(np.mean(values))
        assert summary.loc[arm, "SD (points)"] == pytest.approx(np.std(values, ddof=1))
        assert summary.loc[arm, "95% CI low (%)"] == pytest.approx(low)
        assert summary.loc[arm, "95% CI high (%)"] == pytest.approx(high)
    assert summary.loc["discovered", "Construction time (s)"] == 5.0


def test_study_frame_orders_arms_and_rejects_bad_rows():
    rows = _rows({"random": [98.0], "discovered": [97.0], "reference": [96.0]})
    assert list(study_frame(rows)["arm"]) == ["discovered", "reference", "random"]
    with pytest.raises(ReportError, match="lacks 'top1'"):
        study_frame([{"arm": "discovered", "seed": 0}])
    with pytest.raises(ReportError, match="fraction"):
        top1_by_arm([{"arm": "discovered", "seed": 0, "top1": 97.0}])


def test_cost_deviations_per_seed():
    rows = _rows({"discovered": [97.0, 98.0], "random": [97.0, 98.0]})
    rows[0]["macs"], rows[1]["macs"], rows[2]["macs"], rows[3]["macs"] = 100, 200, 99, 210
    dev = cost_deviations(rows).set_index("unit")["deviation"]
    assert dev["random-s0"] == pytest.approx(-0.01) and dev["random-s1"] == pytest.approx(0.05)
    assert dev["discovered-s1"] == 0.0


def test_sentences_claim_only_what_the_tests_show():
    same = compare([98.0, 98.6, 97.9], [98.4, 99.0, 98.1], arm="reference", baseline="discovered", margin=0.5)
    text = comparison_sentence(same)
    assert "not distinguishable from the reference" in text and "n = 3" in text
    assert f"p = {same.p:.2g}" in text and "cannot give p below 0.1" in text
    assert "lower" not in text and "higher" not in text
    assert "Equivalence within ±0.5 points is not shown" in text

    rng = np.random.default_rng(2)
    a, b = rng.normal(98.0, 0.2, 8), rng.normal(96.0, 0.2, 8)
    apart = compare(a, b, arm="random", baseline="discovered", margin=0.5, percentile=True)
    assert apart.differs(ALPHA)
    text = comparison_sentence(apart)
    assert "higher than the random topologies'" in text and "Welch's t-test, p =" in text
    assert "n = 8" in text and "percentile of the 8 random" in text


def test_findings_name_missing_units_and_cost_misses():
    rows = _rows({"discovered": A, "reference": B}, macs={"discovered": 1_000_000, "reference": 1_050_000})
    paragraphs = study_findings(rows, compare_arms(rows, margin=0.5), tolerance=0.02, missing=["random-s0-k0"])
    text = "\n".join(paragraphs)
    assert "miss the 2% cost tolerance" in text and "reference-s0 (+5.0%)" in text
    assert "1 unit is not finished (random-s0-k0)" in text
    assert "constructing the discovered network took 5.0 s per seed" in text


def test_tests_frame_and_figure(tmp_path):
    rows = _rows({"discovered": A, "reference": B, "random": [97.0, 98.0, 99.0]})
    comparisons = compare_arms(rows, margin=0.5)
    frame = comparisons_frame(comparisons)
    assert list(frame["Comparison"]) == ["discovered vs reference", "discovered vs random"]
    assert pd.isna(frame.loc[0, "Percentile"]) and not pd.isna(frame.loc[1, "Percentile"])
    paths = study_figure(rows, tmp_path / "figures" / "study")
    assert {p.suffix for p in paths} == {".png", ".pdf"} and all(p.stat().st_size > 1000 for p in paths)


def test_one_seed_cannot_be_tested():
    c = compare([98.0, 98.5], [97.0], arm="random", baseline="discovered", margin=0.5, percentile=True)
    assert np.isnan(c.p) and np.isnan(c.welch_p) and np.isnan(c.permutation_p)
    assert c.percentile == 100.0
    assert "cannot be tested against the random topologies" in comparison_sentence(c)
