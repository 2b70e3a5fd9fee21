"""The construction loop: grow a network one Inception module at a time.

For each module of the skeleton (the procedure of "Going deeper with
convolutions", section 3):

1. build the network so far (stem and the modules found so far, with a head)
   and optionally train it briefly (`prepare_prefix`);
2. record the statistics of its last layer, and of that layer max-pooled 3x3
   (the parallel pooling path of the next module) (`record_layer`);
3. cluster the units that fire together (`cluster_layer`), and map the
   clusters onto branch widths (`builders.from_clusters`) within this module's
   share of the multiply-add budget (`module_budget`);
4. append the module, initialised at random or from its clusters (`grow`),
   and repeat.

Progress is saved after every module (`topo.construct.files.ConstructionFiles`), so an
interrupted construction resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import builders
from builders.from_clusters import DATA_FALLBACK, from_clusters
from builders.googlenet import INCEPTION_TABLE
from builders.spec import InceptionSpec, NetworkSpec, PoolSpec
from topo.cluster import UnitClustering
from topo.common import distributed as dist_info
from topo.construct.budget import (
    discovered_base,
    module_weights,
    spend_budget,
    step_budget,
    total_budget,
)
from topo.construct.config import ConstructConfig, skeleton_plan, window_for
from topo.construct.decoding import threshold_decode_
from topo.construct.files import ConstructionFiles, load_progress, save_step
from topo.construct.hebbian import hebbian_init_
from topo.construct.prefix import (
    CarriedOutputs,
    build_prefix,
    calibrate_batchnorm,
    forward_batches,
)
from topo.construct.records import LayerClusters, describe, layer_record
from topo.controls.nulls import null_batches
from topo.stats.layer_stats import LayerStats
from topo.stats.recording import forward_macs, record

log = logging.getLogger(__name__)


PROBE = "pool_probe"  # the 3x3/1 max pool appended while recording: the next module's pooling path


#: The proportions a module without clusters keeps when there is no reference module: GoogLeNet's 3a.
FALLBACK_SHAPE = InceptionSpec(1, *INCEPTION_TABLE[0][1:], name=INCEPTION_TABLE[0][0])


@dataclass
class Construction:
    """The discovered network and what was measured and decided for each module."""

    spec: NetworkSpec
    records: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class BuiltLayers:
    """What each step of one `construct` call measured, kept in memory: pass it as ``on_layer``. ``stats`` by
    the recorded layer's name, ``clusterings`` by the module built from them. Layers read back on a resume were
    not built by the call and are not here: their statistics and clusters are in the construction's files
    (`topo.construct.files`)."""

    stats: dict[str, LayerStats] = field(default_factory=dict)
    clusterings: dict[str, UnitClustering] = field(default_factory=dict)

    def __call__(self, module: str, stats: LayerStats, found: LayerClusters) -> None:
        self.stats[stats.name] = stats
        self.clusterings[module] = found.clustering








def prepare_prefix(model: nn.Module, index: int, trainer: Callable[[nn.Module, int], nn.Module] | None,
                   batches: Any, config: ConstructConfig, device: torch.device) -> nn.Module:
    """Train the prefix briefly (``config.epochs_per_layer > 0``), else calibrate its BatchNorm statistics."""
    if trainer is not None and config.epochs_per_layer > 0:
        return trainer(model, index)
    calibrate_batchnorm(model, batches, config.calibration_batches, device)
    return model


def record_layer(model: nn.Module, spec: NetworkSpec, batches: Any, config: ConstructConfig,
                 device: torch.device, progress: bool, *, carried: CarriedOutputs | None = None,
                 null: str | None = None) -> tuple[LayerStats, LayerStats | None]:
    """Statistics of the prefix's output and of its 3x3 max-pooled map (None without a pooling branch), in one pass.

    Both are read at the pooling probe appended to the prefix (its input is the
    prefix's output, also when the prefix has no layer yet: then it is the data);
    the first is named after the prefix's last layer (``"input"`` without one), the second after it too
    (``"inception3a, 3x3 max-pooled"``); ``null`` (the kind of null input ``batches`` are) says so in both names.
    The layer keeps the offsets its largest window reads; the pooled map, clustered
    with a 1x1 window, only offset (0, 0), at the same anchor positions as the layer.
    With ``carried``, ``batches`` are the prefix's outputs (`topo.construct.prefix`): only the probe runs on them, and
    the positions rule weighs the whole prefix's forward cost, as it would running it.
    """
    probe = builders.build(dataclasses.replace(spec, stages=spec.stages + (PoolSpec(PROBE, 3, 1, padding=1),)))
    probe.load_state_dict(model.state_dict())
    probe.to(device).eval()
    reach = {f"{PROBE}:input": config.largest_window - 1, **({PROBE: 0} if config.pool_branch else {})}
    source, cost = probe, None
    if carried is not None:
        source = nn.Sequential(OrderedDict([(PROBE, getattr(probe, PROBE))]))
        cost = forward_macs(probe, carried.example) if config.positions == "auto" else None
    name = (spec.layers[-1].name if spec.layers else "input") + ("" if null is None else f" on the {null} null")
    names = {f"{PROBE}:input": name, PROBE: f"{name}, 3x3 max-pooled"}
    stats = record(source, batches, list(reach), max_offset=reach, max_batches=config.stats_batches,
                   positions=config.positions, fire_quantile=config.fire_quantile, seed=config.seed,
                   progress=progress, forward_cost=cost, names={layer: names[layer] for layer in reach},
                   cost_multiple=config.stats_cost)
    return stats[f"{PROBE}:input"], stats.get(PROBE)


def record_null(model: nn.Module, spec: NetworkSpec, batches_factory: Callable[[], Any], config: ConstructConfig,
                device: torch.device, progress: bool) -> tuple[LayerStats, LayerStats | None] | None:
    """The same statistics of the same prefix on ``config.null``'s null input (None without a null)."""
    if config.null == "none":
        return None
    return record_layer(model, spec, null_input(batches_factory, config), config, device, progress, null=config.null)


def null_input(batches_factory: Callable[[], Any], config: ConstructConfig) -> Any:
    """``config.null``'s null version of the recording batches (`topo.controls.nulls`), from the reference role's
    stream: never the random numbers of a control's input that the batches may be."""
    return null_batches(batches_factory, config.null, seed=config.seed, role="reference",
                        max_batches=config.stats_batches)


def start_carrying(config: ConstructConfig, batches_factory: Callable[[], Any], trainer: Any,
                   device: torch.device) -> CarriedOutputs | None:
    """`CarriedOutputs` of the recording batches (and of their null input), or None where each step must run the
    whole prefix: a prefix trained at every step, or statistics over every batch (``stats_batches=None``)."""
    if (trainer is not None and config.epochs_per_layer > 0) or config.stats_batches is None:
        return None
    null = None if config.null == "none" else null_input(batches_factory, config)
    return CarriedOutputs(batches_factory(), null, config.stats_batches, device)


def record_step(model: nn.Module, spec: NetworkSpec, index: int, carried: CarriedOutputs | None,
                batches_factory: Callable[[], Any], trainer: Any, config: ConstructConfig, device: torch.device,
                progress: bool) -> tuple[nn.Module, tuple, tuple | None, CarriedOutputs | None]:
    """Calibrate (or train) the prefix and record its last layer on the data and on the null: from the carried
    outputs where there are any (the same numbers), else through the whole prefix. Returns the prefix, the
    layer's statistics and their null, and what is still carried."""
    if carried is not None and carried.advance(model, [layer.name for layer in spec.layers]):
        layer = record_layer(model, spec, carried.eval, config, device, progress, carried=carried)
        null = (None if carried.null is None else
                record_layer(model, spec, carried.null, config, device, progress, carried=carried, null=config.null))
        return model, layer, null, carried
    model = prepare_prefix(model, index, trainer, batches_factory(), config, device)
    layer = record_layer(model, spec, batches_factory(), config, device, progress)
    return model, layer, record_null(model, spec, batches_factory, config, device, progress), None


def cluster_layer(config: ConstructConfig, stats: LayerStats, pooled: LayerStats | None, progress: bool,
                  null: tuple[LayerStats, LayerStats] | None = None, jobs: int = 1) -> LayerClusters:
    """Cluster the layer with the largest window its map allows, and its pooled map with a 1x1 window.

    With ``null`` (the layer and its pooled map recorded on a null input), each pair is tested against it.
    ``jobs``: worker processes of the clustering (`UnitClustering.n_jobs`; the same clusters).
    """
    window = window_for(stats.spatial_shape or (1, 1), config.largest_window)
    layer_null, pooled_null = null if null is not None else (None, None)
    clustering = config.clustering(window, progress=progress, n_jobs=jobs).fit(stats, null=layer_null)
    pool_clustering = (config.clustering(1, progress=progress, n_jobs=jobs).fit(pooled, null=pooled_null)
                       if pooled is not None and config.pool_branch else None)
    return LayerClusters(window, clustering, pool_clustering)


def build_module(config: ConstructConfig, found: LayerClusters, stats: LayerStats, *, name: str,
                 in_channels: int, share: float | None, reference_module: InceptionSpec | None) -> InceptionSpec:
    """The module the clusters call for (`builders.from_clusters`), within ``share`` where it is given."""
    fallback = DATA_FALLBACK if config.fallback == DATA_FALLBACK else (reference_module or FALLBACK_SHAPE)
    return from_clusters(found.clustering, stats, budget=share, round_to=config.round_to if config.budgeted else None,
                         reduce_to_channels=not config.budgeted, carry=config.budgeted, in_channels=in_channels,
                         pool_units=found.pool_clustering.n_clusters_ if found.pool_clustering is not None else 0,
                         name=name, fallback=fallback,
                         max_scale=config.max_units_per_cluster)


def grow(spec: NetworkSpec, module: InceptionSpec, model: nn.Module, init: str, found: LayerClusters,
         stats: LayerStats, seed: int, carry: bool = True) -> tuple[NetworkSpec, nn.Module]:
    """Append ``module``, initialised from ``seed`` (or from its clusters; ``carry``: the module has a carry path,
    `build_module`); the earlier layers keep their (possibly trained) weights. Returns (spec, network)."""
    spec = dataclasses.replace(spec, stages=spec.stages + (module,))
    grown = build_prefix(spec, model.state_dict(), seed, next(model.parameters()).device)
    if init == "hebbian":
        hebbian_init_(getattr(grown, module.name), found.clustering, stats, found.pool_clustering, carry=carry)
    return spec, grown


def decode_thresholds(grown: nn.Module, name: str, found: LayerClusters, stats: LayerStats, pooled: LayerStats,
                      batches_factory: Callable[[], Any], config: ConstructConfig,
                      device: torch.device) -> dict[str, Any]:
    """`topo.construct.decoding.threshold_decode_` on ``grown``'s new module ``name`` over the calibration batches.

    Under ``torchrun`` every process then takes rank 0's weights, so all grow the same network.
    """
    grown.to(device)
    max_batches = config.calibration_batches
    info = threshold_decode_(grown, getattr(grown, name), found.clustering, stats,
                             pool_clustering=found.pool_clustering, pooled=pooled,
                             calibrate=lambda: calibrate_batchnorm(grown, batches_factory(), max_batches, device),
                             run=lambda: forward_batches(grown, batches_factory(), max_batches, device),
                             seed=config.seed)
    grown.load_state_dict(dist_info.same_on_all_ranks({k: v.cpu() for k, v in grown.state_dict().items()}))
    return info


def grow_step(spec: NetworkSpec, module: InceptionSpec, model: nn.Module, config: ConstructConfig,
              found: LayerClusters, layer: tuple[LayerStats, LayerStats], batches_factory: Callable[[], Any],
              device: torch.device, module_record: dict[str, Any],
              seed: int) -> tuple[NetworkSpec, dict[str, torch.Tensor]]:
    """`grow` (from ``seed``), then the threshold decoder where ``config`` asks for it (its rates go into
    ``module_record``)."""
    spec, grown = grow(spec, module, model, config.init, found, layer[0], seed, carry=config.budgeted)
    if config.init == "hebbian" and not config.budgeted and config.decoder == "threshold":
        module_record.update(decode_thresholds(grown, module.name, found, *layer, batches_factory, config, device))
    return spec, {k: v.detach().cpu() for k, v in grown.state_dict().items()}


def construct(
    reference: NetworkSpec,
    train_data: torch.utils.data.Dataset,
    config: ConstructConfig,
    *,
    input_hw: tuple[int, int],
    loader: Callable[[torch.utils.data.Dataset], Any],
    trainer: Callable[[nn.Module, int], nn.Module] | None = None,
    out_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    cluster_jobs: int = 1,
    on_layer: Callable[[str, LayerStats, LayerClusters], None] | None = None,
) -> Construction:
    """Grow a network on the stem of ``reference`` following ``config.skeleton``.

    ``loader(dataset)`` gives the batches statistics are recorded over;
    ``trainer(model, layer_index)`` trains a prefix briefly (used when
    ``config.epochs_per_layer > 0``). With ``out_dir`` the statistics, clusters
    and progress are written there and an interrupted construction resumes.
    ``cluster_jobs``: worker processes of each layer's clustering (the same network for any number).
    ``on_layer(module, stats, found)``: called with what each step built measured (e.g. `BuiltLayers`).

    Under ``torchrun`` every process runs the loop in step: each records its
    shard of the data, the statistics are summed over processes, so every
    process clusters the same numbers and grows the same network; only rank 0
    writes files.
    """
    files = ConstructionFiles(Path(out_dir)) if out_dir is not None else None
    device = torch.device(device)
    plan = skeleton_plan(config.skeleton, reference)
    budget = total_budget(config, dataclasses.replace(reference, input_size=min(input_hw)), input_hw)
    weights = module_weights(plan, reference, input_hw, config.budget_split)
    spec, records, state = load_progress(files, discovered_base(config, reference, input_hw))
    carried = start_carrying(config, lambda: loader(train_data), trainer, device)
    for step, item in enumerate(plan):
        if step < len(spec.stages):  # built before the resume
            continue
        if isinstance(item, PoolSpec):
            spec = dataclasses.replace(spec, stages=spec.stages + (item,))
            continue
        index = len(records)
        model = build_prefix(spec, state, config.seed + step, device)
        model, (stats, pooled), null, carried = record_step(model, spec, index, carried, lambda: loader(train_data),
                                                            trainer, config, device, progress)
        found = cluster_layer(config, stats, pooled, progress, null, cluster_jobs)
        share = step_budget(config, budget, spec, records, weights, input_hw)
        reference_module = reference.inception_modules()[index] if index < len(reference.inception_modules()) else None
        module = build_module(config, found, stats, name=item, in_channels=spec.out_channels, share=share,
                              reference_module=reference_module)
        records.append(layer_record(item, stats, found, module, reference_module, budget=share,
                                    in_channels=spec.out_channels, map_hw=tuple(stats.spatial_shape or (1, 1)),
                                    largest_window=config.largest_window, null=config.null))
        log.info(describe(records[-1]))
        spec, state = grow_step(spec, module, model, config, found, (stats, pooled), lambda: loader(train_data),
                                device, records[-1], config.seed + step)
        if on_layer is not None:
            on_layer(item, stats, found)
        save_step(files, item, stats, found.clustering, spec, records, state)
    return Construction(*spend_budget(config, spec, records, budget, input_hw))
