"""topo.run.study: units, shards, random/uniform/shuffled topologies at the discovered network's cost, a tiny
study on digits run as two shards, resume, and the study's files."""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from checks import one_line_error
from scipy import stats

import builders
from builders.baselines import (
    PERMUTATIONS,
    REDUCTION,
    UNIFORM,
    draw_proportions,
    proportions_module,
    random_topology,
    refit,
)
from builders.budget import OUTPUTS, fill_budget
from builders.cost import inception_macs, module_macs, network_costs
from builders.spec import read_spec
from topo.cli.main import main
from topo.common.errors import SettingError, UserError
from topo.construct.config import ConstructConfig
from topo.run.config import RunConfig, with_aux_policy
from topo.run.rundir import StudyFiles
from topo.run.study import (
    RANDOM_STREAM,
    SHUFFLE_STREAM,
    StudyConfig,
    TimeLeft,
    Unit,
    derived_spec,
    duration_text,
    load_study,
    open_study,
    parse_shard,
    pilot_rows,
    plan_units,
    run_study,
    seed_plan,
    shard_units,
    study_processes,
    study_units,
    summarize,
    topology_id,
)
from topo.train.config import TrainConfig

HW = (8, 8)
FAST_RUN = RunConfig(data="digits", controls=False, construct=ConstructConfig(skeleton="1,pool,1", stats_batches=2),
                     train=TrainConfig(epochs=1, workers=0, progress=False))


def tiny(**changes) -> StudyConfig:
    """Two arms, two seeds, two random topologies: four units of one epoch on digits."""
    return StudyConfig(**{"run": FAST_RUN, "arms": ("discovered", "random"), "seeds": 2, "random": 2, **changes})


def study_random(discovered, k: int, config: StudyConfig):
    """Random topology ``k`` as a study of ``config`` draws it (its random stream of the study's seed)."""
    rng = np.random.default_rng([config.run.seed, RANDOM_STREAM, k])
    return random_topology(discovered, HW, rng, k=k, round_to=config.run.construct.round_to,
                           tolerance=config.tolerance)


def _small_googlenet() -> builders.NetworkSpec:
    return builders.googlenet_spec("small", num_classes=10, width_mult=0.25, in_channels=1, input_size=8)


@pytest.fixture(scope="module")
def standin() -> builders.NetworkSpec:
    """A network with the discovered networks' shape (digits, true 5x5 kernels) to refit: four modules on
    8x8 and 4x4 maps (3a, 3b, a pooling, 4a, 4b)."""
    spec = _small_googlenet()
    return dataclasses.replace(spec, stages=spec.stages[:5], name="discovered")


# --------------------------------------------------------------------------- units, shards, configuration
def test_plan_units_order_and_seeds():
    config = StudyConfig(arms=("discovered", "reference", "random", "uniform", "shuffled"), seeds=3, random=8,
                         run=dataclasses.replace(FAST_RUN, seed=10))
    units = plan_units(config)
    names = [u.name for u in units]
    assert names[:6] == ["discovered-s10", "discovered-s11", "discovered-s12",
                         "reference-s10", "reference-s11", "reference-s12"]
    assert names[6:8] == ["uniform-s10", "shuffled-s10"] and len(names) == 3 * 4 + 8 == len(set(names))
    random = [u for u in units if u.arm == "random"]
    assert [(u.topology, u.seed) for u in random] == [(k, 10 + k % 3) for k in range(8)]
    assert random[4].name == "random-s11-k4" and random[4].source == "discovered-s11"


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_split_the_units_without_overlap(count):
    units = plan_units(StudyConfig(seeds=3, random=8))
    shards = [shard_units(units, i, count) for i in range(count)]
    assert sorted(u.name for s in shards for u in s) == sorted(u.name for u in units)
    assert sum(len(s) for s in shards) == len(units)


