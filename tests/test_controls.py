"""The control of every run (topo.controls) and its null inputs (topo.controls.nulls)."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from topo.common.errors import UserError
from topo.controls.control import (
    ALPHA,
    KINDS,
    PROPERTIES,
    ControlConfig,
    ControlSummary,
    constructions_for,
    distance_matrix,
    permutation_p,
    profile,
    property_distance,
    smallest_p,
    summarise,
    verdict,
)
from topo.controls.nulls import (
    NullBatches,
    NullDataset,
    PixelMoments,
    null_batches,
    phase_randomised,
    stream_seed,
)


def _record(ch1x1, ch3x3, ch5x5, *, clusters=None, in_channels=64, red3=8, red5=4, pool=8):
    spec = {"ch1x1": ch1x1, "ch3x3red": red3, "ch3x3": ch3x3, "ch5x5red": red5, "ch5x5": ch5x5, "pool_proj": pool}
    found = clusters if clusters is not None else ch3x3 + ch5x5 + ch1x1
    return {"name": "m", "spec": spec, "n_clusters": found, "in_channels": in_channels}


def _topology(modules):
    """Records of modules given as (1x1, 3x3, 5x5) widths, or (1x1, 3x3, 5x5, clusters)."""
    return [dict(_record(*m[:3], clusters=m[3] if len(m) > 3 else None), name=f"m{i}")
            for i, m in enumerate(modules)]


# --------------------------------------------------------------------------- properties
def test_property_distances_by_hand():
    a = profile([_record(2, 1, 1, clusters=3), _record(4, 0, 0, clusters=0)])
    b = profile([_record(0, 0, 4, clusters=15), _record(0, 2, 2, clusters=7, red3=16)])
    # units: |log2(4) - log2(16)| = 2 and |log2(1) - log2(8)| = 3 -> mean 2.5
    assert property_distance(a, b, "units") == pytest.approx(2.5)
    # kernel mix: only module 0 found clusters in both: (.5, .25, .25) vs (0, 0, 1) -> L1 1.5
    assert property_distance(a, b, "kernel mix") == pytest.approx(1.5)
    # widths: module 0 outputs 4+8=12 vs 4+8=12, reductions equal -> 0; module 1: outputs 12 vs 12,
    # 3x3 reduction 8 vs 16 -> |log2(9/17)|, 5x5 equal -> mean over 6 widths
    assert property_distance(a, b, "widths") == pytest.approx(abs(math.log2(9 / 17)) / 6)
    with pytest.raises(UserError, match="same skeleton"):
        property_distance(a, profile([_record(1, 1, 1)]), "units")


def test_a_module_that_found_nothing_is_its_own_line_not_a_maximal_kernel_mix():
    """The old distance put a module without clusters (all 1x1) at the maximum 2 from an all-5x5 module."""
    nothing = _topology([(8, 0, 0, 0)] * 3)  # the fallback: no cluster, all 1x1
    spatial = _topology([(0, 0, 8)] * 3)
    a, b = profile(nothing), profile(spatial)
    assert math.isnan(property_distance(a, b, "kernel mix"))
    summary = summarise(["m0", "m1", "m2"], [spatial, spatial], {"noise": [nothing]}, permutations=99)
    assert summary.found_nothing("noise") == [3] and summary.found_nothing("real") == [0, 0]
    assert math.isnan(summary.outcome("noise", "kernel mix").distance)
    assert summary.outcome("noise", "units").distance == pytest.approx(math.log2(9))
    assert "found nothing in 3/3 modules" in verdict(summary)


# --------------------------------------------------------------------------- the test's unit
def _brute_force_p(distances, n_real):
    """Every labelling of n_real constructions as real, counted directly."""
    n = len(distances)

    def stat(real):
        control = [i for i in range(n) if i not in real]
        between = np.mean([distances[i, j] for i in real for j in control])
        within = np.mean([distances[i, j] for i, j in itertools.combinations(real, 2)])
        return between - within

    observed = stat(tuple(range(n_real)))
    values = [stat(real) for real in itertools.combinations(range(n), n_real)]
    return sum(v >= observed - 1e-12 for v in values) / len(values)


def test_the_construction_is_the_unit_of_the_permutation_test():
    rng = np.random.default_rng(0)
    real = [_topology([tuple(rng.integers(1, 9, 3)) for _ in range(9)]) for _ in range(4)]
    control = [_topology([tuple(rng.integers(1, 9, 3)) for _ in range(9)]) for _ in range(3)]
    profiles = [profile(t) for t in real + control]
    for name in PROPERTIES:
        distances = distance_matrix(profiles, name)
        assert permutation_p(distances, 4, permutations=9999) == pytest.approx(_brute_force_p(distances, 4))
    # the design's floor: 2 real constructions and 1 control never give p below 1/3, however many modules
    far = [_topology([(0, 0, 8)] * 9)] * 2
    summary = summarise([f"m{i}" for i in range(9)], far, {"phase": [_topology([(8, 8, 0)] * 9)]},
                        permutations=9999)
    for outcome in summary.outcomes:
        assert outcome.min_p == pytest.approx(1 / 3) and outcome.p_value >= 1 / 3 and not outcome.testable
    assert smallest_p(2, 1, 9999) == pytest.approx(1 / 3)
    assert "cannot give p below 0.33" in verdict(summary) and "distances and ratios only" in verdict(summary)


def test_the_constructions_needed_for_each_level():
    assert constructions_for(0.05) == (5, 2) and 1 / math.comb(7, 2) < 0.05 <= 1 / math.comb(6, 3)
    assert constructions_for(0.01) == (5, 4) and 1 / math.comb(9, 4) < 0.01 <= 1 / math.comb(8, 4)


def test_a_clear_difference_is_shown_and_identical_topologies_are_not():
    modules = [f"m{i}" for i in range(4)]
    jitter = np.random.default_rng(1)
    real = [_topology([(1, 2 + int(jitter.integers(0, 2)), 12) for _ in modules]) for _ in range(5)]
    other = [_topology([(1, 12 + int(jitter.integers(0, 2)), 2)] * 4) for _ in range(4)]
    summary = summarise(modules, real, {"other": other}, permutations=999)
    mix = summary.outcome("other", "kernel mix")
    assert mix.testable and mix.p_value == pytest.approx(1 / math.comb(9, 5)) and mix.shown
    assert "kernel mix" in summary.shown("other")
    # the case built to fail: the control is the data itself
    same = summarise(modules, real, {"other": real[:4]}, permutations=999)
    assert not any(o.shown for o in same.outcomes) and same.shown("other") == []
    again = ControlSummary.from_dict(json.loads(json.dumps(summary.to_dict())))
    assert again.outcome("other", "kernel mix").p_value == mix.p_value
    assert np.array_equal(again.profiles["other"][0]["found"], summary.profiles["other"][0]["found"])


def test_control_config_is_checked():
    with pytest.raises(UserError, match="unknown"):
        ControlConfig(kinds=("pink",))
    with pytest.raises(UserError, match="2 constructions"):
        ControlConfig(real_seeds=1)
    assert ControlConfig(kinds=["phase", "phase", "noise"]).kinds == ("phase", "noise")
    assert set(KINDS) == {"phase", "shuffled", "noise", "other"}


# --------------------------------------------------------------------------- null inputs
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
    null = null_batches(lambda: batches, "noise", seed=0, role="control", max_batches=None)
    nx = torch.cat([b[0] for b in null]).double()
    assert torch.allclose(nx.mean(0), moments.mean, atol=4 * float(moments.std.max()) / np.sqrt(len(nx)))
    assert abs(_neighbour_corr(nx)) < 0.1 < _neighbour_corr(x)
    with pytest.raises(UserError, match="moments"):
        NullBatches(batches, "noise")


def _photo_patches(size=32):
    """Grey 32-pixel windows of scikit-learn's two sample photographs."""
    from sklearn.datasets import load_sample_images

    windows = []
    for image in load_sample_images().images:
        grey = image.astype(np.float64).mean(axis=2) / 255.0
        for y in range(0, grey.shape[0] - size, 61):
            for x in range(0, grey.shape[1] - size, 67):
                windows.append(grey[y:y + size, x:x + size])
    return torch.tensor(np.array(windows)).unsqueeze(1)


