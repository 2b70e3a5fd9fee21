"""`topo-build study`: is the discovered topology better than the hand-designed one, and than chance, at equal cost?

Arms, each trained with the run's recipe, the same data order and initialisation
seed at each seed, and the run's one auxiliary-head policy (``run.aux_heads``):

* ``discovered``: constructed afresh for each seed (`topo.run.stages.construct_stage`, ``ConstructConfig(seed=s)``);
* ``reference``: the hand-designed GoogLeNet variant (`topo.run.config.reference_spec`);
* ``random``: K topologies with the discovered network's skeleton, stem and head, each module's
  output shares and reductions drawn at random (`builders.baselines.draw_proportions`) and scaled to the
  discovered module's multiply-adds; topology k is drawn from its own seed and trained with
  study seed k mod N;
* ``uniform``: every module with equal 1x1/3x3/5x5/pool output shares (`builders.baselines.UNIFORM`) at the
  same budgets;
* ``shuffled``: the discovered clusters with each module's kernel sizes permuted.

One arm x seed (x topology) is a **unit**: a run directory of its own
(`topo.run.rundir.RunDir`, under ``STUDY/units/<arm>-s<seed>[-k<k>]/``) with its
configuration, topology, training checkpoint and, once it has finished,
``result.json``. A killed study resumes where it stopped (finished units are
skipped, a construction or a training resumes from its own files), and
``shard=(i, n)`` runs every n-th unit, so that several processes or machines
share one study folder without writing the same file; :func:`summarize`
gathers what is done. With ``detect`` the study's seeds are a pilot: once it
has finished, the seeds every comparison needs to detect that difference at 80%
power are computed from the pilot's SDs (`analysis.study_stats.plan_seeds`) and
the missing units are added. docs/study.md gives every rule.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from analysis.study_stats import (
    Comparison,
    SeedPlan,
    compare_arms,
    comparisons_frame,
    cost_deviations,
    plan_seeds,
    plan_sentence,
    study_figure,
    study_findings,
    study_frame,
    summary_frame,
    units_frame,
    write_study_report,
    write_tables,
)
from analysis.tables import to_markdown
from builders.baselines import UNIFORM, proportions_module, random_topology, refit, shuffled_module
from builders.cost import network_macs
from builders.spec import NetworkSpec, read_spec
from topo.cluster.clusters import Cluster
from topo.common import distributed as dist_info
from topo.common.devices import resolve_device
from topo.common.errors import SettingError, UserError
from topo.common.processes import Job, default_processes, run_jobs, sharing_threads
from topo.common.progress import progress_bar
from topo.common.reading import read_clusters, read_config, read_json
from topo.common.writing import atomic_create_text, atomic_write_json, atomic_write_text
from topo.construct.files import ConstructionFiles
from topo.data import DataBundle
from topo.run.config import RunConfig, load_data, reference_spec, what_it_computes, with_aux_policy
from topo.run.preflight import preflight
from topo.run.rundir import RunDir, StudyFiles, environment_info
from topo.run.stages import construct_stage, train_stage
from topo.stats.layer_stats import LayerStats, read_stats

log = logging.getLogger(__name__)

ARMS = ("discovered", "reference", "random", "uniform", "shuffled")
DEFAULT_ARMS = ("discovered", "reference", "random", "uniform")
DERIVED = ("random", "uniform", "shuffled")  # made from the discovered network of their seed
RANDOM_STREAM, SHUFFLE_STREAM = 1, 2


@dataclass
class StudyConfig:
    """A study: the run it repeats (data, reference, base seed, construction, training) and the arms and seeds.

    ``seeds``: N training seeds, ``run.seed`` to ``run.seed + N - 1``. ``random``: K random topologies.
    ``margin``: equivalence margin in top-1 points. ``tolerance``: largest relative difference of an
    arm's multiply-adds from the discovered network's. ``detect``: a difference in top-1 points to detect
    with 80% power; the N seeds are then a pilot, and seeds are added, up to ``max_seeds``, as its SDs
    call for (`analysis.study_stats.plan_seeds`). Every arm follows the run's auxiliary-head
    policy (``run.aux_heads``, `topo.run.config.with_aux_policy`).
    """

    run: RunConfig = field(default_factory=RunConfig)
    arms: tuple[str, ...] = DEFAULT_ARMS
    seeds: int = 3
    random: int = 8
    margin: float = 0.5
    tolerance: float = 0.02
    detect: float | None = None
    max_seeds: int = 10

    def __post_init__(self) -> None:
        self.arms = tuple(dict.fromkeys(self.arms))
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise SettingError("arms", f"arm {unknown[0]!r} is unknown: use some of {', '.join(ARMS)}")
        if "discovered" not in self.arms:
            raise SettingError("arms", "the arms lack 'discovered': a study compares the discovered network with "
                                       "the others")
        if self.seeds < 1 or ("random" in self.arms and self.random < 1):
            raise SettingError("seeds" if self.seeds < 1 else "random",
                               f"seeds ({self.seeds}) and random topologies ({self.random}) must be at least 1; "
                               "drop 'random' from the arms to have none")
        if not self.margin > 0 or not 0 < self.tolerance < 1:
            raise SettingError("margin" if not self.margin > 0 else "tolerance",
                               f"margin {self.margin} must be positive and tolerance {self.tolerance} in (0, 1)")
        if self.detect is not None:
            if not (self.detect > 0 and math.isfinite(self.detect)):
                raise SettingError("detect", f"the difference to detect ({self.detect}) must be a positive "
                                             "number of top-1 points")
            if self.seeds < 2:
                raise SettingError("seeds", f"a difference to detect needs a pilot of at least 2 seeds to "
                                            f"estimate each arm's SD, not {self.seeds}")
            if self.max_seeds < self.seeds:
                raise SettingError("max_seeds", f"the most seeds ({self.max_seeds}) cannot be fewer than the "
                                                f"pilot's {self.seeds} seeds")

    @property
    def seed_list(self) -> list[int]:
        return [self.run.seed + i for i in range(self.seeds)]

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**out, "run": self.run.to_dict(), "arms": list(self.arms)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudyConfig:
        data = dict(data)
        return cls(**{**data, "run": RunConfig.from_dict(data["run"]), "arms": tuple(data["arms"])})


@dataclass(frozen=True)
class Unit:
    """One arm trained at one seed (``topology``: k of a random topology)."""

    arm: str
    seed: int
    topology: int | None = None

    @property
    def name(self) -> str:
        return f"{self.arm}-s{self.seed}" + ("" if self.topology is None else f"-k{self.topology}")

    @property
    def source(self) -> str:
        """The unit whose construction a derived unit is made from (its seed's discovered network)."""
        return f"discovered-s{self.seed}"


@dataclass
class StudyResult:
    """What :func:`summarize` gathered and wrote."""

    rows: pd.DataFrame
    summary: pd.DataFrame
    tests: pd.DataFrame
    comparisons: list[Comparison]
    missing: list[str]
    report: Path
    plan: SeedPlan | None = None   # the seeds chosen for ``detect`` (None: no detect, or the pilot unfinished)


# --------------------------------------------------------------------------- units and shards
def plan_units(config: StudyConfig, seeds: int | None = None, random: int | None = None) -> list[Unit]:
    """Every unit, in the fixed order shards split: discovered, reference, per seed uniform and shuffled, random.

    ``seeds`` and ``random`` (default the configuration's) extend a study past its pilot (``detect``): the
    arms of one unit per seed run ``run.seed`` to ``run.seed + seeds - 1``, and random topology k trains
    with the pilot's seed k mod ``config.seeds`` whatever their number, so that a unit keeps its name.
    """
    first = config.run.seed
    every = [first + i for i in range(config.seeds if seeds is None else seeds)]
    units = [Unit("discovered", s) for s in every]
    if "reference" in config.arms:
        units += [Unit("reference", s) for s in every]
    units += [Unit(arm, s) for s in every for arm in ("uniform", "shuffled") if arm in config.arms]
    if "random" in config.arms:
        pilot = config.seed_list
        units += [Unit("random", pilot[k % len(pilot)], k)
                  for k in range(config.random if random is None else random)]
    return units


def pilot_rows(config: StudyConfig, files: StudyFiles) -> list[dict[str, Any]] | None:
    """The rows of the pilot (every unit of :func:`plan_units` at the configured seeds), None until all are done."""
    pilot = plan_units(config)
    if not all(files.result(u.name).is_file() for u in pilot):
        return None
    return [_read_result(files, u) for u in pilot]


def seed_plan(config: StudyConfig, rows: Sequence[Mapping[str, Any]]) -> SeedPlan:
    """The seeds (and random topologies) ``config.detect`` asks for, from the pilot's ``rows``."""
    assert config.detect is not None
    return plan_seeds(rows, detect=config.detect, pilot=config.seeds, max_seeds=config.max_seeds,
                      random=config.random if "random" in config.arms else None)


def study_units(config: StudyConfig, files: StudyFiles) -> tuple[list[Unit], SeedPlan | None]:
    """Every unit of the study as far as it is known: with ``detect``, the pilot until it has finished, then the
    pilot and the seeds its SDs call for; and the plan (None before that, or without ``detect``)."""
    if config.detect is None:
        return plan_units(config), None
    rows = pilot_rows(config, files)
    if rows is None:
        return plan_units(config), None
    plan = seed_plan(config, rows)
    return plan_units(config, plan.seeds, plan.random), plan


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; a one-line error otherwise."""
    try:
        i, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise UserError(f"shard {text!r} is not of the form i/n (e.g. 0/4 ... 3/4)") from None
    if not 0 <= i < n:
        raise UserError(f"shard {text!r}: i must be 0 to n - 1 (e.g. 0/4 ... 3/4)")
    return i, n


def shard_units(units: Sequence[Unit], index: int, count: int) -> list[Unit]:
    """Every ``count``-th unit from ``index``."""
    return list(units[index::count])


def unit_config(config: StudyConfig, seed: int) -> RunConfig:
    """The run configuration of a unit at ``seed``: the study's run with every seed set to it."""
    run = config.run
    return dataclasses.replace(run, seed=seed, construct=dataclasses.replace(run.construct, seed=seed),
                               train=dataclasses.replace(run.train, seed=seed))


# --------------------------------------------------------------------------- topologies


def topology_id(spec: NetworkSpec) -> str:
    """A short hash of the spec (its name aside): equal ids, equal networks."""
    data = {**spec.to_dict(), "name": ""}
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------- making a unit's network


def derived_spec(unit: Unit, config: StudyConfig, files: StudyFiles,
                 image_hw: tuple[int, int]) -> tuple[NetworkSpec, int | None]:
    """A derived unit's network (before the auxiliary-head policy) and its number of draws."""
    source = files.unit(unit.source)
    discovered = read_spec(source.topology)
    round_to = config.run.construct.round_to
    if unit.arm == "random":
        rng = np.random.default_rng([config.run.seed, RANDOM_STREAM, unit.topology])
        return random_topology(discovered, image_hw, rng, k=unit.topology, round_to=round_to,
                               tolerance=config.tolerance)
    if unit.arm == "uniform":
        modules = len(discovered.inception_modules())
        module_for = proportions_module([UNIFORM] * modules, round_to, discovered.kernel5x5)
        return refit(discovered, image_hw, module_for, "uniform"), None
    rng = np.random.default_rng([unit.seed, SHUFFLE_STREAM])
    clusters, stats = found_clusters(source.construction, [m.name for m in discovered.inception_modules()])
    return refit(discovered, image_hw, shuffled_module(clusters, stats, rng, round_to, discovered.kernel5x5),
                 "shuffled"), None


def found_clusters(files: ConstructionFiles, modules: Sequence[str]
                   ) -> tuple[dict[str, list[Cluster]], dict[str, LayerStats | None]]:
    """Each module's clusters and input statistics, read back from a construction's files (statistics only
    where there are clusters: the shuffled arm reads them nowhere else)."""
    clusters = {name: [Cluster.from_dict(c) for c in read_clusters(files.clusters(name))["clusters"]]
                for name in modules}
    return clusters, {name: read_stats(files.stats(name)) if clusters[name] else None for name in modules}


def make_topology(unit: Unit, config: StudyConfig, bundle: DataBundle, files: StudyFiles,
                  run: RunDir) -> tuple[NetworkSpec, dict[str, Any]]:
    """The unit's network (before the auxiliary-head policy) and how it was made; read back once made."""
    done = run.completed()
    if "topology" in done:
        return read_spec(run.topology), done["topology"]
    image_hw = tuple(bundle.image_size)
    start = time.perf_counter()
    made: dict[str, Any] = {"draws": None, "resumed": False}
    if unit.arm == "discovered":
        made["resumed"] = run.construction.progress.is_file() or "construct" in done
        spec = construct_stage(unit_config(config, unit.seed), bundle, run)
    elif unit.arm == "reference":
        spec = reference_spec(config.run, bundle)
    else:
        spec, made["draws"] = derived_spec(unit, config, files, image_hw)
    made["time_s"] = time.perf_counter() - start
    if dist_info.rank() == 0:
        if unit.arm != "discovered":
            atomic_write_text(run.topology, spec.to_json() + "\n")
        run.mark_done("topology", made)
    if made["resumed"]:
        log.warning("%s: the construction was resumed, so its time (%.1f s) counts only the part after the resume",
                    unit.name, made["time_s"])
    return spec, made


# --------------------------------------------------------------------------- running a unit
def source_macs(unit: Unit, files: StudyFiles, image_hw: tuple[int, int]) -> int | None:
    """Multiply-adds of the unit's seed's discovered network, once its construction is done."""
    source = files.unit(unit.source)
    if "construct" not in source.completed():
        return None
    return network_macs(read_spec(source.topology), image_hw)


def run_unit(unit: Unit, config: StudyConfig, bundle: DataBundle, files: StudyFiles) -> dict[str, Any]:
    """Make and train one unit (resuming what it had done) and write its result; returns its study row."""
    run = files.unit(unit.name)
    settings = unit_config(config, unit.seed)
    if dist_info.rank() == 0 and not run.config_path.is_file():
        run.write_config(settings.to_dict(), command="study")
    base, made = make_topology(unit, config, bundle, files, run)
    spec = with_aux_policy(base, reference_spec(config.run, bundle), config.run.aux_heads)
    trained = train_stage(unit.arm, spec, settings, bundle, run)
    target = source_macs(unit, files, tuple(bundle.image_size))
    row = {
        "arm": unit.arm, "seed": unit.seed, "unit": unit.name, "topology": unit.topology,
        "topology_id": topology_id(spec), "params": trained["params"], "macs": trained["macs"],
        "macs_vs_discovered": None if target is None else trained["macs"] / target - 1.0,
        "top1": trained["top1"], "top5": trained["top5"], "train_time_s": trained["train_time_s"],
        "wall_time_s": trained["wall_time_s"], "construction_time_s": made["time_s"], "draws": made["draws"],
        "construction_resumed": made["resumed"],
    }
    if dist_info.rank() == 0:
        atomic_write_json(files.result(unit.name), row)
    return row


def cost_note(row: Mapping[str, Any], tolerance: float) -> str:
    """The per-unit cost check, as printed: multiply-adds against the seed's discovered network."""
    text = f"{row['macs'] / 1e6:.3g}M multiply-adds"
    if row.get("macs_vs_discovered") is None:
        return text + " (checked against the discovered network at the summary)"
    within = "within" if abs(row["macs_vs_discovered"]) <= tolerance else "OUTSIDE"
    return (f"{text}, {100 * row['macs_vs_discovered']:+.2f}% against discovered-s{row['seed']} "
            f"({within} {100 * tolerance:g}%)")


# --------------------------------------------------------------------------- scheduling and progress
def is_ready(unit: Unit, files: StudyFiles) -> bool:
    """Whether ``unit`` can start: a derived unit needs its seed's construction."""
    return unit.arm not in DERIVED or "construct" in files.unit(unit.source).completed()


def schedule(units: Sequence[Unit], files: StudyFiles, *, poll_s: float = 5.0,
             wait_s: float | None = None) -> Iterator[Unit]:
    """``units`` in order, each as soon as it is ready; waits (polling) for constructions another shard runs.

    Under torchrun rank 0 decides, so every process trains the same unit. ``wait_s``: give up
    (`UserError`) after waiting that long in one stretch; None waits as long as it takes.
    """
    pending, waited, told = list(units), 0.0, 0.0
    while pending:
        choice = dist_info.same_on_all_ranks(next((i for i, u in enumerate(pending) if is_ready(u, files)), None))
        if choice is not None:
            waited = told = 0.0
            yield pending.pop(choice)
            continue
        needed = sorted({u.source for u in pending})
        if wait_s is not None and waited >= wait_s:
            raise UserError(f"units {', '.join(u.name for u in pending)} still wait for {', '.join(needed)} after "
                            f"{waited:.0f} s: run the shard that holds them, or run the study without --shard")
        if waited >= told:
            log.info("waiting for the construction of %s (another shard runs it)", ", ".join(needed))
            told = waited + 300.0
        time.sleep(poll_s)
        waited += poll_s


@dataclass
class TimeLeft:
    """Estimates the time left from the finished units: their arm's mean duration, else the mean of all."""

    durations: dict[str, list[float]] = field(default_factory=dict)

    def add(self, arm: str, seconds: float) -> None:
        self.durations.setdefault(arm, []).append(seconds)

    def estimate(self, arms_left: Sequence[str]) -> float | None:
        done = [t for times in self.durations.values() for t in times]
        if not done:
            return None
        overall = float(np.mean(done))
        return sum(float(np.mean(self.durations[a])) if a in self.durations else overall for a in arms_left)


def duration_text(seconds: float | None) -> str:
    """``45 s``, ``3.2 min``, ``1.5 h``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


# --------------------------------------------------------------------------- the study
def _differences(saved: Any, given: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    if isinstance(saved, dict) and isinstance(given, dict):
        for key in sorted(set(saved) | set(given)):
            yield from _differences(saved.get(key), given.get(key), f"{prefix}{key}.")
    elif saved != given:
        yield prefix.rstrip("."), saved, given


def _comparable(config: StudyConfig) -> dict[str, Any]:
    """The configuration without the fields that may change when a study resumes (devices, workers, progress),
    and without ``max_seeds`` where there is no ``detect`` (it is then unused)."""
    data = {**config.to_dict(), "run": what_it_computes(config.run)}
    if config.detect is None:
        del data["max_seeds"]
    return data


def load_study(out: str | Path) -> StudyConfig:
    """The configuration saved in study folder ``out``; a one-line error if it is not one."""
    files = StudyFiles(Path(out))
    if not files.config.is_file():
        raise UserError(f"{out} is not a topo-build study (no {files.config.name}): pass the --out of a study")
    return read_config(files.config, parse=StudyConfig.from_dict)


def open_study(config: StudyConfig, out: str | Path) -> StudyFiles:
    """The study folder ``out``: started with ``config``, or checked to hold a study of the same configuration."""
    files = StudyFiles(Path(out))
    text = json.dumps({"config": config.to_dict(), "environment": environment_info()}, indent=2) + "\n"
    if not files.config.is_file() and dist_info.rank() == 0:
        atomic_create_text(files.config, text)
    if files.config.is_file():
        first = next(_differences(_comparable(load_study(out)), _comparable(config)), None)
        if first is not None:
            key, was, now = first
            raise UserError(f"{out} holds a study with {key}={was!r}, not {now!r}: give the same settings to resume "
                            "it (or --resume to take the saved ones), or choose another --out")
    return files


def _finished(unit: Unit, row: Mapping[str, Any], done: int, total: int, time_left: float | None,
              tolerance: float) -> None:
    log.info("unit %d/%d %s: top-1 %.2f%%, top-5 %.2f%%, %s; %.1f s training, %.1f s making the topology; "
             "about %s left", done, total, unit.name, 100 * row["top1"], 100 * row["top5"],
             cost_note(row, tolerance), row["train_time_s"], row["construction_time_s"], duration_text(time_left))


def run_study(config: StudyConfig, out: str | Path, *, shard: tuple[int, int] = (0, 1), progress: bool = True,
              poll_s: float = 5.0, wait_s: float | None = None, side_by_side: int = 1) -> StudyResult | None:
    """Run the study's units (those of ``shard``) into ``out``, skipping finished ones; summarise when unsharded.

    With ``config.detect`` the configured seeds are a pilot: once every pilot unit has finished (a shard
    waits for the others'), the seeds its SDs call for are added (:func:`study_units`), every shard taking
    its share of the new units. Every setting is checked against the data first
    (`topo.run.preflight.preflight`). ``side_by_side`` > 1 (unsharded): the study runs as that many shards
    in worker processes side by side, each with its share of torch's threads. Returns the summary on rank 0
    of an unsharded study, else None (gather shards with :func:`summarize`).
    """
    bundle = load_data(config.run)
    preflight(config.run, bundle, reference_spec(config.run, bundle))
    files = open_study(config, out)
    if side_by_side > 1 and shard == (0, 1):
        _shards_side_by_side(config, files.root, side_by_side, poll_s=poll_s, wait_s=wait_s)
        return summarize(out) if dist_info.rank() == 0 else None
    pilot = plan_units(config)
    _run_units(shard_units(pilot, *shard), config, bundle, files, shard=shard, progress=progress, poll_s=poll_s,
               wait_s=wait_s, what="the pilot" if config.detect is not None else "")
    if config.detect is not None:
        wait_for(pilot, files, poll_s=poll_s, wait_s=wait_s)
        units, plan = dist_info.same_on_all_ranks(study_units(config, files))
        log.info("%s", plan_sentence(plan))
        known = {u.name for u in pilot}
        added = [u for u in units if u.name not in known]
        _run_units(shard_units(added, *shard), config, bundle, files, shard=shard, progress=progress,
                   poll_s=poll_s, wait_s=wait_s, what="added for the difference to detect", before=pilot)
    if shard[1] > 1:
        log.info("shard %d/%d done; once every shard is, gather them: topo-build study --out %s --summarize",
                 *shard, files.root)
        return None
    return summarize(out) if dist_info.rank() == 0 else None


def study_processes(requested: int | str, config: StudyConfig) -> int:
    """Shards side by side for ``--side-by-side``: ``requested``, or for ``"auto"`` one per core on the CPU (at
    most one per unit) and 1 on an accelerator or under ``torch.distributed`` (`default_processes`)."""
    return default_processes(requested, len(plan_units(config)), resolve_device(config.run.train.device))


def _shards_side_by_side(config: StudyConfig, out: Path, count: int, *, poll_s: float,
                         wait_s: float | None) -> None:
    """Every unit of the study, as ``count`` shards side by side in spawned workers, each with its share of
    torch's threads (docs/study.md, Speed: 0.80x of the wall time one after the other on 2 cores)."""
    jobs = [Job(f"shard {i}/{count}", _run_shard, (config, str(out), (i, count), poll_s, wait_s))
            for i in range(count)]
    with sharing_threads(count) as threads:
        log.info("study %s: %d shards side by side, %d thread%s each", out, count, threads, "s" * (threads > 1))
        for _ in run_jobs(jobs, count, desc="shards", progress=False):
            pass


def _run_shard(config: StudyConfig, out: str, shard: tuple[int, int], poll_s: float, wait_s: float | None) -> None:
    """One shard of `_shards_side_by_side`, in its worker (module level: spawned workers import it)."""
    run_study(config, out, shard=shard, progress=False, poll_s=poll_s, wait_s=wait_s)


def _run_units(units: Sequence[Unit], config: StudyConfig, bundle: DataBundle, files: StudyFiles, *,
               shard: tuple[int, int], progress: bool, poll_s: float, wait_s: float | None, what: str,
               before: Sequence[Unit] = ()) -> None:
    """Run the unfinished ``units``, as they become ready, with a progress bar and a line per finished unit; the
    time left is estimated from the finished units, of these and of those run ``before``."""
    pending = [u for u in units if not files.result(u.name).is_file()]
    time_left, finished = _times_so_far([*before, *units], files), set()
    estimate = ("" if not pending else
                f", about {duration_text(time_left.estimate([u.arm for u in pending]))} by the finished units' times"
                if time_left.durations else ", the time left known once a unit has finished")
    log.info("study %s: %d units%s in %s, %d to run%s%s", files.root, len(units), f" ({what})" if what else "",
             "this shard" if shard[1] > 1 else "all", len(pending),
             f" (shard {shard[0]}/{shard[1]})" if shard[1] > 1 else "", estimate)
    bar = progress_bar(schedule(pending, files, poll_s=poll_s, wait_s=wait_s), total=len(pending), desc="study",
                       unit="unit", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
                       disable=not (progress and dist_info.rank() == 0))
    for done, unit in enumerate(bar, start=1):
        start = time.perf_counter()
        row = run_unit(unit, config, bundle, files)
        time_left.add(unit.arm, time.perf_counter() - start)
        finished.add(unit.name)
        left = time_left.estimate([u.arm for u in pending if u.name not in finished])
        bar.set_postfix_str(f"about {duration_text(left)} left")
        _finished(unit, row, done, len(pending), left, config.tolerance)


def _times_so_far(units: Sequence[Unit], files: StudyFiles) -> TimeLeft:
    """The finished units' times (construction, then training with evaluation), to estimate the rest from."""
    times = TimeLeft()
    for unit in units:
        if files.result(unit.name).is_file():
            row = _read_result(files, unit)
            times.add(unit.arm, float(row["wall_time_s"]) + float(row["construction_time_s"] or 0.0))
    return times


def wait_for(units: Sequence[Unit], files: StudyFiles, *, poll_s: float = 5.0, wait_s: float | None = None) -> None:
    """Return once every unit of ``units`` has its result (other shards run some); ``wait_s``: give up
    (`UserError`) after waiting that long; None waits as long as it takes."""
    waited, told = 0.0, 0.0
    while True:
        missing = dist_info.same_on_all_ranks([u.name for u in units if not files.result(u.name).is_file()])
        if not missing:
            return
        if wait_s is not None and waited >= wait_s:
            raise UserError(f"the pilot's units {', '.join(missing)} are still not finished after {waited:.0f} s: "
                            "run the shards that hold them, then this one again")
        if waited >= told:
            log.info("waiting for the pilot's units %s (other shards run them)", ", ".join(missing))
            told = waited + 300.0
        time.sleep(poll_s)
        waited += poll_s


def collect(units: Sequence[Unit], files: StudyFiles) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of the finished ``units``, and the names of the others, in plan order."""
    rows, missing = [], []
    for unit in units:
        if files.result(unit.name).is_file():
            rows.append(_read_result(files, unit))
        else:
            missing.append(unit.name)
    return rows, missing


def _read_result(files: StudyFiles, unit: Unit) -> dict[str, Any]:
    return read_json(files.result(unit.name), what="unit result", fix="delete it to train the unit again",
                     parse=_result_row)


def _result_row(value: Any) -> dict[str, Any]:
    """A unit's result.json as a study row (a KeyError, named as the file's problem, when it lacks a key)."""
    row = dict(value)
    missing = [key for key in ("arm", "seed", "unit", "params", "macs", "top1", "top5") if key not in row]
    if missing:
        raise KeyError(missing[0])
    return row


def summarize(out: str | Path) -> StudyResult:
    """Gather the finished units of study ``out``: study.csv, study_summary.*, study_tests.*, the figure, report.md.

    Missing units are named (and left out of the statistics); none finished is a `UserError`.
    """
    config = load_study(out)
    files = StudyFiles(Path(out))
    units, plan = study_units(config, files)
    rows, missing = collect(units, files)
    if not rows:
        raise UserError(f"{out} has no finished unit yet: run topo-build study --out {out} first")
    if missing:
        log.warning("%d of %d units are not finished and are left out: %s", len(missing),
                    len(missing) + len(rows), ", ".join(missing))
    deviations = cost_deviations(rows).set_index("unit")["deviation"]
    for row in rows:
        value = deviations.get(row["unit"])
        row["macs_vs_discovered"] = None if value is None or pd.isna(value) else float(value)
    frame, summary = study_frame(rows), summary_frame(rows)
    comparisons = compare_arms(rows, margin=config.margin)
    tests = comparisons_frame(comparisons)
    atomic_write_text(files.rows, frame.to_csv(index=False, float_format="%.10g"))
    write_tables(summary, files.summary)
    if not tests.empty:
        write_tables(tests, files.tests)
    figure = study_figure(rows, files.figure)
    pending = (f"The seeds for a difference of {config.detect:g} points are chosen once the {config.seeds}-seed "
               "pilot has finished." if config.detect is not None and plan is None else None)
    paragraphs = study_findings(rows, comparisons, tolerance=config.tolerance, missing=missing,
                                plan=plan if plan is not None else pending)
    tables = {"Summary": summary, "Tests": tests, "Units": units_frame(frame)}
    report = write_study_report(files.report, paragraphs, tables, figure, config.to_dict())
    return StudyResult(frame, summary, tests, comparisons, missing, report, plan)


def summary_markdown(result: StudyResult) -> str:
    """The summary and tests tables as printed at the end of a study, and the seeds chosen for ``detect``."""
    parts = [to_markdown(result.summary)]
    if not result.tests.empty:
        parts.append(to_markdown(result.tests))
    if result.plan is not None:
        parts.append(plan_sentence(result.plan))
    return "\n\n".join(parts)
