"""What the report says about the construction's decisions: the control first, fallback modules by name,
firing rates, and a depth trend on the depth column over modules whose kernel the map did not force."""
from __future__ import annotations

import numpy as np
import pytest

from analysis import report, tables
from topo.controls.control import summarise


def _record(name, share35, *, forced=False, fallback=False, rate=0.1):
    big = round(20 * share35)
    counts = {"1": 20 - big, "3": big - big // 2, "5": big // 2} if not fallback else {"1": 0, "3": 0, "5": 0}
    spec = dict(name=name, in_channels=32, ch1x1=8, ch3x3red=4, ch3x3=8, ch5x5red=2, ch5x5=4, pool_proj=2)
    return dict(name=name, in_channels=32, spatial_shape=[8, 8], observations=4096, dead_units=0, method="arora",
                n_clusters=0 if fallback else 20, kernel_counts=counts, spec=spec, reference=None,
                macs=1000, budget_macs=1000, fallback=fallback, window_forced=forced, firing_rate=rate)


def test_depth_trend_leaves_out_forced_modules_and_uses_the_depth_column():
    # shares fall over the free modules; a forced 1x1-only module at the end would otherwise make no difference,
    # and a fallback module in the middle is skipped (no clusters) without shifting the depths after it
    records = [_record("m0", 0.9), _record("m1", 0.0, fallback=True), _record("m2", 0.5), _record("m3", 0.1),
               _record("m4", 0.0, forced=True)]
    shares = tables.kernel_shares(records)
    assert shares["depth"].tolist() == [0, 2, 3, 4]
    free = shares[~shares["window_forced"]]
    trend = tables.depth_trend(free)
    expected = np.polyfit([0, 2, 3], [0.9, 0.5, 0.1], 1)[0]
    assert trend.slope == pytest.approx(expected)
    assert trend.slope != pytest.approx(np.polyfit([0, 1, 2], [0.9, 0.5, 0.1], 1)[0])  # not the row index
    sentence = report.findings(records, [])
    assert "m4 left out" in sentence and "does not bear it out" in sentence
    assert "m1 found no units that fire together" in sentence


def test_firing_rates_in_the_findings_and_the_table():
    records = [_record("m0", 0.5, rate=0.08), _record("m1", 0.5, rate=0.12)]
    assert "8.0% to 12.0%" in report.findings(records, []) and "sparse" in report.findings(records, [])
    frame = tables.layer_frame(records + [_record("m2", 0.0, fallback=True, forced=True, rate=0.5)])
    assert frame["Firing (%)"].round(1).tolist() == [8.0, 12.0, 50.0]
    assert frame["Rule"].tolist() == ["", "", "fallback, map"]
    assert "not sparse" in report.findings(records + [_record("m2", 0.5, rate=0.5)], [])


def test_the_control_is_the_reports_first_sentence(tmp_path):
    real = [[_record("m0", 0.5)], [_record("m0", 0.5)]]
    same = summarise(["m0"], real, {"shuffled": [[_record("m0", 0.5)]]}, permutations=99)
    path = report.write_report(tmp_path, real[0], [], None, controls=same)
    text = path.read_text().splitlines()
    assert text[0] == "# topo-build report"
    assert text[2].startswith("Control: 2 constructions on the data and 1 on pixel-shuffled images.")
    assert "no property shown to differ" in text[2] and "distances and ratios only" in text[2]
    assert "## Control: which properties depend on the data?" in text
    assert (tmp_path / "figures" / "controls.png").is_file()
    assert (tmp_path / "figures" / "control_distances.png").is_file()