@pytest.mark.parametrize("text, expected", [("0/1", (0, 1)), ("3/4", (3, 4))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["4/4", "-1/2", "1", "a/b", "1/0"])
def test_parse_shard_errors(text):
    with pytest.raises(UserError, match="shard"):
        parse_shard(text)


@pytest.mark.parametrize("changes, message", [
    ({"arms": ("discovered", "randm")}, "arm 'randm' is unknown"),
    ({"arms": ("reference", "random")}, "lack 'discovered'"),
    ({"seeds": 0}, "at least 1"),
    ({"random": 0}, "drop 'random'"),
    ({"margin": 0.0}, "margin"),
    ({"run": {"aux_heads": "some"}}, "auxiliary-head policy"),
    ({"detect": 0.0}, "must be a positive number of top-1 points"),
    ({"detect": -2.0}, "must be a positive number of top-1 points"),
    ({"detect": float("nan")}, "must be a positive number of top-1 points"),
    ({"detect": 2.0, "seeds": 1}, "a pilot of at least 2 seeds"),
    ({"detect": 2.0, "seeds": 4, "max_seeds": 3}, r"most seeds \(3\) cannot be fewer than the pilot's 4"),
])
def test_config_errors_are_one_line(changes, message):
    with pytest.raises(UserError, match=message) as error:
        if "run" in changes:  # the auxiliary-head policy is the run's, one for every arm and for the main job
            StudyConfig(run=RunConfig(**changes["run"]))
        else:
            StudyConfig(**changes)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("changes, setting", [({"detect": 0.0}, "detect"), ({"detect": 1.0, "seeds": 1}, "seeds"),
                                              ({"detect": 1.0, "max_seeds": 1}, "max_seeds")])
def test_detect_errors_name_their_setting(changes, setting):
    with pytest.raises(SettingError) as error:
        tiny(**changes)
    assert error.value.setting == setting
    assert tiny(seeds=20, max_seeds=10).max_seeds == 10  # the cap is checked only with a difference to detect


def test_config_round_trips():
    config = tiny(arms=("discovered", "uniform", "shuffled"), margin=0.25,
                  run=dataclasses.replace(FAST_RUN, aux_heads="reference"))
    assert StudyConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    detecting = tiny(detect=1.5, max_seeds=6)
    assert StudyConfig.from_dict(json.loads(json.dumps(detecting.to_dict()))) == detecting
    saved = {k: v for k, v in tiny().to_dict().items() if k not in ("detect", "max_seeds")}  # a study of before
    assert StudyConfig.from_dict(saved) == tiny()


def test_added_seeds_keep_the_pilots_units():
    config = StudyConfig(arms=("discovered", "reference", "random", "uniform"), seeds=3, random=8, detect=2.0,
                         run=dataclasses.replace(FAST_RUN, seed=10))
    pilot, more = plan_units(config), plan_units(config, seeds=5, random=10)
    assert plan_units(config, seeds=3, random=8) == pilot
    assert {u.name for u in pilot} < {u.name for u in more}
    added = [u for u in more if u not in pilot]
    assert sorted(u.name for u in added if u.arm != "random") == sorted(
        f"{arm}-s{s}" for arm in ("discovered", "reference", "uniform") for s in (13, 14))
    # the new random topologies train, like the pilot's, with the pilot's seed k mod 3
    assert [u.name for u in added if u.arm == "random"] == ["random-s12-k8", "random-s10-k9"]


# --------------------------------------------------------------------------- topologies
def test_random_shapes_follow_the_documented_distribution():
    draws = draw_proportions(np.random.default_rng(0), 3000)
    shares = np.array([[d[k] for k in OUTPUTS] for d in draws])
    assert np.allclose(shares.sum(axis=1), 1.0)
    for column in shares.T:  # a Dirichlet(1, 1, 1, 1) marginal is Beta(1, 3)
        assert stats.kstest(column, stats.beta(1, 3).cdf).pvalue > 1e-3
    ratios = np.array([[d["ch3x3red"] / d["ch3x3"], d["ch5x5red"] / d["ch5x5"]] for d in draws]).ravel()
    low, high = REDUCTION
    assert stats.kstest(ratios, stats.uniform(low, high - low).cdf).pvalue > 1e-3
    again = draw_proportions(np.random.default_rng(0), 3000)
    assert again == draws


def _assert_same_skeleton(spec, discovered):
    assert spec.stem == discovered.stem and spec.head == discovered.head
    assert [type(l) for l in spec.stages] == [type(l) for l in discovered.stages]
    assert [l.name for l in spec.stages] == [l.name for l in discovered.stages]
    assert [l for l in spec.stages if not isinstance(l, builders.InceptionSpec)] == \
        [l for l in discovered.stages if not isinstance(l, builders.InceptionSpec)]
    builders.build(spec)  # channels chain: the spec validates and builds


@pytest.mark.slow
def test_uniform_and_random_keep_the_skeleton_and_meet_the_budgets(standin):
    target = module_macs(standin, HW)
    uniform = refit(standin, HW, proportions_module([UNIFORM] * len(target), 8, 5), "uniform")
    random, draws = study_random(standin, 3, tiny())
    for spec in (uniform, random):
        _assert_same_skeleton(spec, standin)
        # each prefix of modules within what the discovered prefix costs
        assert np.all(np.cumsum(module_macs(spec, HW)) <= np.cumsum(target))
        assert abs(network_costs(spec, HW)[1] / network_costs(standin, HW)[1] - 1) <= 0.02
    # equal output shares, up to the fill of what rounding left: one step of 8 channels, two in the last
    # module, which receives what every module before it left
    modules = uniform.inception_modules()
    for i, module in enumerate(modules):
        outputs = [getattr(module, k) for k in OUTPUTS]
        assert max(outputs) - min(outputs) <= (16 if i == len(modules) - 1 else 8), module
    assert draws >= 1 and random.name == "random_k3"


@pytest.mark.slow
def test_random_topologies_are_fixed_by_their_seed(standin):
    a, _ = study_random(standin, 0, tiny())
    again, _ = study_random(standin, 0, tiny())
    other, _ = study_random(standin, 1, tiny())
    elsewhere, _ = study_random(standin, 0, tiny(run=dataclasses.replace(FAST_RUN, seed=5)))
    assert a == again and topology_id(a) == topology_id(again)
    assert len({topology_id(s) for s in (a, other, elsewhere)}) == 3


@pytest.mark.slow
def test_fill_budget_spends_what_rounding_left(standin):
    module = standin.inception_modules()[0]
    budget = 1.07 * inception_macs(module, *HW)
    shape = {k: float(getattr(module, k)) for k in OUTPUTS}
    filled = fill_budget(module, shape, budget, HW, 8, 5)
    assert inception_macs(module, *HW) < inception_macs(filled, *HW) <= budget
    for key in OUTPUTS:  # no output branch can take another step
        grown = dataclasses.replace(filled, **{key: getattr(filled, key) + 8})
        assert inception_macs(grown, *HW) > budget
    assert (filled.ch3x3red, filled.ch5x5red) == (module.ch3x3red, module.ch5x5red)


@pytest.mark.slow
def test_aux_policy_is_one_setting_for_every_arm(standin):
    reference = builders.googlenet_spec("torchvision", num_classes=10, aux_logits=True, width_mult=0.25)
    assert reference.aux_heads
    assert with_aux_policy(reference, reference, "none").aux_heads == ()
    given = with_aux_policy(dataclasses.replace(_small_googlenet(), name="discovered"), reference, "reference")
    assert given.aux_heads == reference.aux_heads
    assert {a.name for a in given.attached_aux_heads()} == {"aux1", "aux2"}  # inception4a and 4d exist
    assert [a.name for a in with_aux_policy(standin, reference, "reference").attached_aux_heads()] == ["aux1"]


def test_time_left_from_the_finished_units():
    left = TimeLeft()
    assert left.estimate(["random"]) is None and duration_text(None) == "?"
    left.add("discovered", 30.0)
    left.add("random", 10.0)
    left.add("random", 14.0)
    # random units at their arm's mean; an arm not seen yet at the mean of every finished unit
    assert left.estimate(["random", "random", "uniform"]) == pytest.approx(12 + 12 + 18)
    assert [duration_text(t) for t in (45, 192, 7200)] == ["45 s", "3.2 min", "2.0 h"]


# --------------------------------------------------------------------------- choosing the seeds (no training)
def _fake_results(out: Path, config: StudyConfig, top1: dict[str, list[float]], seeds: int | None = None) -> None:
    """result.json of every unit of ``config`` at ``seeds`` whose arm has accuracies left in ``top1`` (points)."""
    files = open_study(config, out)
    left = {arm: list(values) for arm, values in top1.items()}
    for unit in plan_units(config, seeds=seeds):
        if not left.get(unit.arm):
            continue
        row = {"arm": unit.arm, "seed": unit.seed, "unit": unit.name, "topology": unit.topology, "topology_id": "x",
               "params": 1000, "macs": 1_000_000, "top1": left[unit.arm].pop(0) / 100, "top5": 1.0,
               "train_time_s": 1.0, "wall_time_s": 1.0, "construction_time_s": 1.0, "draws": None}
        files.unit(unit.name).root.mkdir(parents=True, exist_ok=True)
        files.result(unit.name).write_text(json.dumps(row))


PILOT = {"discovered": [47.8, 50.6, 53.4], "reference": [64.3, 65.2, 66.1]}  # SDs 2.8 and 0.9, as measured


def test_the_seeds_are_chosen_once_the_pilot_has_finished(tmp_path):
    config = StudyConfig(run=FAST_RUN, arms=("discovered", "reference"), seeds=3, detect=5.0, max_seeds=10)
    files = StudyFiles(tmp_path)
    _fake_results(tmp_path, config, {"discovered": PILOT["discovered"], "reference": PILOT["reference"][:2]})
    assert pilot_rows(config, files) is None
    units, plan = study_units(config, files)
    assert plan is None and units == plan_units(config)
    result = summarize(tmp_path)
    assert result.plan is None and result.missing == ["reference-s2"]
    assert "chosen once the 3-seed pilot has finished" in (tmp_path / "report.md").read_text()

    _fake_results(tmp_path, config, PILOT)
    units, plan = study_units(config, files)
    assert plan == seed_plan(config, pilot_rows(config, files)) and plan.seeds == 5  # 5 asked for against 0.9
    assert units == plan_units(config, seeds=5)
    result = summarize(tmp_path)
    assert result.plan == plan and result.missing == ["discovered-s3", "discovered-s4", "reference-s3",
                                                      "reference-s4"]
    report = (tmp_path / "report.md").read_text()
    assert "the study runs 5 seeds (the pilot's 3 kept)" in report
    assert "2.80 vs 0.90" in report and "Detectable (points, 80% power)" in report
    tests = pd.read_csv(tmp_path / "study_tests.csv")
    assert tests.loc[0, "SD (points)"] == "2.80 vs 0.90" and tests.loc[0, "Detectable (points, 80% power)"] == np.inf


def test_a_study_keeps_its_difference_to_detect(tmp_path):
    """--detect and --max-seeds decide which units run, like --seeds: a study folder keeps them."""
    config = tiny(detect=2.0)
    open_study(config, tmp_path)
    open_study(dataclasses.replace(config), tmp_path)  # the same settings continue it
    for other, message in ((tiny(detect=3.0), "detect=2.0, not 3.0"), (tiny(), "detect=2.0, not None"),
                           (tiny(detect=2.0, max_seeds=12), "max_seeds=10, not 12")):
        with pytest.raises(UserError, match=message):
            open_study(other, tmp_path)
    plain = tmp_path / "plain"
    open_study(tiny(), plain)
    open_study(tiny(max_seeds=12), plain)  # without a difference to detect the cap is unused, so it may differ


def test_resume_refuses_another_difference_to_detect(tmp_path):
    from topo.cli.resume import study_config
    from topo.cli.settings import parse

    open_study(tiny(detect=2.0), tmp_path)
    resumed = study_config(parse("study", ["--resume", "--out", str(tmp_path)]), tmp_path)
    assert resumed.detect == 2.0 and resumed.max_seeds == 10
    with pytest.raises(UserError, match=r"drop the other flags \(detect\)"):
        study_config(parse("study", ["--resume", "--out", str(tmp_path), "--detect", "3"]), tmp_path)


# --------------------------------------------------------------------------- a tiny study, as two shards
def _files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _written(before: dict[Path, int], after: dict[Path, int]) -> set[Path]:
    return {p for p, t in after.items() if before.get(p) != t}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, list[set[Path]]]:
    """The tiny study run as shard 0/2, then shard 1/2, into one folder; the files each wrote."""
    out = tmp_path_factory.mktemp("study") / "tiny"
    written = []
    for index in (0, 1):
        before = _files(out) if out.exists() else {}
        assert run_study(tiny(), out, shard=(index, 2), progress=False) is None  # a shard does not summarise
        written.append(_written(before, _files(out)))
    return out, written


