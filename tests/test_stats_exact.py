"""The exact path of LayerStats against float64 NumPy references, with either way of multiplying a batch: one
stacked product for all offsets, or offset by offset on crops of the map (every test here runs with both)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from stats_helpers import correlated_maps, numpy_cross_corr, pairs

import topo.stats.kernels as stats_module
from topo.stats.positions import inside_share
from topo.stats.layer_stats import LayerStats, from_activations
from topo.stats.positions import half_offsets, sample_anchors


@pytest.fixture(autouse=True, params=["stacked", "cropped"])
def product_path(request, monkeypatch):
    """Force the exact path's products one way for the whole test: the share of pairs inside the map is never
    below -1 (always stacked) and never above 1 (always cropped)."""
    monkeypatch.setattr(stats_module, "_CROPS_BELOW", -1.0 if request.param == "stacked" else 1.0)
    return request.param


def reference(x: np.ndarray, dy: int, dx: int, threshold) -> dict[str, np.ndarray]:
    """Everything LayerStats keeps for one offset, computed directly in float64 from the pairs."""
    a, b = pairs(x.astype(np.float64), dy, dx)
    fa, fb = (a > threshold).astype(np.float64), (b > threshold).astype(np.float64)
    return {
        "n": len(a),
        "cov": (a - a.mean(0)).T @ (b - b.mean(0)) / (len(a) - 1),
        "corr": np.corrcoef(a.T, b.T)[: x.shape[1], x.shape[1] :],
        "counts": fa.T @ fb,
        "rate_a": fa.mean(0),
        "rate_b": fb.mean(0),
    }


def assert_matches_numpy(stats: LayerStats, x: np.ndarray, threshold, atol: float = 1e-12) -> None:
    for dy, dx in stats.offsets:
        want = reference(x, dy, dx, threshold)
        index, flip = stats._offset_index(dy, dx)
        assert stats._state["n"][index].item() == want["n"], (dy, dx)
        np.testing.assert_allclose(stats.cross_cov(dy, dx), want["cov"], rtol=0, atol=atol)
        np.testing.assert_allclose(stats.cross_corr(dy, dx), want["corr"], rtol=0, atol=atol)
        joint = stats._numpy(stats._state["joint"][:, index])
        np.testing.assert_array_equal(joint.T if flip else joint, want["counts"])  # exact integer counts
        prob, lift = stats.coactivation(dy, dx)
        np.testing.assert_allclose(prob, want["counts"] / want["n"], rtol=1e-15, atol=0)
        expected = np.outer(want["rate_a"], want["rate_b"])
        live = expected > 0
        np.testing.assert_allclose(lift[live], want["counts"][live] / want["n"] / expected[live], rtol=1e-12)
        assert not lift[~live].any()


def test_exact_update_matches_numpy_at_every_offset():
    x = correlated_maps(n=5, c=6, h=9, w=8, seed=20)
    stats = from_activations(list(torch.from_numpy(x).split(2)), positions=None, threshold=0.3)
    assert stats.exact and stats.positions_used == 72 and len(stats.offsets) == 81
    assert_matches_numpy(stats, x, 0.3)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_large_common_offset_keeps_full_precision(dtype):
    """Mean 1e4, standard deviation 1: the shifted sums lose nothing (the NumPy reference is float64)."""
    rng = np.random.default_rng(21)
    x = (rng.normal(size=(6, 5, 7, 6)) + 1e4).astype(dtype)
    x[:, 1] += 0.8 * x[:, 0] - 0.8e4  # two correlated units, same offset
    stats = from_activations(list(torch.from_numpy(x).split(2)), positions=None, threshold=1e4)
    assert_matches_numpy(stats, x, 1e4, atol=1e-12)


def test_batches_far_from_the_first_ones_mean_keep_precision():
    """The shift is the first batch's mean; later batches 50 standard deviations away still match."""
    rng = np.random.default_rng(22)
    x = rng.normal(size=(6, 4, 6, 6)) + 1e4
    x[3:] += 50.0
    stats = from_activations([torch.from_numpy(x[:3]), torch.from_numpy(x[3:])], positions=None, threshold=1e4 + 25)
    assert_matches_numpy(stats, x, 1e4 + 25, atol=1e-10)


def test_blocks_of_rows_and_groups_of_offsets_give_the_same_sums(monkeypatch, product_path):
    """Small stack budgets split a batch into row blocks, or into groups of offsets: same numbers."""
    if product_path == "cropped":
        pytest.skip("the cropped products build no stack")
    x = correlated_maps(n=4, c=5, h=8, w=7, seed=23)
    whole = from_activations(torch.from_numpy(x), positions=None, threshold=0.0)
    assert stats_module._blocks(4 * 56, len(half_offsets(4, (8, 7))), 5) == (224, 41)  # one block by default
    for budget, min_rows, expected in [(41 * 5 * 50, 1, (50, 41)), (5 * 224 * 7, 1024, (224, 7))]:
        monkeypatch.setattr(stats_module, "_STACK_ELEMENTS", budget)
        monkeypatch.setattr(stats_module, "_MIN_BLOCK_ROWS", min_rows)
        assert stats_module._blocks(224, 41, 5) == expected
        split = from_activations(torch.from_numpy(x), positions=None, threshold=0.0)
        for key in ("prod", "joint", "sum_a", "sum_b", "sq_a", "sq_b", "fire_a", "fire_b", "n"):
            np.testing.assert_allclose(split._state[key].numpy(), whole._state[key].numpy(), rtol=0, atol=1e-10)
        assert_matches_numpy(split, x, 0.0)


