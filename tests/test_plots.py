"""Figures: correlation ordered by cluster, branch widths, kernel shares, accuracy, learning curves."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from sklearn.datasets import load_digits

from analysis import plots
from topo.common.errors import StatsError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_valid_figure_files(paths, stem):
    assert [p.name for p in paths] == [f"{stem.name}.png", f"{stem.name}.pdf"]
    png, pdf = paths
    png_bytes, pdf_bytes = png.read_bytes(), pdf.read_bytes()
    assert png_bytes.startswith(PNG_MAGIC) and len(png_bytes) > 5_000
    height, width = imread(png).shape[:2]
    assert height > 200 and width > 200
    assert pdf_bytes.startswith(b"%PDF-") and pdf_bytes.rstrip().endswith(b"%%EOF") and len(pdf_bytes) > 3_000
    assert not list(png.parent.glob(".*.tmp")), "a temporary file was left behind"


@pytest.fixture(scope="module")
def digits_correlation():
    """Correlation of the 8x8 digit pixels and clusters from average-linkage on 1 - corr."""
    x = load_digits().data
    x = x[:, x.std(axis=0) > 0]
    corr = np.corrcoef(x, rowvar=False)
    distance = np.clip(1.0 - corr, 0.0, None)
    np.fill_diagonal(distance, 0.0)
    labels = fcluster(linkage(squareform(distance, checks=False), "average"), t=6, criterion="maxclust") - 1
    labels[::17] = -1  # a few unclustered units, as dead units would be
    return corr, labels


def record(name, share35, reference=True):
    """A synthetic layer record whose 3x3+5x5 share is ``share35`` out of 20 clusters."""
    big = round(20 * share35)
    spec = dict(name=name, in_channels=192, ch1x1=64, ch3x3red=96, ch3x3=120, ch5x5red=16, ch5x5=24, pool_proj=32)
    ref = dict(spec, ch3x3=128, ch5x5=32) if reference else None
    return dict(name=name, in_channels=192, dead_units=0, n_clusters=20,
                kernel_counts={"1": 20 - big, "3": big - big // 2, "5": big // 2},
                spec=spec, reference=ref, macs=1_000_000, budget_macs=1_000_000)


def test_cluster_order_groups_clusters_and_puts_unclustered_last():
    labels = np.array([2, 0, -1, 0, 1, 2, -1])
    order = plots.cluster_order(labels)
    np.testing.assert_array_equal(order, [1, 3, 4, 0, 5, 2, 6])
    np.testing.assert_array_equal(labels[order], [0, 0, 1, 2, 2, -1, -1])
    np.testing.assert_array_equal(plots.cluster_boundaries(labels[order]), [2, 3, 5])
    assert plots.cluster_boundaries([3, 3, 3]).size == 0


def test_correlation_figure_shows_matrix_reordered_by_cluster(digits_correlation):
    corr, labels = digits_correlation
    fig = plots.correlation_figure(corr, None, labels)
    ax = fig.axes[0]
    order = plots.cluster_order(labels)
    shown = np.asarray(ax.images[0].get_array())
    np.testing.assert_allclose(shown, corr[np.ix_(order, order)])
    assert ax.images[0].get_clim() == (-1.0, 1.0)
    # One horizontal and one vertical line per cluster boundary.
    n_boundaries = len(plots.cluster_boundaries(labels[order]))
    assert n_boundaries == len(np.unique(labels)) - 1
    assert len(ax.lines) == 2 * n_boundaries
    # Ordering by cluster makes the diagonal blocks the strongly correlated ones.
    same = labels[:, None] == labels[None, :]
    clustered = (labels[:, None] >= 0) & (labels[None, :] >= 0) & ~np.eye(len(labels), dtype=bool)
    assert corr[same & clustered].mean() > corr[~same & clustered].mean() + 0.1


def test_correlation_matrix_writes_png_and_pdf(tmp_path, digits_correlation):
    corr, labels = digits_correlation
    stem = tmp_path / "figures" / "correlation_inception3a"
    paths = plots.correlation_matrix(corr, plots.cluster_order(labels), labels, stem, title="digits")
    assert_valid_figure_files(paths, stem)
    first = paths[1].read_bytes()
    plots.correlation_matrix(corr, plots.cluster_order(labels), labels, stem, title="digits")
    assert paths[1].read_bytes() == first, "the same inputs should give the same PDF"


def test_correlation_matrix_rejects_bad_inputs(tmp_path, digits_correlation):
    corr, labels = digits_correlation
    with pytest.raises(StatsError, match="permutation"):
        plots.correlation_matrix(corr, np.zeros(len(labels), dtype=int), labels, tmp_path / "c")
    with pytest.raises(StatsError, match="square"):
        plots.correlation_matrix(corr[:, :3], None, None, tmp_path / "c")
    with pytest.raises(StatsError, match="one label per channel"):
        plots.correlation_matrix(corr, None, labels[:-1], tmp_path / "c")
    assert not list(tmp_path.iterdir()), "nothing may be written for bad input"


def test_branch_widths_with_and_without_reference(tmp_path):
    records = [record("inception3a", 0.2), record("inception3b", 0.4, reference=False), record("inception4a", 0.5)]
    stem = tmp_path / "branch_widths"
    assert_valid_figure_files(plots.branch_widths(records, stem), stem)
    assert plots.branch_widths([], tmp_path / "none") == []


def test_kernel_share_by_depth(tmp_path):
    stem = tmp_path / "kernel_share"
    records = [record(f"inception{i}", s) for i, s in enumerate([0.1, 0.3, 0.5])]
    assert_valid_figure_files(plots.kernel_share_by_depth(records, stem), stem)
    no_clusters = [dict(record("a", 0.5), kernel_counts={})]
    assert plots.kernel_share_by_depth(no_clusters, tmp_path / "empty") == []
    assert not (tmp_path / "empty.png").exists()


def test_accuracy_vs_macs_skips_networks_without_accuracy(tmp_path):
    rows = [
        dict(network="discovered", params=5_000_000, macs=1.2e9, top1=0.61, top5=0.84),
        dict(network="googlenet", params=6_600_000, macs=1.5e9, top1=0.63, top5=0.86),
        dict(network="untrained", params=1_000_000, macs=3e8, top1=None, top5=None),
    ]
    stem = tmp_path / "accuracy"
    assert_valid_figure_files(plots.accuracy_vs_macs(rows, stem), stem)
    assert plots.accuracy_vs_macs(rows[2:], tmp_path / "none") == []


def test_learning_curves(tmp_path):
    epochs = np.arange(1, 6)
    history = pd.DataFrame({
        "epoch": epochs, "lr": 0.1, "train_loss": 2.0 / epochs, "train_top1": 0.1 * epochs,
        "val_loss": 2.2 / epochs, "val_top1": 0.12 * epochs, "val_top5": 0.15 * epochs,
    })
    with_ema = history.assign(ema_val_top1=0.13 * epochs)
    with_ema.loc[0, "val_top1"] = np.nan  # an epoch without evaluation
    stem = tmp_path / "curves"
    paths = plots.learning_curves({"discovered": history, "googlenet": with_ema}, stem)
    assert_valid_figure_files(paths, stem)
    assert plots.learning_curves({}, tmp_path / "none") == []


def test_safe_name():
    assert plots.safe_name("inception 4a/branch") == "inception_4a_branch"
    assert plots.safe_name("///") == "layer"
