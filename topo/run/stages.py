"""The main job, stage by stage: construct, train both networks, compare, report.

Each stage records its completion in the run directory (`topo.run.rundir`), so a
killed run resumes at the stage it reached; training resumes from its last
epoch checkpoint. Only rank 0 writes files under ``torchrun``.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import builders
from analysis.report import write_report
from analysis.tables import comparison_frame
from builders.cost import network_costs
from builders.spec import NetworkSpec, read_spec
from topo.common import distributed as dist_info
from topo.common.devices import resolve_device
from topo.common.processes import (
    Job,
    default_processes,
    jobs_beside,
    processes_within,
    sharing_threads,
)
from topo.common.reading import read_clusters, read_json, read_records
from topo.common.writing import atomic_write_json, atomic_write_text
from topo.construct.budget import total_budget
from topo.construct.config import ConstructConfig
from topo.construct.files import read_prefix, read_progress
from topo.construct.loop import Construction, construct
from topo.construct.prefix import load_prefix, shared_weights
from topo.construct.slimming import SlimConfig, slim
from topo.controls.control import ControlSummary, summarise, verdict
from topo.controls.nulls import NullDataset, PixelMoments, null_batches
from topo.data import DataBundle, make_loader, second_source
from topo.run.config import RunConfig, load_data, reference_spec, with_aux_policy
from topo.run.preflight import preflight
from topo.run.rundir import RunDir
from topo.stats.layer_stats import read_stats
from topo.train.config import TrainResult
from topo.train.files import read_metrics
from topo.train.trainer import train

log = logging.getLogger(__name__)


CONTROLS_FIX = "delete {} to construct the controls again"




def comparison_row(name: str, spec: NetworkSpec, result: TrainResult, image_hw: tuple[int, int]) -> dict[str, Any]:
    """A trained network's row of the comparison table (see `analysis.tables.ComparisonRow`)."""
    params, macs = network_costs(spec, image_hw)
    final = result.final
    return {
        "network": name,
        "params": int(params),
        "macs": int(macs),
        "top1": float(final.get("val_top1", float("nan"))),
        "top5": float(final.get("val_top5", float("nan"))),
        "ema_top1": _maybe_float(final.get("ema_val_top1")),
        "train_time_s": float(result.train_time_s),
        "wall_time_s": float(result.wall_time_s),
        "throughput": float(result.throughput),
    }


def run_construction(config: RunConfig, bundle: DataBundle, construct_config: ConstructConfig, out_dir: Path,
                     *, null: str | None = None, cluster_jobs: int = 1) -> Construction:
    """One construction on the run's data (or, with ``null``, on its null version: `topo.controls.nulls`), its
    clustering in ``cluster_jobs`` processes. With ``epochs_per_layer`` each prefix first trains briefly: on the
    data, or on its null with labels drawn at random (`null_datasets`), so that a control runs the same procedure
    without the real labels; so does slimming (``slim_epochs``, `topo.construct.slimming`), after the construction."""
    reference = reference_spec(config, bundle)
    device = resolve_device(config.train.device)

    def stats_loader(dataset):  # each process its own shard under torchrun; record() sums over processes
        return make_loader(dataset, batch_size=config.train.batch_size, train=True, seed=construct_config.seed,
                           workers=config.train.workers, device=device)

    def loader(dataset):
        if null is None:
            return stats_loader(dataset)
        return null_batches(lambda: stats_loader(dataset), null, seed=construct_config.seed, role="control",
                            max_batches=construct_config.stats_batches)

    @functools.cache
    def training_data():  # a null's images (and, for noise, its moments) made once, for every brief training
        return (bundle.train, bundle.val) if null is None else null_datasets(bundle, null, construct_config,
                                                                              stats_loader)

    def brief_training(model, epochs: int, after_backward=None):
        brief = dataclasses.replace(config.train, epochs=epochs, ema_decay=None,
                                    seed=construct_config.seed)  # a control's own seed (the run's: the same)
        return train(model, *training_data(), brief, after_backward=after_backward).model

    found = construct(reference, bundle.train, construct_config, input_hw=tuple(bundle.image_size), loader=loader,
                      trainer=lambda model, index: brief_training(model, construct_config.epochs_per_layer),
                      out_dir=out_dir, device=device, progress=config.train.progress, cluster_jobs=cluster_jobs)
    if construct_config.slim_epochs:
        found = slimmed_construction(found, construct_config, reference, tuple(bundle.image_size), brief_training)
    return found


