"""Clusters -> InceptionSpec: branch counts, reductions, pool projection, rounding, budget."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from builders.budget import fit_to_budget, scaled_widths
from builders.cost import inception_macs
from builders.from_clusters import POOL_SHARE, cluster_widths, from_clusters, reduction_width, uncovered_channels
from topo.cluster import UnitClustering
from topo.construct.config import ConstructConfig
from topo.construct.loop import cluster_layer
from topo.common.errors import StatsError
from topo.planted.generator import PlantedConfig, generate
from topo.stats.layer_stats import from_activations

CFG = PlantedConfig(num_channels=48, num_hidden=12, degree=4, num_samples=40, height=10, width=10, seed=11)


@pytest.fixture(scope="module")
def fitted():
    planted = generate(CFG)
    acts = torch.from_numpy(planted.activations)
    stats = from_activations(acts, positions=None)
    model = UnitClustering(method="arora", random_state=0).fit(stats)
    return acts, stats, model


def test_branch_widths_are_cluster_counts_and_the_1x1_branch_carries_what_no_cluster_covers(fitted):
    _, stats, model = fitted
    spec = from_clusters(model, stats, round_to=None)
    kc = model.kernel_counts_
    covered = {c for cluster in model.clusters_ for c in cluster.channels}
    uncovered = [c for c in range(CFG.num_channels) if c not in covered]
    assert uncovered  # the planted layer has channels no support draws on: the carry path is exercised
    assert uncovered_channels(model.clusters_, stats) == uncovered
    carry = reduction_width(np.asarray(stats.cov(), dtype=np.float64), uncovered)
    assert carry >= 1
    assert (spec.ch1x1, spec.ch3x3, spec.ch5x5) == (kc[1] + carry, kc[3], kc[5])
    assert from_clusters(model, stats, round_to=None, carry=False).ch1x1 == kc[1]
    assert spec.in_channels == CFG.num_channels
    # the documented pool rule: POOL_SHARE of the module's output
    assert spec.pool_proj == round(POOL_SHARE / (1 - POOL_SHARE) * model.n_clusters_)


def test_reductions_never_exceed_the_channels_drawn_on(fitted):
    _, stats, model = fitted
    spec = from_clusters(model, stats, round_to=None)
    for k, red in ((3, spec.ch3x3red), (5, spec.ch5x5red)):
        chans = {c for cl in model.clusters_ if cl.kernel_size == k for c in cl.channels}
        assert 1 <= red <= len(chans)
    rounded = from_clusters(model, stats, round_to=8)
    for k, red in ((3, rounded.ch3x3red), (5, rounded.ch5x5red)):
        chans = {c for cl in model.clusters_ if cl.kernel_size == k for c in cl.channels}
        assert red <= len(chans)


def test_reduction_width_follows_the_spectrum():
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((10, 2))
    cov = basis @ basis.T + 1e-6 * np.eye(10)  # rank 2 plus a whisper
    assert reduction_width(cov, range(10), 0.9) <= 2
    assert reduction_width(np.eye(10), range(10), 0.9) == 9  # isotropic: 9 of 10 dims hold 90%
    assert reduction_width(np.eye(10), [1, 2, 3], 1.0) == 3  # never more than the channels


def test_rounding_keeps_positive_widths_positive(fitted):
    _, stats, model = fitted
    spec = from_clusters(model, stats, round_to=8)
    for name in ("ch1x1", "ch3x3", "ch5x5", "pool_proj"):
        w = getattr(spec, name)
        assert w > 0 and w % 8 == 0


def test_a_budget_is_met_by_the_outputs_and_never_squeezes_the_reductions_or_the_carry_path(fitted):
    _, stats, model = fitted
    base = from_clusters(model, stats, round_to=None)
    H, W = stats.spatial_shape
    kept = ("ch3x3red", "ch5x5red")
    carry = base.ch1x1 - model.kernel_counts_[1]
    smallest = inception_macs(cluster_widths(model.clusters_, stats, None).spec(1e-9, None, CFG.num_channels, ""),
                              H, W)
    for factor in (4, 0.8):  # scaled up, and down to a budget the smallest module of every cluster fits
        budget = factor * inception_macs(base, H, W)
        assert budget >= smallest
        spec = from_clusters(model, stats, round_to=None, budget=budget)
        got = inception_macs(spec, H, W)
        assert 0.85 * budget <= got <= budget, factor  # integer widths of a small module: coarse steps
        assert all(getattr(spec, k) == getattr(base, k) for k in kept), factor  # the data's dimension, kept
        # one scale on the clusters' units: their ratios are kept (up to integer rounding)
        units = np.array([spec.ch1x1 - carry, spec.ch3x3, spec.ch5x5])
        ratio = units / np.array([base.ch1x1 - carry, base.ch3x3, base.ch5x5])
        assert ratio.max() - ratio.min() < 0.25 * factor, factor
        assert (ratio < 1).all() if factor < 1 else (ratio > 1).all()
    budget = 4 * inception_macs(base, H, W)
    rounded = from_clusters(model, stats, round_to=8, budget=budget)
    assert inception_macs(rounded, H, W) <= budget
    assert all(getattr(rounded, n) % 8 == 0 for n in ("ch1x1", "ch3x3", "ch5x5", "pool_proj"))
    with pytest.raises(StatsError, match="budget"):
        from_clusters(model, stats, budget=10)


def test_a_tight_budget_drops_the_weakest_clusters_before_it_squeezes_a_reduction(fitted, caplog):
    _, stats, model = fitted
    H, W = stats.spatial_shape
    n = model.n_clusters_
    smallest = inception_macs(cluster_widths(model.clusters_[: n // 2], stats, None).spec(1e-9, None, CFG.num_channels,
                                                                                          ""), H, W)
    every = cluster_widths(model.clusters_, stats, None)
    assert inception_macs(every.spec(1e-9, None, CFG.num_channels, ""), H, W) > smallest  # all of them cannot fit
    with caplog.at_level("INFO", logger="builders.from_clusters"):
        spec = from_clusters(model, stats, round_to=None, budget=smallest)
    assert inception_macs(spec, H, W) <= smallest
    kept = int(re.search(r"(\d+) of (\d+) clusters fit the budget", caplog.text).group(1))
    assert n // 2 <= kept < n  # the first (best evidenced) clusters stay
    widths = cluster_widths(model.clusters_[:kept], stats, None)
    assert (spec.ch3x3red, spec.ch5x5red) == (widths.kept["ch3x3red"], widths.kept["ch5x5red"])
    assert spec.ch1x1 >= widths.kept["carry"]
    # one factor on every width (the rule before) squeezes a reduction below the data's dimension here
    whole = every.spec(1.0, None, CFG.num_channels, "")
    squeezed = fit_to_budget(lambda scale: scaled_widths(whole, scale, None), smallest, H, W)
    assert squeezed.ch5x5red < every.kept["ch5x5red"] or squeezed.ch3x3red < every.kept["ch3x3red"]


def test_pool_proj_from_the_pooled_map(fitted):
    """The loop clusters the pooled map with a 1x1 window (`cluster_layer`); the builder gives one
    projection channel per cluster found there."""
    acts, stats, model = fitted
    pooled = torch.nn.functional.max_pool2d(acts, 3, stride=1, padding=1)
    pool_stats = from_activations(pooled, positions=None)
    found = cluster_layer(ConstructConfig(seed=0), stats, pool_stats, progress=False)
    spec = from_clusters(model, stats, round_to=None, pool_units=found.pool_clustering.n_clusters_)
    expected = UnitClustering(method="arora", window=1, random_state=0).fit(pool_stats).n_clusters_
    assert expected > 0 and spec.pool_proj == expected


def test_no_clusters_means_no_module():
    rng = np.random.default_rng(1)
    noise = torch.from_numpy(rng.standard_normal((300, 12)).astype(np.float32))
    stats = from_activations(noise)
    model = UnitClustering(method="arora").fit(stats)
    assert model.n_clusters_ == 0
    with pytest.raises(StatsError, match="no clusters"):
        from_clusters(model, stats)
    with pytest.raises(StatsError, match="not fitted"):
        from_clusters(UnitClustering(), stats)