@pytest.mark.slow
def test_shards_never_write_the_same_file(sharded):
    out, (first, second) = sharded
    assert not first & second
    assert out / "study.json" in first
    assert {p.relative_to(out).parts[1] for p in first if "units" in p.parts} == {"discovered-s0", "random-s0-k0"}
    assert {p.relative_to(out).parts[1] for p in second if "units" in p.parts} == {"discovered-s1", "random-s1-k1"}
    assert not list(out.rglob("*.tmp")) and not list(out.glob(".study.json.*"))


@pytest.mark.slow
def test_summary_gathers_the_shards(sharded):
    out, _ = sharded
    result = summarize(out)
    assert result.missing == []
    for name in ("study.csv", "study_summary.csv", "study_summary.md", "study_summary.tex", "study_tests.csv",
                 "study_tests.md", "report.md", "figures/study.png", "figures/study.pdf"):
        assert (out / name).is_file(), name
    rows = pd.read_csv(out / "study.csv")
    assert list(rows["unit"]) == ["discovered-s0", "discovered-s1", "random-s0-k0", "random-s1-k1"]
    assert rows["top1"].between(0, 1).all() and (rows["params"] > 0).all()
    assert (rows["construction_time_s"] > 0).all() and (rows["train_time_s"] > 0).all()
    assert rows["macs_vs_discovered"].abs().max() <= 0.02  # every arm at the discovered network's cost
    summary = pd.read_csv(out / "study_summary.csv").set_index("Arm")
    assert list(summary["n"]) == [2, 2]
    assert summary.loc["random", "Top-1 (%)"] == pytest.approx(100 * rows[rows["arm"] == "random"]["top1"].mean())
    report = (out / "report.md").read_text()
    assert "the discovered network" in report and "n = 2" in report and "figures/study.png" in report
    for unit in rows["unit"]:  # every unit is a run directory of its own: config, topology, training
        run = out / "units" / unit
        assert (run / "config.json").is_file() and (run / "result.json").is_file()
        spec = read_spec(run / "training" / f"{unit.split('-')[0]}.spec.json")
        assert topology_id(spec) == rows.set_index("unit").loc[unit, "topology_id"]


