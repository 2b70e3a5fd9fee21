"""`topo-build analyze`: record and cluster the input of every Inception module of a (trained) network and
report the widths the data suggests beside the hand-chosen ones.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import builders
from analysis.plots import branch_widths
from analysis.tables import layer_frame, to_markdown
from builders.cost import inception_macs
from builders.from_clusters import from_clusters
from builders.spec import InceptionSpec, NetworkSpec
from topo.common.devices import resolve_device
from topo.common.errors import UserError
from topo.common.reading import read_weights, state_mismatch
from topo.common.writing import atomic_write_json, atomic_write_text
from topo.construct.config import ConstructConfig, window_for
from topo.construct.files import clustering_to_dict
from topo.construct.records import LayerClusters, layer_record
from topo.data import DataBundle, make_loader
from topo.run.rundir import AnalysisFiles
from topo.stats.layer_stats import LayerStats
from topo.stats.recording import record

log = logging.getLogger(__name__)


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

    ``weights``: a state-dict file (`topo.common.reading.read_weights`), or None (the
    network as initialised). For each module, the widths
    the data suggests (at the module's own multiply-add cost) are reported
    beside the hand-chosen ones, as a table, JSON records and a branch-width
    figure in ``out_dir`` (`topo.run.rundir.AnalysisFiles`).
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
                   seed=construct_config.seed, progress=progress, cost_multiple=construct_config.stats_cost)
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
    window = window_for(map_hw, config.largest_window)
    found = LayerClusters(window, config.clustering(window, progress=progress).fit(stats))
    hand_macs = inception_macs(module, *map_hw, kernel5x5=kernel5x5)
    suggested = from_clusters(found.clustering, stats, budget=hand_macs, round_to=config.round_to,
                              in_channels=module.in_channels, name=module.name, fallback=module,
                              kernel5x5=kernel5x5)
    atomic_write_json(files.clusters(module.name), clustering_to_dict(found.clustering))
    module_record = layer_record(module.name, stats, found, suggested, module, budget=hand_macs,
                           in_channels=module.in_channels, map_hw=map_hw, kernel5x5=kernel5x5)
    log.info("%s: %d clusters %s", module.name, found.clustering.n_clusters_, dict(found.clustering.kernel_counts_))
    return module_record


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a state-dict file (`topo.common.reading.read_weights`) strictly, with a one-line error where it does
    not fit."""
    state = read_weights(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"weights file {path} does not fit the network ({state_mismatch(model, state, e)}); check "
                        "--model/--variant/--width-mult/--num-classes") from None
