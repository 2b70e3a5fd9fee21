"""The planted deep network: shapes, determinism, per-layer truth against the generated layers, labels."""
from __future__ import annotations

from itertools import pairwise
from types import SimpleNamespace

import numpy as np
import pytest

from topo.cluster import Cluster, recovery_scores
from topo.cluster.clusters import extent, kernel_for_extent
from topo.common.errors import UserError
from topo.planted.generator import (
    BOTTOM_MIX,
    LAYER_REACH,
    TOP_MIX,
    DeepPlantedConfig,
    PlantedTruth,
    default_kernel_mixes,
    generate_deep,
    sibling_pairs,
    support_pairs,
)

SMALL = DeepPlantedConfig(num_samples=96, height=10, width=10, seed=4)


@pytest.fixture(scope="module")
def small():
    return generate_deep(SMALL)


def _numpy_drive(upper: np.ndarray, truth: PlantedTruth, n_lower: int) -> np.ndarray:
    """``drive[v, q] = sum w * h_u(q - o)`` over memberships (v, o) of u, by shifting (no convolution)."""
    R = LAYER_REACH
    N, _, H, W = upper.shape
    drive = np.zeros((N, n_lower, H - 2 * R, W - 2 * R))
    for u, (support, weights) in enumerate(zip(truth.supports, truth.weights)):
        for (v, dy, dx), w in zip(support, weights):
            drive[:, v] += w * upper[:, u, R - dy:H - R - dy, R - dx:W - R - dx]
    return drive


def _lift(a: np.ndarray, b: np.ndarray, dy: int, dx: int) -> float:
    """P(a(p) and b(p + d)) / (P(a(p)) P(b(p + d))) over the positions where both lie in the (N, H, W) maps."""
    H, W = a.shape[1:]
    pa = a[:, max(0, -dy):H - max(0, dy), max(0, -dx):W - max(0, dx)] > 0
    pb = b[:, max(0, dy):H + min(0, dy), max(0, dx):W + min(0, dx)] > 0
    return float((pa & pb).mean() / (pa.mean() * pb.mean()))


# ----------------------------------------------------------------------------- shapes, determinism


def test_shapes_padding_and_layer_maps(small) -> None:
    N, C, H, W = 96, 16, 10, 10
    assert small.activations.shape == (N, C, H, W) and small.activations.dtype == np.float32
    assert (small.activations >= 0).all()
    assert small.labels.shape == (N,) and small.labels.dtype == np.int64
    assert set(np.unique(small.labels)) <= set(range(SMALL.num_classes))
    for layer, (maps, width) in enumerate(zip(small.hidden, SMALL.widths), start=1):
        pad = LAYER_REACH * layer  # offsets compose: layer l reaches 2 l positions
        assert maps.shape == (N, width, H + 2 * pad, W + 2 * pad)
        crop = small.layer_activations(layer)
        assert crop.shape == (N, width, H, W) and crop.dtype == np.float32
        np.testing.assert_array_equal(crop, maps[:, :, pad:pad + H, pad:pad + W])
    assert small.layer_activations(0) is small.activations
    with pytest.raises(UserError, match="layer 4 does not exist"):
        small.layer_activations(4)
    with pytest.raises(UserError, match="layer 0 does not exist"):
        small.layer_truth(0)


def test_same_seed_same_sample_other_seed_other_sample(small) -> None:
    again = generate_deep(SMALL)
    np.testing.assert_array_equal(again.activations, small.activations)
    np.testing.assert_array_equal(again.labels, small.labels)
    for a, b in zip(again.truth, small.truth):
        assert (a.supports, a.kernel_sizes, a.weights) == (b.supports, b.kernel_sizes, b.weights)
        np.testing.assert_array_equal(a.labels, b.labels)
    assert again.class_units == small.class_units
    assert all(np.array_equal(a, b) for a, b in zip(again.hidden, small.hidden))
    other = generate_deep(SMALL, seed=5)
    assert other.layer_truth(1).supports != small.layer_truth(1).supports
    assert not np.array_equal(other.activations, small.activations)


# ----------------------------------------------------------------------------- truth


