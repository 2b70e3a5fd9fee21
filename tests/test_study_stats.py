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
    MAX_PLANNED,
    POWER,
    SMALL_N,
    compare,
    compare_arms,
    comparison_sentence,
    cost_deviations,
    detectable_difference,
    mean_ci,
    paired_by_seed,
    permutation_pvalue,
    plan_seeds,
    plan_sentence,
    power_sentence,
    seeds_to_detect,
    smallest_permutation_pvalue,
    smallest_sign_flip_pvalue,
    study_figure,
    study_findings,
    study_frame,
    summary_frame,
    comparisons_frame,
    top1_by_arm,
    tost_pvalue,
    verdict_detectable,
    welch_power,
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
    # one more seed: a discovered unit (5 s of construction, 3 s of training) and a reference unit (0.01 + 3 s)
    assert "Each added seed costs about 0.2 min of unit time" in text and "(discovered 8 s, reference 3 s:" in text
    rows = _rows({"discovered": A, "random": [97.0, 98.0, 99.0]})
    text = "\n".join(study_findings(rows, compare_arms(rows, margin=0.5), tolerance=0.02))
    assert "(discovered 8 s:" in text and "each added random topology 3 s" in text


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


# --------------------------------------------------------------------------- power
def _simulated_power(difference, sd_a, n_a, sd_b, n_b, reps=20_000, seed=0):
    """The share of ``reps`` simulated pairs of arms in which Welch's test finds ``difference`` at alpha 0.05."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(difference, sd_a, (reps, n_a)), rng.normal(0.0, sd_b, (reps, n_b))
    return float(np.mean(stats.ttest_ind(a, b, axis=1, equal_var=False).pvalue < ALPHA))


@pytest.mark.parametrize("effect, n", [(1.0, 17), (0.8, 26), (0.5, 64)])
def test_seeds_to_detect_gives_the_textbook_t_test_sizes(effect, n):
    """Cohen's d of 1, 0.8 and 0.5 at 80% power, alpha 0.05 two-sided: 17, 26 and 64 per group (the t-test's
    sizes, e.g. G*Power's; the normal approximation gives 16, 25 and 63)."""
    assert seeds_to_detect(effect, 1.0, 1.0) == n
    assert welch_power(effect, 1.0, n, 1.0, n) >= POWER > welch_power(effect, 1.0, n - 1, 1.0, n - 1)
    # the inverse: n seeds detect the effect, n - 1 do not; the scale is points, so SDs of 2 double everything
    assert detectable_difference(1.0, n, 1.0, n) <= effect < detectable_difference(1.0, n - 1, 1.0, n - 1)
    assert seeds_to_detect(2 * effect, 2.0, 2.0) == n
    assert detectable_difference(2.0, n, 2.0, n) == pytest.approx(2 * detectable_difference(1.0, n, 1.0, n))


@pytest.mark.parametrize("sd_a, n_a, sd_b, n_b", [(1.0, 17, 1.0, 17), (2.8, 10, 0.9, 10), (2.8, 6, 0.9, 12),
                                                  (2.8, 10, 2.7, 10)])
def test_the_detectable_difference_has_80_percent_power_in_simulation(sd_a, n_a, sd_b, n_b):
    detectable = detectable_difference(sd_a, n_a, sd_b, n_b)
    assert welch_power(detectable, sd_a, n_a, sd_b, n_b) == pytest.approx(POWER, abs=1e-8)
    assert _simulated_power(detectable, sd_a, n_a, sd_b, n_b) == pytest.approx(POWER, abs=0.015)


def test_too_few_seeds_miss_a_true_difference():
    """Built to fail: 5 seeds per arm of SD 1 cannot reliably find a difference of 1 point."""
    assert detectable_difference(1.0, 5, 1.0, 5) > 1.0  # about 2 points
    simulated = _simulated_power(1.0, 1.0, 5, 1.0, 5)
    assert simulated < 0.35 and simulated == pytest.approx(welch_power(1.0, 1.0, 5, 1.0, 5), abs=0.03)
    # and the normal approximation's 16 seeds fall short of 80% with the t-test
    assert _simulated_power(1.0, 1.0, 16, 1.0, 16) < POWER - 0.01


