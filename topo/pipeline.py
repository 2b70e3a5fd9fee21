"""The main job, stage by stage: construct, train both networks, compare, report.

Each stage records its completion in the run directory (`topo.rundir`), so a
killed run resumes at the stage it reached; training resumes from its last
epoch checkpoint. Only rank 0 writes files under ``torchrun``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

import builders
from analysis import count_macs
from builders.spec import NetworkSpec
from topo import distributed as dist_info
from topo.construct import ConstructConfig, clustering_to_dict, construct
from topo.data import DataBundle, load, make_loader, resolve_device
from topo.errors import SpecError, UserError
from topo.hooks import record
from topo.io import atomic_write_json, atomic_write_text
from topo.rundir import RunDir
from topo.stats import LayerStats
from topo.train import TrainConfig, train

REFERENCES = ("auto", "googlenet-small", "googlenet-paper", "googlenet-torchvision")
SMALL_IMAGES = 64  # at or below this size the small-input GoogLeNet is the reference


@dataclass
class RunConfig:
    """Everything one `topo-build` run needs; saved as the run's config.json."""

    data: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    strict: bool = False
    verify: bool = True
    reference: str = "auto"
    width_mult: float | None = None
    seed: int = 0
    construct: ConstructConfig = field(default_factory=ConstructConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["construct"] = dataclasses.asdict(self.construct)
        out["train"] = self.train.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = dict(data)
        data["construct"] = ConstructConfig(**data["construct"])
        data["train"] = TrainConfig.from_dict(data["train"])
        return cls(**data)


# --------------------------------------------------------------------------- inputs
def load_data(config: RunConfig) -> DataBundle:
    return load(config.data, config.data_dir, image_size=config.image_size, strict=config.strict,
                verify=config.verify, seed=config.seed)


def default_width(data: str) -> float:
    """Width multiplier of the reference when none is given: a quarter on the embedded digits."""
    return 0.25 if data == "digits" else 1.0


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
    return builders.googlenet_spec(
        variant,
        num_classes=bundle.num_classes,
        aux_logits=None,
        width_mult=width,
        in_channels=bundle.in_channels,
        input_size=size,
    )


def read_spec(path: str | Path) -> NetworkSpec:
    """A `NetworkSpec` from a JSON file, with a one-line error for a missing or invalid file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"spec file {path} does not exist: give the path of a NetworkSpec .json file")
    try:
        return NetworkSpec.from_json(path.read_text())
    except SpecError as e:
        raise SpecError(f"spec file {path}: {e}") from None


def network_costs(spec: NetworkSpec, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(parameters, multiply-adds per image) of the network at inference (auxiliary heads excluded)."""
    model = builders.build(spec).eval()
    aux = tuple(f"{a.name}." for a in spec.aux_heads)
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(aux))
    return params, count_macs(model, (1, spec.in_channels, *image_hw))


# --------------------------------------------------------------------------- stages
def construct_stage(config: RunConfig, bundle: DataBundle, run: RunDir, *, log: Callable[[str], None]) -> NetworkSpec:
    """Construct the topology (or read it back if this stage is done)."""
    if "construct" in run.completed():
        return read_spec(run.topology)
    reference = reference_spec(config, bundle)
    device = resolve_device(config.train.device)

    def stats_loader(dataset):  # each process its own shard under torchrun; record() sums over processes
        return make_loader(dataset, batch_size=config.train.batch_size, train=True, seed=config.seed,
                           workers=config.train.workers, device=device)

    def brief_training(model, index):
        brief = dataclasses.replace(config.train, epochs=config.construct.epochs_per_layer, ema_decay=None)
        return train(model, bundle.train, bundle.val, brief).model

    result = construct(
        reference,
        bundle.train,
        config.construct,
        input_hw=tuple(bundle.image_size),
        loader=stats_loader,
        trainer=brief_training,
        out_dir=run.construction,
        device=device,
        progress=config.train.progress,
        log=log,
    )
    if dist_info.rank() == 0:
        atomic_write_text(run.topology, result.spec.to_json() + "\n")
        atomic_write_json(run.construction / "records.json", result.records)
        run.mark_done("construct", {"modules": len(result.records)})
    return result.spec


def train_stage(name: str, spec: NetworkSpec, config: RunConfig, bundle: DataBundle, run: RunDir,
                *, log: Callable[[str], None]) -> dict[str, Any]:
    """Train one network with the run's recipe and return its comparison row (cached once done)."""
    done = run.completed()
    if f"train:{name}" in done:
        return done[f"train:{name}"]
    log(f"training {name} ({config.train.epochs} epochs)")
    torch.manual_seed(config.seed)
    model = builders.build(spec)
    result = train(model, bundle.train, bundle.val, config.train, run_dir=run.training, name=name)
    params, macs = network_costs(spec, tuple(bundle.image_size))
    final = result.final
    row = {
        "network": name,
        "params": int(params),
        "macs": int(macs),
        "top1": float(final.get("val_top1", float("nan"))),
        "top5": float(final.get("val_top5", float("nan"))),
        "ema_top1": _maybe_float(final.get("ema_val_top1")),
        "train_time_s": float(result.train_time_s),
        "throughput": float(result.throughput),
    }
    if dist_info.rank() == 0:
        run.mark_done(f"train:{name}", row)
    return row


def _maybe_float(value: Any) -> float | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    return float(value)


def histories(run: RunDir, names: list[str]) -> dict[str, pd.DataFrame]:
    out = {}
    for name in names:
        path = run.training / f"{name}_metrics.csv"
        if path.is_file():
            out[name] = pd.read_csv(path)
    return out