def test_reused_buffers_follow_changes_of_batch_size():
    """The padded buffers are reused between batches; a batch of another size must not see stale padding."""
    x = correlated_maps(n=9, c=4, h=6, w=5, seed=24)
    batches = [torch.from_numpy(x[i:j]) for i, j in [(0, 3), (3, 5), (5, 8), (8, 9)]]
    stats = from_activations(batches, positions=None, threshold=0.1)
    assert_matches_numpy(stats, x, 0.1)


def test_per_unit_thresholds_in_the_exact_and_dense_paths():
    x = correlated_maps(n=4, c=5, h=7, w=6, seed=25)
    thresholds = np.array([-0.5, 0.0, 0.4, 1.0, 2.5])
    stats = from_activations(torch.from_numpy(x), positions=None, threshold=thresholds)
    np.testing.assert_array_equal(stats.thresholds, thresholds)
    assert_matches_numpy(stats, x, thresholds)
    np.testing.assert_allclose(stats.firing_rate, (x > thresholds[:, None, None]).mean(axis=(0, 2, 3)))
    dense = x.transpose(0, 2, 3, 1).reshape(-1, 5)
    vectors = from_activations(torch.from_numpy(dense), threshold=thresholds)
    fired = (dense > thresholds).astype(float)
    np.testing.assert_allclose(vectors.coactivation()[0], fired.T @ fired / len(dense), atol=1e-15)
    np.testing.assert_allclose(vectors.corr(), np.corrcoef(dense.T), atol=1e-12)


def test_exact_and_sampled_agree_within_the_sampling_error():
    x = torch.from_numpy(correlated_maps(n=400, c=4, h=8, w=8, seed=26))
    exact = from_activations(x, positions=None, threshold=0.0)
    sampled = from_activations(x.split(100), positions=8, seed=2, threshold=0.0)
    assert exact.exact and not sampled.exact and sampled.positions_used == 8
    assert sampled.count == 400 * 8 and exact.count == 400 * 64
    # 3,200 anchors: a correlation's standard error is below 1 / sqrt(3200 * (5/8)^2) ~ 0.03 at (3, 3)
    for dy, dx in [(0, 0), (1, -1), (3, 3)]:
        assert np.abs(sampled.cross_corr(dy, dx) - exact.cross_corr(dy, dx)).max() < 0.15
    assert not np.allclose(sampled.cross_corr(1, 1), exact.cross_corr(1, 1), atol=1e-6)


@pytest.mark.parametrize("positions", [1, 6], ids=["gathered-from-the-maps", "gathered-from-the-padded-maps"])
def test_sampled_path_matches_numpy_on_the_same_anchors(positions):
    """K D < H W anchors are gathered from the maps, more from the padded maps: both against NumPy."""
    x = correlated_maps(n=40, c=4, h=8, w=8, seed=28)
    thresholds = np.array([0.0, 0.3, -0.2, 1.0])
    stats = from_activations(list(torch.from_numpy(x).split(16)), positions=positions, seed=5, threshold=thresholds)
    offsets = half_offsets(4, (8, 8))
    generator = torch.Generator().manual_seed(5)
    drawn = [sample_anchors(len(b), (8, 8), offsets, positions, generator) for b in np.split(x, [16, 32])]
    anchors, targets, valid = (np.concatenate([d[i].numpy() for d in drawn]) for i in range(3))
    flat = x.reshape(40, 4, 64)
    for d, (dy, dx) in enumerate(offsets):
        n, k = np.nonzero(valid[:, :, d])
        a, b = flat[n, :, anchors[n, k]], flat[n, :, targets[n, k, d]]
        np.testing.assert_allclose(stats.cross_corr(dy, dx), np.corrcoef(a.T, b.T)[:4, 4:], rtol=0, atol=1e-12)
        fa, fb = (a > thresholds).astype(float), (b > thresholds).astype(float)
        np.testing.assert_allclose(stats.coactivation(dy, dx)[0], fa.T @ fb / len(a), rtol=0, atol=1e-15)
    assert stats.count == 40 * positions


def test_release_buffers_keeps_the_statistics():
    x = torch.from_numpy(correlated_maps(n=4, seed=27))
    stats = LayerStats(positions=None, threshold=0.0).update(x[:2])
    assert stats._scratch._kept
    before = stats.cov()
    stats.release_buffers()
    assert not stats._scratch._kept
    np.testing.assert_array_equal(stats.cov(), before)
    stats.update(x[2:])  # buffers come back as needed
    np.testing.assert_allclose(stats.cross_corr(1, 2), numpy_cross_corr(x.numpy(), 1, 2), atol=1e-12)