def test_the_formula_is_optimistic_below_small_n():
    """The SDs are taken as known; Welch's test estimates them, which costs power at few seeds: at the
    computed difference, 3 seeds per arm have about 70% power, and SMALL_N seeds close to the stated 80%."""
    at_three = _simulated_power(detectable_difference(1.0, 3, 1.0, 3), 1.0, 3, 1.0, 3)
    at_small_n = _simulated_power(detectable_difference(1.0, SMALL_N, 1.0, SMALL_N), 1.0, SMALL_N, 1.0, SMALL_N)
    assert at_three < 0.75 and POWER - 0.03 < at_small_n < POWER


def test_power_is_undefined_without_seeds_or_spread():
    for args in ((1.0, 1, 1.0, 5), (0.0, 5, 0.0, 5), (math.nan, 5, 1.0, 5)):
        assert math.isnan(detectable_difference(*args)) and math.isnan(welch_power(1.0, *args))
    assert math.isnan(seeds_to_detect(1.0, 0.0, 0.0)) and math.isnan(seeds_to_detect(0.0, 1.0, 1.0))
    assert math.isnan(seeds_to_detect(-1.0, 1.0, 1.0))
    # one arm without spread is defined: the other arm's n - 1 degrees of freedom
    assert detectable_difference(0.0, 5, 1.0, 5) == pytest.approx(detectable_difference(1e-9, 5, 1.0, 5))
    assert seeds_to_detect(1e-4, 1.0, 1.0) == math.inf and MAX_PLANNED >= 10_000_000


def test_what_the_verdicts_test_detects():
    assert verdict_detectable(1.0, 3, 1.0, 3) == math.inf  # the permutation test cannot give p below 0.1
    assert verdict_detectable(1.0, 4, 1.0, 4) == detectable_difference(1.0, 4, 1.0, 4)  # it can give 0.029
    assert verdict_detectable(1.0, 3, 1.0, 8) == detectable_difference(1.0, 3, 1.0, 8)  # 0.012
    assert verdict_detectable(1.0, 6, 1.0, 6) == detectable_difference(1.0, 6, 1.0, 6)


def test_comparisons_state_the_sds_and_the_detectable_difference():
    rows = _rows({"discovered": A, "reference": B, "random": [97.0, 98.0, 99.0]})
    reference, random = compare_arms(rows, margin=0.5)
    assert reference.sd_baseline == pytest.approx(np.std(A, ddof=1)) and reference.sd == pytest.approx(
        np.std(B, ddof=1))
    assert reference.detectable == pytest.approx(detectable_difference(np.std(A, ddof=1), 4, np.std(B, ddof=1), 5))
    assert random.n == 3 and random.sd == pytest.approx(1.0)  # the random arm's n counts its topologies
    frame = comparisons_frame([reference, random])
    assert frame.loc[0, "SD (points)"] == f"{np.std(A, ddof=1):.2f} vs {np.std(B, ddof=1):.2f}"
    assert frame.loc[0, "Detectable (points, 80% power)"] == reference.detectable
    assert frame.loc[1, "Detectable (points, 80% power)"] == math.inf  # 4 against 3: the floor is 0.057