def slimmed_construction(found: Construction, construct_config: ConstructConfig, reference: NetworkSpec,
                         hw: tuple[int, int], training) -> Construction:
    """``found`` with its widths chosen by training signal within the construction's budget
    (`topo.construct.slimming`); ``training(model, epochs, after_backward)`` trains on the data, or on a control's
    null."""
    slim_config = SlimConfig(construct_config.slim_epochs, construct_config.slim_over, construct_config.slim_penalty)
    budget = total_budget(construct_config, dataclasses.replace(reference, input_size=min(hw)), hw)
    spec = slim(found.spec, budget, hw, slim_config, lambda model, step: training(model, slim_config.epochs, step),
                seed=construct_config.seed)
    log.info("slimmed by training signal (%d epochs at %.3g x the width): %s", slim_config.epochs, slim_config.over,
             ", ".join(f"{m.name} {m.widths}" for m in spec.inception_modules()))
    return dataclasses.replace(found, spec=spec)


def null_datasets(bundle: DataBundle, kind: str, construct_config: ConstructConfig,
                  loader) -> tuple[NullDataset, NullDataset]:
    """The training and validation images a ``kind`` control's construction trains its prefixes on: the data's
    null, labels drawn at random (`topo.controls.nulls.NullDataset`; for noise, the moments of the batches its
    statistics see)."""
    moments = PixelMoments.of(loader(bundle.train), construct_config.stats_batches) if kind == "noise" else None
    return tuple(NullDataset(data, kind, seed=construct_config.seed, num_classes=bundle.num_classes, part=part,
                             moments=moments) for data, part in ((bundle.train, "train"), (bundle.val, "val")))


def construct_stage(config: RunConfig, bundle: DataBundle, run: RunDir) -> NetworkSpec:
    """Construct the topology (or read it back if this stage is done); no controls."""
    return constructions_stage(dataclasses.replace(config, controls=False), bundle, run)[0]


def constructions_stage(config: RunConfig, bundle: DataBundle, run: RunDir
                        ) -> tuple[NetworkSpec, ControlSummary | None]:
    """The run's construction and, with ``config.controls``, the control's (`control_plan`), each resumable on its
    own (what is done is read back), side by side in ``config.jobs`` processes (`topo.common.processes.jobs_beside`):
    the topology, and the control's outcome (`topo.controls`; None without controls)."""
    done = run.completed()
    plan = control_plan(config) if config.controls and "controls" not in done else []
    own = "construct" not in done
    processes = default_processes(config.jobs, own + len(plan), resolve_device(config.train.device))
    quiet = config if processes == 1 else dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                                                  progress=False))
    each = processes_within(config.jobs, processes)
    other = second_source(bundle) if any(kind == "other" for _, kind, _ in plan) else None
    controls = [Job(f"the control's construction {name}", construction_job,
                    (quiet, other if kind == "other" else bundle, dataclasses.replace(config.construct, seed=seed),
                     run.control(name).root, None if kind in (None, "other") else kind, each))
                for name, kind, seed in plan]
    # The run's own construction here; the control's beside it in the other processes (this one takes over
    # those not started when it is done).
    with jobs_beside(controls, processes - own, take_over=own, desc="the control's constructions",
                     progress=config.train.progress and len(controls) > 1) as results:
        if own:
            spec = _keep_construction(run, *construction_job(config, bundle, config.construct,
                                                             run.construction.root, None, each))
        else:
            spec = read_spec(run.topology)
        outcomes = list(results)
    if plan:
        summary = _control_summary(config, run, plan, [records for _, records in outcomes])
    else:
        summary = read_controls(run) if config.controls else None
    return spec, summary


def construction_job(config: RunConfig, bundle: DataBundle, construct_config: ConstructConfig, out_dir: Path,
                     null: str | None, cluster_jobs: int = 1) -> tuple[NetworkSpec, list[dict[str, Any]]]:
    """`run_construction` as a job for `topo.common.processes` (picklable in and out): the spec and the records."""
    log.info("constructing on %s, seed %d (%s)", f"the {null} null" if null else f"the {bundle.name} data",
             construct_config.seed, out_dir)
    result = run_construction(config, bundle, construct_config, out_dir, null=null, cluster_jobs=cluster_jobs)
    return result.spec, result.records


