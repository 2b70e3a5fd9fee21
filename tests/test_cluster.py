"""Correlation clustering on planted structure: recovery, translation, determinism, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from planted_configs import FLAT, SPATIAL

from topo.cluster import Cluster, UnitClustering, adjusted_rand, aligned_jaccard, recovery_scores
from topo.cluster.clusters import extent, kernel_for_extent
from topo.cluster.window import through_translates
from topo.common.errors import StatsError, UserError
from topo.planted.generator import generate
from topo.stats.layer_stats import from_activations

HARD = ("spectral", "agglomerative", "louvain")


@pytest.fixture(scope="module")
def spatial():
    planted = generate(SPATIAL)
    stats = from_activations(torch.from_numpy(planted.activations), positions=None)
    return planted, stats


@pytest.fixture(scope="module")
def flat():
    planted = generate(FLAT)
    return planted, from_activations(torch.from_numpy(planted.activations))


# ---------------------------------------------------------------- Cluster


def test_translated_copies_are_one_cluster():
    members = [(3, 0, 0), (7, 1, 2), (9, -1, 1)]
    shifted = [(c, dy + 2, dx - 1) for c, dy, dx in members]
    a, b = Cluster.from_members(members), Cluster.from_members(shifted)
    assert a == b
    assert a.kernel_size == 3 and a.channels == (3, 7, 9)
    assert a.footprint == tuple(sorted((dy, dx) for _, dy, dx in a.members))
    assert Cluster.from_members([(1, 0, 0), (2, 0, 0)]).kernel_size == 1
    assert Cluster.from_members([(1, -2, 0), (2, 2, 0)]).kernel_size == 5
    assert Cluster.from_members([(1, 0, 0), (2, 0, 3)]).kernel_size == 5  # extent 4 needs a 5x5
    assert Cluster.from_dict(a.to_dict()) == a


def test_aligned_overlap_equals_the_best_shift_by_brute_force():
    from topo.cluster.metrics import aligned_overlap

    rng = np.random.default_rng(0)
    for _ in range(50):
        a = {(int(c), int(y), int(x)) for c, y, x in rng.integers([0, -3, -3], [6, 4, 4], size=(12, 3))}
        b = {(int(c), int(y), int(x)) for c, y, x in rng.integers([0, -3, -3], [6, 4, 4], size=(10, 3))}
        brute = max(len(a & {(c, y + sy, x + sx) for c, y, x in b}) for sy in range(-6, 7) for sx in range(-6, 7))
        assert aligned_overlap(a, b) == brute
    with pytest.raises(ValueError, match="offsets"):
        aligned_overlap([(0, 64, 0)], [(0, 0, 0)])


def test_aligned_jaccard_ignores_translation():
    a = [(1, 0, 0), (2, 1, 0), (3, 0, 1)]
    b = [(c, dy - 3, dx + 2) for c, dy, dx in a]
    assert aligned_jaccard(a, b) == 1.0
    assert aligned_jaccard(a, b[:2]) == pytest.approx(2 / 3)
    assert aligned_jaccard(a, [(1, 0, 0), (2, 2, 0)]) == pytest.approx(1 / 4)  # one member lines up at a time


# ---------------------------------------------------------------- recovery


@pytest.mark.parametrize("method", ("arora",) + HARD)
def test_recovers_planted_supports_and_kernel_classes(spatial, method):
    planted, stats = spatial
    model = UnitClustering(method=method, window=5, random_state=0).fit(stats)
    score = recovery_scores(planted.truth, model)
    assert score["jaccard"] >= 0.8, score
    assert score["max_count_error"] <= 0.10, score
    n_true = len(planted.truth.supports)
    assert abs(model.n_clusters_ - n_true) <= 0.1 * n_true  # about one cluster per planted unit
    for kernel, count in planted.truth.kernel_counts.items():  # and about as many of each kernel
        assert abs(model.kernel_counts_.get(kernel, 0) - count) <= max(1, 0.1 * count), kernel
    exact = 0
    for cluster in model.clusters_:
        assert max(max(abs(dy), abs(dx)) for _, dy, dx in cluster.members) <= 2
        best = max(planted.truth.supports, key=lambda support: aligned_jaccard(support, cluster.members))
        if aligned_jaccard(best, cluster.members) == 1.0:  # a recovered support needs its footprint's kernel
            assert cluster.kernel_size == kernel_for_extent(extent(best))
            exact += 1
    assert exact >= 0.8 * model.n_clusters_


def _one_pair(lifts: dict, own: dict, reach: int = 1):
    """Edges and lifts of two channels (0, 1) at every offset within ``reach``: ``lifts[(dy, dx)]`` is the pair's
    lift (an edge wherever given), ``own[(dy, dx)]`` both channels' lift with their own translate."""
    offsets = np.array([(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)])
    lift = np.ones((len(offsets), 2, 2), dtype=np.float32)
    edges = np.zeros((len(offsets), 2, 2), dtype=bool)
    for o, (dy, dx) in enumerate(offsets):
        for (ly, lx), value in lifts.items():
            if (dy, dx) == (ly, lx):
                lift[o, 0, 1] = value
                edges[o, 0, 1] = True
            if (dy, dx) == (-ly, -lx):  # (1 at p, 0 at p - d) is the same pair
                lift[o, 1, 0] = value
                edges[o, 1, 0] = True
        lift[o, 0, 0] = lift[o, 1, 1] = own.get((abs(dy), abs(dx)), own.get((abs(dx), abs(dy)), 1.0))
    index = {(int(dy), int(dx)): o for o, (dy, dx) in enumerate(offsets)}
    return edges, lift, offsets, index