def test_supports_are_distinct_in_window_and_need_their_kernel(small) -> None:
    for layer, (truth, width, degree) in enumerate(zip(small.truth, SMALL.widths, SMALL.degrees), start=1):
        assert len(truth.supports) == len(truth.kernel_sizes) == width
        for support, k in zip(truth.supports, truth.kernel_sizes):
            units = [m[0] for m in support]
            assert len(set(units)) == len(units) == degree
            assert max(units) < SMALL.layer_sizes[layer - 1]
            assert all(max(abs(dy), abs(dx)) <= k // 2 for _, dy, dx in support)
            assert kernel_for_extent(extent(support)) == k


def test_parents_are_balanced_and_exact_when_they_divide() -> None:
    sample = generate_deep(SMALL)
    for layer, truth in enumerate(sample.truth, start=1):
        parents = np.bincount([m[0] for s in truth.supports for m in s], minlength=SMALL.layer_sizes[layer - 1])
        assert parents.max() - parents.min() <= 1 and parents.min() >= 1
    two = generate_deep(DeepPlantedConfig(widths=(12, 12), degrees=(3, 3), num_samples=8, seed=1))
    parents = np.bincount([m[0] for s in two.layer_truth(2).supports for m in s], minlength=12)
    assert (parents == 3).all()


def test_truth_labels_name_the_strongest_parent(small) -> None:
    truth = small.layer_truth(2)
    for v in range(SMALL.widths[0]):
        weights = {u: w for u, (s, ws) in enumerate(zip(truth.supports, truth.weights))
                   for (c, _, _), w in zip(s, ws) if c == v}
        assert truth.labels[v] == max(weights, key=weights.get)


def test_layer_truth_is_what_recovery_scores_expects(small) -> None:
    """The true supports, handed over as clusters, score a perfect recovery at every layer."""
    for layer in range(1, SMALL.depth + 1):
        truth = small.layer_truth(layer)
        clusters = [Cluster.from_members(s) for s in truth.supports]
        found = SimpleNamespace(clusters_=clusters,
                                kernel_counts_={k: sum(c.kernel_size == k for c in clusters) for k in (1, 3, 5)})
        scores = recovery_scores(truth, found)
        assert scores["jaccard"] == scores["precision_jaccard"] == 1.0
        assert scores["max_count_error"] == 0.0


# ----------------------------------------------------------------------------- the generated layers


def test_hidden_layers_follow_their_parents_exactly(small) -> None:
    """Recomputed by shifting in numpy: a unit is on wherever its parents drive it over the threshold,
    and elsewhere only at about its own rate."""
    for layer in range(SMALL.depth, 1, -1):
        lower = small.hidden[layer - 2]
        driven = _numpy_drive(small.hidden[layer - 1].astype(float), small.layer_truth(layer),
                              SMALL.widths[layer - 2]) > SMALL.threshold
        assert lower[driven].all()
        own = lower[~driven].mean()
        n = (~driven).sum()
        assert abs(own - SMALL.own_density) < 5 * np.sqrt(SMALL.own_density / n) + 1e-4


def test_observed_layer_is_relu_of_the_drive_plus_noise(small) -> None:
    drive = _numpy_drive(small.hidden[0].astype(float), small.layer_truth(1), SMALL.num_channels)
    x = small.activations
    fired = x > 0
    driven = fired & (drive > 0)
    residual = x[driven] - (drive[driven] - SMALL.bias)
    assert abs(residual.std() - SMALL.noise) < 0.01 and abs(residual.mean()) < 0.02
    assert fired[drive == 0].mean() < 0.005  # noise alone almost never beats the bias
    assert fired[drive > 0].mean() > 0.99


def test_support_members_fire_when_their_unit_is_on(small) -> None:
    """Unit u of layer l on at p: every member (v, dy, dx) of its support is on at p + (dy, dx) in layer l - 1."""
    R = LAYER_REACH
    for layer in range(1, SMALL.depth + 1):
        upper = small.hidden[layer - 1]
        below = small.hidden[layer - 2] if layer > 1 else small.activations
        H, W = below.shape[2:]
        for u, support in enumerate(small.layer_truth(layer).supports):
            n, y, x = np.nonzero(upper[:, u, R:R + H, R:R + W])  # positions whose whole window lies below
            assert len(n) > 0
            for v, dy, dx in support:
                inside = (y + dy >= 0) & (y + dy < H) & (x + dx >= 0) & (x + dx < W)
                on = below[n[inside], v, y[inside] + dy, x[inside] + dx] > 0
                assert on.mean() >= (1.0 if layer > 1 else 0.99)


def test_siblings_co_fire_less_than_support_members() -> None:
    """Siblings share a parent: their members co-fire (lift > 1) in the observed layer, less than within a support."""
    sample = generate_deep(SMALL, num_samples=256)
    x = sample.activations
    lower, upper = sample.layer_truth(1), sample.layer_truth(2)

    def lift(pairs):
        return np.array([_lift(x[:, i], x[:, j], dy, dx) for i, j, dy, dx in pairs if max(abs(dy), abs(dx)) <= 4])

    within, siblings = lift(support_pairs(lower)), lift(sibling_pairs(lower, upper))
    assert len(siblings) > len(within) > 10
    assert np.median(siblings) > 1.3
    assert np.median(within) > np.median(siblings)
    # in layer 1 itself, the siblings are the members of layer 2's supports
    h1 = sample.layer_activations(1)
    sib_units = np.array([_lift(h1[:, i], h1[:, j], dy, dx) for i, j, dy, dx in support_pairs(upper)])
    assert np.median(sib_units) > 2


def test_pairs_of_a_hand_built_network() -> None:
    lower = PlantedTruth(supports=(((0, 0, 0), (1, 0, 1)), ((2, 0, 0), (3, 0, 0))), kernel_sizes=(3, 1),
                         weights=((1.0, 1.0), (1.0, 1.0)), labels=np.zeros(4, dtype=np.int64))
    upper = PlantedTruth(supports=(((0, 0, 0), (1, 1, 0)),), kernel_sizes=(3,), weights=((1.0, 1.0),),
                         labels=np.zeros(2, dtype=np.int64))
    assert support_pairs(lower) == {(0, 1, 0, 1), (2, 3, 0, 0)}
    # unit 1 sits one row below unit 0: (0 at 0,0), (1 at 0,1) versus (2, 3 at 1,0)
    assert sibling_pairs(lower, upper) == {(0, 2, 1, 0), (0, 3, 1, 0), (1, 2, 1, -1), (1, 3, 1, -1)}


# ----------------------------------------------------------------------------- kernel mix, labels


def test_default_kernel_mix_moves_from_1x1_to_5x5() -> None:
    for depth in (2, 3, 5):
        mixes = default_kernel_mixes(depth)
        assert mixes[0] == pytest.approx(BOTTOM_MIX) and mixes[-1] == pytest.approx(TOP_MIX)
        ones, fives = [m[0] for m in mixes], [m[2] for m in mixes]
        assert all(a > b for a, b in pairwise(ones)) and all(a < b for a, b in pairwise(fives))
        assert all(sum(m) == pytest.approx(1.0) for m in mixes)
    sample = generate_deep(DeepPlantedConfig(widths=(20, 20, 20), num_channels=20, num_samples=4))
    counts = [t.kernel_counts for t in sample.truth]
    assert counts[0][1] > counts[0][5] and counts[-1][5] > counts[-1][1]
    assert counts[0] == {1: 12, 3: 6, 5: 2} and counts[-1] == {1: 2, 3: 6, 5: 12}


def test_class_raises_its_own_top_units(small) -> None:
    groups = small.class_units
    assert len(groups) == SMALL.num_classes
    assert all(len(g) == SMALL.widths[-1] // SMALL.num_classes for g in groups)
    assert len({u for g in groups for u in g}) == sum(len(g) for g in groups)  # disjoint
    top = small.hidden[-1]
    own = np.mean([top[small.labels == k][:, list(g)].mean() for k, g in enumerate(groups)])
    other = np.mean([top[small.labels != k][:, list(g)].mean() for k, g in enumerate(groups)])
    assert own == pytest.approx(SMALL.top_density * SMALL.class_boost, rel=0.15)
    assert other == pytest.approx(SMALL.top_density, rel=0.15)


def test_labels_are_learnable_from_pooled_activations_but_not_trivially() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    sample = generate_deep()  # the default configuration: 512 samples, 4 classes
    features = sample.activations.mean(axis=(2, 3))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    accuracy = cross_val_score(model, features, sample.labels, cv=5).mean()
    chance = np.bincount(sample.labels).max() / len(sample.labels)
    assert chance < 0.3
    assert 0.45 < accuracy < 0.9, accuracy  # measured 0.63 (seed 0)
    # the top layer holds the answer: the Bayes rule there (most active class group) is near perfect
    counts = np.stack([sample.hidden[-1][:, list(g)].sum(axis=(1, 2, 3)) for g in sample.class_units], axis=1)
    assert (counts.argmax(axis=1) == sample.labels).mean() > 0.9


# ----------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"degrees": (3, 3)}, "one entry per hidden layer"),
    ({"degrees": (17, 3, 3)}, "degree 17 exceeds"),
    ({"widths": (4, 8, 8)}, "without a parent"),
    ({"num_classes": 9}, "num_classes must lie in 2..8"),
    ({"num_classes": 1}, "num_classes"),
    ({"top_density": 0.0}, "top_density"),
    ({"class_boost": 200.0}, "class_boost"),
    ({"own_density": 1.0}, "own_density"),
    ({"threshold": 0.0}, "threshold"),
    ({"kernel_mixes": (BOTTOM_MIX,)}, "one (1x1, 3x3, 5x5) triple per hidden layer"),
    ({"kernel_mixes": (BOTTOM_MIX, (0.5, -0.1, 0.6), TOP_MIX)}, "non-negative"),
    ({"degrees": (1, 3, 3), "widths": (16, 8, 8)}, "need degree >= 2"),
])
def test_bad_config_is_a_one_line_user_error(overrides, fragment) -> None:
    with pytest.raises(UserError) as excinfo:
        generate_deep(SMALL, **overrides)
    assert fragment in str(excinfo.value) and "\n" not in str(excinfo.value)