def test_phase_randomised_photographs_keep_their_power_spectrum_and_lose_their_edges():
    x = _photo_patches()
    null = torch.cat([b[0] for b in NullBatches([(x, torch.zeros(len(x)))], "phase", seed=0)])
    assert torch.allclose(torch.fft.fft2(null).abs(), torch.fft.fft2(x).abs(), atol=1e-9)
    assert torch.allclose(null.mean((2, 3)), x.mean((2, 3)), atol=1e-12)
    assert not torch.allclose(null, x, atol=1e-3)
    # photographs have sparse, heavy-tailed gradients (edges); with their phases scrambled each image's
    # gradients are close to Gaussian (kurtosis 3). Median over the windows of each window's kurtosis:
    kurtosis = [float(np.median(scipy_stats.kurtosis(torch.diff(v, dim=-1).flatten(1).numpy(), axis=1,
                                                     fisher=False))) for v in (x, null)]
    assert kurtosis[0] > 4 and abs(kurtosis[1] - 3) < 0.2, kurtosis
    white = torch.randn(len(x), 1, 32, 32, dtype=torch.float64)
    assert torch.equal(phase_randomised(x, white), phase_randomised(x, white))


def test_every_role_draws_its_own_stream():
    batches = _batches(n=3)
    moments = PixelMoments.of(batches)
    draws = {role: torch.cat([b[0] for b in NullBatches(batches, "noise", seed=5, role=role, moments=moments)])
             for role in ("control", "reference")}
    assert not torch.allclose(draws["control"], draws["reference"])
    again = torch.cat([b[0] for b in NullBatches(batches, "noise", seed=5, role="control", moments=moments)])
    assert torch.equal(again, draws["control"])
    seeds = {stream_seed(s, r, k, i) for s in (0, 1) for r in ("control", "reference")
             for k in ("noise", "phase") for i in range(3)}
    assert len(seeds) == 2 * 2 * 2 * 3 and all(0 <= s < 2 ** 63 for s in seeds)


