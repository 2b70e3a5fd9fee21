"""positions="auto": every position when the exact products fit in the forward pass's cost, else enough
random positions for MIN_PAIRS pairs per offset; decided by counted multiply-adds, recorded and logged."""
from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from stats_helpers import correlated_maps
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import topo
from builders.cost import count_macs
from topo.cluster import UnitClustering
from topo.common.errors import StatsError
from topo.stats import positions
from topo.stats.layer_stats import LayerStats
from topo.stats.positions import (
    COST_MULTIPLE,
    FREE_MACS,
    MIN_PAIRS,
    PositionBudget,
    choice_macs,
    choose_positions,
    exact_macs,
    half_offsets,
    recording_scale,
)
from topo.stats.recording import forward_macs


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
    assert exact_macs(8, (8, 8), half_offsets(1, (8, 8))) <= COST_MULTIPLE * forward
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


def test_the_cost_bound_keeps_the_same_share_of_every_layers_positions(monkeypatch):
    """Layers recorded together that would cost more than the bound keep the same share of the positions the
    rule wants, at least one, so that all of them together fit; the shortfall in pairs is stated."""
    wide, narrow = (64, (16, 16), half_offsets(4, (16, 16))), (16, (8, 8), half_offsets(2, (8, 8)))
    layers = [(c, shape, offsets, offsets) for c, shape, offsets in (wide, narrow)]
    plan = PositionBudget(forward_macs=1_000, num_images=300)
    wanted = [choose_positions(c, shape, offsets, plan) for c, shape, offsets in (wide, narrow)]
    assert recording_scale(layers, plan) == 1.0  # a small recording is never cut: under FREE_MACS in all
    wanted_macs = sum(choice_macs(c, s, o, w) for (c, s, o), w in zip((wide, narrow), wanted))
    assert wanted_macs * 300 <= FREE_MACS
    monkeypatch.setattr(positions, "FREE_MACS", 0)
    plan = PositionBudget(forward_macs=wanted_macs // 4, num_images=300)
    wanted = [choose_positions(c, shape, offsets, plan) for c, shape, offsets in (wide, narrow)]
    assert wanted[1].exact and not wanted[0].exact  # the narrow layer's exact products fit in the bound alone
    scale = recording_scale(layers, plan)
    wanted_macs = sum(choice_macs(c, s, o, w) for (c, s, o), w in zip((wide, narrow), wanted))
    assert scale == plan.allowed_macs / wanted_macs
    assert scale < 0.3
    cut = [choose_positions(c, shape, offsets, replace(plan, scale=scale)) for c, shape, offsets in (wide, narrow)]
    for before, after in zip(wanted, cut):
        assert after.positions == max(1, math.floor(scale * before.positions)) < before.positions
        assert not after.exact and "cost bound" in after.reason
    assert sum(choice_macs(c, s, o, k) for (c, s, o), k in zip((wide, narrow), cut)) <= plan.allowed_macs
    inside = (16 - 4) * (16 - 4) / 256
    assert cut[0].short and cut[0].pairs == pytest.approx(300 * cut[0].positions * inside)
    assert cut[0].pairs < MIN_PAIRS
    generous = PositionBudget(forward_macs=wanted_macs, num_images=300)
    assert recording_scale(layers, generous) == 1.0  # within the bound: the rule as before
    with pytest.raises(StatsError, match="scale"):
        PositionBudget(forward_macs=1, num_images=1, scale=0.0)


def test_record_bounds_the_statistics_of_the_layers_recorded_together(monkeypatch, caplog):
    """Two 6-channel layers of 16 x 16 maps want 45 positions each (MIN_PAIRS over 400 images), products of
    265,680 multiply-adds per image, 29 times their 1x1 convolution's forward pass (9,216): at 10 forward passes
    both keep 15, and the one-line warning, `pairs_short` and the clustering's evidence say what that leaves."""
    monkeypatch.setattr(positions, "FREE_MACS", 0)  # the floor would let a recording this small be
    maps = torch.from_numpy(correlated_maps(n=400, c=6, h=16, w=16, seed=42)).float()
    loader = DataLoader(TensorDataset(maps), batch_size=50)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 6, 1, bias=False), nn.ReLU())
    with caplog.at_level(logging.INFO, logger="topo.stats"):
        stats = topo.record(model, loader, ["0", "1"], progress=False, cost_multiple=10)
    offsets = half_offsets(4, (16, 16))
    for layer in stats.values():
        assert layer.budget.forward_macs == 9_216 and layer.budget.scale == pytest.approx(92_160 / 265_680)
        assert not layer.exact and layer.positions_used == math.floor(92_160 / 265_680 * 45) == 15
        assert layer.count == 400 * 15
        assert layer.pairs_short == pytest.approx(400 * 15 * 144 / 256)
    assert sum(2 * 36 * len(offsets) * s.positions_used for s in stats.values()) <= 10 * 9_216
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and all("cost bound (92,160 multiply-adds per image for the layers recorded together: 10 x "
                                    "the forward pass) leaves 3,375 pairs" in w for w in warned)
    with pytest.warns(UserWarning):  # whatever else it says, the evidence carries the shortfall
        evidence = UnitClustering(n_clusters=2).fit(stats["1"]).evidence_
    assert evidence.pairs_short == pytest.approx(3375)
    # within a generous bound, or with positions given, nothing is cut
    roomy = topo.record(model, loader, ["0", "1"], progress=False, cost_multiple=30)
    assert all(s.positions_used == 45 and s.pairs_short is None for s in roomy.values())
    given = topo.record(model, loader, ["0", "1"], progress=False, positions=45, cost_multiple=10)
    assert all(s.positions_used == 45 and s.pairs_short is None for s in given.values())
