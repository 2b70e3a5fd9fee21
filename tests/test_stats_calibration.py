"""Per-unit firing thresholds: the quantile calibration (ActivationSample) against numpy.quantile, and its
use by from_activations and topo.record, including the calibration pass seeing the same batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from planted_configs import FLAT, SPATIAL
from stats_helpers import correlated_maps
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import topo
from topo.data import make_loader
from topo.common.errors import StatsError
from topo.planted.generator import generate
from topo.stats.sample import DEFAULT_FIRE_QUANTILE, ActivationSample
from topo.stats.layer_stats import LayerStats, from_activations


def unit_columns(x: np.ndarray) -> np.ndarray:
    """(observations, C): every (image, position) of a map, or every image of a vector layer."""
    return x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.ndim == 4 else x


def test_a_sample_holding_every_observation_gives_numpy_quantiles():
    x = correlated_maps(n=10, c=6, seed=30)  # 420 observations, fewer than the sample size
    sample = ActivationSample(seed=0)
    for batch in torch.from_numpy(x).split(3):
        sample.update(batch)
    assert sample.count == 420 and sample.values.shape == (420, 6)
    columns = unit_columns(x)
    np.testing.assert_array_equal(np.sort(sample.values, axis=0), np.sort(columns, axis=0))
    for q in (0.1, 0.5, 0.9):
        np.testing.assert_allclose(sample.quantile(q), np.quantile(columns, q, axis=0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 7, 1000])
def test_sample_quantiles_are_numpys_to_the_last_bit(dtype, rows):
    """The quantiles come from torch.kthvalue and numpy's interpolation formula: equal to numpy.quantile of the
    float64 sample, bit for bit, at every q (below and above the midpoint between two order statistics)."""
    x = torch.from_numpy(np.random.default_rng(rows).standard_normal((rows, 5))).to(dtype).relu()
    sample = ActivationSample(size=4096).update(x)
    for q in (0.001, 0.1, 0.3333, 0.5, 0.9, 0.95, 0.999):
        np.testing.assert_array_equal(sample.quantile(q), np.quantile(sample.values, q, axis=0))


def test_a_bounded_sample_is_seeded_uniform_and_close_to_the_whole_data():
    rng = np.random.default_rng(31)
    x = rng.gamma(2.0, size=(200, 5, 10, 10)) * rng.uniform(0.5, 3.0, size=(1, 5, 1, 1))  # 20,000 observations
    batches = list(torch.from_numpy(x).split(16))
    samples = [ActivationSample(size=2000, seed=seed) for seed in (0, 0, 1)]
    for sample in samples:
        for batch in batches:
            sample.update(batch)
    first, again, other = samples
    assert first.count == 20_000 and first.values.shape == (2000, 5)  # memory bounded by the sample size
    np.testing.assert_array_equal(first.values, again.values)
    assert not np.array_equal(first.values, other.values)
    # the same subsample, the same numbers as numpy.quantile
    np.testing.assert_allclose(first.quantile(0.9), np.quantile(first.values, 0.9, axis=0), rtol=0, atol=1e-12)
    # rows are whole observations: each sampled row is a (image, position) vector of the data
    columns = unit_columns(x)
    rows = {tuple(r) for r in columns}
    assert all(tuple(r) in rows for r in first.values[:50])
    # on the whole data, the estimate sits at the 0.9 quantile up to the sampling error sqrt(0.09 / 2000) ~ 0.007
    fraction_below = (columns <= first.quantile(0.9)).mean(0)
    assert np.abs(fraction_below - 0.9).max() < 4 * np.sqrt(0.09 / 2000)


def test_sample_errors():
    with pytest.raises(StatsError, match="no activations"):
        ActivationSample().quantile(0.9)
    with pytest.raises(StatsError, match="earlier batches had 3"):
        ActivationSample().update(torch.zeros(2, 3)).update(torch.zeros(2, 4), batch_index=1)
    with pytest.raises(StatsError, match=r"NaN or Inf in batch 2"):
        ActivationSample().update(torch.tensor([[float("nan")]]), batch_index=2)
    with pytest.raises(StatsError, match="fire_quantile"):
        ActivationSample().update(torch.ones(3, 2)).quantile(1.0)


def test_from_activations_defaults_to_quantile_thresholds():
    x = correlated_maps(n=12, c=5, seed=32)
    cut = np.quantile(x[:, 4], 0.95)
    x[:, 4] = np.where(x[:, 4] > cut, x[:, 4] - cut, 0.0)  # a ReLU unit, positive 5% of the time
    stats = from_activations(list(torch.from_numpy(x).split(4)))
    columns = unit_columns(x)
    assert stats.fire_quantile == DEFAULT_FIRE_QUANTILE == 0.9
    np.testing.assert_allclose(stats.thresholds, np.quantile(columns, 0.9, axis=0), rtol=0, atol=1e-12)
    assert 0.0 < (columns[:, 4] > 0).mean() < 0.1 and stats.thresholds[4] == 0.0  # fires when positive
    np.testing.assert_allclose(stats.firing_rate, (columns > stats.thresholds).mean(0))
    # continuous units: the interpolated quantile leaves 10% of the observations above it, to one observation
    assert np.abs(stats.firing_rate[:4] - 0.1).max() <= 1 / len(columns)
    # an explicit threshold wins; threshold=None with fire_quantile=None means 0
    given = from_activations(torch.from_numpy(x), threshold=0.5)
    assert given.threshold == 0.5 and given.fire_quantile is None
    zero = from_activations(torch.from_numpy(x), fire_quantile=None)
    assert zero.threshold == 0.0
    np.testing.assert_allclose(zero.firing_rate, (columns > 0).mean(0))


def test_a_one_shot_iterator_cannot_be_calibrated():
    batches = list(torch.from_numpy(correlated_maps(n=4, seed=33)).split(2))
    with pytest.raises(StatsError, match="one-shot iterator") as info:
        from_activations(iter(batches))
    assert "\n" not in str(info.value) and "threshold=" in str(info.value)
    assert from_activations(iter(batches), threshold=0.0).count == 4 * 42
    assert from_activations(tuple(batches)).fire_quantile == 0.9  # a tuple can be scanned twice


@pytest.mark.parametrize("config", [SPATIAL, FLAT], ids=["spatial", "flat"])
def test_planted_units_fire_rarely_so_the_default_changes_nothing(config):
    """Planted units fire less than 10% of the time: their 0.9-quantile is 0, i.e. the old threshold 0."""
    x = torch.from_numpy(generate(config).activations)
    default = from_activations(x, positions=None)
    zero = from_activations(x, positions=None, threshold=0.0)
    assert (x > 0).float().mean(dim=(0, 2, 3) if x.dim() == 4 else 0).max() < 0.1
    assert not default.thresholds.any()
    for dy, dx in default.offsets[:5]:
        for got, want in zip(default.coactivation(dy, dx), zero.coactivation(dy, dx)):
            np.testing.assert_array_equal(got, want)


def test_per_unit_threshold_checks_and_merge():
    x = torch.from_numpy(correlated_maps(n=8, c=5, seed=34))
    with pytest.raises(StatsError, match="3 thresholds for 5 units"):
        LayerStats(threshold=[0.0, 1.0, 2.0]).update(x)
    with pytest.raises(StatsError, match="threshold"):
        LayerStats(threshold=[0.0, float("nan")])
    with pytest.raises(StatsError, match="threshold"):
        LayerStats(threshold=np.zeros((2, 2)))
    thresholds = np.array([0.0, 0.5, 1.0, -1.0, 2.0])
    halves = [from_activations(part, positions=None, threshold=thresholds) for part in (x[:3], x[3:])]
    whole = from_activations(x, positions=None, threshold=thresholds)
    merged = halves[0].merge(halves[1])
    np.testing.assert_array_equal(merged.thresholds, thresholds)
    for got, want in zip(merged.coactivation(1, -2), whole.coactivation(1, -2)):
        np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(merged.cross_cov(2, 1), whole.cross_cov(2, 1), atol=1e-10)
    calibrated = from_activations(x[:3])  # its own quantiles: other thresholds
    with pytest.raises(StatsError, match="per-unit thresholds"):
        halves[0].merge(calibrated)


def test_save_load_keeps_thresholds_rates_and_the_positions_decision(tmp_path):
    x = torch.from_numpy(correlated_maps(n=6, c=5, seed=35))
    stats = from_activations(x, positions=4, seed=2, name="layer")
    path = tmp_path / "layer.pt"
    stats.save(path)
    loaded = LayerStats.load(path)
    np.testing.assert_array_equal(loaded.thresholds, stats.thresholds)
    assert isinstance(loaded.threshold, np.ndarray) and loaded.fire_quantile == 0.9
    np.testing.assert_array_equal(loaded.firing_rate, stats.firing_rate)
    assert (loaded.positions, loaded.positions_used, loaded.exact) == (4, 4, False)
    np.testing.assert_array_equal(loaded.coactivation(1, 1)[1], stats.coactivation(1, 1)[1])
    # a file of the previous layout is refused with a one-line message
    payload = torch.load(path, weights_only=True)
    payload["version"] = 1
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(StatsError, match="version 1.*record the statistics again") as info:
        LayerStats.load(tmp_path / "old.pt")
    assert "\n" not in str(info.value)


class _Logged(nn.Module):
    """Identity that keeps every input it sees, to compare the two passes of record()."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Identity()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.out(x)