def test_an_edge_a_translate_explains_is_dropped_and_a_spread_pair_is_kept():
    """Two channels that fire together at one place, on smooth maps: the pair's weaker co-firing one position
    over is the translate's doing (dropped); on rough maps, or where the far offset is the stronger, both stay.
    The drop is symmetric under d -> -d, and a tie explains nothing."""
    smooth = {(0, 0): 9.0, (0, 1): 5.0, (1, 0): 5.0, (1, 1): 4.0}
    edges, lift, offsets, index = _one_pair({(0, 0): 6.0, (0, 1): 4.0}, smooth)
    dropped = through_translates(edges, lift, offsets, reach=1)
    assert dropped[index[(0, 1)], 0, 1] and dropped[index[(0, -1)], 1, 0]
    assert not dropped[index[(0, 0)]].any() and dropped.sum() == 2
    rough = {(0, 0): 9.0, (0, 1): 1.5, (1, 0): 1.5, (1, 1): 1.2}
    edges, lift, offsets, index = _one_pair({(0, 0): 6.0, (0, 1): 4.0}, rough)
    assert not through_translates(edges, lift, offsets, reach=1).any()
    edges, lift, offsets, index = _one_pair({(0, 0): 2.0, (1, 1): 6.0}, rough)  # a spread pair: far is strongest
    dropped = through_translates(edges, lift, offsets, reach=1)
    assert not dropped[index[(1, 1)]].any()
    edges, lift, offsets, index = _one_pair({(0, 0): 4.0, (0, 1): 4.0}, smooth)  # a tie
    assert not through_translates(edges, lift, offsets, reach=1).any()


def test_dropping_explained_edges_keeps_every_planted_kernel(spatial):
    """On the planted layer (no smoothness of its own: units on independently at each position) nothing is
    explained by a translate, so the clusters and their kernels stay the truth's (the rule tried before,
    the smallest window holding half the evidence, demoted a true 5x5 here)."""
    planted, stats = spatial
    plain = UnitClustering(method="arora", window=5, random_state=0, progress=False).fit(stats)
    direct = UnitClustering(method="arora", window=5, random_state=0, progress=False, direct_only=True).fit(stats)
    assert direct.kernel_counts_ == plain.kernel_counts_ == planted.truth.kernel_counts
    assert direct.clusters_ == plain.clusters_


def test_translated_copies_count_once(spatial):
    """Every member of a support anchors a translated copy of it; exactly one cluster must remain per support."""
    planted, stats = spatial
    model = UnitClustering(method="arora", random_state=0).fit(stats)
    for support in planted.truth.supports:
        matches = [c for c in model.clusters_ if aligned_jaccard(support, c.members) >= 0.5]
        assert len(matches) == 1
    for i, a in enumerate(model.clusters_):
        for b in model.clusters_[i + 1:]:
            assert aligned_jaccard(a.members, b.members) < 0.5


