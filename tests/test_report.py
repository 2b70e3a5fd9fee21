"""Comparison tables, the findings paragraph and report.md."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

from analysis import report, tables
from analysis.plots import cluster_order
from analysis.tables import ReportError
from topo.common.errors import UserError


def spec(name, ch1x1=64, ch3x3red=96, ch3x3=128, ch5x5red=16, ch5x5=32, pool_proj=32):
    return dict(name=name, in_channels=192, ch1x1=ch1x1, ch3x3red=ch3x3red, ch3x3=ch3x3,
                ch5x5red=ch5x5red, ch5x5=ch5x5, pool_proj=pool_proj)


def records_with_shares(shares, *, reference=True, dead=(0, 3)):
    """Layer records whose 3x3+5x5 cluster shares (of 20 clusters) are ``shares``, in depth order."""
    out = []
    for i, share in enumerate(shares):
        name = f"inception{i}"
        big = round(20 * share)
        out.append(dict(
            name=name, in_channels=192, spatial_shape=[8, 8], observations=4096,
            dead_units=dead[i % len(dead)], method="arora", n_clusters=20,
            kernel_counts={"1": 20 - big, "3": big - big // 2, "5": big // 2},
            spec=spec(name, ch1x1=60 - i, ch3x3=120 + i), reference=spec(name) if reference else None,
            macs=2_000_000 + 10_000 * i, budget_macs=2_050_000,
        ))
    return out


ROWS = [
    dict(network="discovered", params=5_900_000, macs=1_480_000_000, top1=0.612, top5=0.851,
         ema_top1=None, train_time_s=7_200.0 * 15, throughput=1234.5),
    dict(network="googlenet-small", params=6_600_000, macs=1_500_000_000, top1=0.634, top5=0.862,
         ema_top1=0.641, train_time_s=7_300.0 * 15, throughput=1100.0),
]


def history(offset=0.0):
    epochs = np.arange(1, 4)
    return pd.DataFrame({"epoch": epochs, "lr": 0.1, "train_loss": 2.0 / epochs, "train_top1": 0.2 * epochs,
                         "val_loss": 2.1 / epochs, "val_top1": 0.2 * epochs + offset, "val_top5": 0.3 * epochs})


def test_comparison_frame_units_and_values():
    frame = tables.comparison_frame(ROWS)
    assert list(frame.columns) == ["Network", "Params (M)", "MACs (G)", "Top-1 (%)", "Top-5 (%)",
                                   "EMA top-1 (%)", "Train time (h)", "Throughput (img/s)"]
    assert frame["Params (M)"].tolist() == pytest.approx([5.9, 6.6])
    assert frame["MACs (G)"].tolist() == pytest.approx([1.48, 1.5])
    assert frame["Top-1 (%)"].tolist() == pytest.approx([61.2, 63.4])
    assert frame["Train time (h)"].tolist() == pytest.approx([30.0, 30.4166667])
    assert np.isnan(frame.loc[0, "EMA top-1 (%)"])
    # Small networks are counted in millions of multiply-adds, and no EMA column without EMA.
    small = tables.comparison_frame([dict(network="tiny", params=20_000, macs=3_500_000, top1=0.9)])
    assert "MACs (M)" in small and "EMA top-1 (%)" not in small
    assert small.loc[0, "MACs (M)"] == pytest.approx(3.5)


def test_write_comparison_round_trips(tmp_path):
    paths = tables.write_comparison(ROWS, tmp_path)
    assert [p.name for p in paths] == ["comparison.csv", "comparison.md", "comparison.tex"]
    back = pd.read_csv(paths[0])
    pd.testing.assert_frame_equal(back, tables.comparison_frame(ROWS), check_exact=False, rtol=1e-9)
    assert back.loc[1, "EMA top-1 (%)"] == pytest.approx(64.1)

    markdown = paths[1].read_text()
    assert markdown.splitlines()[0].startswith("| Network")
    assert re.search(r"\| discovered\s+\|\s+5\.90 \|\s+1\.48 \|\s+61\.2 \|\s+85\.1 \|\s+– \|", markdown)
    assert "| googlenet-small" in markdown and "64.1" in markdown

    latex = paths[2].read_text()
    assert "\\begin{tabular}{lrrrrrrr}" in latex and "\\end{tabular}" in latex
    assert "Top-1 (\\%)" in latex  # escaped for LaTeX
    assert "discovered & 5.90 & 1.48 & 61.2 & 85.1 & -- &" in latex
    assert not list(tmp_path.glob(".*.tmp"))


def test_accuracy_must_be_a_fraction():
    bad = [dict(ROWS[0], top1=61.2)]
    with pytest.raises(ReportError, match="top1=61.2 for network 'discovered'.*fraction") as info:
        tables.comparison_frame(bad)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    with pytest.raises(ReportError, match="lacks 'macs'"):
        tables.comparison_frame([dict(network="x", params=1)])


def test_layer_frame_discovered_beside_reference():
    records = records_with_shares([0.2, 0.5])
    records[1]["reference"] = None
    frame = tables.layer_frame(records)
    assert frame["Module"].tolist() == ["inception0", "inception1"]
    assert frame["#1x1"].tolist() == [60, 59]
    assert frame["#1x1 (ref)"].iloc[0] == 64 and pd.isna(frame["#1x1 (ref)"].iloc[1])
    assert frame["Out"].tolist() == [60 + 120 + 32 + 32, 59 + 121 + 32 + 32]
    assert frame["Out (ref)"].iloc[0] == 64 + 128 + 32 + 32
    assert frame["3x3+5x5 share (%)"].tolist() == pytest.approx([20.0, 50.0])
    assert frame["MACs (M)"].tolist() == pytest.approx([2.0, 2.01])


def test_kernel_shares_and_depth_trend():
    shares = tables.kernel_shares(records_with_shares([0.2, 0.4, 0.6, 0.8]))
    assert shares["share35"].tolist() == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert (shares[["share1", "share3", "share5"]].sum(axis=1)).tolist() == pytest.approx([1, 1, 1, 1])
    trend = tables.depth_trend(shares)
    assert trend.slope == pytest.approx(0.2)
    assert (trend.first_half, trend.second_half) == pytest.approx((0.3, 0.7))
    assert trend.rises and not trend.falls_or_flat
    assert tables.depth_trend(shares.iloc[:1]) is None
    with pytest.raises(ReportError, match="kernel size '7'"):
        tables.kernel_shares([dict(name="a", kernel_counts={"7": 1})])


def slope_points(shares):
    """The least-squares slope of the shares in points per module, as the report prints it."""
    return f"{100 * np.polyfit(np.arange(len(shares)), shares, 1)[0]:+.1f} points per module"


def test_findings_bears_it_out_for_rising_shares():
    shares = [0.1, 0.2, 0.35, 0.5, 0.6]
    text = report.findings(records_with_shares(shares), ROWS)
    assert "bears it out" in text and "does not" not in text
    assert "61.2%" in text and "63.4%" in text and "2.2 points lower" in text
    assert "5.90M parameters against 6.60M" in text and "1.48G multiply-adds against 1.50G" in text
    assert "from 10.0% in inception0 to 60.0% in inception4" in text
    assert slope_points(shares) in text and slope_points(shares).startswith("+")
    assert "\n" not in text  # one paragraph


def test_findings_does_not_bear_it_out_for_falling_or_mixed_shares():
    shares = [0.6, 0.5, 0.3, 0.1]
    falling = report.findings(records_with_shares(shares), ROWS)
    assert "does not bear it out" in falling and "bears it out" not in falling.replace("does not bear it out", "")
    assert slope_points(shares) in falling and slope_points(shares).startswith("-")
    flat = report.findings(records_with_shares([0.3, 0.3, 0.3]), ROWS)
    assert "does not bear it out" in flat

    # The slope rises but the deeper half is below the shallower half: no verdict in favour.
    shares = [0.4, 0.0, 0.4, 0.0, 0.0, 0.7]
    trend = tables.depth_trend(tables.kernel_shares(records_with_shares(shares)))
    assert trend.slope > 0 and trend.second_half < trend.first_half
    mixed = report.findings(records_with_shares(shares), ROWS)
    assert "does not clearly bear it out" in mixed


def test_findings_reports_dead_units_and_budget():
    text = report.findings(records_with_shares([0.2, 0.4], dead=(0, 3)), ROWS)
    assert "3 dead units" in text and "inception1" in text
    assert "4.01M multiply-adds against the 4.10M of their per-module budgets (-2.2%" in text
    clean = report.findings(records_with_shares([0.2, 0.4], dead=(0,)), ROWS)
    assert "No module input had dead units." in clean


def test_findings_handles_missing_pieces():
    one = report.findings(records_with_shares([0.3], reference=False), [])
    assert "single module" in one and "cannot be judged" in one and "No network was trained" in one

    no_reference = report.findings(records_with_shares([0.2, 0.4]), ROWS[:1])
    assert "61.2% top-1" in no_reference and "no reference" in no_reference

    untrained = [dict(r, top1=None, top5=None) for r in ROWS]
    text = report.findings(records_with_shares([0.2, 0.4]), untrained)
    assert "neither network's accuracy was measured" in text and "0.89x" in text
    half = report.findings([], [ROWS[0], dict(ROWS[1], top1=None)])
    assert "googlenet-small's accuracy was not measured" in half

    only_reference = report.findings([], ROWS[1:])
    assert "No discovered network was trained" in only_reference and "63.4% top-1" in only_reference

    assert "cannot be judged" in report.findings([dict(records_with_shares([0.2])[0], kernel_counts={})], ROWS)


def test_findings_accepts_dataclasses():
    @dataclasses.dataclass
    class Row:
        network: str
        params: int
        macs: int
        top1: float | None = None
        top5: float | None = None

    text = report.findings([], [Row("discovered", 1_000_000, 2_000_000, 0.9, 0.99), Row("googlenet", 2_000_000, 4_000_000, 0.8)])
    assert "90.0% top-1 against 80.0% for googlenet, 10.0 points higher" in text and "0.50x" in text


def markdown_links(text):
    return re.findall(r"\]\(([^)]+)\)", text)


@pytest.mark.slow
def test_write_report_links_existing_files(tmp_path):
    x = load_digits().data
    x = x[:, x.std(axis=0) > 0]
    corr = np.corrcoef(x, rowvar=False)
    labels = np.arange(corr.shape[0]) % 4
    records = records_with_shares([0.2, 0.3, 0.5])
    config = {"data": "digits", "epochs": 2, "versions": {"torch": "2.x", "numpy": np.__version__}}
    path = report.write_report(
        tmp_path, records, ROWS, {"discovered": history(), "googlenet-small": history(0.05)},
        corr_by_layer={"inception0": {"corr": corr, "order": cluster_order(labels), "labels": labels},
                       "inception1": (corr, None, labels)},
        config=config,
    )
    assert path == tmp_path / "report.md"
    text = path.read_text()
    links = markdown_links(text)
    assert {"figures/branch_widths.png", "figures/kernel_share.png", "figures/accuracy_vs_macs.png",
            "figures/learning_curves.png", "figures/correlation_inception0.png",
            "figures/correlation_inception1.png", "comparison.csv", "comparison.tex"} <= set(links)
    for link in links:
        assert (tmp_path / link).is_file(), link
    assert report.findings(records, ROWS) in text
    assert "| discovered" in text and "| inception0" in text and "60 (64)" in text
    assert "versions.torch" in text and "digits" in text
    assert (tmp_path / "comparison.md").read_text().strip() in text
    assert not list(tmp_path.rglob(".*.tmp"))


def test_write_report_with_one_layer_and_nothing_trained(tmp_path):
    path = report.write_report(tmp_path, records_with_shares([0.25], reference=False), [], None)
    text = path.read_text()
    for link in markdown_links(text):
        assert (tmp_path / link).is_file(), link
    assert "cannot be judged" in text and "No network was trained" in text
    assert "accuracy_vs_macs" not in text and "## Comparison" not in text
    assert not (tmp_path / "comparison.csv").exists()
    assert (tmp_path / "figures" / "branch_widths.pdf").is_file()
    assert re.search(r"\| inception0 \|\s+192 \|\s+60 \|", text)  # no reference: widths shown bare
