"""`topo.construct.hebbian.hebbian_init_` on planted statistics with known 1x1, 3x3 and 5x5 clusters.

Each filter must sit exactly on its cluster: a 1x1 filter on the cluster's
channels, a 3x3 / 5x5 filter (composed with its branch's reduction) on the
cluster's (channel, offset) members; a reduction narrower than the channels its
branch reads holds the leading eigenvectors (numpy ``eigh``) of their
correlation, ``stats.corr()``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from builders.from_clusters import clusters_by_branch, from_clusters, reduction_width, uncovered_channels
from builders.inception import Inception
from topo.cluster import UnitClustering, aligned_jaccard
from topo.construct.hebbian import hebbian_init_
from topo.planted.generator import PlantedConfig, generate
from topo.stats.layer_stats import from_activations

CONFIG = PlantedConfig(num_channels=40, num_hidden=9, degree=4, kernel_mix=(1, 1, 1), density=0.03, num_samples=64,
                       height=12, width=12, disjoint=True, seed=3)


@pytest.fixture(scope="module")
def planted(one_thread_module):
    sample = generate(CONFIG)
    stats = from_activations(torch.from_numpy(sample.activations), threshold=0.0)
    clustering = UnitClustering(method="arora", random_state=0, progress=False).fit(stats)
    return sample, stats, clustering


def _module(clustering, stats, **kwargs) -> Inception:
    spec = from_clusters(clustering, stats, budget=None, round_to=None, **kwargs)
    torch.manual_seed(0)
    module = Inception(spec, kernel5x5=5)
    return hebbian_init_(module, clustering, stats)


def _footprint(cluster, kernel: int) -> np.ndarray:
    """(channels, k, k) indicator of the cluster's members at their offsets in a k x k filter."""
    out = np.zeros((max(c for c, _, _ in cluster.members) + 1, kernel, kernel), dtype=bool)
    r = kernel // 2
    for c, dy, dx in cluster.members:
        out[c, dy + r, dx + r] = True
    return out


def test_the_planted_statistics_hold_every_kernel_class(planted):
    sample, _, clustering = planted
    assert all(clustering.kernel_counts_[k] >= 2 for k in (1, 3, 5)), clustering.kernel_counts_
    for cluster in clustering.clusters_:  # the clusters are the planted supports
        assert max(aligned_jaccard(cluster.members, s) for s in sample.truth.supports) == 1.0


def test_each_filter_is_non_zero_exactly_on_its_clusters_channels_and_offsets(planted):
    _, stats, clustering = planted
    module = _module(clustering, stats, reduce_to_channels=True)  # --budget none: one unit per cluster
    by_branch = clusters_by_branch(clustering.clusters_)
    inputs = module.input_weights()
    C = stats.num_channels
    one = inputs[1].detach().numpy()[:, :, 0, 0]
    uncovered = uncovered_channels(clustering.clusters_, stats)
    carry = reduction_width(np.asarray(stats.cov(), dtype=np.float64), uncovered)
    assert uncovered and carry >= 1 and one.shape[0] == len(by_branch[1]) + carry
    for f, cluster in enumerate(by_branch[1]):
        expected = np.zeros(C, dtype=bool)
        expected[list(cluster.channels)] = True
        np.testing.assert_array_equal(one[f] != 0, expected)
    carried = one[len(by_branch[1]):]  # the carry path: only the channels no cluster draws on
    outside = np.setdiff1d(np.arange(C), uncovered)
    assert not carried[:, outside].any() and (np.abs(carried[:, uncovered]).sum(axis=1) > 0).all()
    assert np.linalg.matrix_rank(carried) == carry  # distinct principal directions, not copies
    for kernel in (3, 5):
        reduce = inputs[kernel].detach().numpy()[:, :, 0, 0]  # (reduced, C)
        spatial = module.spatial_weight(kernel).detach().numpy()  # (filters, reduced, k, k)
        assert spatial.shape[0] == len(by_branch[kernel])
        composite = np.einsum("frij,rc->fcij", spatial, reduce)  # each filter over the input channels
        for f, cluster in enumerate(by_branch[kernel]):
            expected = np.zeros((C, kernel, kernel), dtype=bool)
            fp = _footprint(cluster, kernel)
            expected[: fp.shape[0]] = fp
            np.testing.assert_array_equal(composite[f] != 0, expected)