def correlations(run: RunDir, records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each constructed layer's correlation matrix with its cluster order, from the saved files."""
    out = {}
    for rec in records:
        stats_path = run.construction / f"{rec['name']}_stats.pt"
        clusters_path = run.construction / f"{rec['name']}_clusters.json"
        if stats_path.is_file() and clusters_path.is_file():
            clusters = json.loads(clusters_path.read_text())
            out[rec["name"]] = {
                "corr": LayerStats.load(stats_path).corr(),
                "order": clusters["channel_order"],
                "labels": clusters["channel_labels"],
            }
    return out


def report_stage(run: RunDir, *, log: Callable[[str], None]) -> Path:
    """Write the comparison tables, figures and report.md from what the run directory holds."""
    from analysis.report import comparison_frame, to_markdown, write_report

    config = run.read_config()
    records_path = run.construction / "records.json"
    records = json.loads(records_path.read_text()) if records_path.is_file() else []
    done = run.completed()
    rows = [done[k] for k in ("train:discovered", "train:reference") if k in done]
    report = write_report(
        run.root,
        records,
        rows,
        histories(run, [row["network"] for row in rows]),
        corr_by_layer=correlations(run, records),
        config=config,
    )
    if rows:
        log("\n" + to_markdown(comparison_frame(rows)))
    log(f"report: {report}")
    return report


def _quiet(message: str) -> None:
    """The log of processes other than rank 0."""


def run_all(config: RunConfig, run: RunDir, *, log: Callable[[str], None] = print) -> Path | None:
    """The whole job: construct, train the discovered and the reference network, compare, report."""
    bundle = load_data(config)
    reference = reference_spec(config, bundle)  # a bad --reference fails before anything is written
    is_main = dist_info.rank() == 0
    if is_main and not run.config_path.is_file():
        run.write_config(config.to_dict())
    log = log if is_main else _quiet
    discovered = construct_stage(config, bundle, run, log=log)
    train_stage("discovered", discovered, config, bundle, run, log=log)
    train_stage("reference", reference, config, bundle, run, log=log)
    if not is_main:
        return None
    return report_stage(run, log=log)


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
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Record and cluster the input of every Inception module of a (trained) network.

    For each module, the widths the data suggests (at the module's own
    multiply-add cost) are reported beside the hand-chosen ones, as a table,
    JSON records and a branch-width figure in ``out_dir``.
    """
    from analysis import inception_macs
    from analysis.plots import branch_widths
    from analysis.report import layer_frame, to_markdown
    from topo.construct import module_from_clustering, window_for
    from topo.cluster import UnitClustering

    model = builders.build(spec)
    if weights is not None:
        load_weights(model, weights)
    dev = resolve_device(device)
    model.to(dev)
    modules = spec.inception_modules()
    if not modules:
        raise UserError(f"network {spec.name or 'spec'} has no Inception modules to analyse")
    loader = make_loader(bundle.train, batch_size=batch_size, train=False, seed=construct_config.seed,
                         workers=workers, device=dev, distributed=False)
    layers = [f"{m.name}:input" for m in modules]
    stats = record(model, loader, layers, max_batches=construct_config.stats_batches,
                   positions=construct_config.positions, seed=construct_config.seed, progress=progress)
    shapes = spec.input_shapes(tuple(bundle.image_size))
    out = Path(out_dir)
    records = []
    for module, layer in zip(modules, layers):
        layer_stats = stats[layer]
        map_hw = tuple(shapes[module.name][1:])
        clustering = UnitClustering(
            method=construct_config.method,
            window=window_for(map_hw, construct_config.window),
            n_clusters=construct_config.n_clusters,
            max_clusters=construct_config.max_clusters,
            random_state=construct_config.seed,
            progress=progress,
        ).fit(layer_stats)
        hand_macs = inception_macs(module, *map_hw, kernel5x5=spec.kernel5x5)
        suggested = module_from_clustering(clustering, layer_stats, budget=hand_macs,
                                           round_to=construct_config.round_to, in_channels=module.in_channels,
                                           name=module.name, reference=module, log=log)
        atomic_write_json(out / f"{module.name}_clusters.json", clustering_to_dict(clustering))
        records.append({
            "name": module.name,
            "in_channels": module.in_channels,
            "spatial_shape": list(map_hw),
            "observations": int(layer_stats.count),
            "dead_units": int(len(layer_stats.dead_units)),
            "method": construct_config.method,
            "n_clusters": int(clustering.n_clusters_),
            "kernel_counts": {str(k): int(v) for k, v in clustering.kernel_counts_.items()},
            "spec": suggested.to_dict(),
            "reference": module.to_dict(),
            "macs": int(inception_macs(suggested, *map_hw)),
            "budget_macs": int(hand_macs),
            "fallback": not clustering.n_clusters_,
        })
        log(f"{module.name}: {clustering.n_clusters_} clusters {dict(clustering.kernel_counts_)}")
    frame = layer_frame(records)
    atomic_write_json(out / "analysis.json", records)
    atomic_write_text(out / "analysis.md", to_markdown(frame) + "\n")
    branch_widths(records, out / "branch_widths")
    log("\n" + to_markdown(frame))
    return frame


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a state dict (or a trainer checkpoint's ``model``) with a one-line error on mismatch."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist: give a state-dict .pt/.pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"weights file {path} is not a readable PyTorch file ({type(e).__name__})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(
            f"weights file {path} does not fit the network ({first}); check --model/--variant/--width-mult"
        ) from None
