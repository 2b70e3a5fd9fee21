"""The control of every run (topo.controls) and its null inputs (topo.controls.nulls)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from topo.controls.control import (
    ALPHA,
    ControlConfig,
    ControlSummary,
    module_shares,
    permutation_p,
    statistic,
    summarise,
    topology_distance,
    topology_shares,
    verdict,
)
from topo.common.errors import UserError
from topo.controls.nulls import NullBatches, PixelMoments, null_batches


def _records(shares_per_module):
    """Layer records whose modules have the given (1x1, 3x3, 5x5) output widths."""
    return [{"name": f"m{i}", "spec": {"ch1x1": a, "ch3x3": b, "ch5x5": c}}
            for i, (a, b, c) in enumerate(shares_per_module)]


def test_shares_and_distance_by_hand():
    assert module_shares({"ch1x1": 2, "ch3x3": 1, "ch5x5": 1}).tolist() == [0.5, 0.25, 0.25]
    assert module_shares({"ch1x1": 0, "ch3x3": 0, "ch5x5": 0}).tolist() == [0, 0, 0]
    a = topology_shares(_records([(1, 0, 0), (0, 1, 1)]))
    b = topology_shares(_records([(0, 0, 1), (0, 1, 1)]))
    # module 0: L1 of (1,0,0) vs (0,0,1) is 2; module 1: 0; mean 1
    assert topology_distance(a, b) == pytest.approx(1.0)
    with pytest.raises(UserError, match="same skeleton"):
        topology_distance(a, topology_shares(_records([(1, 0, 0)])))


def test_permutation_p_matches_exhaustive_enumeration():
    """With few topologies the Monte Carlo p-value approaches the exact one over every labelling."""
    rng = np.random.default_rng(0)
    real = [rng.dirichlet([1, 1, 1], size=2) for _ in range(2)]
    control = [rng.dirichlet([1, 1, 1], size=2) for _ in range(2)]
    stacked = np.stack(real + control)
    observed = statistic(real, control)
    # exact: every labelling per module independently (C(4,2) = 6 per module, 36 in all)
    labellings = list(itertools.combinations(range(4), 2))
    hits = total = 0
    for per_module in itertools.product(labellings, repeat=2):
        real_sets = [np.stack([stacked[per_module[m][j], m] for m in range(2)]) for j in range(2)]
        control_ids = [[i for i in range(4) if i not in per_module[m]] for m in range(2)]
        control_sets = [np.stack([stacked[control_ids[m][j], m] for m in range(2)]) for j in range(2)]
        hits += statistic(real_sets, control_sets) >= observed - 1e-12
        total += 1
    exact = hits / total
    p = permutation_p(real, control, permutations=20000, seed=1)
    assert p == pytest.approx(exact, abs=0.02)


def test_identical_topologies_are_not_a_difference_and_distinct_ones_are():
    same = _records([(4, 2, 2), (2, 4, 2), (1, 1, 6)])
    summary = summarise(["m0", "m1", "m2"], [same, same], {"shuffled": [same]}, permutations=999)
    outcome = summary.outcomes[0]
    assert outcome.distance == 0 and outcome.p_value == 1.0 and not outcome.passes
    assert "not shown to depend" in verdict(summary)
    # real seeds agree closely; the control differs in every module -> a clear difference
    real_a = _records([(6, 1, 1)] * 8)
    real_b = _records([(6, 1, 1)] * 7 + [(5, 2, 1)])
    other = _records([(1, 1, 6)] * 8)
    summary = summarise([f"m{i}" for i in range(8)], [real_a, real_b], {"noise": [other, other]},
                        permutations=4999)
    outcome = summary.outcomes[0]
    assert outcome.distance > 1.0 and outcome.ratio > 3 and outcome.p_value < ALPHA
    assert summary.depends_on_data and verdict(summary).startswith("This run's topology depends on its data")
    again = ControlSummary.from_dict(summary.to_dict())
    assert again.outcomes[0].p_value == outcome.p_value and np.allclose(again.shares["noise"][0],
                                                                        summary.shares["noise"][0])


def test_control_config_is_checked():
    with pytest.raises(UserError, match="unknown"):
        ControlConfig(kinds=("pink",))
    with pytest.raises(UserError, match="2 real seeds"):
        ControlConfig(real_seeds=1)


def _batches(n=6, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 16, 1, size, size, generator=g)
    # smooth images: neighbouring pixels correlate strongly
    smooth = torch.nn.functional.avg_pool2d(base.flatten(0, 1), 3, 1, 1).reshape(n, 16, 1, size, size)
    return [(smooth[i], torch.arange(16) % 3) for i in range(n)]


def _neighbour_corr(x: torch.Tensor) -> float:
    a, b = x[..., :, :-1].reshape(-1).double(), x[..., :, 1:].reshape(-1).double()
    return float(np.corrcoef(a.numpy(), b.numpy())[0, 1])


def test_shuffled_pixels_keep_values_and_lose_geometry():
    batches = _batches()
    null = list(NullBatches(batches, "shuffled", seed=3))
    for (x, y), (nx, ny) in zip(batches, null):
        assert torch.equal(y, ny)
        assert torch.equal(torch.sort(x.flatten(1), dim=1).values, torch.sort(nx.flatten(1), dim=1).values)
    x = torch.cat([b[0] for b in batches])
    nx = torch.cat([b[0] for b in null])
    assert _neighbour_corr(x) > 0.5 and abs(_neighbour_corr(nx)) < 0.2
    again = list(NullBatches(batches, "shuffled", seed=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(null, again))


def test_matched_noise_keeps_pixel_moments_and_loses_correlation():
    batches = _batches(n=40)
    moments = PixelMoments.of(batches)
    x = torch.cat([b[0] for b in batches]).double()
    assert torch.allclose(moments.mean, x.mean(0), atol=1e-10)
    assert torch.allclose(moments.std, x.std(0), atol=1e-10)  # unbiased, like torch.std
    null = null_batches(lambda: batches, "noise", seed=0, max_batches=None)
    nx = torch.cat([b[0] for b in null]).double()
    assert torch.allclose(nx.mean(0), moments.mean, atol=4 * float(moments.std.max()) / np.sqrt(len(nx)))
    assert abs(_neighbour_corr(nx)) < 0.1 < _neighbour_corr(x)
    with pytest.raises(UserError, match="moments"):
        NullBatches(batches, "noise")


def test_the_smallest_attainable_p_is_stated_where_it_is_above_alpha():
    from topo.controls.control import smallest_p

    assert smallest_p(2, 1, 9, 10**6) == pytest.approx(3.0 ** -9)
    assert smallest_p(2, 1, 9, 9999) == pytest.approx(1e-4)
    assert smallest_p(2, 1, 9, 99) == pytest.approx(0.01)
    real = [_records([(6, 1, 1)] * 2), _records([(6, 1, 1)] * 2)]
    summary = summarise(["m0", "m1"], real, {"noise": [_records([(1, 1, 6)] * 2)]}, permutations=999)
    outcome = summary.outcomes[0]
    assert outcome.min_p == pytest.approx(1 / 9) and outcome.p_value > ALPHA  # a Monte Carlo estimate of 1/9
    assert "cannot go below p = 0.11" in verdict(summary)


@pytest.mark.slow
def test_a_construction_on_noise_differs_from_one_on_structured_data(tmp_path, one_thread):
    """The run's own control on planted data (a known sparse network): its topology is far from those built on
    the pixel-shuffled data and on matched-moment noise, by the documented target (topo.controls)."""
    from topo.construct.config import ConstructConfig
    from topo.run.config import RunConfig, load_data
    from topo.run.stages import constructions_stage
    from topo.run.rundir import RunDir
    from topo.train.config import TrainConfig

    config = RunConfig(data="planted", construct=ConstructConfig(skeleton="2", stem="none", budget_macs="none",
                                                                 stats_batches=4),
                       control=ControlConfig(real_seeds=4, control_seeds=2, permutations=4999),
                       train=TrainConfig(progress=False, workers=0, batch_size=64))
    run = RunDir(tmp_path / "run")
    run.write_config(config.to_dict())
    bundle = load_data(config)
    _, summary = constructions_stage(config, bundle, run)
    assert [o.kind for o in summary.outcomes] == ["shuffled", "noise"]
    for outcome in summary.outcomes:
        assert outcome.min_p < ALPHA
        assert outcome.distance >= 0.15 and outcome.ratio >= 3 and outcome.p_value < ALPHA, outcome
    assert summary.depends_on_data
    assert ControlSummary.from_dict(__import__("json").loads(run.controls.read_text())).depends_on_data
    assert "controls" in run.completed()
