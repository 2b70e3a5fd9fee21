"""The main job, stage by stage: construct, train both networks, compare, report.

Each stage records its completion in the run directory (`topo.rundir`), so a
killed run resumes at the stage it reached; training resumes from its last
epoch checkpoint. Only rank 0 writes files under ``torchrun``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import builders
from analysis.plots import branch_widths
from analysis.report import write_report
from analysis.tables import comparison_frame, layer_frame, to_markdown
from builders.cost import count_macs, inception_macs
from builders.from_clusters import from_clusters
from builders.spec import InceptionSpec, NetworkSpec, PoolSpec
from topo import distributed as dist_info
from topo.construct import (
    Construction,
    ConstructConfig,
    LayerClusters,
    clustering_to_dict,
    construct,
    discovered_base,
    head_macs,
    load_prefix,
    layer_record,
    module_weights,
    skeleton_plan,
    total_budget,
    window_for,
)
from topo.data import DataBundle, load, make_loader, resolve_device
from topo.errors import DataError, SpecError, UserError
from topo.files import (
    read_clusters,
    read_config,
    read_json,
    read_metrics,
    read_prefix,
    read_progress,
    read_records,
    read_spec,
    read_stats,
    read_weights,
    state_mismatch,
)
from topo.controls import ControlConfig, ControlSummary, summarise, verdict
from topo.hooks import record
from topo.io import atomic_write_json, atomic_write_text
from topo.nulls import null_batches
from topo.parallel import Job, check_processes, default_processes, processes_within, run_jobs
from topo.rundir import AnalysisFiles, RunDir
from topo.stats import LayerStats
from topo.train import TrainConfig, TrainResult, train

log = logging.getLogger(__name__)

REFERENCES = ("auto", "googlenet-small", "googlenet-paper", "googlenet-torchvision")
AUX_POLICIES = ("none", "reference")
CONTROLS_FIX = "delete {} to construct the controls again"
SMALL_IMAGES = 64  # at or below this size the small-input GoogLeNet is the reference


@dataclass
class RunConfig:
    """Everything one `topo-build` run needs; saved as the run's config.json.

    ``aux_heads``: the one auxiliary-head policy of every trained network: ``"none"``,
    or ``"reference"`` (each network gets the reference's heads where it has the
    layers they attach to); see `with_aux_policy`.
    """

    data: str = "patches"
    data_dir: str | None = None
    image_size: int | None = None
    strict: bool = False
    verify: bool = True
    reference: str = "auto"
    width_mult: float | None = None
    aux_heads: str = "none"
    seed: int = 0
    controls: bool = True
    jobs: int | str = "auto"
    fresh_init: bool = False
    construct: ConstructConfig = field(default_factory=ConstructConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["construct"] = dataclasses.asdict(self.construct)
        out["control"] = dataclasses.asdict(self.control)
        out["train"] = self.train.to_dict()
        return out

    def __post_init__(self) -> None:
        self.jobs = check_processes(self.jobs)
        if self.aux_heads not in AUX_POLICIES:
            raise UserError(f"auxiliary-head policy {self.aux_heads!r} is unknown: use {' or '.join(AUX_POLICIES)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = dict(data)
        data["construct"] = ConstructConfig(**data["construct"])
        control = dict(data.get("control", {}))
        control["kinds"] = tuple(control.get("kinds", ControlConfig().kinds))
        data["control"] = ControlConfig(**control)
        data["train"] = TrainConfig.from_dict(data["train"])
        return cls(**data)

    @classmethod
    def of_run(cls, run: RunDir) -> RunConfig:
        """The configuration saved in a run directory (a one-line error naming a damaged config.json)."""
        return read_config(run.config_path, parse=cls.from_dict)


# --------------------------------------------------------------------------- inputs
def load_data(config: RunConfig) -> DataBundle:
    return load(config.data, config.data_dir, image_size=config.image_size, strict=config.strict,
                verify=config.verify, seed=config.seed)


#: Width multiplier of the reference on the embedded data sets (CPU-sized); 1 elsewhere.
EMBEDDED_WIDTHS = {"digits": 0.25, "patches": 0.125}


def default_width(data: str) -> float:
    """Width multiplier of the reference when none is given (`EMBEDDED_WIDTHS`, else 1)."""
    return EMBEDDED_WIDTHS.get(data, 1.0)


def reference_spec(config: RunConfig, bundle: DataBundle) -> NetworkSpec:
    """The hand-designed network the discovered one is compared with, sized for the data."""
    size = min(bundle.image_size)
    choice = config.reference
    if choice.endswith(".json") or Path(choice).is_file():
        return read_spec(choice)
    if choice not in REFERENCES:
        raise UserError(
            f"reference {choice!r} is unknown: use one of {', '.join(REFERENCES)} or a NetworkSpec .json file"
        )
    if choice == "auto":
        choice = "googlenet-small" if size <= SMALL_IMAGES else "googlenet-torchvision"
    variant = choice.split("-", 1)[1]
    width = config.width_mult if config.width_mult is not None else default_width(config.data)
    try:
        return builders.googlenet_spec(variant, num_classes=bundle.num_classes, aux_logits=None, width_mult=width,
                                       in_channels=bundle.in_channels, input_size=size)
    except SpecError as e:
        h, w = bundle.image_size
        raise SpecError(f"reference {choice} does not fit the {h}x{w} images of {_data_name(config)} ({e}); use "
                        "larger images (--image-size) or another --reference") from None


def with_aux_policy(spec: NetworkSpec, reference: NetworkSpec, policy: str) -> NetworkSpec:
    """``spec`` with the auxiliary heads ``policy`` gives every trained network: none, or the reference's."""
    return dataclasses.replace(spec, aux_heads=reference.aux_heads if policy == "reference" else ())


