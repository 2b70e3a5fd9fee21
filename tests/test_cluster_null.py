"""Testing pairs against a null recording: `UnitClustering(...).fit(stats, null=null_stats)`.

The data hold two planted networks on the same channels: A, which the null
shares (the stand-in for a network's own receptive-field overlaps, present
whatever the input), and B, which only the data hold. Against independence
both are found; against the null only B.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from topo.cluster import UnitClustering, best_match_jaccard
from topo.common.errors import StatsError, UserError
from topo.planted.generator import PlantedConfig, generate
from topo.stats.layer_stats import from_activations

N = 60
SHARED = PlantedConfig(num_channels=48, num_hidden=8, degree=4, density=0.03, num_samples=2 * N, height=10,
                       width=10, seed=11)
ONLY_DATA = PlantedConfig(num_channels=48, num_hidden=8, degree=4, density=0.03, num_samples=N, height=10,
                          width=10, seed=12)


def _stats(x: np.ndarray):
    return from_activations(torch.from_numpy(np.ascontiguousarray(x)), positions=None, threshold=0.0)


@pytest.fixture(scope="module")
def layers():
    """(truth A, truth B, data stats, null stats): data = A + B, null = a second sample of A + B shuffled."""
    a, b = generate(SHARED), generate(ONLY_DATA)
    rng = np.random.default_rng(0)
    # each channel of B from an image of its own: B's units keep their maps, not their co-firing
    shuffled = np.stack([b.activations[rng.permutation(N), c] for c in range(48)], axis=1)
    data = _stats(a.activations[:N] + b.activations)
    null = _stats(a.activations[N:] + shuffled)
    return a.truth, b.truth, data, null


def _found(model) -> list:
    return [c.members for c in model.clusters_]


def _fit(stats, null=None, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the power warnings are tested elsewhere
        return UnitClustering(progress=False, random_state=0, **params).fit(stats, null=null)


@pytest.mark.parametrize("method", ["arora", "spectral", "agglomerative", "louvain"])
def test_structure_absent_from_the_null_is_found_and_shared_structure_is_not(layers, method):
    truth_a, truth_b, data, null = layers
    plain = _fit(data, method=method)
    assert best_match_jaccard(truth_a.supports, _found(plain)).mean() >= 0.9  # A is real structure of the data
    assert best_match_jaccard(truth_b.supports, _found(plain)).mean() >= 0.9
    against = _fit(data, null, method=method)
    found = _found(against)
    assert best_match_jaccard(truth_b.supports, found).mean() >= 0.9
    assert best_match_jaccard(found, truth_b.supports).mean() >= 0.9  # what is found is B
    # A's supports are matched no better than B's own supports overlap them by chance (shared channels)
    chance = best_match_jaccard(truth_a.supports, truth_b.supports)
    assert (best_match_jaccard(truth_a.supports, found) <= chance + 1e-9).all()
    assert against.n_edges_ < plain.n_edges_
    assert against.evidence_.null_observations == null.count


def test_the_data_as_its_own_null_leaves_no_edge(layers):
    _, _, data, _ = layers
    model = _fit(data, data)
    assert model.n_edges_ == 0 and model.n_clusters_ == 0


def test_a_second_sample_of_the_same_generator_leaves_almost_nothing():
    planted = generate(SHARED)  # 2N images of one network: the first half against the second
    first, second = _stats(planted.activations[:N]), _stats(planted.activations[N:])
    assert _fit(first).n_clusters_ >= SHARED.num_hidden - 1  # the structure is there
    model = _fit(first, second)
    assert model.n_edges_ <= 2 and model.n_clusters_ == 0


def test_fit_without_null_is_the_independence_test(layers):
    _, _, data, _ = layers
    a, b = _fit(data), _fit(data, None)
    assert a.clusters_ == b.clusters_ and a.n_edges_ == b.n_edges_
    assert a.evidence_.null_observations is None


def test_a_null_of_another_layer_is_a_one_line_error(layers):
    _, _, data, null = layers
    other = _stats(np.random.default_rng(0).random((20, 12, 10, 10), dtype=np.float32))
    with pytest.raises(StatsError) as err:
        _fit(data, other)
    assert "\n" not in str(err.value) and "same layer" in str(err.value)
    small = _stats(np.random.default_rng(0).random((1, 48, 4, 4), dtype=np.float32))
    with pytest.raises(StatsError):
        _fit(data, small)
    with pytest.raises(UserError, match="LayerStats"):
        _fit(data, np.eye(3))


def test_units_silent_in_the_null_are_named():
    planted = generate(SHARED)
    x = planted.activations[:N]
    null_x = planted.activations[N:].copy()
    null_x[:, :5] = 0.0  # five units never fire in the null
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = UnitClustering(progress=False).fit(_stats(x), null=_stats(null_x))
    silent = [str(w.message) for w in caught if "never fire in the null" in str(w.message)]
    assert len(silent) == 1 and silent[0].startswith("UnitClustering: 5 live units") and "\n" not in silent[0]
    assert model.evidence_.null_silent == 5