def test_filters_keep_the_norm_of_their_random_initialisation(planted):
    _, stats, clustering = planted
    spec = from_clusters(clustering, stats, budget=None, round_to=None, reduce_to_channels=True)
    torch.manual_seed(0)
    fresh = Inception(spec, kernel5x5=5)
    torch.manual_seed(0)
    module = hebbian_init_(Inception(spec, kernel5x5=5), clustering, stats)
    for kernel in (3, 5):
        before = fresh.spatial_weight(kernel).detach().flatten(1).norm(dim=1)
        after = module.spatial_weight(kernel).detach().flatten(1).norm(dim=1)
        torch.testing.assert_close(after, before)


def test_a_narrow_reduction_holds_the_leading_eigenvectors_of_the_correlation(planted):
    _, stats, clustering = planted
    module = _module(clustering, stats)  # widths from the data's dimension: reductions narrower than their inputs
    corr = stats.corr()
    by_branch = clusters_by_branch(clustering.clusters_)
    checked = 0
    for kernel in (3, 5):
        reduce = module.input_weights()[kernel].detach().numpy()[:, :, 0, 0].astype(np.float64)
        drawn = sorted({c for cl in by_branch[kernel] for c, _, _ in cl.members})
        if reduce.shape[0] >= len(drawn):
            continue
        values, vectors = np.linalg.eigh(corr[np.ix_(drawn, drawn)])
        top = vectors[:, np.argsort(values)[::-1][: reduce.shape[0]]]
        outside = np.setdiff1d(np.arange(stats.num_channels), drawn)
        assert np.all(reduce[:, outside] == 0)
        for row, vector in zip(reduce[:, drawn], top.T):
            unit = row / np.linalg.norm(row)
            assert abs(unit @ vector) == pytest.approx(1.0, abs=1e-5)  # the same direction (the sign is free)
            assert unit.sum() >= -1e-9  # oriented to a positive sum, as documented
        checked += 1
    assert checked == 2  # both branches were narrower than their channels, so both were checked


def test_the_pooling_projection_sums_the_pooled_maps_clusters(planted):
    """With the pooled map's clusters, filter f of the pooling projection is non-zero exactly on the channels
    of pooled cluster f (the clusters of the layer itself stand in for them here: any 1x1 clustering will do)."""
    _, stats, clustering = planted
    pooled = UnitClustering(method="arora", window=1, random_state=0, progress=False).fit(stats)
    assert pooled.n_clusters_ >= 2
    spec = from_clusters(clustering, stats, budget=None, round_to=None, pool_units=pooled.n_clusters_)
    torch.manual_seed(0)
    random_init = Inception(spec, kernel5x5=5)
    before = random_init.pool_weight().detach().clone()
    module = hebbian_init_(random_init, clustering, stats, pooled)
    weight = module.pool_weight().detach()[:, :, 0, 0].numpy()
    for f, cluster in enumerate(pooled.clusters_):
        expected = np.zeros(spec.in_channels, dtype=bool)
        expected[[c for c, _, _ in cluster.members]] = True
        assert np.array_equal(weight[f] != 0, expected)
        assert np.isclose(np.linalg.norm(weight[f]), before[f].norm().item(), rtol=1e-5)  # the scale is kept
    untouched = hebbian_init_(Inception(spec, kernel5x5=5), clustering, stats)  # no pooled clusters: random
    assert np.count_nonzero(untouched.pool_weight().detach().numpy()) == untouched.pool_weight().numel()