def network_costs(spec: NetworkSpec, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(parameters, multiply-adds per image) of the network at inference (auxiliary heads excluded)."""
    model = builders.build(spec).eval()
    aux = tuple(f"{a.name}." for a in spec.aux_heads)
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(aux))
    return params, count_macs(model, (1, spec.in_channels, *image_hw))


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


# --------------------------------------------------------------------------- checks before any work
def _data_name(config: RunConfig) -> str:
    return f"{config.data} data" + (f" in {config.data_dir}" if config.data_dir else "")


def check_device(device: str) -> torch.device:
    """The device ``device`` (``--device``) names, or a one-line error where this machine has no such device."""
    try:
        resolved = resolve_device(device)
    except RuntimeError:
        raise UserError(f"device {device!r} (--device) is not a device name: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {device!r} (--device): this machine has {torch.cuda.device_count()} CUDA "
                        "device(s); use --device auto or cpu")
    return resolved


def check_training_data(config: RunConfig, bundle: DataBundle) -> None:
    """One-line errors, before any work, for a one-class data set and a batch the training split cannot fill."""
    if bundle.num_classes < 2:
        raise DataError(f"{_data_name(config)} has {bundle.num_classes} class ({', '.join(bundle.class_names)}); "
                        "a classifier needs at least 2: add a class (a folder per class)")
    images = len(bundle.train)
    if config.train.batch_size > images:
        raise UserError(f"batch size {config.train.batch_size} (--batch-size) is larger than the {images} training "
                        f"images of {_data_name(config)}: no batch could be filled; use --batch-size {images} or less")


def module_maps(config: ConstructConfig, reference: NetworkSpec, image_hw: tuple[int, int]
                ) -> list[tuple[str, tuple[int, int]]]:
    """(name, map entering it) of every module of the skeleton; a one-line error where a map would be empty."""
    base = discovered_base(config, reference, image_hw)
    _, h, w = base.output_shape(image_hw)
    where, maps = "the stem", []
    for item in skeleton_plan(config.skeleton, reference):
        if isinstance(item, PoolSpec):
            h, w, where = item.out_size(h), item.out_size(w), item.name
        elif min(h, w) < 1:
            raise UserError(
                f"skeleton {config.skeleton!r} (--skeleton) leaves no map for {item} on {image_hw[0]}x{image_hw[1]} "
                f"images ({where} makes it {h}x{w}): use fewer poolings, or larger images (--image-size)"
            )
        else:
            maps.append((item, (h, w)))
    return maps


def _narrowest_module(in_channels: int, map_hw: tuple[int, int], width: int) -> int:
    """Multiply-adds of a module with every branch ``width`` wide: the least any rescaled module costs."""
    module = InceptionSpec(in_channels, width, width, width, width, width, width)
    return inception_macs(module, *map_hw, kernel5x5=5)


def check_budget(config: ConstructConfig, reference: NetworkSpec, image_hw: tuple[int, int]) -> None:
    """A one-line error, before anything is recorded, for a budget the skeleton's modules cannot fit in.

    The stem, poolings and head cost what they cost; each module gets a share of
    the rest in proportion to its weight under the configured split (`topo.construct.module_weights`) and
    must at least afford its narrowest form, every branch ``round_to`` wide.
    """
    budget = total_budget(config, dataclasses.replace(reference, input_size=min(image_hw)), image_hw)
    if budget is None:
        return
    maps = module_maps(config, reference, image_hw)
    plan = skeleton_plan(config.skeleton, reference)
    pools = tuple(item for item in plan if isinstance(item, PoolSpec))
    base = discovered_base(config, reference, image_hw)
    fixed = head_macs(dataclasses.replace(base, stages=pools), image_hw)
    width = config.round_to or 1
    inputs = [base.out_channels] + [4 * width] * (len(maps) - 1)
    least = [_narrowest_module(c, hw, width) for c, (_, hw) in zip(inputs, maps)]
    weights = module_weights(plan, reference, image_hw, config.budget_split)
    need = fixed + max(cost * sum(weights) / weight for cost, weight in zip(least, weights))
    if budget < need:
        raise UserError(
            f"budget {budget:.4g} multiply-adds (--budget) is too small for skeleton {config.skeleton!r}: the stem, "
            f"poolings and head cost {fixed:.4g} alone, and its {len(maps)} module(s), each at its narrowest (every "
            f"branch {width} wide) within its share, need {need:.4g} in all; give --budget "
            f"{math.ceil(need / 1e3) * 1e3:.4g} or more"
        )


def check_window(window: int, maps: list[tuple[str, tuple[int, int]]]) -> None:
    """A one-line error for a window (``--window``) larger than every map it would look at."""
    largest = max((min(hw) for _, hw in maps), default=0)
    if maps and window > largest:
        shown = ", ".join(f"{name} {h}x{w}" for name, (h, w) in maps[:4])
        raise UserError(f"window {window} (--window) is larger than every map it would look at ({shown}): "
                        f"use --window {window_for((largest, largest), window)}")


def preflight(config: RunConfig, bundle: DataBundle, reference: NetworkSpec | None, *,
              window_given: bool = False) -> None:
    """Every check of the settings against the data and the machine, before any work (``reference``: with a
    construction)."""
    check_device(config.train.device)
    check_training_data(config, bundle)
    if reference is None:
        return
    hw = tuple(bundle.image_size)
    maps = module_maps(config.construct, reference, hw)
    if window_given:
        check_window(config.construct.window, maps)
    check_budget(config.construct, reference, hw)


# --------------------------------------------------------------------------- stages
def run_construction(config: RunConfig, bundle: DataBundle, construct_config: ConstructConfig, out_dir: Path,
                     *, null: str | None = None, trainer: bool = True, cluster_jobs: int = 1) -> Construction:
    """One construction on the run's data (or, with ``null``, on its null version: `topo.nulls`), its clustering
    in ``cluster_jobs`` processes."""
    reference = reference_spec(config, bundle)
    device = resolve_device(config.train.device)

    def stats_loader(dataset):  # each process its own shard under torchrun; record() sums over processes
        return make_loader(dataset, batch_size=config.train.batch_size, train=True, seed=construct_config.seed,
                           workers=config.train.workers, device=device)

    def loader(dataset):
        if null is None:
            return stats_loader(dataset)
        return null_batches(lambda: stats_loader(dataset), null, seed=construct_config.seed,
                            max_batches=construct_config.stats_batches)

    def brief_training(model, index):
        brief = dataclasses.replace(config.train, epochs=construct_config.epochs_per_layer, ema_decay=None)
        return train(model, bundle.train, bundle.val, brief).model

    return construct(reference, bundle.train, construct_config, input_hw=tuple(bundle.image_size), loader=loader,
                     trainer=brief_training if trainer else None, out_dir=out_dir, device=device,
                     progress=config.train.progress, cluster_jobs=cluster_jobs)


def construct_stage(config: RunConfig, bundle: DataBundle, run: RunDir) -> NetworkSpec:
    """Construct the topology (or read it back if this stage is done); no controls."""
    return constructions_stage(dataclasses.replace(config, controls=False), bundle, run)[0]


def constructions_stage(config: RunConfig, bundle: DataBundle, run: RunDir
                        ) -> tuple[NetworkSpec, ControlSummary | None]:
    """The run's construction and, with ``config.controls``, the control's (`control_plan`), each resumable on its
    own (what is done is read back), side by side in ``config.jobs`` processes (`topo.parallel`): the topology,
    and the control's outcome (`topo.controls`; None without controls)."""
    done = run.completed()
    plan = control_plan(config) if config.controls and "controls" not in done else []
    if plan and config.construct.epochs_per_layer > 0:
        log.warning("the controls construct without the brief prefix training (it would train on the real labels)")
    own = "construct" not in done
    processes = default_processes(config.jobs, own + len(plan), resolve_device(config.train.device))
    quiet = config if processes == 1 else dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                                                  progress=False))
    each = processes_within(config.jobs, processes)
    jobs = [Job("the construction", construction_job, (quiet, bundle, config.construct, run.construction.root,
                                                       None, True, each))] if own else []
    jobs += [Job(f"the control's construction {name}", construction_job,
                 (quiet, bundle, dataclasses.replace(config.construct, seed=seed), run.control(name).root, kind, False,
                  each))
             for name, kind, seed in plan]
    results = run_jobs(jobs, processes, desc="constructions", progress=config.train.progress and len(jobs) > 1)
    spec = _keep_construction(run, *next(results)) if own else read_spec(run.topology)
    if plan:
        summary = _control_summary(config, run, plan, [records for _, records in results])
    else:
        summary = read_controls(run) if config.controls else None
    return spec, summary