@pytest.mark.slow
def test_derived_topologies_use_their_seeds_discovered_network(sharded):
    out, _ = sharded
    discovered = read_spec(out / "units" / "discovered-s1" / "topology.json")
    random = read_spec(out / "units" / "random-s1-k1" / "topology.json")
    _assert_same_skeleton(random, discovered)
    assert random.stem == discovered.stem and random != discovered


@pytest.mark.slow
def test_shuffled_permutes_each_modules_kernel_sizes(sharded):
    out, _ = sharded
    config = tiny(arms=("discovered", "shuffled"))
    spec, _ = derived_spec(Unit("shuffled", 0), config, StudyFiles(out), HW)
    discovered = read_spec(out / "units" / "discovered-s0" / "topology.json")
    _assert_same_skeleton(spec, discovered)
    rng = np.random.default_rng([0, SHUFFLE_STREAM])
    construction = out / "units" / "discovered-s0" / "construction"
    for module in spec.inception_modules():
        clusters = json.loads((construction / f"{module.name}_clusters.json").read_text())["clusters"]
        if not clusters:  # kept as discovered: nothing to permute, no draw
            continue
        order = dict(zip((1, 3, 5), PERMUTATIONS[int(rng.integers(len(PERMUTATIONS)))], strict=True))
        counts = {k: sum(min(c["kernel_size"], 5) == k for c in clusters) for k in (1, 3, 5)}
        moved = {order[k]: n for k, n in counts.items()}
        widths = {1: module.ch1x1, 3: module.ch3x3, 5: module.ch5x5}
        assert {k for k, n in moved.items() if n} == {k for k, w in widths.items() if w}
    assert abs(network_costs(spec, HW)[1] / network_costs(discovered, HW)[1] - 1) <= 0.02