class _Jittered(Dataset):
    """Maps with random augmentation drawn from torch's global RNG in __getitem__ (as torchvision's are)."""

    def __init__(self, maps: torch.Tensor) -> None:
        self.maps = maps

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, index: int):
        return self.maps[index] + 0.1 * torch.rand(()), 0


def _passes(model: _Logged, first_batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The inputs of the calibration pass and of the recording pass (the probe of one image left out)."""
    seen = [t for t in model.seen if t.shape[0] != 1 or first_batch_size == 1]
    half = len(seen) // 2
    return seen[:half], seen[half:]


@pytest.mark.parametrize("workers", [0, 1])
def test_calibration_pass_sees_the_same_batches_as_the_recording_pass(workers):
    maps = torch.from_numpy(correlated_maps(n=40, c=3, h=5, w=5, seed=36)).float()
    loader = make_loader(_Jittered(maps), batch_size=8, train=True, seed=3, workers=workers, device="cpu")
    model = _Logged()
    torch.manual_seed(0)
    stats = topo.record(model, loader, ["out"], progress=False, replay_bytes=0)["out"]  # two passes
    calibration, recording = _passes(model, 8)
    assert len(calibration) == len(recording) == 5  # train=True drops no batch of 8 out of 40
    for a, b in zip(calibration, recording):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the case built to fail: a pass of another epoch draws other augmentations (and another order)
    loader.set_epoch(1)
    other = [x for x, _ in loader]
    assert not all(torch.equal(a, b) for a, b in zip(recording, other))
    order = torch.cat(recording)
    # the thresholds are the quantiles of exactly what was recorded
    columns = order.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    np.testing.assert_allclose(stats.thresholds, np.quantile(columns, 0.9, axis=0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("layers", [["out"], ["out", "out:input"]], ids=["one layer", "two layers"])
def test_replaying_the_calibration_pass_gives_the_statistics_of_a_second_pass(layers):
    """The kept activations give bitwise the statistics a second pass gives, in one forward pass per batch;
    activations beyond ``replay_bytes`` make record() run the data again, with the same result."""
    maps = torch.from_numpy(correlated_maps(n=40, c=3, h=5, w=5, seed=38)).float()
    loader = make_loader(_Jittered(maps), batch_size=8, train=True, seed=3, workers=0, device="cpu")
    outcomes = {}
    for replay_bytes in (2**30, 40 * 3 * 5 * 5 * 4 * len(layers) - 1, 0):  # all kept; one byte short; none
        model = _Logged()
        torch.manual_seed(0)
        outcomes[replay_bytes] = topo.record(model, loader, layers, progress=False, replay_bytes=replay_bytes)
        batches = sum(1 for t in model.seen if t.shape[0] == 8)
        assert batches == (5 if replay_bytes == 2**30 else 10)
    for got in list(outcomes.values())[1:]:
        for spec in layers:
            assert got[spec].thresholds.tolist() == outcomes[2**30][spec].thresholds.tolist()
            for key, value in outcomes[2**30][spec]._state.items():
                torch.testing.assert_close(got[spec]._state[key], value, rtol=0, atol=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(StatsError, match="replay_bytes"):
            topo.record(_Logged(), loader, ["out"], progress=False, replay_bytes=bad)


def test_record_threshold_options():
    x = torch.from_numpy(correlated_maps(n=12, c=4, seed=37)).float()
    loader = torch.utils.data.DataLoader(TensorDataset(x), batch_size=4)
    model = _Logged()
    explicit = topo.record(model, loader, ["out"], threshold=0.25, progress=False)["out"]
    assert explicit.threshold == 0.25 and explicit.fire_quantile is None
    assert sum(t.shape[0] for t in model.seen if t.shape[0] > 1) == 12  # one pass
    default = topo.record(nn.Sequential(nn.Identity()), loader, ["0"], progress=False)["0"]
    reference = from_activations(list(x.split(4)))  # same batches, same seed: the same sample and thresholds
    np.testing.assert_array_equal(default.thresholds, reference.thresholds)
    np.testing.assert_allclose(default.cross_corr(1, 1), reference.cross_corr(1, 1), atol=1e-12)
    with pytest.raises(StatsError, match="fire_quantile"):
        topo.record(model, loader, ["out"], fire_quantile=1.5, progress=False)
    with pytest.raises(StatsError, match="threshold"):
        topo.record(model, loader, ["out"], threshold=[0.0, 1.0], progress=False)
