"""LayerStats against direct NumPy computations on the same activations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from stats_helpers import correlated_maps, numpy_cross_corr, pairs

from topo.common.errors import StatsError
from topo.stats.layer_stats import DEAD_EPS, LayerStats, from_activations
from topo.stats.positions import half_offsets, sample_anchors


OFFSETS = [(0, 0), (0, 1), (1, 0), (1, -2), (-2, 1), (-3, -3), (3, 3), (0, -4), (4, 4)]


def test_cov_corr_cross_corr_match_numpy_in_batches():
    x = correlated_maps()
    stats = from_activations(list(torch.from_numpy(x).split(2)), positions=None)
    flat = x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
    assert stats.count == flat.shape[0] and stats.spatial and stats.spatial_shape == (7, 6)
    np.testing.assert_allclose(stats.mean, flat.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.cov(), np.cov(flat.T), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.corr(), np.corrcoef(flat.T), rtol=0, atol=1e-12)
    for dy, dx in OFFSETS:
        a, b = pairs(x, dy, dx)
        expected_cov = (a - a.mean(0)).T @ (b - b.mean(0)) / (len(a) - 1)
        np.testing.assert_allclose(stats.cross_cov(dy, dx), expected_cov, rtol=0, atol=1e-12)
        np.testing.assert_allclose(stats.cross_corr(dy, dx), numpy_cross_corr(x, dy, dx), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.cross_corr(-1, 2), stats.cross_corr(1, -2).T)
    # the maps are spatially smooth, so neighbours correlate: a check that cannot pass by accident
    assert np.diag(stats.cross_corr(1, 1)).min() > 0.3


def test_dense_activations_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    stats = from_activations([torch.from_numpy(x[:15]), torch.from_numpy(x[15:])])
    assert not stats.spatial and stats.spatial_shape is None and stats.offsets == [(0, 0)]
    assert stats.count == 40
    np.testing.assert_allclose(stats.corr(), np.corrcoef(x.T), atol=1e-12)
    with pytest.raises(StatsError, match="offset"):
        stats.cross_corr(0, 1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_large_mean_is_stable(dtype):
    x = correlated_maps(n=8, mean=1e4, dtype=dtype, seed=2)
    stats = from_activations(list(torch.from_numpy(x).split(3)), positions=None)
    x64 = x.astype(np.float64)
    flat = x64.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
    np.testing.assert_allclose(stats.corr(), np.corrcoef(flat.T), rtol=0, atol=1e-12)
    for dy, dx in [(1, 1), (-2, 3)]:
        np.testing.assert_allclose(stats.cross_corr(dy, dx), numpy_cross_corr(x64, dy, dx), rtol=0, atol=1e-12)


def test_coactivation_matches_direct_count():
    x = correlated_maps(seed=3)
    x[:, 4] = -1.0  # never fires: lift 0, not NaN
    threshold = 0.5
    stats = from_activations(torch.from_numpy(x), positions=None, threshold=threshold)
    for dy, dx in [(0, 0), (1, -1), (-2, 0)]:
        a, b = pairs(x, dy, dx)
        fa, fb = (a > threshold).astype(float), (b > threshold).astype(float)
        prob_expected = fa.T @ fb / len(a)
        marginal = np.outer(fa.mean(0), fb.mean(0))
        prob, lift = stats.coactivation(dy, dx)
        np.testing.assert_allclose(prob, prob_expected, atol=1e-15)
        live = marginal > 0
        np.testing.assert_allclose(lift[live], prob_expected[live] / marginal[live], rtol=1e-12)
        assert np.all(lift[~live] == 0) and np.isfinite(lift).all()
    np.testing.assert_allclose(stats.firing_rate, (x > threshold).mean(axis=(0, 2, 3)))


def test_dead_units_have_zero_correlation_and_no_nan():
    x = correlated_maps(seed=4)
    x[:, 1] = 3.0
    x[:, 3] = 0.0
    stats = from_activations(list(torch.from_numpy(x).split(3)), positions=None)
    np.testing.assert_array_equal(stats.dead_units, [1, 3])
    assert stats.variance[[1, 3]].max() <= DEAD_EPS
    for dy, dx in stats.offsets:
        corr = stats.cross_corr(dy, dx)
        assert np.isfinite(corr).all()
        assert not corr[[1, 3]].any() and not corr[:, [1, 3]].any()
        assert all(np.isfinite(m).all() for m in stats.coactivation(dy, dx))
    assert stats.corr()[0, 0] == 1.0 and stats.corr()[1, 1] == 0.0


def test_unit_constant_on_one_side_of_an_offset_gives_zero_not_nan():
    x = correlated_maps(seed=5)
    x[:, 0, 1:, :] = 2.0  # varies only in row 0: constant over the targets of dy=1
    stats = from_activations(torch.from_numpy(x), positions=None)
    corr = stats.cross_corr(1, 0)
    assert np.isfinite(corr).all() and not corr[:, 0].any()
    assert 0 not in stats.dead_units


def test_too_few_observations_and_bad_input_raise_stats_error():
    with pytest.raises(StatsError, match="at least"):
        from_activations(torch.ones(1, 3)).cov()
    with pytest.raises(StatsError, match="at least"):
        LayerStats().corr()
    with pytest.raises(StatsError, match=r"batch 1"):
        from_activations([torch.zeros(2, 3), torch.tensor([[0.0, float("nan"), 1.0]])])
    with pytest.raises(StatsError, match=r"NaN or Inf in batch 0"):
        from_activations(torch.full((2, 3, 4, 4), float("inf")))
    with pytest.raises(StatsError, match=r"\(N, C, H, W\) or \(N, C\)"):
        from_activations(torch.zeros(2, 3, 4))
    with pytest.raises(StatsError, match="earlier batches"):
        from_activations([torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 5, 4)])
    with pytest.raises(StatsError, match="positions"):
        LayerStats(positions=0)


def test_offsets_are_limited_by_the_map_and_max_offset():
    stats = from_activations(torch.randn(4, 2, 3, 8), max_offset=4, positions=None)
    assert len(half_offsets(4, (9, 9))) == 41
    assert max(abs(dy) for dy, _ in stats.offsets) == 2 and max(abs(dx) for _, dx in stats.offsets) == 4
    assert (-2, -4) in stats.offsets and (2, 4) in stats.offsets and len(stats.offsets) == 5 * 9
    with pytest.raises(StatsError, match=r"offset \(3, 0\)"):
        stats.cross_corr(3, 0)


def test_merge_of_two_halves_equals_one_pass():
    x = torch.from_numpy(correlated_maps(n=8, seed=6, mean=5.0))
    whole = from_activations(x, positions=None, threshold=5.0)
    first = from_activations(x[:3], positions=None, threshold=5.0)
    second = from_activations(x[3:] * 1.0 + 0.0, positions=None, threshold=5.0)
    merged = first.merge(second)
    assert merged.count == whole.count and first.count == 3 * 42
    for dy, dx in [(0, 0), (2, -1), (-3, 2)]:
        np.testing.assert_allclose(merged.cross_cov(dy, dx), whole.cross_cov(dy, dx), atol=1e-10)
        np.testing.assert_allclose(merged.cross_corr(dy, dx), whole.cross_corr(dy, dx), atol=1e-12)
        for m, w in zip(merged.coactivation(dy, dx), whole.coactivation(dy, dx)):
            np.testing.assert_allclose(m, w, atol=1e-12)
    np.testing.assert_allclose(merged.mean, whole.mean, atol=1e-12)
    with pytest.raises(StatsError, match="cannot merge"):
        merged.merge(from_activations(torch.randn(4, 3, 7, 6), positions=None))


def test_save_load_round_trip(tmp_path):
    x = torch.from_numpy(correlated_maps(seed=7))
    stats = from_activations(x, positions=3, seed=1, name="inception3a", threshold=0.25)
    path = tmp_path / "stats" / "inception3a.pt"
    stats.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["inception3a.pt"]  # no temporary left behind
    loaded = LayerStats.load(path)
    assert (loaded.name, loaded.count, loaded.threshold, loaded.positions, loaded.spatial_shape) == (
        "inception3a", stats.count, 0.25, 3, (7, 6))
    assert loaded.offsets == stats.offsets and loaded.num_channels == 5
    for dy, dx in [(0, 0), (1, 2), (-4, -1)]:
        np.testing.assert_array_equal(loaded.cross_corr(dy, dx), stats.cross_corr(dy, dx))
        np.testing.assert_array_equal(loaded.coactivation(dy, dx)[1], stats.coactivation(dy, dx)[1])
    # streaming resumes where it stopped: same anchors as an uninterrupted run
    more = torch.from_numpy(correlated_maps(seed=8))
    np.testing.assert_allclose(
        loaded.update(more).corr(), from_activations([x, more], positions=3, seed=1).corr(), atol=1e-12
    )
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(StatsError, match="junk.pt"):
        LayerStats.load(tmp_path / "junk.pt")
    with pytest.raises(StatsError, match="does not exist"):
        LayerStats.load(tmp_path / "missing.pt")


def test_subsampled_path_matches_numpy_on_the_same_anchors():
    x = correlated_maps(n=5, seed=9)
    stats = from_activations(torch.from_numpy(x), positions=4, seed=3, threshold=0.0)
    offsets = half_offsets(4, (7, 6))
    anchors, targets, valid = sample_anchors(5, (7, 6), offsets, 4, torch.Generator().manual_seed(3))
    flat = x.reshape(5, 5, -1)
    anchors, targets, valid = anchors.numpy(), targets.numpy(), valid.numpy()
    for d, (dy, dx) in enumerate(offsets):
        a = np.concatenate([flat[n][:, anchors[n][valid[n, :, d]]].T for n in range(5)])
        b = np.concatenate([flat[n][:, targets[n, :, d][valid[n, :, d]]].T for n in range(5)])
        expected = np.corrcoef(a.T, b.T)[:5, 5:]
        np.testing.assert_allclose(stats.cross_corr(dy, dx), expected, atol=1e-12)
        np.testing.assert_allclose(stats.coactivation(dy, dx)[0], (a > 0).T.astype(float) @ (b > 0) / len(a))
    # targets really are the anchors moved by the offset
    d = offsets.index((1, -2))
    ok = valid[:, :, d]
    np.testing.assert_array_equal(targets[:, :, d][ok], (anchors + 1 * 6 - 2)[ok])
    assert ok.sum() > 5


def test_subsampling_is_seeded_and_close_to_exact():
    x = torch.from_numpy(correlated_maps(n=300, c=4, h=8, w=8, seed=10))
    exact = from_activations(x, positions=None)
    run1 = from_activations(x.split(64), positions=4, seed=0)
    run2 = from_activations(x.split(64), positions=4, seed=0)
    other = from_activations(x.split(64), positions=4, seed=1)
    assert run1.count == 1200
    np.testing.assert_array_equal(run1.cross_corr(1, 2), run2.cross_corr(1, 2))
    assert not np.array_equal(run1.cross_corr(1, 2), other.cross_corr(1, 2))
    # 1200 anchors: the standard error of a correlation is below 1 / sqrt(1200) ~ 0.03
    for dy, dx in [(0, 0), (1, 1), (-2, 3)]:
        assert np.abs(run1.cross_corr(dy, dx) - exact.cross_corr(dy, dx)).max() < 0.12


def test_positions_at_least_the_map_size_is_exact():
    x = torch.from_numpy(correlated_maps(seed=11))
    np.testing.assert_array_equal(
        from_activations(x, positions=42).cross_cov(1, 1), from_activations(x, positions="all").cross_cov(1, 1)
    )


@pytest.mark.parametrize("crops_below", [-1.0, 1.0], ids=["stacked-products", "cropped-products"])
def test_counts_switch_to_float64_before_float32_stops_being_exact(monkeypatch, crops_below):
    import topo.stats.kernels as stats_module
    import topo.stats.layer_stats as layer_stats_module

    monkeypatch.setattr(layer_stats_module, "FLOAT32_EXACT", 100)
    monkeypatch.setattr(stats_module, "_CROPS_BELOW", crops_below)  # float32 counts added into float64 either way
    x = correlated_maps(n=4, seed=12)
    small = from_activations(torch.from_numpy(x[:1]), positions=None, threshold=0.0)  # 42 rows: float32 counts
    assert small._state["joint"].dtype == torch.float32
    stats = from_activations(list(torch.from_numpy(x).split(1)), positions=None, threshold=0.0)  # 168 rows
    assert stats._state["joint"].dtype == torch.float64
    assert small.merge(stats)._state["joint"].dtype == torch.float64
    a, b = pairs(x, 1, 1)
    np.testing.assert_allclose(stats.coactivation(1, 1)[0], (a > 0).T.astype(float) @ (b > 0) / len(a))