def _keep_construction(run: RunDir, spec: NetworkSpec, records: list[dict[str, Any]]) -> NetworkSpec:
    if dist_info.rank() == 0:
        atomic_write_text(run.topology, spec.to_json() + "\n")
        atomic_write_json(run.construction.records, records)
        run.mark_done("construct", {"modules": len(records)})
    return spec


def control_plan(config: RunConfig) -> list[tuple[str, str | None, int]]:
    """(name, control kind or None for the real data, seed) of every construction the control adds to the run's
    own: each its own seed, the run's next ones, so that no control shares random numbers with another
    construction."""
    control = config.control
    base = config.construct.seed
    plan: list[tuple[str, str | None, int]] = [(f"real-seed{base + k}", None, base + k)
                                               for k in range(1, control.real_seeds)]
    seeds = itertools.count(base + control.real_seeds)
    plan += [(f"{kind}-seed{seed}", kind, seed) for kind in control.kinds
             for seed in itertools.islice(seeds, control.control_seeds)]
    return plan


def read_controls(run: RunDir) -> ControlSummary | None:
    """The control's outcome saved in ``run`` (None before the controls ran; a damaged file is one line)."""
    if not run.controls.is_file():
        return None
    return read_json(run.controls, what="control summary", fix=CONTROLS_FIX.format(run.controls.parent),
                     parse=ControlSummary.from_dict)


def _control_summary(config: RunConfig, run: RunDir, plan: list[tuple[str, str | None, int]],
                     outcomes: list[list[dict[str, Any]]]) -> ControlSummary:
    """Test the run's topology against the control's constructions (their records, in ``plan``'s order)."""
    real = [read_records(run.construction.records)]
    nulls: dict[str, list] = {}
    for (_, kind, _), records in zip(plan, outcomes):
        (real if kind is None else nulls.setdefault(kind, [])).append(records)
    modules = [r["name"] for r in real[0]]
    summary = summarise(modules, real, nulls, permutations=config.control.permutations, seed=config.seed)
    if dist_info.rank() == 0:
        atomic_write_json(run.controls, summary.to_dict())
        run.mark_done("controls", {"shown": {kind: summary.shown(kind) for kind in summary.kinds}})
    log.debug(verdict(summary))  # the commands print it once (topo.cli.commands)
    return summary


def train_stage(name: str, spec: NetworkSpec, config: RunConfig, bundle: DataBundle, run: RunDir) -> dict[str, Any]:
    """Train one network with the run's recipe and return its comparison row (cached once done)."""
    done = run.completed()
    if f"train:{name}" in done:
        return done[f"train:{name}"]
    row = training_job(name, spec, config, bundle, run.root)
    if dist_info.rank() == 0:
        run.mark_done(f"train:{name}", row)
    return row


def trainings_stage(arms: list[tuple[str, NetworkSpec]], config: RunConfig, bundle: DataBundle, run: RunDir) -> None:
    """Train the ``arms`` (name, spec) not yet trained: side by side in ``config.jobs`` processes, each with its
    share of torch's threads (`sharing_threads`), else one after the other. On the 2-core VM a default run's
    network trains as fast on one thread as on two (3 epochs: 20.4 s against 20.7 s), so two side by side take
    about the time of one (23.6 s; docs/benchmarks.md). Every process trains with the threads it is given, so a
    seed's numbers depend on the share (as they depended on the machine's threads before)."""
    done = run.completed()
    todo = [(name, spec) for name, spec in arms if f"train:{name}" not in done]
    processes = default_processes(config.jobs, len(todo), resolve_device(config.train.device))
    if processes < 2:
        for name, spec in todo:
            train_stage(name, spec, config, bundle, run)
        return
    quiet = dataclasses.replace(config, train=dataclasses.replace(config.train, progress=False))
    jobs = [Job(f"training {name}", training_job, (name, spec, quiet, bundle, run.root)) for name, spec in todo[1:]]
    with sharing_threads(processes), jobs_beside(jobs, processes - 1, desc="trainings", progress=False) as results:
        rows = [training_job(*todo[0], config, bundle, run.root)]
        rows += list(results)
    for (name, _), row in zip(todo, rows):  # this process alone writes the run's record of what is done
        run.mark_done(f"train:{name}", row)