def construction_job(config: RunConfig, bundle: DataBundle, construct_config: ConstructConfig, out_dir: Path,
                     null: str | None, trainer: bool, cluster_jobs: int = 1) -> tuple[NetworkSpec, list[dict[str, Any]]]:
    """`run_construction` as a job for `topo.parallel` (picklable in and out): the spec and the records."""
    log.info("constructing on %s, seed %d (%s)", f"the {null} null" if null else "the data", construct_config.seed,
             out_dir)
    result = run_construction(config, bundle, construct_config, out_dir, null=null, trainer=trainer,
                              cluster_jobs=cluster_jobs)
    return result.spec, result.records


def _keep_construction(run: RunDir, spec: NetworkSpec, records: list[dict[str, Any]]) -> NetworkSpec:
    if dist_info.rank() == 0:
        atomic_write_text(run.topology, spec.to_json() + "\n")
        atomic_write_json(run.construction.records, records)
        run.mark_done("construct", {"modules": len(records)})
    return spec


def control_plan(config: RunConfig) -> list[tuple[str, str | None, int]]:
    """(name, null kind or None for the real data, seed) of every construction the control adds to the run's own."""
    control = config.control
    seeds = [config.construct.seed + k for k in range(control.real_seeds)]
    plan: list[tuple[str, str | None, int]] = [(f"real-seed{s}", None, s) for s in seeds[1:]]
    plan += [(f"{kind}-seed{s}", kind, s) for kind in control.kinds for s in seeds[:control.control_seeds]]
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
        run.mark_done("controls", {"depends_on_data": summary.depends_on_data})
    log.info(verdict(summary))
    return summary