@pytest.mark.parametrize("method", HARD)
def test_non_spatial_partition_ari(flat, method):
    planted, stats = flat
    model = UnitClustering(method=method, random_state=0).fit(stats)
    assert model.labels_.shape == (FLAT.num_channels,)
    assert adjusted_rand(planted.truth.labels, model.labels_) >= 0.9
    assert set(model.kernel_counts_) >= {1, 3, 5} and model.kernel_counts_[3] == model.kernel_counts_[5] == 0


def test_arora_overlapping_has_no_hard_labels(flat):
    planted, stats = flat
    model = UnitClustering(method="arora").fit(stats)
    assert model.labels_ is None
    assert adjusted_rand(planted.truth.labels, model.channel_labels_) >= 0.9


# ---------------------------------------------------------------- estimator conventions


@pytest.mark.parametrize("method", ("spectral", "louvain"))
def test_same_random_state_same_clusters(spatial, method):
    _, stats = spatial
    a = UnitClustering(method=method, random_state=7).fit(stats)
    b = UnitClustering(method=method, random_state=7).fit(stats)
    assert a.clusters_ == b.clusters_
    np.testing.assert_array_equal(a.channel_labels_, b.channel_labels_)


def test_n_clusters_and_cap(spatial, flat):
    _, stats = spatial
    assert UnitClustering(n_clusters=5).fit(stats).n_clusters_ == 5
    assert UnitClustering(max_clusters=3).fit(stats).n_clusters_ == 3
    _, fstats = flat
    for method in HARD:
        assert UnitClustering(method=method, n_clusters=8, min_size=1).fit(fstats).n_clusters_ == 8, method
        capped = UnitClustering(method=method, max_clusters=5, min_size=1).fit(fstats)
        assert capped.n_clusters_ == 5, method
        assert max(len(c) for c in capped.clusters_) < fstats.num_channels / 2, method  # a cap never lumps


def test_fewer_clusters_than_asked_is_a_warning(spatial):
    _, stats = spatial
    with pytest.warns(UserWarning, match="n_clusters"):
        model = UnitClustering(n_clusters=500, progress=False).fit(stats)
    assert model.n_clusters_ < 500


def test_a_map_smaller_than_the_window_needs_only_its_own_offsets():
    acts = torch.from_numpy(np.random.default_rng(0).random((400, 6, 3, 3), dtype=np.float32))
    stats = from_activations(acts, max_offset=2, positions=None)
    model = UnitClustering(window=5, progress=False).fit(stats)  # 3x3 map: offsets up to 2 are all there are
    assert model.n_clusters_ == 0  # independent uniform noise: nothing fires together
    with pytest.raises(StatsError, match="max_offset=2"):
        UnitClustering(window=5, progress=False).fit(from_activations(acts, max_offset=1, positions=None))


def test_fit_needs_layer_stats():
    with pytest.raises(UserError, match="LayerStats"):
        UnitClustering().fit(np.eye(4))


def test_channel_order_groups_clusters(spatial):
    _, stats = spatial
    model = UnitClustering(method="agglomerative").fit(stats)
    order = model.channel_order_
    assert sorted(order.tolist()) == list(range(SPATIAL.num_channels))
    seq = model.channel_labels_[order]
    assigned = seq[seq >= 0]
    assert (np.diff(assigned) >= 0).all()  # contiguous blocks, best cluster first
    assert (seq[len(assigned):] == -1).all()


def test_dead_units_are_left_out():
    planted = generate(SPATIAL)
    acts = planted.activations.copy()
    dead = [0, 5, 17]
    acts[:, dead] = 0.0
    stats = from_activations(torch.from_numpy(acts), positions=None)
    for method in ("arora", "agglomerative"):
        model = UnitClustering(method=method).fit(stats)
        np.testing.assert_array_equal(np.sort(model.dead_units_), dead)
        used = {c for cl in model.clusters_ for c in cl.channels}
        assert not used & set(dead)
        assert (model.channel_labels_[dead] == -1).all()
        assert set(model.channel_order_[-3:].tolist()) == set(dead)


