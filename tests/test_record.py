"""topo.record: forward hooks on real models over real images (sklearn's digits)."""
from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import topo
from topo.common.errors import StatsError, UserError
from topo.stats.positions import DEFAULT_POSITIONS
from topo.stats.layer_stats import from_activations


# not conftest.py's digits (topo's train/val split): the first 192 of scikit-learn's digits, as a TensorDataset
@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    images = torch.tensor(data.images[:192] / 16.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    return TensorDataset(images, torch.tensor(data.target[:192]))


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 10),
    )


def test_record_matches_statistics_of_the_captured_activations(digits):
    model = small_cnn()
    model.train()
    model[3].eval()  # a submodule in its own mode must be left that way
    loader = DataLoader(digits, batch_size=50)
    stats = topo.record(model, loader, ["4", "7:input", "1"], max_offset=2, positions=None, progress=False)
    assert list(stats) == ["4", "7:input", "1"]
    assert model.training and not model[3].training and model[0].training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

    model.eval()
    with torch.no_grad():
        images = torch.cat([x for x, _ in loader])
        after_conv = model[:5](images)
        pooled = model[:7](images)
    relu = stats["4"]
    assert relu.name == "4" and relu.count == 192 * 64 and relu.spatial_shape == (8, 8)
    reference = from_activations(after_conv, max_offset=2, positions=None)
    assert relu.offsets == reference.offsets and (-2, 2) in relu.offsets
    for dy, dx in [(0, 0), (1, -1), (-2, 2)]:
        np.testing.assert_allclose(relu.cross_corr(dy, dx), reference.cross_corr(dy, dx), atol=1e-10)
    flat = after_conv.double().permute(0, 2, 3, 1).reshape(-1, 12).numpy()
    live = np.setdiff1d(np.arange(12), relu.dead_units)
    np.testing.assert_allclose(relu.corr()[np.ix_(live, live)], np.corrcoef(flat[:, live].T), atol=1e-6)
    # the head's input: one observation per image
    head = stats["7:input"]
    assert not head.spatial and head.count == 192
    np.testing.assert_allclose(head.mean, pooled.double().mean(0).numpy(), atol=1e-6)
    # digits have strokes: neighbouring positions of the first ReLU co-activate above chance
    _, lift = stats["1"].coactivation(0, 1)
    assert np.nanmax(np.diag(lift)) > 1.0


def test_record_defaults_on_googlenet_small(digits):
    builders = pytest.importorskip("builders")
    model = builders.googlenet(variant="small", num_classes=10, in_channels=1, width_mult=0.25)
    loader = DataLoader(digits, batch_size=32)
    stats = topo.record(model, loader, ["inception3a", "inception5b", "avgpool:input"], max_batches=2, progress=False)
    c3a = stats["inception3a"]
    assert c3a.positions == DEFAULT_POSITIONS and c3a.spatial_shape == (8, 8)
    # 64 images of 8x8 cannot give MIN_PAIRS pairs at the (4, 4) offset by sampling: every position is used
    assert c3a.exact and c3a.positions_used == 64
    assert c3a.count == 64 * c3a.positions_used
    assert stats["avgpool:input"].num_channels == stats["inception5b"].num_channels
    np.testing.assert_allclose(stats["avgpool:input"].cov(), stats["inception5b"].cov())
    assert np.isfinite(c3a.cross_corr(4, -4)).all()


def test_unknown_layer_lists_close_matches():
    with pytest.raises(StatsError, match=r"'conv_2'.*close matches: conv2") as info:
        topo.record(_Named(), [torch.zeros(1, 1, 4, 4)], ["conv_2"], progress=False)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    with pytest.raises(StatsError, match="suffix"):
        topo.record(_Named(), [torch.zeros(1, 1, 4, 4)], ["conv2:grad"], progress=False)


class _Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.conv1(x))