def test_sentences_say_what_the_seeds_could_detect():
    close = compare([98.0, 98.6, 97.9, 98.3, 98.1], [98.4, 99.0, 98.1, 97.9, 98.5], arm="reference",
                    baseline="discovered", margin=0.5)
    assert not close.differs() and close.test == "welch" and abs(close.difference) < close.detectable
    text = comparison_sentence(close)
    assert (f"These seeds detect only differences of {close.detectable:.2f} points or more at 80% power, more than "
            f"the observed {abs(close.difference):.2f} points") in text
    assert "equal" not in text and "Equivalence within ±0.5 points is not shown" in text

    three = compare([98.0, 98.6, 97.9], [98.4, 99.0, 98.1], arm="reference", baseline="discovered", margin=0.5)
    text = comparison_sentence(three)
    welch = detectable_difference(three.sd_baseline, 3, three.sd, 3)
    assert "These seeds detect no difference at alpha = 0.05" in text
    assert f"Welch's t-test would detect only differences of {welch:.2f} points or more" in text

    flat = compare([98.0, 98.0], [98.0, 98.0], arm="uniform", baseline="discovered", margin=0.5)
    assert math.isnan(flat.detectable) and "undefined: neither arm's top-1 varies" in power_sentence(flat)

    rng = np.random.default_rng(2)
    apart = compare(rng.normal(98.0, 0.2, 8), rng.normal(96.0, 0.2, 8), arm="random", baseline="discovered",
                    margin=0.5)
    assert apart.differs() and "detect" not in comparison_sentence(apart)


# --------------------------------------------------------------------------- choosing the seeds
MEASURED = {"discovered": (50.6, 2.8), "reference": (65.2, 0.9), "random": (61.7, 2.7), "uniform": (63.8, 1.8)}


def _pilot(sds: dict[str, tuple[float, float]], seeds: int = 3) -> list[dict]:
    """Rows of a pilot whose arms have exactly these means and SDs (3 seeds: mean - sd, mean, mean + sd)."""
    assert seeds == 3
    return _rows({arm: [mean - sd, mean, mean + sd] for arm, (mean, sd) in sds.items()})


def test_plan_takes_the_largest_need_of_the_pilots_comparisons():
    rows = _pilot(MEASURED)
    plan = plan_seeds(rows, detect=5.0, pilot=3, max_seeds=10, random=8)
    needs = {n.arm: n for n in plan.needs}
    assert {arm: n.sd for arm, n in needs.items()} == pytest.approx({"reference": 0.9, "random": 2.7, "uniform": 1.8})
    for arm, need in needs.items():
        assert need.sd_baseline == pytest.approx(2.8)
        assert need.needed == seeds_to_detect(5.0, 2.8, MEASURED[arm][1])
    assert plan.seeds == max(n.needed for n in plan.needs) == 6 and not plan.capped
    assert plan.random == 8  # more topologies than seeds already
    for need in plan.needs:
        assert need.detectable <= 5.0
    text = plan_sentence(plan)
    assert "detect a difference of 5 points (80% power, alpha 0.05)" in text and "3-seed pilot" in text
    assert "the discovered network 2.80 points; the reference 0.90" in text
    assert "the study runs 6 seeds (the pilot's 3 kept) and 8 random topologies." in text and "cap" not in text


def test_plan_stops_at_the_cap_and_says_what_the_cap_detects():
    plan = plan_seeds(_pilot(MEASURED), detect=2.0, pilot=3, max_seeds=10, random=8)
    assert plan.capped and plan.seeds == 10 and plan.random == 10 and plan.wanted == 31
    random = next(n for n in plan.needs if n.arm == "random")
    assert random.needed == 31 and random.detectable == pytest.approx(detectable_difference(2.8, 10, 2.7, 10))
    text = plan_sentence(plan)
    assert "The cap of 10 seeds detects only " in text
    assert f"{random.detectable:.2f} points against the random topologies" in text


def test_plan_asks_for_small_n_and_keeps_a_larger_pilot():
    plan = plan_seeds(_pilot(MEASURED), detect=40.0, pilot=3, max_seeds=10)
    assert all(n.needed < SMALL_N for n in plan.needs) and plan.seeds == SMALL_N and plan.random is None
    assert "At least 5 seeds are asked for" in plan_sentence(plan)
    capped = plan_seeds(_pilot(MEASURED), detect=40.0, pilot=3, max_seeds=3)
    assert capped.capped and capped.seeds == 3
    assert "the permutation test decides against the reference" in plan_sentence(capped)
    big = plan_seeds(_pilot(MEASURED), detect=40.0, pilot=8, max_seeds=10)  # never fewer than the pilot
    assert big.seeds == 8 and not big.capped