def train_stage(name: str, spec: NetworkSpec, config: RunConfig, bundle: DataBundle, run: RunDir) -> dict[str, Any]:
    """Train one network with the run's recipe and return its comparison row (cached once done)."""
    done = run.completed()
    if f"train:{name}" in done:
        return done[f"train:{name}"]
    log.info("training %s (%d epochs)", name, config.train.epochs)
    if dist_info.rank() == 0:
        atomic_write_text(run.training.spec(name), spec.to_json() + "\n")
    model = initial_model(name, spec, config, run)
    result = train(model, bundle.train, bundle.val, config.train, run_dir=run.training.root, name=name)
    row = comparison_row(name, spec, result, tuple(bundle.image_size))
    if dist_info.rank() == 0:
        run.mark_done(f"train:{name}", row)
    return row


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
    own = model.state_dict()
    fits = state is not None and all(k in own and own[k].shape == v.shape for k, v in state.items()
                                     if not k.startswith("fc."))
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


def run_all(config: RunConfig, run: RunDir, *, bundle: DataBundle | None = None,
            window_given: bool = False) -> tuple[Path, pd.DataFrame | None] | None:
    """The whole job: construct, train the discovered and the reference network, compare, report.

    Every setting is checked against the data first (`preflight`), so a doomed
    run fails before anything is written. Returns what `report_stage` returns,
    on rank 0 (None on the other processes).
    """
    bundle = load_data(config) if bundle is None else bundle
    reference = reference_spec(config, bundle)  # a bad --reference fails before anything is written
    preflight(config, bundle, reference, window_given=window_given)
    is_main = dist_info.rank() == 0
    if is_main and not run.config_path.is_file():
        run.write_config(config.to_dict())
    discovered, _ = constructions_stage(config, bundle, run)
    for name, spec in (("discovered", discovered), ("reference", reference)):  # one auxiliary-head policy for both
        train_stage(name, with_aux_policy(spec, reference, config.aux_heads), config, bundle, run)
    if not is_main:
        return None
    return report_stage(run)