@pytest.mark.slow
def test_summary_names_missing_units(sharded, tmp_path):
    out = Path(shutil.copytree(sharded[0], tmp_path / "copy"))
    (out / "units" / "random-s1-k1" / "result.json").unlink()
    result = summarize(out)
    assert result.missing == ["random-s1-k1"] and len(result.rows) == 3
    assert "1 unit is not finished (random-s1-k1)" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_resumed_study_runs_only_what_is_missing(sharded, tmp_path):
    out = Path(shutil.copytree(sharded[0], tmp_path / "copy"))
    before = json.loads((out / "units" / "random-s1-k1" / "result.json").read_text())
    shutil.rmtree(out / "units" / "random-s1-k1")
    kept = {p: t for p, t in _files(out).items() if "units" in p.parts}
    result = run_study(tiny(), out, progress=False)
    after = _files(out)
    assert all(after[p] == t for p, t in kept.items())  # no other unit was touched
    again = json.loads((out / "units" / "random-s1-k1" / "result.json").read_text())
    for key in ("topology_id", "params", "macs", "top1", "top5"):  # same seed, same result
        assert again[key] == before[key], key
    assert result is not None and result.missing == [] and len(result.rows) == 4


@pytest.mark.slow
def test_a_study_folder_keeps_its_configuration(sharded):
    out, _ = sharded
    with pytest.raises(UserError, match="seeds=2, not 3"):
        run_study(tiny(seeds=3), out, progress=False)
    assert load_study(out) == tiny()
    with pytest.raises(UserError, match="is not a topo-build study"):
        load_study(out / "units")