def test_a_pilot_without_spread_keeps_its_seeds():
    plan = plan_seeds(_pilot({"discovered": (98.0, 0.0), "reference": (97.0, 0.0)}), detect=1.0, pilot=3,
                      max_seeds=10)
    assert math.isnan(plan.needs[0].needed) and plan.seeds == 3 and not plan.capped
    assert "No need is defined (no SD in the pilot)" in plan_sentence(plan)


def test_findings_state_the_plan():
    rows = _pilot(MEASURED)
    plan = plan_seeds(rows, detect=5.0, pilot=3, max_seeds=10, random=8)
    text = "\n".join(study_findings(rows, compare_arms(rows, margin=0.5), tolerance=0.02, plan=plan))
    assert plan_sentence(plan) in text
    pending = study_findings(rows, [], tolerance=0.02, plan="chosen once the pilot has finished")
    assert "chosen once the pilot has finished" in pending


# --------------------------------------------------------------------------- paired by seed
def test_pairing_by_seed_finds_an_offset_that_the_seeds_spread_hides():
    """Built so that pairing matters: each seed moves both arms by the same large amount, the arms differ by
    one point on every seed. Unpaired, the difference is lost in the seeds' spread; paired, it is exact."""
    seed_effect = np.array([0.0, 6.0, -5.0, 3.0, -2.0, 8.0, -7.0, 1.0])
    rows = _rows({"discovered": 60.0 + seed_effect - 1.0, "reference": 60.0 + seed_effect + 0.1 * np.sin(range(8))})
    (c,) = compare_arms(rows, margin=0.5)
    assert c.welch_p > 0.5 and c.permutation_p > 0.5  # unpaired: nothing seen
    assert c.paired_n == 8 and c.paired_difference == pytest.approx(-1.0 - 0.1 * np.sin(range(8)).mean())
    assert c.paired_t_p < 1e-6
    # the sign-flip test by brute force over all 2^8 sign patterns of the per-seed differences
    d = (60.0 + seed_effect - 1.0) - (60.0 + seed_effect + 0.1 * np.sin(range(8)))
    flips = np.array(list(itertools.product((1, -1), repeat=8)))
    brute = np.mean(np.abs((flips * d).mean(axis=1)) >= abs(d.mean()) - 1e-12)
    assert c.paired_permutation_p == pytest.approx(brute) == pytest.approx(smallest_sign_flip_pvalue(8))
    assert "Paired by seed over 8 seeds: mean difference" in comparison_sentence(c)
    # and it can say no: no offset, the seeds' spread alone
    (null,) = compare_arms(_rows({"discovered": 60.0 + seed_effect + 0.3 * np.cos(range(8)),
                                  "reference": 60.0 + seed_effect}), margin=0.5)
    assert null.paired_t_p > 0.05 and null.paired_permutation_p > 0.05


def test_a_random_arms_units_of_one_seed_are_averaged_before_pairing():
    rows = _rows({"discovered": [50.0, 60.0]})
    for k, value in enumerate([40.0, 70.0, 44.0, 66.0]):  # topology k trains with seed k mod 2
        rows.append({**rows[0], "arm": "random", "seed": k % 2, "unit": f"random-s{k % 2}-k{k}", "topology": k,
                     "top1": value / 100})
    a, b = paired_by_seed(rows, "discovered", "random")
    np.testing.assert_allclose(a, [50.0, 60.0])
    np.testing.assert_allclose(b, [42.0, 68.0])
    (c,) = compare_arms(rows, margin=0.5)
    assert c.n == 4 and c.paired_n == 2 and c.paired_difference == pytest.approx(0.0)
    one = compare_arms(_rows({"discovered": [50.0], "reference": [60.0]}), margin=0.5)[0]
    assert one.paired_n == 1 and math.isnan(one.paired_t_p) and comparison_sentence(one).count("Paired") == 0