def test_both_product_paths_and_the_default_choice_give_the_same_sums(monkeypatch):
    """A small map (most pairs leave it: cropped by default) and a large one (stacked by default): the two
    paths agree to float64 round-off on every stored sum, and the default picks by the share of pairs inside."""
    for h, w, default in [(5, 5, "cropped"), (20, 20, "stacked")]:
        share = inside_share(half_offsets(4, (h, w)), (h, w))
        assert (share <= 0.7) == (default == "cropped"), share
        x = torch.from_numpy(correlated_maps(n=6, c=5, h=h, w=w, seed=29))
        results = {}
        for path, limit in [("stacked", -1.0), ("cropped", 1.0), ("default", 0.7)]:
            monkeypatch.setattr(stats_module, "_CROPS_BELOW", limit)
            results[path] = from_activations(list(x.split(4)), positions=None, threshold=0.2)._state
        for key in ("prod", "joint", "sum_b", "sq_b", "n"):
            np.testing.assert_allclose(results["cropped"][key].numpy(), results["stacked"][key].numpy(),
                                       rtol=1e-13, atol=1e-11)
            np.testing.assert_array_equal(results["default"][key].numpy(), results[default][key].numpy())


def test_inside_share_counts_the_pairs_inside_the_map():
    offsets = half_offsets(4, (5, 7))
    inside = sum(0 <= y + dy < 5 and 0 <= x + dx < 7 for dy, dx in offsets for y in range(5) for x in range(7))
    assert inside_share(offsets, (5, 7)) == pytest.approx(inside / (len(offsets) * 35), abs=1e-15)


@pytest.mark.parametrize("elements", [7, 2**18], ids=["a-few-rows-at-a-time", "all-rows-at-once"])
def test_column_sums_match_numpy(monkeypatch, elements):
    monkeypatch.setattr(stats_module, "_SQUARE_ELEMENTS", elements)
    x = np.random.default_rng(30).normal(3.0, 2.0, size=(23, 9))
    sums, squares = stats_module._column_sums(torch.from_numpy(x), stats_module.Scratch())
    np.testing.assert_allclose(sums.numpy(), x.sum(0), rtol=1e-14)
    np.testing.assert_allclose(squares.numpy(), (x * x).sum(0), rtol=1e-14)


@pytest.mark.parametrize("elements", [5, 2**20], ids=["a-few-columns-at-a-time", "all-columns-at-once"])
def test_int8_counts_match_numpy_in_ragged_chunks(monkeypatch, elements):
    """The CPU's 0/1 counts are int8 products, made a few columns at a time (the last chunk shorter)."""
    monkeypatch.setattr(stats_module, "_COUNT_ELEMENTS", elements)
    rng = np.random.default_rng(31)
    a, b = rng.random((40, 3)) < 0.3, rng.random((40, 11)) < 0.3
    out = torch.full((3, 11), 7.0)
    flags = [torch.from_numpy(t).to(stats_module.firing_dtype(torch.device("cpu"))) for t in (a, b)]
    stats_module.add_product(out, *flags, stats_module.Scratch())
    assert flags[0].dtype == torch.int8
    np.testing.assert_array_equal(out.numpy(), 7.0 + a.T.astype(np.float64) @ b)


def test_exact_counts_in_chunks_of_columns_match_numpy(monkeypatch):
    monkeypatch.setattr(stats_module, "_COUNT_ELEMENTS", 13)
    x = correlated_maps(n=4, c=5, h=7, w=6, seed=32)
    stats = from_activations(list(torch.from_numpy(x).split(3)), positions=None, threshold=0.2)
    assert_matches_numpy(stats, x, 0.2)


@pytest.mark.parametrize("positions", [None, 3], ids=["exact", "sampled"])
def test_a_layer_of_one_unit_counts_exactly(positions):
    """One unit makes one row of counts from a transposed column, where torch._int_mm errs (torch 2.14): the
    counts still match NumPy."""
    x = correlated_maps(n=6, c=1, h=7, w=7, seed=33)
    stats = from_activations(list(torch.from_numpy(x).split(2)), positions=positions, threshold=0.1)
    if positions is None:
        assert_matches_numpy(stats, x, 0.1)
    fired = stats._numpy(stats._state["joint"][0, 0, 0])
    assert fired == stats._numpy(stats._state["fire_a"][0, 0]) > 0  # co-firing with itself: its own firing count


def test_column_counts_match_numpy_for_int8_and_float_flags():
    flags = np.random.default_rng(34).random((300, 7)) < 0.2
    for dtype in (torch.int8, torch.float32):
        counts = stats_module.column_counts(torch.from_numpy(flags).to(dtype))
        assert counts.dtype == torch.float64
        np.testing.assert_array_equal(counts.numpy(), flags.sum(0))