def test_nan_activation_names_layer_and_batch_and_hooks_are_removed():
    model = _Named()
    model.train()
    batches = [torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4), torch.full((2, 1, 4, 4), float("nan"))]
    with pytest.raises(StatsError, match=r"layer 'conv2'.*batch 2"):
        topo.record(model, batches, ["conv2"], progress=False)
    assert model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hooks_removed_after_an_error_in_forward():
    model = _Named()
    with pytest.raises(RuntimeError):
        topo.record(model, [torch.zeros(2, 5, 4, 4)], ["conv1", "conv2:input"], progress=False)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


Pair = namedtuple("Pair", "features extra")


class _TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return Pair(y, y.sum())


def test_tuple_outputs_take_the_first_tensor_and_max_batches_stops(digits):
    model = nn.Sequential(_TupleOut())
    loader = DataLoader(digits, batch_size=16)
    stats = topo.record(model, loader, ["0"], max_batches=3, progress=False)
    assert stats["0"].count == 3 * 16 * stats["0"].positions_used and stats["0"].num_channels == 4
    exact = topo.record(model, [x for x, _ in loader][:1], ["0"], positions="all", progress=False)["0"]
    assert exact.count == 16 * 36 and exact.spatial_shape == (6, 6)


class _CountingLoader:
    """A DataLoader stand-in that counts how often iteration starts (each start spawns workers)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.started = loader, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.started += 1
        return iter(self.loader)


@pytest.mark.parametrize("progress", [True, False])
def test_record_iterates_the_data_once(digits, progress):
    loader = _CountingLoader(DataLoader(digits, batch_size=64))
    stats = topo.record(small_cnn(), loader, ["1"], threshold=0.0, progress=progress)  # no calibration pass
    assert loader.started == 1
    assert stats["1"].count == 192 * stats["1"].positions_used


@pytest.mark.parametrize("progress", [True, False])
def test_record_with_calibration_iterates_the_data_once_while_it_fits(digits, progress):
    loader = _CountingLoader(DataLoader(digits, batch_size=64))
    stats = topo.record(small_cnn(), loader, ["1"], progress=progress)  # fire_quantile=0.9: calibrate, replay
    assert loader.started == 1
    assert stats["1"].count == 192 * stats["1"].positions_used
    twice = _CountingLoader(DataLoader(digits, batch_size=64))
    again = topo.record(small_cnn(), twice, ["1"], progress=progress, replay_bytes=0)  # calibrate, then record
    assert twice.started == 2
    assert again["1"].count == stats["1"].count


@pytest.mark.gpu
def test_statistics_accumulate_on_the_model_device(digits):
    model = small_cnn().cuda()
    loader = DataLoader(digits, batch_size=64)
    on_gpu = topo.record(model, loader, ["4"], progress=False)["4"]
    assert on_gpu._state["prod"].is_cuda
    on_cpu = topo.record(model.cpu(), loader, ["4"], progress=False)["4"]
    # same seed, same anchors on both devices
    np.testing.assert_allclose(on_gpu.cross_corr(1, -1), on_cpu.cross_corr(1, -1), atol=1e-5)


def test_recording_under_cpu_autocast_keeps_float64_sums(digits):
    model = small_cnn()
    loader = DataLoader(digits, batch_size=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = topo.record(model, loader, ["4"], max_offset=1, positions=None, progress=False)["4"]
    assert stats._state["prod"].dtype == torch.float64
    plain = topo.record(model, loader, ["4"], max_offset=1, positions=None, progress=False)["4"]
    # bfloat16 activations differ from float32 ones by ~1e-2 relative; the correlations stay close
    assert np.abs(stats.corr() - plain.corr()).max() < 0.05


def test_record_names_the_statistics_it_is_told_to_and_rejects_unknown_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1))
    batches = [torch.randn(2, 3, 6, 6) for _ in range(2)]
    stats = topo.record(model, batches, ["0", "2"], names={"2": "the 1x1 layer"}, progress=False)
    assert stats["0"].name == "0" and stats["2"].name == "the 1x1 layer"
    with pytest.raises(StatsError, match=r"names are given for \['1'\]"):
        topo.record(model, batches, ["0", "2"], names={"1": "a layer not recorded"}, progress=False)