@pytest.mark.slow
def test_a_study_adds_the_seeds_its_pilot_calls_for(sharded, tmp_path, caplog):
    """The tiny study as the pilot of one with a difference to detect (the pilot's units do not depend on it):
    its SDs call for at least 5 seeds, the cap of 3 adds a seed and a random topology, the pilot is kept."""
    out = Path(shutil.copytree(sharded[0], tmp_path / "copy"))
    config = tiny(detect=50.0, max_seeds=3)
    saved = json.loads((out / "study.json").read_text())
    (out / "study.json").write_text(json.dumps({**saved, "config": config.to_dict()}))
    pilot = {p: t for p, t in _files(out).items() if "units" in p.parts}
    plan = seed_plan(config, pilot_rows(config, StudyFiles(out)))
    assert plan.seeds == 3 and plan.random == 3 and plan.capped  # 5 asked for (Welch's test decides), 3 allowed
    with caplog.at_level(logging.INFO, logger="topo.run.study"):
        result = run_study(config, out, progress=False)
    started = [r.getMessage() for r in caplog.records if "to run" in r.getMessage()]
    assert len(started) == 2 and started[0].endswith("0 to run"), started  # the pilot: all finished
    assert re.search(r"2 to run, about .+ by the finished units' times$", started[1]), started
    assert all(_files(out)[p] == t for p, t in pilot.items())  # the pilot's units were not touched
    assert result is not None and result.plan == plan and result.missing == []
    assert sorted(result.rows["unit"]) == ["discovered-s0", "discovered-s1", "discovered-s2", "random-s0-k0",
                                           "random-s0-k2", "random-s1-k1"]
    report = (out / "report.md").read_text()
    assert "the study runs 3 seeds (the pilot's 2 kept) and 3 random topologies" in report
    assert "The cap of 3 seeds" in report or "At the cap of 3 seeds" in report
    finished = _files(out)
    assert run_study(config, out, progress=False).missing == []  # resumed: nothing left to run
    assert all(_files(out)[p] == t for p, t in finished.items() if "units" in p.parts)


