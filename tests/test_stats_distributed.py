"""LayerStats.all_reduce over two gloo processes equals one process on the same data."""
from __future__ import annotations

import pytest

import numpy as np
import torch
from gloo_group import run_two

from topo.stats.layer_stats import LayerStats, from_activations

pytestmark = pytest.mark.slow  # subprocesses or whole constructions: seconds each

OFFSETS = [(0, 0), (1, -2), (-3, 1)]


def activations() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 6, 6, generator=generator, dtype=torch.float64)
    return x + x.roll(1, dims=1) + 100.0  # correlated units, a large common mean


def _worker(rank: int, out_dir: str) -> None:
    shard = activations()[rank * 3 : 8 if rank else 3]  # unequal shards: 3 and 5 images
    stats = from_activations(shard.split(2), positions=None, threshold=100.0)
    stats.all_reduce()
    stats.save(f"{out_dir}/rank{rank}.pt")


def test_two_process_all_reduce_equals_one_process(tmp_path):
    run_two(_worker, str(tmp_path), init_file=str(tmp_path / "init"))
    single = from_activations(activations().split(2), positions=None, threshold=100.0)
    for rank in (0, 1):
        reduced = LayerStats.load(tmp_path / f"rank{rank}.pt")
        assert reduced.count == single.count == 8 * 36
        np.testing.assert_allclose(reduced.mean, single.mean, rtol=0, atol=1e-10)
        for dy, dx in OFFSETS:
            np.testing.assert_allclose(reduced.cross_cov(dy, dx), single.cross_cov(dy, dx), rtol=0, atol=1e-10)
            np.testing.assert_allclose(reduced.cross_corr(dy, dx), single.cross_corr(dy, dx), rtol=0, atol=1e-12)
            np.testing.assert_array_equal(reduced.coactivation(dy, dx)[0], single.coactivation(dy, dx)[0])
    assert abs(single.corr()[0, 1]) > 0.3  # the units do correlate


def test_all_reduce_without_a_process_group_is_a_no_op():
    stats = from_activations(activations(), positions=None)
    before = stats.cov()
    assert stats.all_reduce() is stats
    np.testing.assert_array_equal(stats.cov(), before)
