"""How the construction spends its budget and what a layer without clusters becomes."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

import builders
from builders.cost import inception_macs
from builders.from_clusters import VARIANCE_SHARE, from_clusters, reduction_width
from builders.spec import InceptionSpec
from topo.cluster import UnitClustering
from topo.construct.config import ConstructConfig, skeleton_plan
from topo.construct.budget import discovered_base, fit_network_to_budget, head_macs, module_budget, module_weights
from builders.cost import network_macs
from topo.common.errors import UserError
from topo.stats.layer_stats import from_activations

HW = (20, 20)


@pytest.fixture(scope="module")
def reference():
    return builders.googlenet_spec("small", num_classes=11, width_mult=0.125, in_channels=1, input_size=20)


def test_reference_split_follows_googlenet_and_adds_up(reference):
    """With the reference's skeleton, module budgets are the reference modules' own costs, and the modules
    plus stem, poolings and head add up to the total."""
    plan = skeleton_plan("2,pool,5,pool,2", reference)
    weights = module_weights(plan, reference, HW, "reference")
    shapes = reference.input_shapes(HW)
    own = [inception_macs(m, *shapes[m.name][1:], kernel5x5=reference.kernel5x5) for m in reference.inception_modules()]
    assert weights == [float(w) for w in own]
    total = network_macs(reference, HW)
    base = head_macs(reference, HW)
    spent, budgets = base, []
    for index, macs in enumerate(own):  # spending each module's share exactly as the reference does
        budgets.append(module_budget(total, spent, weights, index))
        spent += macs
    assert np.allclose(budgets, own, rtol=1e-9)
    assert base + sum(budgets) == pytest.approx(total, rel=1e-9)


def test_data_split_is_one_scale_factor_on_the_whole_network(reference):
    """The 'data' split keeps the modules' widths relative to each other and meets the total budget."""
    base = discovered_base(ConstructConfig(), reference, HW)
    a = InceptionSpec(base.out_channels, 6, 4, 10, 2, 30, 3, name="inception3a")
    b = InceptionSpec(a.out_channels, 40, 0, 0, 0, 0, 5, name="inception3b")
    grown = dataclasses.replace(base, stages=(a, b))
    budget = 0.5 * network_macs(grown, HW)
    scaled = fit_network_to_budget(grown, budget, HW, round_to=1)
    total = network_macs(scaled, HW)
    assert total <= budget and total >= 0.95 * budget
    sa, sb = scaled.inception_modules()
    assert sb.in_channels == sa.out_channels  # channels re-chained
    assert sb.ch3x3 == 0 and sb.ch5x5 == 0  # absent branches stay absent
    ratios = [sa.ch5x5 / a.ch5x5, sa.ch1x1 / a.ch1x1, sb.ch1x1 / b.ch1x1]
    assert max(ratios) - min(ratios) < 0.25  # one factor, up to rounding to whole channels
    builders.build(scaled)(torch.zeros(2, 1, *HW))
    with pytest.raises(UserError, match="stem and head"):
        fit_network_to_budget(grown, 10.0, HW, round_to=1)


def _no_cluster_stats(channels=12, strong=4, n=600, seed=0):
    """Units that never fire together beyond chance: independent Gaussians, ``strong`` of them 10x wider."""
    rng = np.random.default_rng(seed)
    scale = np.where(np.arange(channels) < strong, 5.0, 0.5)
    x = rng.standard_normal((n, channels)) * scale
    return x, from_activations(torch.from_numpy(x.astype(np.float32)))


def test_data_fallback_is_the_layers_principal_dimension():
    x, stats = _no_cluster_stats()
    clustering = UnitClustering(method="arora").fit(stats)
    assert clustering.n_clusters_ == 0
    module = from_clusters(clustering, stats, round_to=None, fallback="data", name="m", pool_units=0)
    ratios = np.cumsum(PCA().fit(x).explained_variance_ratio_)
    expected = int(np.searchsorted(ratios, VARIANCE_SHARE - 1e-12) + 1)
    assert expected == 4  # the strong units
    assert (module.ch1x1, module.ch3x3, module.ch5x5, module.pool_proj) == (expected, 0, 0, 0)
    budgeted = from_clusters(clustering, stats, budget=10_000, round_to=None, fallback="data", name="m",
                             pool_units=2)
    assert budgeted.ch3x3 == budgeted.ch5x5 == 0 and budgeted.ch1x1 >= expected
    assert inception_macs(budgeted, 1, 1) <= 10_000


def test_reference_fallback_counts_the_budget_with_the_modules_own_kernel():
    """analyze's fallback on torchvision's GoogLeNet (its '5x5' branch is 3x3): at the hand module's own cost
    the suggestion is the hand module, not a narrower one counted with true 5x5 kernels."""
    hw = (7, 7)
    maps = torch.randn(60, 16, *hw, generator=torch.Generator().manual_seed(0))
    stats = from_activations(maps, max_offset=2)
    clustering = UnitClustering(method="arora", window=3).fit(stats)
    assert clustering.n_clusters_ == 0
    hand = InceptionSpec(16, 8, 8, 16, 4, 8, 8, name="inception3a")
    cost = inception_macs(hand, *hw, kernel5x5=3)
    suggested = from_clusters(clustering, stats, budget=cost, round_to=8, fallback=hand, name=hand.name,
                              kernel5x5=3)
    assert suggested.widths == hand.widths
    counted_as_5x5 = from_clusters(clustering, stats, budget=cost, round_to=8, fallback=hand, name=hand.name)
    assert inception_macs(counted_as_5x5, *hw) <= cost and counted_as_5x5.widths != hand.widths


def test_one_cluster_does_not_take_the_whole_budget():
    """The budget is a ceiling: a layer with a single cluster grows to at most max_scale units per cluster."""
    from topo.cluster.clusters import Cluster

    _, stats = _no_cluster_stats(channels=8)
    clustering = UnitClustering(method="arora").fit(stats)
    clustering.clusters_ = [Cluster(members=((0, 0, 0), (1, 0, 0), (2, 0, 0)), kernel_size=1)]
    huge = 10 ** 7
    uncapped = from_clusters(clustering, stats, budget=huge, round_to=None, pool_units=0, fallback="data")
    capped = from_clusters(clustering, stats, budget=huge, round_to=None, pool_units=0, fallback="data",
                           max_scale=8)
    carry = reduction_width(np.asarray(stats.cov(), dtype=np.float64), range(3, 8))  # the channels it leaves
    assert uncapped.ch1x1 > 1000 and capped.ch1x1 == 8 + carry and carry >= 1
    with pytest.raises(UserError, match="below 1"):
        ConstructConfig(max_units_per_cluster=0.5)
