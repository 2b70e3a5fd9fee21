"""`topo.construct.decoding`: threshold decoding of Hebbian units at ``--budget none``.

On a planted layer with known 1x1, 3x3 and 5x5 supports: each decoded unit's
target rate is the least co-firing of its members, computed here directly
from the activations with numpy; after decoding, each unit fires (is positive)
at that rate over the calibration data, exactly where its sum exceeds the
threshold; each reduction passes its channel through rectified at 0.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from builders.from_clusters import clusters_by_branch, from_clusters
from builders.inception import Inception
from topo.cluster import UnitClustering
from topo.construct.config import ConstructConfig
from topo.construct.prefix import calibrate_batchnorm, forward_batches
from topo.construct.decoding import cofiring_rate, threshold_decode_, unit_rates
from topo.common.errors import UserError
from topo.construct.hebbian import hebbian_init_
from topo.planted.generator import PlantedConfig, generate
from topo.stats.layer_stats import from_activations

CONFIG = PlantedConfig(num_channels=40, num_hidden=9, degree=4, kernel_mix=(1, 1, 1), density=0.03, num_samples=64,
                       height=12, width=12, disjoint=True, seed=3)


pytestmark = pytest.mark.filterwarnings("ignore:UnitClustering:UserWarning")  # the power warning, tested elsewhere


@pytest.fixture(scope="module")
def decoded(one_thread_module):
    sample = generate(CONFIG)
    x = torch.from_numpy(sample.activations)
    stats = from_activations(x, threshold=0.0)
    clustering = UnitClustering(method="arora", random_state=0, progress=False).fit(stats)
    pooled_x = F.max_pool2d(x, 3, 1, padding=1)
    pooled = from_activations(pooled_x, threshold=0.0, max_offset=0)
    pool_clustering = UnitClustering(method="arora", window=1, random_state=0, progress=False).fit(pooled)
    spec = from_clusters(clustering, stats, budget=None, round_to=None, reduce_to_channels=True, carry=False,
                         pool_units=pool_clustering.n_clusters_)
    torch.manual_seed(0)
    module = hebbian_init_(Inception(spec, kernel5x5=5), clustering, stats, pool_clustering, carry=False)
    batches = list(x.split(16))
    info = threshold_decode_(module, module, clustering, stats, pool_clustering=pool_clustering, pooled=pooled,
                             calibrate=lambda: calibrate_batchnorm(module, batches, len(batches), "cpu"),
                             run=lambda: forward_batches(module, batches, len(batches), "cpu"))
    module.eval()
    return sample, x, stats, clustering, pool_clustering, pooled, module, info


def _numpy_cofiring(x: np.ndarray, members) -> float:
    """min over member pairs of P(x_i(p) > 0 and x_j(p + d) > 0), over the positions where both are inside."""
    fire = x > 0
    n, _, h, w = x.shape
    rates = [fire[:, members[0][0]].mean()]
    for a, (i, ay, ax) in enumerate(members):
        for j, by, bx in members[a + 1:]:
            dy, dx = by - ay, bx - ax
            ys, xs = slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx))
            ys2, xs2 = slice(max(0, dy), h - max(0, -dy)), slice(max(0, dx), w - max(0, -dx))
            rates.append((fire[:, i, ys, xs] & fire[:, j, ys2, xs2]).mean())
    return float(min(rates))


def test_the_target_rate_is_the_members_least_co_firing(decoded):
    sample, x, stats, clustering, *_ = decoded
    assert clustering.n_clusters_ >= 6
    for cluster in clustering.clusters_:
        expected = _numpy_cofiring(sample.activations, cluster.members)
        assert cofiring_rate(stats, cluster.members) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert cofiring_rate(stats, [(3, 0, 0)]) == pytest.approx((sample.activations[:, 3] > 0).mean())


def _branch_outputs(module: Inception, x: torch.Tensor) -> dict[int, torch.Tensor]:
    spec = module.spec
    out = module(x)
    widths = {1: spec.ch1x1, 3: spec.ch3x3, 5: spec.ch5x5, 0: spec.pool_proj}
    parts = torch.split(out, [widths[k] for k in (1, 3, 5, 0)], dim=1)
    return dict(zip((1, 3, 5, 0), parts))


def test_each_decoded_unit_fires_at_its_clusters_rate(decoded):
    _, x, stats, clustering, pool_clustering, pooled, module, info = decoded
    by_branch = clusters_by_branch(clustering.clusters_)
    with torch.no_grad():
        outputs = _branch_outputs(module, x)
    checked = 0
    for kernel, clusters, layer in ((1, by_branch[1], stats), (3, by_branch[3], stats), (5, by_branch[5], stats),
                                    (0, pool_clustering.clusters_, pooled)):
        rates = unit_rates(clusters, layer)
        fired = (outputs[kernel] > 0).double().mean(dim=(0, 2, 3)).numpy()
        assert len(fired) == len(rates) > 0
        # the (1 - r)-quantile of the sum is exceeded at rate r, up to ties at the threshold
        assert np.all(fired <= rates + 2e-3), (kernel, fired, rates)
        assert np.all(fired >= 0.5 * rates), (kernel, fired, rates)
        checked += len(rates)
    assert info["decoded_units"] == checked


def test_below_the_threshold_a_unit_is_silent_and_above_it_grows_with_the_sum(decoded):
    """A 1x1 unit is relu(gamma * (s - threshold) / std): zero exactly where s is at or below its threshold."""
    _, x, _, clustering, _, _, module, _ = decoded
    spec, bn = module.spec, module.fused1x1.bn
    with torch.no_grad():
        s = F.conv2d(x, module.fused1x1.conv.weight[: spec.ch1x1])
        out = _branch_outputs(module, x)[1]
        std = torch.sqrt(bn.running_var[: spec.ch1x1] + bn.eps)
        level = bn.running_mean[: spec.ch1x1] - bn.bias[: spec.ch1x1] * std / bn.weight[: spec.ch1x1]
    expected = torch.relu(bn.weight[: spec.ch1x1, None, None] * (s - level[:, None, None]) / std[:, None, None])
    assert torch.allclose(out, expected, atol=1e-5)
    assert (level > 0).all()  # above the sum's zero: the unit is sparser than "any member on"


def test_a_reduction_passes_its_channel_through_rectified_at_zero(decoded):
    _, x, _, _, _, _, module, _ = decoded
    spec = module.spec
    with torch.no_grad():
        reduced = torch.split(module.fused1x1(x), [spec.ch1x1, spec.ch3x3red, spec.ch5x5red], dim=1)
    weight = module.input_weights()[3].detach()[:, :, 0, 0]
    for row, channel in enumerate(weight.abs().argmax(dim=1).tolist()):
        assert torch.count_nonzero(weight[row]) == 1  # a selection (--budget none)
        out, inp = reduced[1][:, row].flatten(), x[:, channel].flatten()
        scale = out.max() / inp.max()
        assert scale > 0
        assert torch.allclose(out, scale * inp.clamp(min=0), atol=1e-5 * float(out.max()))  # passed through


def test_the_decoder_is_validated():
    assert ConstructConfig().decoder == "mean"
    with pytest.raises(UserError, match="decoder 'and' is unknown: use one of threshold, mean"):
        ConstructConfig(decoder="and")
    for options in ({}, {"init": "hebbian"}, {"budget_macs": "none"}):  # it has nothing to decode there
        with pytest.raises(UserError, match="use it with init .hebbian. and budget .none."):
            ConstructConfig(decoder="threshold", **options)


# --------------------------------------------------------------------------- through the construction
def _construction(**overrides):
    """The planted deep network (`load("planted")`) through `construct`, two modules, exact statistics."""
    import builders
    from topo.construct.loop import BuiltLayers, construct
    from topo.data import load, make_loader

    bundle = load("planted", seed=0)
    reference = builders.googlenet_spec("small", num_classes=bundle.num_classes, width_mult=0.25,
                                        in_channels=bundle.in_channels, input_size=16)
    config = ConstructConfig(skeleton="2", stem="none", init="hebbian", budget_macs="none", positions=None,
                             stats_batches=None, fire_quantile=None, null="none", **{"seed": 0, **overrides})
    loader = lambda d: make_loader(d, batch_size=64, train=True, seed=0, workers=0, device="cpu", distributed=False)
    built = BuiltLayers()
    result = construct(reference, bundle.train, config, input_hw=(16, 16), loader=loader, progress=False,
                       on_layer=built)
    return SimpleNamespace(spec=result.spec, records=result.records, stats=built.stats,
                           clusterings=built.clusterings)


@pytest.fixture(scope="module")
def constructions(one_thread_module):
    # direct_only=False: the decoders as docs/clustering.md compares them (measured before edges a translate
    # explains were dropped by default; with them layer 2's mean gain is 0.147, recorded there)
    return {decoder: _construction(decoder=decoder, pool_branch=False, direct_only=False)
            for decoder in ("threshold", "mean")}


@pytest.mark.slow
def test_the_decoded_rates_reach_the_next_layers_statistics(constructions):
    """What the decoder set is what the next module's statistics see: the first module's units fire at their
    clusters' rates, far below the mean decoder's (above the sum's mean)."""
    threshold, mean = constructions["threshold"], constructions["mean"]
    first = threshold.records[0]
    spec = threshold.spec.inception_modules()[0]
    assert spec.pool_proj == 0 and first["decoded_units"] == spec.out_channels  # every unit decoded, no pool branch
    seen = float(np.mean(threshold.stats["inception3a"].firing_rate))
    assert seen == pytest.approx(first["decoded_rate"], rel=0.1), (seen, first["decoded_rate"])
    assert "decoded_rate" not in mean.records[0]
    assert float(np.mean(mean.stats["inception3a"].firing_rate)) > 2 * seen


@pytest.mark.slow
def test_the_threshold_decoder_recovers_the_second_layer_better_than_the_mean(constructions):
    """Over construction seeds 0-2 (each seed its modules' random init; the data is seed 0's): layer 2's Jaccard
    gains more than 0.15 on average, and on every seed (docs/clustering.md: the gain varies with the init)."""
    from topo.planted.generator import generate_deep
    from topo.data.tensors import PLANTED_DATA
    from topo.planted.recovery import layer_recovery

    sample = generate_deep(PLANTED_DATA, seed=0)
    gains = []
    for seed in (0, 1, 2):
        runs = constructions if seed == 0 else {d: _construction(decoder=d, pool_branch=False, seed=seed,
                                                             direct_only=False) for d in ("threshold", "mean")}
        scores = {d: [r["jaccard"] for r in layer_recovery(sample, [c.clusterings[m] for m in ("inception3a",
                                                                                               "inception3b")])]
                  for d, c in runs.items()}
        assert scores["threshold"][0] == scores["mean"][0]  # layer 1: the same statistics, the same clusters
        assert scores["threshold"][1] > scores["mean"][1], (seed, scores)
        gains.append(scores["threshold"][1] - scores["mean"][1])
    assert np.mean(gains) > 0.15, gains