def test_the_noise_controls_null_is_not_its_own_input(tmp_path):
    """The noise control's construction tests every pair against a null of its input: the null's noise must
    not be the input's noise (before, both came from the construction's seed, batch by batch)."""
    from topo.construct.config import ConstructConfig
    from topo.construct.loop import null_input
    from topo.data import make_loader
    from topo.run.config import RunConfig, load_data
    from topo.run.stages import control_plan

    config = RunConfig(data="digits", construct=ConstructConfig(stats_batches=2))
    bundle = load_data(config)
    plan = control_plan(dataclasses_replace(config, kinds=("noise",)))
    (_, kind, seed), = [p for p in plan if p[1] == "noise"]
    construct_config = ConstructConfig(stats_batches=2, seed=seed, null="noise")

    def data():
        return make_loader(bundle.train, batch_size=64, train=True, seed=seed, workers=0, device="cpu")

    control_input = null_batches(data, kind, seed=seed, role="control", max_batches=2)  # as the run draws it
    reference = null_input(lambda: control_input, construct_config)
    x = torch.cat([b[0] for b in itertools.islice(control_input, 2)]).double()
    r = torch.cat([b[0] for b in itertools.islice(reference, 2)]).double()
    assert x.shape == r.shape and not torch.allclose(x, r)
    varies = x.std(0) > 0  # digits have constant corner pixels

    def correlation(a, b):
        """Mean over the varying pixels of the correlation of two draws across images."""
        a, b = ((v - v.mean(0)) / v.std(0).clamp_min(1e-12) for v in (a, b))
        return float((a * b).mean(0)[varies].mean())

    assert abs(correlation(x, r)) < 0.05  # independent draws
    # the case built to fail, the old design: the null drawn from the input's own stream is its input again
    shared = NullBatches(control_input, "noise", seed=seed, role="control", moments=PixelMoments.of(control_input, 2))
    again = torch.cat([b[0] for b in itertools.islice(shared, 2)]).double()
    assert correlation(x, again) > 0.95  # the same noise, up to the moments' estimation error


def dataclasses_replace(config, **control):
    import dataclasses

    return dataclasses.replace(config, control=dataclasses.replace(config.control, **control))


def test_every_construction_of_the_control_has_its_own_seed():
    from topo.run.config import RunConfig
    from topo.run.stages import control_plan

    config = dataclasses_replace(RunConfig(seed=7), kinds=KINDS, real_seeds=3, control_seeds=2)
    plan = control_plan(config)
    seeds = [config.construct.seed] + [seed for _, _, seed in plan]
    assert len(seeds) == len(set(seeds)) == 3 + 2 * len(KINDS)
    assert [kind for _, kind, _ in plan].count(None) == 2


