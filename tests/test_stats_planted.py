"""The planted layer (64 channels, 16x16 maps, 300 images, 18 hidden units) recovered with every
argument at its default, through from_activations and through topo.record."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import topo
from topo.cluster import UnitClustering
from topo.cluster.metrics import recovery_scores
from topo.planted.generator import generate
from topo.stats.positions import MIN_PAIRS
from topo.stats.layer_stats import from_activations

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def planted():
    return generate(num_channels=64, num_hidden=18, height=16, width=16, num_samples=300)


def recovered(planted, stats) -> dict:
    return recovery_scores(planted.truth, UnitClustering(method="arora", progress=False).fit(stats))


def test_from_activations_with_defaults_recovers_the_planted_layer(planted):
    stats = from_activations(torch.from_numpy(planted.activations))
    assert stats.exact and stats.count == 300 * 256 and stats.fire_quantile == 0.9
    scores = recovered(planted, stats)
    assert scores["n_found"] == scores["n_true"] == 18
    assert scores["jaccard"] >= 0.9 and scores["precision_jaccard"] >= 0.9
    # the old default, one random position per image, lost this layer: the test can tell them apart
    old = recovered(planted, from_activations(torch.from_numpy(planted.activations), positions=1, threshold=0.0))
    assert old["jaccard"] < 0.5


class _Planted(nn.Module):
    """A model whose layer ``out`` outputs the planted activations it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Identity()

    def forward(self, x):
        return self.out(x)


def test_record_with_defaults_recovers_the_planted_layer(planted):
    loader = DataLoader(TensorDataset(torch.from_numpy(planted.activations)), batch_size=50)
    stats = topo.record(_Planted(), loader, ["out"], progress=False)["out"]
    # the model costs no multiply-adds, so positions are sampled: enough for MIN_PAIRS pairs per offset
    inside = (16 - 4) ** 2 / 16**2
    assert not stats.exact and stats.positions_used == math.ceil(MIN_PAIRS / (300 * inside))
    scores = recovered(planted, stats)
    assert scores["n_found"] == scores["n_true"] == 18
    assert scores["jaccard"] >= 0.9 and scores["precision_jaccard"] >= 0.9
