"""The clustering on a real layer (digits through a briefly trained stem): the neighbour cap's known outcome.

On such a layer far more pairs pass the Hebbian test than ``max_degree`` edges per unit, so ``min_lift="auto"``
keeps the strongest ``max_degree x alive units`` edges by lift. The test recomputes that outcome from the
uncapped graph with numpy and checks the estimator's decisions against it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import builders
from topo.cluster import UnitClustering
from topo.cluster.window import DEFAULT_MIN_LIFT, build_window_graph
from topo.data import load, make_loader
from topo.stats.recording import record
from topo.train.config import TrainConfig
from topo.train.trainer import train

pytestmark = pytest.mark.slow  # one epoch of training and a recording: seconds


@pytest.fixture(scope="module")
def real_layer():
    digits = load("digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        spec = builders.googlenet_spec("small", num_classes=10, width_mult=0.25, in_channels=1, input_size=8)
        net = train(builders.build(spec), digits.train, digits.val,
                    TrainConfig(epochs=1, batch_size=64, workers=0, progress=False, device="cpu")).model
        loader = make_loader(digits.train, batch_size=64, train=False, seed=0, workers=0, device="cpu",
                             distributed=False)
        return record(net.eval(), loader, ["inception3a:input"], max_batches=8, progress=False)["inception3a:input"]
    finally:
        torch.set_num_threads(threads)


def test_the_neighbour_cap_keeps_the_strongest_edges(real_layer):
    stats, reach, max_degree = real_layer, 2, 64
    uncapped = build_window_graph(stats, reach, min_lift=DEFAULT_MIN_LIFT, max_degree=max_degree)
    capped = build_window_graph(stats, reach, min_lift="auto", max_degree=max_degree)
    keep = max_degree * int(uncapped.alive.sum())
    assert uncapped.edges.sum() > keep  # the cap path is taken on this layer
    # the known outcome, from the uncapped graph: the keep-th largest lift is the threshold
    lifts = []
    for o in range(len(uncapped.offsets)):
        rows, cols = np.nonzero(uncapped.edges[o])
        lifts.append(_lifts(stats, uncapped.offsets[o], rows, cols))
    lifts = np.sort(np.concatenate(lifts))[::-1]
    assert capped.lift_threshold == pytest.approx(lifts[keep - 1], rel=1e-5)
    assert capped.lift_threshold > DEFAULT_MIN_LIFT
    assert np.all(capped.edges <= uncapped.edges)  # only removes edges
    ties = int(np.sum(np.isclose(lifts, lifts[keep - 1], rtol=1e-6)))
    assert keep <= capped.edges.sum() <= keep + ties


def _lifts(stats, offset, rows, cols):
    """Lift of each (row, col) pair at ``offset``: co-firing probability over the product of the rates."""
    prob, _ = stats.coactivation(int(offset[0]), int(offset[1]))
    rate = np.asarray(stats.firing_rate, dtype=np.float64)
    return np.asarray(prob, dtype=np.float64)[rows, cols] / (rate[rows] * rate[cols])


def test_the_estimator_uses_the_capped_graph(real_layer):
    model = UnitClustering(method="arora", window=5, random_state=0, progress=False).fit(real_layer)
    graph = build_window_graph(real_layer, 2, min_lift="auto", max_degree=model.max_degree)
    assert model.n_edges_ == int(graph.edges.sum()) // 2  # each unordered pair at +offset and -offset once
    assert model.n_clusters_ > 0
    assert sum(model.kernel_counts_.values()) == model.n_clusters_


def test_a_channel_and_its_own_translates_are_never_one_cluster(real_layer):
    """docs/clustering.md: a channel paired with its own translate is never an edge (the map's smoothness). On
    this layer most channels fire with their neighbouring translate far above chance, so the rule is needed."""
    stats = real_layer
    prob, _ = stats.coactivation(0, 1)
    rate = np.asarray(stats.firing_rate, dtype=np.float64)
    alive = rate > 0
    self_lift = np.diag(np.asarray(prob, dtype=np.float64))[alive] / rate[alive] ** 2
    assert np.median(self_lift) > DEFAULT_MIN_LIFT  # translates co-fire: the case the rule is for
    graph = build_window_graph(stats, 2, min_lift=DEFAULT_MIN_LIFT, max_degree=10**6)
    assert not graph.edges[:, np.arange(stats.num_channels), np.arange(stats.num_channels)].any()
    model = UnitClustering(window=5, random_state=0, progress=False).fit(stats)
    assert model.n_clusters_ > 0
    for cluster in model.clusters_:
        assert len(cluster.channels) == len(cluster.members), cluster.members


def test_one_offset_per_channel_keeps_the_best_linked_translate():
    from topo.cluster.estimator import one_offset_per_channel

    chans = np.array([7, 3, 3, 5, 3])  # the anchor (7), then channel 3 at three offsets, and 5
    weight = np.zeros((5, 5))
    for a, b, w in [(0, 1, 1.0), (0, 2, 2.0), (2, 3, 1.0), (0, 3, 1.0), (0, 4, 2.0), (4, 3, 1.0)]:
        weight[a, b] = weight[b, a] = w
    kept = one_offset_per_channel(np.arange(5), chans, weight)
    assert kept.tolist() == [0, 2, 3]  # node 2 and node 4 link equally (3.0): the first is kept
    assert one_offset_per_channel(np.array([0, 1, 3]), chans, weight).tolist() == [0, 1, 3]