@pytest.mark.slow
def test_a_noise_control_finds_no_more_edges_than_the_false_positive_rate_allows(tmp_path, one_thread):
    """The Hebbian test's family-wise false-positive rate is alpha = 0.01 per layer (Bonferroni over every pair
    and offset). A noise construction tested against an independent noise null must then find edges in at most
    one of its modules (P(two or more of 9) < 0.004); the real data, tested the same way, find edges in every
    module, at least ten each (an order of magnitude past the one edge a false positive makes)."""
    from topo.construct.config import ConstructConfig
    from topo.run.config import RunConfig, load_data
    from topo.run.stages import run_construction
    from topo.train.config import TrainConfig

    config = RunConfig(data="patches", construct=ConstructConfig(skeleton="2,pool,5,pool,2", seed=3),
                       train=TrainConfig(progress=False, workers=0))
    bundle = load_data(config)
    noise = run_construction(config, bundle, config.construct, tmp_path / "noise", null="noise")
    with_edges = [r["name"] for r in noise.records if r["edges"] > 0]
    assert len(with_edges) <= 1, [(r["name"], r["edges"]) for r in noise.records]
    # the case built to fail: the photographs against the same kind of null
    short = ConstructConfig(skeleton="2", seed=3)
    real = run_construction(config, bundle, short, tmp_path / "real")
    assert all(r["edges"] >= 10 for r in real.records), [r["edges"] for r in real.records]


def test_the_control_on_planted_data_shows_what_its_design_allows(tmp_path, one_thread):
    """The run's own control on planted data (a known sparse network) with 5 constructions on the data and 4 per
    control, the fewest that can reach p < 0.01: every property, p-value and found-nothing line is reported and
    read back, and the design's floor is below alpha."""
    from topo.construct.config import ConstructConfig
    from topo.run.config import RunConfig, load_data
    from topo.run.rundir import RunDir
    from topo.run.stages import constructions_stage
    from topo.train.config import TrainConfig

    config = RunConfig(data="planted", construct=ConstructConfig(skeleton="2", stem="none", budget_macs="none",
                                                                 stats_batches=4),
                       control=ControlConfig(kinds=("shuffled", "other"), real_seeds=5, control_seeds=4),
                       train=TrainConfig(progress=False, workers=0, batch_size=64))
    run = RunDir(tmp_path / "run")
    run.write_config(config.to_dict())
    _, summary = constructions_stage(config, load_data(config), run)
    assert [(o.kind, o.property) for o in summary.outcomes] == [(k, p) for k in ("shuffled", "other")
                                                                for p in PROPERTIES]
    for outcome in summary.outcomes:
        assert outcome.min_p == pytest.approx(1 / 126) and outcome.testable
        assert math.isnan(outcome.p_value) or outcome.min_p <= outcome.p_value <= 1
    saved = json.loads(run.controls.read_text())
    assert set(saved["found_nothing"]) == {"real", "shuffled", "other"} and len(saved["found_nothing"]["real"]) == 5
    assert ControlSummary.from_dict(saved).to_dict() == summary.to_dict()
    assert "controls" in run.completed()
    assert f"p < {ALPHA:g}" in verdict(summary)


def test_a_summary_of_the_old_control_is_one_line_with_the_fix(tmp_path):
    from topo.run.rundir import RunDir
    from topo.run.stages import read_controls

    run = RunDir(tmp_path / "run")
    run.controls.parent.mkdir(parents=True)
    run.controls.write_text(json.dumps({"modules": ["m0"], "shares": {"real": [[[1, 0, 0]]]}, "outcomes": []}))
    with pytest.raises(UserError, match="older version of the control.*delete .* to construct the controls again"):
        read_controls(run)