# --------------------------------------------------------------------------- analyse
def analyze(
    spec: NetworkSpec,
    weights: str | Path | None,
    bundle: DataBundle,
    out_dir: str | Path,
    *,
    construct_config: ConstructConfig,
    batch_size: int = 64,
    device: str = "auto",
    workers: int | str = "auto",
    progress: bool = True,
) -> pd.DataFrame:
    """Record and cluster the input of every Inception module of a (trained) network.

    ``weights``: a state-dict file (`topo.files.read_weights`), or None (the
    network as initialised). For each module, the widths
    the data suggests (at the module's own multiply-add cost) are reported
    beside the hand-chosen ones, as a table, JSON records and a branch-width
    figure in ``out_dir`` (`topo.rundir.AnalysisFiles`).
    """
    modules = spec.inception_modules()
    if not modules:
        raise UserError(f"network {spec.name or 'spec'} has no Inception modules to analyse")
    dev = resolve_device(device)
    model = builders.build(spec)
    if weights is not None:
        load_weights(model, weights)
    model.to(dev)
    loader = make_loader(bundle.train, batch_size=batch_size, train=False, seed=construct_config.seed,
                         workers=workers, device=dev, distributed=False)
    layers = [f"{m.name}:input" for m in modules]
    stats = record(model, loader, layers, max_batches=construct_config.stats_batches,
                   positions=construct_config.positions, fire_quantile=construct_config.fire_quantile,
                   seed=construct_config.seed, progress=progress)
    files = AnalysisFiles(Path(out_dir))
    shapes = spec.input_shapes(tuple(bundle.image_size))
    records = [suggest_module(module, stats[layer], tuple(shapes[module.name][1:]), spec.kernel5x5,
                              construct_config, files, progress) for module, layer in zip(modules, layers)]
    frame = layer_frame(records)
    atomic_write_json(files.records, records)
    atomic_write_text(files.table, to_markdown(frame) + "\n")
    branch_widths(records, files.branch_widths)
    return frame


def suggest_module(module: InceptionSpec, stats: LayerStats, map_hw: tuple[int, int], kernel5x5: int,
                   config: ConstructConfig, files: AnalysisFiles, progress: bool) -> dict[str, Any]:
    """Cluster the input of a hand-designed ``module``; the record of the module the data suggests at its cost."""
    window = window_for(map_hw, config.window)
    found = LayerClusters(window, config.clustering(window, progress=progress).fit(stats))
    hand_macs = inception_macs(module, *map_hw, kernel5x5=kernel5x5)
    suggested = from_clusters(found.clustering, stats, budget=hand_macs, round_to=config.round_to,
                              in_channels=module.in_channels, name=module.name, fallback=module,
                              kernel5x5=kernel5x5)
    atomic_write_json(files.clusters(module.name), clustering_to_dict(found.clustering))
    record_ = layer_record(module.name, stats, found, suggested, module, budget=hand_macs,
                           in_channels=module.in_channels, map_hw=map_hw, kernel5x5=kernel5x5)
    log.info("%s: %d clusters %s", module.name, found.clustering.n_clusters_, dict(found.clustering.kernel_counts_))
    return record_


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a state-dict file (`topo.files.read_weights`) strictly, with a one-line error where it does not fit."""
    state = read_weights(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"weights file {path} does not fit the network ({state_mismatch(model, state, e)}); check "
                        "--model/--variant/--width-mult/--num-classes") from None