@pytest.mark.slow
def test_a_shard_waits_for_a_construction_another_shard_runs(tmp_path):
    config = tiny(arms=("discovered", "uniform"))  # units: discovered-s0, discovered-s1, uniform-s0, uniform-s1
    with pytest.raises(UserError, match="uniform-s0 still wait for discovered-s0"):
        run_study(config, tmp_path / "waits", shard=(2, 3), progress=False, poll_s=0.05, wait_s=0.2)
    assert not (tmp_path / "waits" / "units" / "uniform-s0" / "result.json").exists()


# --------------------------------------------------------------------------- the command line
FLAGS = ["--skeleton", "1,pool,1", "--stats-batches", "2", "--epochs", "1", "--workers", "0", "--no-progress",
         "--seeds", "2", "--data", "digits"]


@pytest.mark.parametrize("argv, expected", [
    (["--shard", "2/2"], "shard '2/2'"),
    (["--side-by-side", "0"], "--side-by-side 0 is neither"),
    (["--side-by-side", "two"], "--side-by-side 'two' is neither"),
    (["--shard", "0/2", "--side-by-side", "2"], "--shard 0/2 runs one shard"),
    (["--arms", "reference,random"], "lack 'discovered'"),
    (["--summarize"], "need --out STUDY"),
    (["--detect", "2", "--max-seeds", "1"], "cannot be fewer than the pilot's 2 seeds (--max-seeds)"),
])
def test_study_command_errors_are_one_line(argv, expected, tmp_path, capsys):
    out = [] if "--summarize" in argv else ["--out", str(tmp_path / "s")]
    assert main(["study", *FLAGS, *argv, *out]) == 2
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "s" / "study.json").exists()


def test_summarize_needs_a_study(tmp_path, capsys):
    assert main(["study", "--summarize", "--out", str(tmp_path)]) == 2
    assert "is not a topo-build study" in one_line_error(capsys)


def test_an_unknown_arm_is_a_flag_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["study", "--arms", "discovered,randm"])
    assert exit_.value.code == 2 and "--arms" in one_line_error(capsys)


@pytest.mark.slow
def test_summarize_and_resume_from_the_command_line(sharded, tmp_path, capsys):
    out = Path(shutil.copytree(sharded[0], tmp_path / "copy"))
    assert main(["study", "--out", str(out), "--summarize"]) == 0
    printed = capsys.readouterr().out
    assert "| discovered |" in printed and "discovered vs random" in printed and "report:" in printed
    assert main(["study", "--out", str(out), "--resume", "--no-progress"]) == 0  # nothing left to run
    assert main(["study", "--out", str(out), "--resume", "--seeds", "3"]) == 2
    assert "drop the other flags (seeds)" in one_line_error(capsys)