def test_construct_states_the_control_once(tmp_path, capsys, one_thread):
    """`topo-build construct` printed the control's paragraph twice (a log line and the command's own)."""
    from topo.cli.main import main

    status = main(["construct", "--data", "planted", "--stem", "none", "--budget", "none", "--skeleton", "2",
                   "--stats-batches", "4", "--batch-size", "64", "--workers", "0", "--jobs", "1", "--no-progress",
                   "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert status == 0
    assert (captured.out + captured.err).count("Control: 2 constructions on the data") == 1


# ------------------------------------------------------------ a control's brief training (--epochs-per-layer)


def _digits_images():
    from sklearn.datasets import load_digits
    from torch.utils.data import TensorDataset

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    return TensorDataset(x, torch.tensor(digits.target)), digits.target


def test_a_null_dataset_gives_each_image_its_null_and_a_label_drawn_at_random():
    """Shuffled: every image keeps its own pixel values under one permutation; the labels are drawn in range,
    fixed by the seed, and agree with the real ones about as often as chance (1 in 10), where the real labels
    (the case built to fail) agree always."""
    data, target = _digits_images()
    null = NullDataset(data, "shuffled", seed=3, num_classes=10)
    assert len(null) == len(data)
    images, labels = zip(*(null[i] for i in range(len(null))))
    first = data[0][0].flatten()
    assert torch.equal(images[0].flatten().sort().values, first.sort().values)  # its own pixels
    assert not torch.equal(images[0].flatten(), first)  # moved
    two = torch.stack([data[i][0] for i in range(2)])  # one permutation for every image
    assert torch.equal(torch.stack(images[:2]), null.null.draw(two, 0))
    labels = np.array(labels)
    assert labels.min() >= 0 and labels.max() <= 9 and len(set(labels.tolist())) == 10
    assert (labels == target).mean() < 0.15  # chance is 0.10
    assert (np.array([int(data[i][1]) for i in range(len(data))]) == target).mean() == 1.0
    again = NullDataset(data, "shuffled", seed=3, num_classes=10)
    assert [again[i][1] for i in range(50)] == labels[:50].tolist()
    other = NullDataset(data, "shuffled", seed=4, num_classes=10)
    assert [other[i][1] for i in range(50)] != labels[:50].tolist()


def test_a_null_datasets_parts_and_the_statistics_null_draw_from_their_own_streams():
    """Noise: image i of the training part, of the validation part and batch i of the statistics' null (role
    "control") are different draws of the same moments."""
    data, _ = _digits_images()
    moments = PixelMoments.of([(torch.stack([data[i][0] for i in range(64)]),)])
    train = NullDataset(data, "noise", seed=1, num_classes=10, moments=moments)
    val = NullDataset(data, "noise", seed=1, num_classes=10, part="val", moments=moments)
    control = NullBatches((), "noise", seed=1, role="control", moments=moments).draw(data[0][0][None], 0)[0]
    assert not torch.equal(train[0][0], val[0][0]) and not torch.equal(train[0][0], control)
    draws = torch.stack([train[i][0] for i in range(400)]).double()
    assert torch.allclose(draws.mean(0), moments.mean, atol=4 * float(moments.std.max()) / 20 + 1e-6)


def test_a_controls_construction_trains_its_prefixes_on_its_null_with_random_labels(tmp_path, one_thread, monkeypatch):
    """With --epochs-per-layer, the run's construction trains each prefix on the data and a control's on its null
    (`NullDataset`, its own seed); before, the controls skipped the training (and warned)."""
    import dataclasses

    from topo.construct.config import ConstructConfig
    from topo.run import stages
    from topo.run.config import RunConfig, load_data
    from topo.train.config import TrainConfig

    seen = []

    class Trained(Exception):  # the first prefix's training is all this test needs to see
        pass

    def fake_train(model, train_data, val_data, config, **kw):
        seen.append((train_data, val_data, config.seed, config.epochs))
        raise Trained

    monkeypatch.setattr(stages, "train", fake_train)
    config = RunConfig(data="patches", construct=ConstructConfig(skeleton="2", seed=5, epochs_per_layer=1,
                                                                 stats_batches=2),
                       train=TrainConfig(progress=False, workers=0, seed=5))
    bundle = load_data(config)
    with pytest.raises(Trained):
        stages.run_construction(config, bundle, config.construct, tmp_path / "real")
    assert seen and all(t is bundle.train and v is bundle.val and s == 5 and e == 1 for t, v, s, e in seen)
    seen.clear()
    control = dataclasses.replace(config.construct, seed=9)
    with pytest.raises(Trained):
        stages.run_construction(config, bundle, control, tmp_path / "shuffled", null="shuffled")
    assert seen
    for train_data, val_data, seed, epochs in seen:
        assert isinstance(train_data, NullDataset) and isinstance(val_data, NullDataset)
        assert train_data.null.kind == "shuffled" and train_data.dataset is bundle.train and seed == 9
        assert train_data.num_classes == bundle.num_classes
