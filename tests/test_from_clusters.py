"""Clusters -> InceptionSpec: branch counts, reductions, pool projection, rounding, budget."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from builders.cost import inception_macs
from builders.from_clusters import POOL_SHARE, from_clusters, reduction_width
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


def test_branch_widths_are_cluster_counts(fitted):
    _, stats, model = fitted
    spec = from_clusters(model, stats, round_to=None)
    kc = model.kernel_counts_
    assert (spec.ch1x1, spec.ch3x3, spec.ch5x5) == (kc[1], kc[3], kc[5])
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


def test_budget_is_met_by_one_scale_factor(fitted):
    _, stats, model = fitted
    base = from_clusters(model, stats, round_to=None)
    H, W = stats.spatial_shape
    for factor in (4, 0.5):  # scaled up and down
        budget = factor * inception_macs(base, H, W)
        spec = from_clusters(model, stats, round_to=None, budget=budget)
        got = inception_macs(spec, H, W)
        assert 0.85 * budget <= got <= budget, factor  # integer widths of a small module: coarse steps
        # one scale on all branch outputs: their ratios are kept (up to integer rounding)
        ratio = np.array([spec.ch1x1, spec.ch3x3, spec.ch5x5]) / np.array([base.ch1x1, base.ch3x3, base.ch5x5])
        assert ratio.max() - ratio.min() < 0.25 * factor, factor
        assert (ratio < 1).all() if factor < 1 else (ratio > 1).all()
    budget = 4 * inception_macs(base, H, W)
    rounded = from_clusters(model, stats, round_to=8, budget=budget)
    assert inception_macs(rounded, H, W) <= budget
    assert all(getattr(rounded, n) % 8 == 0 for n in ("ch1x1", "ch3x3", "ch5x5", "pool_proj"))
    with pytest.raises(StatsError, match="budget"):
        from_clusters(model, stats, budget=10)


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