# ---------------------------------------------------------------- bad input


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_too_few_observations():
    stats = from_activations(torch.rand(20, 8))
    with pytest.raises(StatsError) as err:
        UnitClustering().fit(stats)
    assert "observations" in _one_line(err) and "record at least" in str(err.value)


def test_all_units_dead():
    stats = from_activations(torch.zeros(200, 6))
    with pytest.raises(StatsError) as err:
        UnitClustering().fit(stats)
    assert "dead" in _one_line(err)


def test_offsets_too_small_for_window():
    stats = from_activations(torch.rand(4, 6, 8, 8), max_offset=2, positions=None)
    with pytest.raises(StatsError) as err:
        UnitClustering(window=5).fit(stats)
    assert "max_offset=4" in _one_line(err)
    UnitClustering(window=3).fit(stats)  # a 3x3 window needs offsets up to 2 only


def test_bad_parameters():
    stats = from_activations(torch.rand(200, 6))
    with pytest.raises(UserError, match="method"):
        UnitClustering(method="kmeans").fit(stats)
    with pytest.raises(UserError, match="window"):
        UnitClustering(window=4).fit(stats)
    for bad in (0, 1.5, "two", True):
        with pytest.raises(UserError, match="n_jobs must be None"):
            UnitClustering(n_jobs=bad).fit(stats)


@pytest.mark.parametrize("params, name", [
    ({"method": "kmeans"}, "method"),
    ({"window": 4}, "window"),
    ({"window": 0}, "window"),
    ({"n_clusters": 0}, "n_clusters"),
    ({"n_clusters": "many"}, "n_clusters"),
    ({"max_levels": 0}, "max_levels"),
    ({"n_jobs": 0}, "n_jobs"),
    ({"max_clusters": 0}, "max_clusters"),
])
def test_bad_parameters_are_value_errors(params, name):
    """scikit-learn's contract: an invalid parameter raises ValueError; topo's CLI needs a UserError."""
    stats = from_activations(torch.rand(200, 6))
    with pytest.raises(ValueError, match=name) as err:
        UnitClustering(**params).fit(stats)
    assert isinstance(err.value, UserError)


# ---------------------------------------------------------------- the window cut


def test_window_mask_keeps_the_fullest_placement_by_brute_force():
    from topo.cluster.estimator import _window_mask

    rng = np.random.default_rng(0)
    for _ in range(200):
        window = int(rng.choice([1, 3, 5]))
        n = int(rng.integers(1, 12))
        offs = np.vstack([[0, 0], rng.integers(-(window - 1), window, size=(n - 1, 2))]) if n > 1 else np.zeros((1, 2), int)
        keep, cut = _window_mask(offs, window)
        width = (offs.max(axis=0) - offs.min(axis=0)).max() + 1
        assert cut == (width > window)
        if not cut:
            assert keep.all() and len(keep) == n
            continue
        best = None  # placements [ty, ty + window) x [tx, tx + window) holding the anchor, top-left first
        for ty in range(-(window - 1), 1):
            for tx in range(-(window - 1), 1):
                held = [i for i, (y, x) in enumerate(offs) if ty <= y < ty + window and tx <= x < tx + window]
                if best is None or len(held) > len(best):
                    best = held
        assert np.flatnonzero(keep).tolist() == best


def test_window_cuts_are_counted():
    wide = generate(SPATIAL, degree=6, kernel_mix=(0.0, 0.0, 1.0))  # only 5x5 supports
    stats = from_activations(torch.from_numpy(wide.activations), positions=None)
    narrow = UnitClustering(window=3, progress=False).fit(stats)  # ... seen through a 3x3 window
    assert 0 < narrow.n_window_cuts_ <= narrow.n_candidates_
    assert all(narrow.cut_kernel_counts_[k] <= narrow.kernel_counts_[k] for k in narrow.kernel_counts_)
    assert narrow.cut_kernel_counts_[3] > 0 and narrow.kernel_counts_[5] == 0
    ones = generate(SPATIAL, kernel_mix=(1.0, 0.0, 0.0))
    model = UnitClustering(progress=False).fit(from_activations(torch.from_numpy(ones.activations), positions=None))
    assert model.n_window_cuts_ == 0 and sum(model.cut_kernel_counts_.values()) == 0 and model.n_candidates_ > 0
