"""positions="auto": every position when the exact products fit in the forward pass's cost, else enough
random positions for MIN_PAIRS pairs per offset; decided by counted multiply-adds, recorded and logged."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from stats_helpers import correlated_maps
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import topo
from builders.cost import count_macs
from topo.common.errors import StatsError
from topo.stats.recording import forward_macs
from topo.stats.positions import (
    EXACT_COST_MULTIPLE,
    MIN_PAIRS,
    PositionBudget,
    choose_positions,
    exact_macs,
    half_offsets,
)
from topo.stats.layer_stats import LayerStats


def digits_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))


# not conftest.py's digits (topo's train/val split): the first 192 of scikit-learn's digit images, as one tensor
@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return torch.tensor(load_digits().images[:192] / 16.0, dtype=torch.float32).unsqueeze(1)


def test_the_rule_on_its_own():
    offsets = half_offsets(4, (16, 16))
    cost = exact_macs(64, (16, 16), offsets)
    assert cost == 2 * 64 * 64 * 41 * 256
    exact = choose_positions(64, (16, 16), offsets, PositionBudget(forward_macs=cost, num_images=10))
    assert exact.exact and exact.positions == 256 and "fit in 1 x the forward pass" in exact.reason
    sampled = choose_positions(64, (16, 16), offsets, PositionBudget(forward_macs=cost - 1, num_images=300))
    inside = (16 - 4) * (16 - 4) / 256  # the farthest offsets keep this share of their anchors
    assert not sampled.exact and sampled.positions == math.ceil(MIN_PAIRS / (300 * inside)) == 60
    assert 300 * 60 * inside >= MIN_PAIRS > 300 * 59 * inside  # the fewest that reach the target
    few_images = choose_positions(64, (16, 16), offsets, PositionBudget(forward_macs=0, num_images=30))
    assert few_images.exact and "need all 256" in few_images.reason
    assert choose_positions(64, (16, 16), offsets, None).exact  # activations in memory: no cost to weigh
    with pytest.raises(StatsError, match="num_images"):
        PositionBudget(forward_macs=10, num_images=0)


def test_forward_multiply_adds_are_counted_not_timed():
    model = digits_cnn().eval()
    x = torch.rand(1, 1, 8, 8)
    macs = forward_macs(model, x)
    assert macs == count_macs(model, (1, 8, 8)) == 8 * 9 * 64 + 12 * 72 * 64 + 12 * 10
    assert forward_macs(nn.Identity(), x) == 0


def test_record_keeps_every_position_when_the_exact_products_are_cheap(digits, caplog):
    """Layer '1' (8 units, 8x8) with max_offset 1: the exact products cost less than the forward pass."""
    loader = DataLoader(TensorDataset(digits), batch_size=64)
    with caplog.at_level(logging.INFO, logger="topo.stats"):
        stats = topo.record(digits_cnn(), loader, ["1"], max_offset=1, progress=False)["1"]
    forward = forward_macs(digits_cnn().eval(), digits[:1])
    assert exact_macs(8, (8, 8), half_offsets(1, (8, 8))) <= EXACT_COST_MULTIPLE * forward
    assert stats.positions == "auto" and stats.exact and stats.positions_used == 64
    assert stats.count == 192 * 64 and stats.budget == PositionBudget(forward_macs=forward, num_images=192)
    decisions = [r.getMessage() for r in caplog.records if "layer '1'" in r.getMessage()]
    assert len(decisions) == 1 and "exact statistics, every position" in decisions[0]


def test_record_samples_positions_to_reach_the_target_pairs_per_offset(caplog):
    """An identity model costs nothing, so the products are sampled: enough for MIN_PAIRS at every offset."""
    maps = torch.from_numpy(correlated_maps(n=400, c=6, h=16, w=16, seed=40)).float()
    loader = DataLoader(TensorDataset(maps), batch_size=50)
    model = nn.Sequential(nn.Identity())
    with caplog.at_level(logging.INFO, logger="topo.stats"):
        stats = topo.record(model, loader, ["0"], progress=False)["0"]  # the calibration pass counts 400 images
    inside = (16 - 4) * (16 - 4) / 256
    assert stats.budget == PositionBudget(forward_macs=0, num_images=400)
    assert not stats.exact and stats.positions_used == math.ceil(MIN_PAIRS / (400 * inside)) == 45
    assert stats.count == 400 * 45 >= MIN_PAIRS
    # pairs at the farthest offsets: MIN_PAIRS expected; the realised count is within its sampling noise
    farthest = [i for i, (dy, dx) in enumerate(stats._offsets) if dy == 4 and abs(dx) == 4]
    expected = 400 * 45 * inside
    assert expected >= MIN_PAIRS
    for index in farthest:
        assert abs(stats._state["n"][index].item() - expected) < 4 * math.sqrt(expected)
    assert any("sampled statistics, 45 of 256" in r.getMessage() for r in caplog.records)
    # counted multiply-adds, not timings: the same seed gives the same statistics
    again = topo.record(model, loader, ["0"], progress=False)["0"]
    np.testing.assert_array_equal(again.cross_corr(2, -3), stats.cross_corr(2, -3))
    assert again.positions_used == stats.positions_used
    # one pass (explicit threshold): the images are not counted beforehand, so a lower bound plans the
    # sampling, from the 8 batches and the first one's 50 images: 7 x 50 + 1
    one_pass = topo.record(model, loader, ["0"], threshold=0.0, progress=False)["0"]
    assert one_pass.budget.num_images == 351
    assert one_pass.positions_used == math.ceil(MIN_PAIRS / (351 * inside)) == 51


def test_explicit_positions_override_the_rule(digits):
    loader = DataLoader(TensorDataset(digits), batch_size=64)
    few = topo.record(digits_cnn(), loader, ["1"], max_offset=1, positions=3, progress=False)["1"]
    assert (few.positions, few.positions_used, few.exact, few.count) == (3, 3, False, 192 * 3)
    every = topo.record(nn.Sequential(nn.Identity()), loader, ["0"], positions=None, progress=False)["0"]
    assert every.exact and every.positions_used == 64


def test_a_bare_layer_stats_with_auto_and_no_budget_is_exact():
    stats = LayerStats().update(torch.rand(3, 4, 6, 6))
    assert stats.positions == "auto" and stats.exact and stats.positions_used == 36
    assert LayerStats().update(torch.rand(5, 4)).positions_used == 1  # a vector layer
    with pytest.raises(StatsError, match="'auto'"):
        LayerStats(positions="some")


def test_layers_recorded_together_at_smaller_reaches_share_the_farthest_layers_anchors():
    """A max-pooled copy of a map recorded at offset (0, 0) beside the map at reach 4 (the construction's
    pooling branch): its positions are planned for reach 4, so it is sampled at the layer's anchors, and its
    statistics at (0, 0) are those of recording it alone at reach 4."""
    maps = torch.from_numpy(correlated_maps(n=400, c=6, h=16, w=16, seed=41)).float()
    loader = DataLoader(TensorDataset(maps), batch_size=50)
    model = nn.Sequential(nn.Identity(), nn.MaxPool2d(3, 1, padding=1))
    both = topo.record(model, loader, ["0", "1"], max_offset={"0": 4, "1": 0}, progress=False)
    alone = topo.record(model, loader, ["1"], max_offset=4, progress=False)["1"]
    pooled = both["1"]
    assert pooled.max_offset == 0 and pooled.offsets == [(0, 0)] and both["0"].max_offset == 4
    assert not pooled.exact and pooled.positions_used == both["0"].positions_used == alone.positions_used == 45
    assert pooled.budget.reach == 4 and both["0"].budget.reach == 4
    np.testing.assert_allclose(pooled.cov(), alone.cov(), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(pooled.coactivation()[0], alone.coactivation()[0])
    # planned for its own reach, the pooled map alone would need fewer positions: inside = every position
    own = topo.record(model, loader, ["1"], max_offset=0, progress=False)["1"]
    assert own.budget.reach is None and own.positions_used == math.ceil(MIN_PAIRS / 400) == 25
    with pytest.raises(StatsError, match="one per recorded layer"):
        topo.record(model, loader, ["0", "1"], max_offset={"0": 4}, progress=False)