@pytest.mark.slow
def test_study_command_on_digits(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["study", *FLAGS, "--arms", "discovered,uniform,shuffled", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| uniform" in printed and "| shuffled" in printed and "discovered vs shuffled" in printed
    rows = pd.read_csv(out / "study.csv")
    assert len(rows) == 6 and rows["macs_vs_discovered"].abs().max() <= 0.02
    assert main(["study", *FLAGS, "--arms", "discovered,uniform", "--out", str(out)]) == 2
    assert "arms" in one_line_error(capsys)


@pytest.mark.slow
def test_study_command_on_an_image_folder(image_tree: Path, tmp_path: Path):
    out = tmp_path / "tree"
    assert main(["study", "--data", "folder", "--data-dir", str(image_tree), "--image-size", "32",
                 "--batch-size", "8", "--skeleton", "1", "--stats-batches", "1", "--epochs", "1",
                 "--width-mult", "0.125", "--workers", "0", "--no-progress", "--seeds", "2",
                 "--arms", "discovered,reference,random", "--random", "2", "--out", str(out)]) == 0
    rows = pd.read_csv(out / "study.csv")
    assert sorted(rows["arm"].unique()) == ["discovered", "random", "reference"] and len(rows) == 6
    spec = read_spec(out / "units" / "random-s1-k1" / "topology.json")
    assert spec.in_channels == 3 and spec.head.num_classes == 2
    assert (out / "report.md").is_file() and (out / "figures" / "study.png").is_file()


@pytest.mark.slow
def test_a_killed_study_resumes_where_it_stopped(tmp_path: Path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "topo.cli", "study", *FLAGS, "--arms", "discovered,random", "--random", "2",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "units" / "discovered-s0" / "result.json"
    deadline = time.time() + 600
    try:
        while not first.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert first.exists(), "the study finished no unit in time"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = {p.parent.name for p in out.glob("units/*/result.json")}
    assert "discovered-s0" in done and len(done) < 4 and not (out / "study.csv").exists()
    written = first.stat().st_mtime_ns
    assert main(["study", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert {p.parent.name for p in out.glob("units/*/result.json")} == {
        "discovered-s0", "discovered-s1", "random-s0-k0", "random-s1-k1"}
    assert first.stat().st_mtime_ns == written  # the finished unit was not run again
    assert len(pd.read_csv(out / "study.csv")) == 4


def test_a_resumed_study_takes_the_jobs_it_is_given_and_nothing_else(tmp_path):
    """``study --resume --jobs N`` changes how the study computes (the same rule as a resumed run), not what."""
    from topo.cli.resume import study_config
    from topo.cli.settings import parse

    saved = tiny()
    open_study(saved, tmp_path)
    resumed = study_config(parse("study", ["--resume", "--out", str(tmp_path), "--jobs", "2"]), tmp_path)
    assert resumed.run.jobs == 2 and saved.run.jobs != 2
    assert resumed == dataclasses.replace(saved, run=dataclasses.replace(saved.run, jobs=2))
    with pytest.raises(UserError, match="--resume continues"):
        study_config(parse("study", ["--resume", "--out", str(tmp_path), "--epochs", "9"]), tmp_path)


@pytest.mark.slow
def test_a_study_side_by_side_runs_each_unit_once_in_worker_processes(sharded, tmp_path, caplog):
    """--side-by-side 2: the shards of `sharded`, run side by side in two spawned workers, then summarised;
    the same units and topologies as the shards run one after the other here."""
    out = tmp_path / "tiny"
    with caplog.at_level("INFO", logger="topo.run.study"):
        result = run_study(tiny(), out, progress=False, side_by_side=2)
    assert "2 shards side by side" in caplog.text
    assert result.missing == [] and (out / "report.md").is_file()
    rows = pd.read_csv(out / "study.csv").set_index("unit")
    one_by_one = {unit: json.loads((sharded[0] / "units" / unit / "result.json").read_text())["topology_id"]
                  for unit in rows.index}
    assert rows["topology_id"].to_dict() == one_by_one and len(one_by_one) == 4


def test_side_by_side_shards_follow_the_cores_and_the_device(monkeypatch):
    import torch

    from topo.common import processes

    monkeypatch.setattr(processes, "available_cpus", lambda: 2)
    monkeypatch.setattr(processes.torch, "get_num_threads", lambda: 2)
    assert study_processes("auto", tiny()) == 2  # one per core
    assert study_processes(3, tiny()) == 3 and study_processes(9, tiny()) == 4  # at most one per unit
    assert study_processes("auto", tiny(seeds=1, random=1, arms=("discovered",))) == 1  # one unit
    gpu = tiny(run=dataclasses.replace(FAST_RUN, train=dataclasses.replace(FAST_RUN.train, device="cuda")))
    monkeypatch.setattr("topo.run.study.resolve_device", lambda device: torch.device(device))
    assert study_processes("auto", gpu) == 1  # one process on an accelerator

