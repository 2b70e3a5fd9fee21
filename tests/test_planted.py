"""The planted generator: shapes, determinism, and truth consistent with the activations."""
from __future__ import annotations

import numpy as np
import pytest

from topo.cluster.clusters import extent, kernel_for_extent
from topo.common.errors import UserError
from topo.planted.generator import PlantedConfig, generate

SMALL = PlantedConfig(num_channels=32, num_hidden=8, degree=4, num_samples=40, height=8, width=8, seed=5)


def test_shapes_and_dtype():
    p = generate(SMALL)
    assert p.activations.shape == (40, 32, 8, 8)
    assert p.activations.dtype == np.float32
    assert (p.activations >= 0).all()
    flat = generate(SMALL, spatial=False, num_samples=100)
    assert flat.activations.shape == (100, 32)
    assert set(flat.truth.kernel_sizes) == {1}


def test_same_seed_same_data_other_seed_other_data():
    a, b = generate(SMALL), generate(SMALL)
    np.testing.assert_array_equal(a.activations, b.activations)
    assert a.truth.supports == b.truth.supports
    c = generate(SMALL, seed=6)
    assert c.truth.supports != a.truth.supports
    assert not np.array_equal(c.activations, a.activations)


def test_truth_is_consistent():
    p = generate(SMALL)
    t = p.truth
    assert len(t.supports) == len(t.kernel_sizes) == SMALL.num_hidden
    assert t.kernel_counts == {1: 3, 3: 3, 5: 2}  # 8 units split as evenly as the mix allows
    for support, k in zip(t.supports, t.kernel_sizes):
        chans = [m[0] for m in support]
        assert len(set(chans)) == SMALL.degree  # distinct channels
        r = k // 2
        assert all(abs(dy) <= r and abs(dx) <= r for _, dy, dx in support)
        assert kernel_for_extent(extent(support)) == k  # the footprint needs exactly this kernel


def test_disjoint_supports_partition_channels():
    p = generate(SMALL, spatial=False, disjoint=True, num_samples=50)
    chans = [m[0] for s in p.truth.supports for m in s]
    assert len(chans) == len(set(chans)) == 32
    for u, s in enumerate(p.truth.supports):
        assert all(p.truth.labels[c] == u for c, _, _ in s)


def test_members_of_a_support_fire_together_at_their_offset():
    """Correlation computed directly in numpy: true pairs correlate, unrelated pairs do not."""
    p = generate(SMALL, num_samples=80)
    x = p.activations
    H, W = x.shape[2:]

    def corr_at(i, j, dy, dx):
        a = x[:, i, max(0, -dy):H - max(0, dy), max(0, -dx):W - max(0, dx)].ravel()
        b = x[:, j, max(0, dy):H + min(0, dy), max(0, dx):W + min(0, dx)].ravel()
        return np.corrcoef(a, b)[0, 1]

    support = next(s for s, k in zip(p.truth.supports, p.truth.kernel_sizes) if k == 5)
    (i, ay, ax), (j, by, bx) = support[0], support[1]
    assert corr_at(i, j, by - ay, bx - ax) > 0.3
    # the same pair at a wrong offset carries no shared cause
    assert abs(corr_at(i, j, by - ay + 4 if by - ay < 0 else by - ay - 4, bx - ax)) < 0.1


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError, match="degree"):
        generate(SMALL, degree=40)
    with pytest.raises(UserError, match="density"):
        generate(SMALL, density=0.0)
    with pytest.raises(UserError, match="disjoint"):
        generate(SMALL, disjoint=True, num_hidden=20)