def training_job(name: str, spec: NetworkSpec, config: RunConfig, bundle: DataBundle, root: Path) -> dict[str, Any]:
    """Train one network with the run's recipe (in this process or a worker: picklable in and out) and return its
    comparison row; the caller records it as done."""
    run = RunDir(root)
    log.info("training %s (%d epochs, %d thread%s)", name, config.train.epochs, torch.get_num_threads(),
             "s" if torch.get_num_threads() > 1 else "")
    if dist_info.rank() == 0:
        atomic_write_text(run.training.spec(name), spec.to_json() + "\n")
    model = initial_model(name, spec, config, run)
    result = train(model, bundle.train, bundle.val, config.train, run_dir=run.training.root, name=name)
    return comparison_row(name, spec, result, tuple(bundle.image_size))


def initial_model(name: str, spec: NetworkSpec, config: RunConfig, run: RunDir) -> torch.nn.Module:
    """The network training starts from: seeded at random, or, for the discovered network of a construction
    that initialised or trained it (``--init hebbian``, ``--epochs-per-layer``), with the construction's weights
    (``--fresh-init`` for the ablation). Where the budget rescaled the network after construction, the weights
    no longer fit and training starts at random (logged)."""
    torch.manual_seed(config.seed)
    model = builders.build(spec)
    shaped = config.construct.init != "random" or config.construct.epochs_per_layer > 0
    if name != "discovered" or config.fresh_init or not shaped:
        return model
    state = construction_state(run)
    fits = state is not None and not shared_weights(model, state)[1]
    if not fits:
        log.info("the discovered network differs from the constructed one (rescaled to the budget): training "
                 "starts from random weights")
        return model
    load_prefix(model, state)
    log.info("training the discovered network from the construction's weights (--fresh-init to start at random)")
    return model


def construction_state(run: RunDir) -> dict[str, torch.Tensor] | None:
    """The weights the construction left (its last ``prefixN.pt``), or None."""
    files = run.construction
    if not files.progress.is_file():
        return None
    modules = len(read_progress(files.progress)["records"])
    return read_prefix(files.prefix(modules), modules)


def _maybe_float(value: Any) -> float | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    return float(value)


def histories(run: RunDir, names: list[str]) -> dict[str, pd.DataFrame]:
    return {name: read_metrics(run.training.metrics(name)) for name in names if run.training.metrics(name).is_file()}


def correlations(run: RunDir, records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each constructed layer's correlation matrix with its cluster order, from the saved files."""
    out = {}
    for rec in records:
        stats_path, clusters_path = run.construction.stats(rec["name"]), run.construction.clusters(rec["name"])
        if stats_path.is_file() and clusters_path.is_file():
            clusters = read_clusters(clusters_path)
            out[rec["name"]] = {
                "corr": read_stats(stats_path).corr(),
                "order": clusters["channel_order"],
                "labels": clusters["channel_labels"],
            }
    return out


def report_stage(run: RunDir) -> tuple[Path, pd.DataFrame | None]:
    """Write the comparison tables, figures and report.md from what the run directory holds.

    Returns the report's path and the comparison table (None where no network was trained).
    """
    config = run.read_config()
    records_path = run.construction.records
    records = read_records(records_path) if records_path.is_file() else []
    done = run.completed()
    rows = [done[k] for k in ("train:discovered", "train:reference") if k in done]
    report = write_report(
        run.root,
        records,
        rows,
        histories(run, [row["network"] for row in rows]),
        corr_by_layer=correlations(run, records),
        config=config,
        controls=read_controls(run),
    )
    return report, comparison_frame(rows) if rows else None


def run_all(config: RunConfig, run: RunDir, *, bundle: DataBundle | None = None
            ) -> tuple[Path, pd.DataFrame | None] | None:
    """The whole job: construct, train the discovered and the reference network, compare, report.

    Every setting is checked against the data first (`preflight`), so a doomed
    run fails before anything is written. Returns what `report_stage` returns,
    on rank 0 (None on the other processes).
    """
    bundle = load_data(config) if bundle is None else bundle
    reference = reference_spec(config, bundle)  # a bad --reference fails before anything is written
    preflight(config, bundle, reference)
    is_main = dist_info.rank() == 0
    if is_main and not run.config_path.is_file():
        run.write_config(config.to_dict())
    discovered, _ = constructions_stage(config, bundle, run)
    arms = [(name, with_aux_policy(spec, reference, config.aux_heads))  # one auxiliary-head policy for both
            for name, spec in (("discovered", discovered), ("reference", reference))]
    trainings_stage(arms, config, bundle, run)
    if not is_main:
        return None
    return report_stage(run)
