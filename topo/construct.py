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

Progress is saved after every module (`topo.rundir.ConstructionFiles`), so an
interrupted construction resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import builders
from builders.cost import count_macs, inception_macs
from builders.budget import largest_scale, scaled_widths
from builders.from_clusters import DATA_FALLBACK, from_clusters
from builders.googlenet import INCEPTION_TABLE
from builders.spec import InceptionSpec, NetworkSpec, PoolSpec
from topo import distributed as dist_info
from topo.carried import CarriedOutputs, calibrating
from topo.cluster import METHODS, UnitClustering
from topo.decoding import DECODERS, threshold_decode_
from topo.errors import UserError
from topo.files import read_prefix, read_progress
from topo.hebbian import hebbian_init_
from topo.hooks import forward_macs, record
from topo.io import atomic_torch_save, atomic_write_json
from topo.nulls import KINDS as NULL_KINDS
from topo.nulls import null_batches
from topo.rundir import ConstructionFiles
from topo.stats import DEFAULT_FIRE_QUANTILE, DEFAULT_POSITIONS, LayerStats, check_fire_quantile

log = logging.getLogger(__name__)

DEFAULT_SKELETON = "2,pool,5,pool,2"
INIT_MODES = ("random", "hebbian")
WINDOWS = (1, 3, 5)
STEMS = ("reference", "none")
#: ``budget_macs`` in words: the reference's multiply-adds, or no budget at all (one unit per cluster).
BUDGETS = ("reference", "none")
#: How the total budget is shared among the modules: ``"even"``, each module an equal share of what the
#: modules before it left; ``"data"``, every module as its clusters call for (one unit per cluster) and one
#: scale factor on the whole network (unstable where layers find few clusters: a narrow layer finds fewer
#: clusters still, docs/clustering.md); ``"reference"``, GoogLeNet's split where the skeleton matches.
SPLITS = ("even", "data", "reference")
#: What the Hebbian edges are tested against: independence, or the same prefix recorded on a null input.
NULLS = ("none",) + NULL_KINDS
#: What a layer without clusters becomes: its principal dimension as 1x1 units, or the reference's proportions.
FALLBACKS = (DATA_FALLBACK, "reference")
#: Where the modules' ceilings (``max_units_per_cluster``) left more than this share of the budget unspent,
#: the grown network is scaled as a whole to the budget, so that it is compared with the reference at equal cost.
SPENT = 0.98
PROBE = "pool_probe"  # the 3x3/1 max pool appended while recording: the next module's pooling path
#: The proportions a module without clusters keeps when there is no reference module: GoogLeNet's 3a.
FALLBACK_SHAPE = InceptionSpec(1, *INCEPTION_TABLE[0][1:], name=INCEPTION_TABLE[0][0])


@dataclass
class ConstructConfig:
    """How the construction loop measures, clusters and budgets.

    ``skeleton``: modules per stage and the stride-2 poolings between stages
    (GoogLeNet's "2,pool,5,pool,2"). ``stem``: the reference's stem, or
    ``"none"``: the first module reads the data's channels directly (the
    theory's first layer). ``budget_macs``: multiply-adds per image of the whole
    network: a number, ``"reference"`` (those of the reference), or ``"none"``:
    no budget, every cluster becomes exactly one unit of the next layer (no
    rescaling, no rounding, each reduction one channel per channel its clusters
    read), which is what recovering a planted network needs. ``window``: the largest
    window a candidate unit looks at (5: 1x1, 3x3 and 5x5 kernels); it shrinks to
    the map where a map is smaller. ``stats_batches``: batches of training data
    the statistics are recorded over; ``positions``: anchor positions per map
    and image (``None``: all; ``"auto"``: the rule of docs/statistics.md);
    ``fire_quantile``: a unit fires above its own q-quantile (``None``: when
    positive). ``null``: test each pair against the same prefix recorded on a null
    input (`topo.nulls`) instead of against independence. ``budget_split``: see
    `SPLITS`; ``fallback``: see `FALLBACKS`; ``max_units_per_cluster``: a module's
    share of the budget is a ceiling, its widths grow to at most this many
    channels per cluster (what is left goes to the later modules; None: no cap);
    where the ceilings leave more than 2% of the budget unspent (`SPENT`), the
    network is scaled as a whole to the budget at the end (`fit_to_total`).
    ``epochs_per_layer``: brief training of each prefix before its statistics are recorded (0: statistics of the random
    network). ``decoder``: with ``init="hebbian"`` and ``budget_macs="none"``, how a decoded unit fires:
    ``"mean"``, above its sum's mean (BatchNorm bias 0); ``"threshold"``, as often as its cluster's members
    fire together (`topo.decoding`). ``pool_branch``: each module's pooling branch, one unit per cluster of its
    3x3 max-pooled input (False: no pooling branch, as in the theory's layers).
    """

    skeleton: str = DEFAULT_SKELETON
    stem: str = "reference"
    method: str = "arora"
    window: int = 5
    n_clusters: int | str = "auto"
    max_clusters: int | None = None
    budget_macs: int | str = "reference"
    budget_split: str = "even"
    round_to: int = 1
    fallback: str = DATA_FALLBACK
    max_units_per_cluster: float | None = 8.0
    null: str = "noise"
    init: str = "random"
    epochs_per_layer: int = 0
    stats_batches: int | None = 16
    positions: int | str | None = DEFAULT_POSITIONS
    fire_quantile: float | None = DEFAULT_FIRE_QUANTILE
    decoder: str = "mean"
    pool_branch: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        parse_skeleton(self.skeleton)
        if self.init not in INIT_MODES:
            raise UserError(f"init {self.init!r} is unknown: use one of {', '.join(INIT_MODES)}")
        if self.method not in METHODS:
            raise UserError(f"method {self.method!r} is unknown: use one of {', '.join(METHODS)}")
        if self.window not in WINDOWS:
            raise UserError(f"window {self.window} is not supported: use 1, 3 or 5")
        check_fire_quantile(self.fire_quantile)
        for name, value, choices in (("budget split", self.budget_split, SPLITS), ("null", self.null, NULLS),
                                     ("fallback", self.fallback, FALLBACKS), ("decoder", self.decoder, DECODERS)):
            if value not in choices:
                raise UserError(f"{name} {value!r} is unknown: use one of {', '.join(choices)}")
        if self.decoder == "threshold" and (self.init != "hebbian" or self.budget_macs != "none"):
            raise UserError("decoder 'threshold' decodes one unit per cluster: use it with --init hebbian "
                            "--budget none, or drop --decoder")
        if self.stem not in STEMS:
            raise UserError(f"stem {self.stem!r} is unknown: use one of {', '.join(STEMS)}")
        if self.max_units_per_cluster is not None and not self.max_units_per_cluster >= 1:
            raise UserError(f"max units per cluster {self.max_units_per_cluster} is below 1: use 1 or more, or none")
        if self.epochs_per_layer < 0:
            raise UserError(f"epochs per layer {self.epochs_per_layer} is negative: use 0 or more")
        if isinstance(self.budget_macs, str):
            if self.budget_macs not in BUDGETS:
                raise UserError(f"budget {self.budget_macs!r} is neither a number of multiply-adds nor one of "
                                f"{', '.join(BUDGETS)}")
        elif isinstance(self.budget_macs, bool) or not self.budget_macs > 0:
            raise UserError(f"budget {self.budget_macs} multiply-adds is not positive")

    @property
    def budgeted(self) -> bool:
        return self.budget_macs != "none"

    def clustering(self, window: int, *, progress: bool = True, n_jobs: int | None = None) -> UnitClustering:
        """The (unfitted) clustering estimator this configuration asks for, with ``window`` (``n_jobs``: its
        worker processes, which never change the clusters)."""
        return UnitClustering(method=self.method, window=window, n_clusters=self.n_clusters,
                              max_clusters=self.max_clusters, random_state=self.seed, n_jobs=n_jobs,
                              progress=progress)


def parse_skeleton(text: str) -> list[int | str]:
    """``"2,pool,5,pool,2"`` -> ``[2, "pool", 5, "pool", 2]``; a clear error otherwise."""
    items: list[int | str] = []
    for raw in str(text).split(","):
        token = raw.strip().lower()
        if token == "pool":
            items.append("pool")
        elif token.isdigit() and int(token) > 0:
            items.append(int(token))
        else:
            raise UserError(
                f"skeleton {text!r}: {raw.strip()!r} is neither a module count nor 'pool'; "
                "write it like '2,pool,5,pool,2'"
            )
    if not any(isinstance(item, int) for item in items):
        raise UserError(f"skeleton {text!r} has no modules: write it like '2,pool,5,pool,2'")
    return items


def skeleton_plan(skeleton: str, reference: NetworkSpec) -> list[PoolSpec | str]:
    """The stage plan: a `PoolSpec` for each pooling, and a module name (``inception3a``...) for each module.

    Modules are named as in GoogLeNet (stage numbers from 3, letters within a
    stage); poolings take the reference's pooling layers in order, or a 3x3/2 max
    pool where the reference has fewer.
    """
    reference_pools = [layer for layer in reference.stages if isinstance(layer, PoolSpec)]
    plan: list[PoolSpec | str] = []
    stage, pools = 3, 0
    for item in parse_skeleton(skeleton):
        if item == "pool":
            name = f"maxpool{stage}"
            if pools < len(reference_pools):
                plan.append(dataclasses.replace(reference_pools[pools], name=name))
            else:
                plan.append(PoolSpec(name, 3, 2))
            pools += 1
            stage += 1
        else:
            plan.extend(f"inception{stage}{chr(ord('a') + i)}" for i in range(item))
    return plan


@dataclass
class Construction:
    """The discovered network and what was measured and decided for each module."""

    spec: NetworkSpec
    records: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, LayerStats] = field(default_factory=dict)
    clusterings: dict[str, UnitClustering] = field(default_factory=dict)


@dataclass
class LayerClusters:
    """What the clustering found in one recorded layer: the layer's clusters and those of its pooled map."""

    window: int
    clustering: UnitClustering
    pool_clustering: UnitClustering | None = None


# --------------------------------------------------------------------------- budget
def network_macs(spec: NetworkSpec, input_hw: tuple[int, int]) -> int:
    """Multiply-adds per image of the network ``spec`` describes (eval mode, batch 1)."""
    return count_macs(builders.build(spec).eval(), (1, spec.in_channels, *input_hw))


def head_macs(spec: NetworkSpec, input_hw: tuple[int, int]) -> int:
    """Multiply-adds of everything but the Inception modules (stem, poolings, head)."""
    return network_macs(spec, input_hw) - modules_macs(spec, input_hw)


def discovered_base(config: ConstructConfig, reference: NetworkSpec, input_hw: tuple[int, int]) -> NetworkSpec:
    """What the construction grows from: the reference's stem (or none), no stages, no auxiliary heads.

    The discovered modules use true 5x5 kernels: their clusters were measured in 5x5 windows.
    """
    sized = dataclasses.replace(reference, input_size=min(input_hw))
    stem = sized.stem if config.stem == "reference" else ()
    return dataclasses.replace(sized, stem=stem, stages=(), aux_heads=(), name="discovered", kernel5x5=5)


def total_budget(config: ConstructConfig, reference: NetworkSpec, input_hw: tuple[int, int]) -> float | None:
    """Multiply-adds per image the discovered network may cost: ``config.budget_macs`` resolved (None: no budget)."""
    if config.budget_macs == "none":
        return None
    if config.budget_macs == "reference":
        return float(network_macs(reference, input_hw))
    return float(config.budget_macs)


def module_weights(plan: list, reference: NetworkSpec, input_hw: tuple[int, int], split: str) -> list[float]:
    """Relative weights of the modules' budgets: equal, or (``split="reference"``) the reference's own split
    when the module counts match."""
    names = [item for item in plan if isinstance(item, str)]
    ref_modules = reference.inception_modules()
    if split != "reference" or len(ref_modules) != len(names):
        return [1.0] * len(names)
    shapes = reference.input_shapes(input_hw)
    return [float(inception_macs(m, *shapes[m.name][1:], kernel5x5=reference.kernel5x5)) for m in ref_modules]


def module_budget(budget: float, spent: float, weights: list[float], index: int) -> float:
    """Module ``index``'s share of what is left of ``budget`` after ``spent``, by ``weights``."""
    remaining = weights[index:]
    return max(1.0, budget - spent) * remaining[0] / sum(remaining)


def step_budget(config: ConstructConfig, budget: float | None, spec: NetworkSpec, records: list[dict[str, Any]],
                weights: list[float], input_hw: tuple[int, int]) -> float | None:
    """The next module's share of ``budget`` (None: no budget, or the ``"data"`` split's one scale at the end)."""
    if budget is None or config.budget_split == "data":
        return None
    spent = head_macs(spec, input_hw) + sum(r["macs"] for r in records)
    return module_budget(budget, spent, weights, len(records))


def window_for(map_hw: tuple[int, int], largest: int) -> int:
    """The largest of 5, 3, 1 (up to ``largest``) that fits inside the map."""
    for window in (5, 3, 1):
        if window <= largest and window <= min(map_hw):
            return window
    return 1


def scale_network(spec: NetworkSpec, scale: float, round_to: int | None) -> NetworkSpec:
    """Every Inception module's widths times ``scale`` (`builders.budget.scaled_widths`), channels re-chained."""
    channels, stages = dataclasses.replace(spec, stages=()).out_channels, []
    for layer in spec.stages:
        if isinstance(layer, InceptionSpec):
            layer = dataclasses.replace(scaled_widths(layer, scale, round_to), in_channels=channels)
            channels = layer.out_channels
        stages.append(layer)
    return dataclasses.replace(spec, stages=tuple(stages))


def modules_macs(spec: NetworkSpec, input_hw: tuple[int, int]) -> int:
    """Multiply-adds of the Inception modules alone."""
    shapes = spec.input_shapes(input_hw)
    return sum(inception_macs(m, *shapes[m.name][1:], kernel5x5=spec.kernel5x5) for m in spec.inception_modules())


def fit_network_to_budget(spec: NetworkSpec, budget: float, input_hw: tuple[int, int],
                          round_to: int | None) -> NetworkSpec:
    """``spec`` with one scale factor on every module's widths: the largest within ``budget`` multiply-adds.

    The ``"data"`` budget split: the modules keep the sizes their clusters call for relative to each other
    (within and across modules); only the network's overall width is set by the budget. The bisection
    counts the modules (`builders.cost.inception_macs`) plus the rest of the network at scale 1; the result
    is then counted whole and shrunk until it fits.
    """
    rest = head_macs(spec, input_hw)

    def cost(scale: float) -> int:
        return rest + modules_macs(scale_network(spec, scale, round_to), input_hw)

    if cost(1e-9) > budget:
        raise UserError(f"budget {budget:.0f} multiply-adds is below the cost of the stem and head alone "
                        f"({cost(1e-9)}); raise --budget")
    lo = largest_scale(cost, budget)
    scaled = scale_network(spec, lo, round_to)
    while network_macs(scaled, input_hw) > budget and lo > 1e-6:  # the head's share changed with the widths
        lo *= 0.99
        scaled = scale_network(spec, lo, round_to)
    return scaled


# --------------------------------------------------------------------------- one step
def build_prefix(spec: NetworkSpec, state: dict[str, torch.Tensor] | None, seed: int,
                 device: torch.device) -> nn.Module:
    """The network so far, seeded, with the weights of ``state`` where the layers match."""
    torch.manual_seed(seed)
    model = builders.build(spec)
    if state is not None:
        load_prefix(model, state)
    return model.to(device)


def prepare_prefix(model: nn.Module, index: int, trainer: Callable[[nn.Module, int], nn.Module] | None,
                   batches: Any, config: ConstructConfig, device: torch.device) -> nn.Module:
    """Train the prefix briefly (``config.epochs_per_layer > 0``), else calibrate its BatchNorm statistics."""
    if trainer is not None and config.epochs_per_layer > 0:
        return trainer(model, index)
    calibrate_batchnorm(model, batches, config.stats_batches or 16, device)
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
    With ``carried``, ``batches`` are the prefix's outputs (`topo.carried`): only the probe runs on them, and
    the positions rule weighs the whole prefix's forward cost, as it would running it.
    """
    probe = builders.build(dataclasses.replace(spec, stages=spec.stages + (PoolSpec(PROBE, 3, 1, padding=1),)))
    probe.load_state_dict(model.state_dict())
    probe.to(device).eval()
    reach = {f"{PROBE}:input": config.window - 1, **({PROBE: 0} if config.pool_branch else {})}
    source, cost = probe, None
    if carried is not None:
        source = nn.Sequential(OrderedDict([(PROBE, getattr(probe, PROBE))]))
        cost = forward_macs(probe, carried.example) if config.positions == "auto" else None
    name = (spec.layers[-1].name if spec.layers else "input") + ("" if null is None else f" on the {null} null")
    names = {f"{PROBE}:input": name, PROBE: f"{name}, 3x3 max-pooled"}
    stats = record(source, batches, list(reach), max_offset=reach, max_batches=config.stats_batches,
                   positions=config.positions, fire_quantile=config.fire_quantile, seed=config.seed,
                   progress=progress, forward_cost=cost, names={spec: names[spec] for spec in reach})
    return stats[f"{PROBE}:input"], stats.get(PROBE)


def record_null(model: nn.Module, spec: NetworkSpec, batches_factory: Callable[[], Any], config: ConstructConfig,
                device: torch.device, progress: bool) -> tuple[LayerStats, LayerStats | None] | None:
    """The same statistics of the same prefix on ``config.null``'s null input (None without a null)."""
    if config.null == "none":
        return None
    return record_layer(model, spec, null_input(batches_factory, config), config, device, progress, null=config.null)


def null_input(batches_factory: Callable[[], Any], config: ConstructConfig) -> Any:
    """``config.null``'s null version of the recording batches (`topo.nulls`)."""
    return null_batches(batches_factory, config.null, seed=config.seed, max_batches=config.stats_batches)


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
    window = window_for(stats.spatial_shape or (1, 1), config.window)
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
                         reduce_to_channels=not config.budgeted, in_channels=in_channels,
                         pool_units=found.pool_clustering.n_clusters_ if found.pool_clustering is not None else 0,
                         name=name, fallback=fallback,
                         max_scale=config.max_units_per_cluster)


def layer_record(name: str, stats: LayerStats, found: LayerClusters, module: InceptionSpec,
                 reference: InceptionSpec | None, *, budget: float | None, in_channels: int,
                 map_hw: tuple[int, int], largest_window: int = 5, null: str = "none",
                 kernel5x5: int = 5) -> dict[str, Any]:
    """What was measured and decided for one module (see `analysis.tables.LayerRecord`).

    ``window_forced``: the map was too small for ``largest_window``, so the window (and the largest kernel)
    was set by the map, not by the data; ``firing_rate``: the layer's mean per-unit firing rate.
    """
    clustering = found.clustering
    return {
        "name": name,
        "in_channels": in_channels,
        "spatial_shape": list(map_hw),
        "observations": int(stats.count),
        "dead_units": int(len(stats.dead_units)),
        "method": clustering.method,
        "window": found.window,
        "n_clusters": int(clustering.n_clusters_),
        "kernel_counts": {str(k): int(v) for k, v in clustering.kernel_counts_.items()},
        "spec": module.to_dict(),
        "reference": reference.to_dict() if reference is not None else None,
        "macs": int(inception_macs(module, *map_hw, kernel5x5=kernel5x5)),
        "budget_macs": None if budget is None else int(round(budget)),
        "fallback": not clustering.n_clusters_,
        "window_forced": found.window < largest_window,
        "firing_rate": float(np.mean(stats.firing_rate)) if stats.count else None,
        "pool_clusters": int(found.pool_clustering.n_clusters_) if found.pool_clustering is not None else None,
        "null": null,
    }


def describe(record: dict[str, Any]) -> str:
    """One line on what a module's statistics called for."""
    m = InceptionSpec.from_dict(record["spec"])
    h, w = record["spatial_shape"]
    counts = {int(k): v for k, v in record["kernel_counts"].items()}
    return (f"{record['name']}: {record['in_channels']} channels at {h}x{w}, {record['n_clusters']} clusters "
            f"{counts} -> 1x1 {m.ch1x1}, 3x3 {m.ch3x3red}->{m.ch3x3}, 5x5 {m.ch5x5red}->{m.ch5x5}, "
            f"pool {m.pool_proj}")


def grow(spec: NetworkSpec, module: InceptionSpec, model: nn.Module, init: str, found: LayerClusters,
         stats: LayerStats, seed: int) -> tuple[NetworkSpec, nn.Module]:
    """Append ``module``, initialised from ``seed`` (or from its clusters); the earlier layers keep their (possibly
    trained) weights. Returns (spec, network)."""
    spec = dataclasses.replace(spec, stages=spec.stages + (module,))
    grown = build_prefix(spec, model.state_dict(), seed, next(model.parameters()).device)
    if init == "hebbian":
        hebbian_init_(getattr(grown, module.name), found.clustering, stats, found.pool_clustering)
    return spec, grown


def decode_thresholds(grown: nn.Module, name: str, found: LayerClusters, stats: LayerStats, pooled: LayerStats,
                      batches_factory: Callable[[], Any], config: ConstructConfig,
                      device: torch.device) -> dict[str, Any]:
    """`topo.decoding.threshold_decode_` on ``grown``'s new module ``name`` over the calibration batches.

    Under ``torchrun`` every process then takes rank 0's weights, so all grow the same network.
    """
    grown.to(device)
    max_batches = config.stats_batches or 16
    info = threshold_decode_(grown, getattr(grown, name), found.clustering, stats,
                             pool_clustering=found.pool_clustering, pooled=pooled,
                             calibrate=lambda: calibrate_batchnorm(grown, batches_factory(), max_batches, device),
                             run=lambda: forward_batches(grown, batches_factory(), max_batches, device),
                             seed=config.seed)
    grown.load_state_dict(dist_info.same_on_all_ranks({k: v.cpu() for k, v in grown.state_dict().items()}))
    return info


def grow_step(spec: NetworkSpec, module: InceptionSpec, model: nn.Module, config: ConstructConfig,
              found: LayerClusters, layer: tuple[LayerStats, LayerStats], batches_factory: Callable[[], Any],
              device: torch.device, record_: dict[str, Any], seed: int) -> tuple[NetworkSpec, dict[str, torch.Tensor]]:
    """`grow` (from ``seed``), then the threshold decoder where ``config`` asks for it (its rates go into
    ``record_``)."""
    spec, grown = grow(spec, module, model, config.init, found, layer[0], seed)
    if config.init == "hebbian" and not config.budgeted and config.decoder == "threshold":
        record_.update(decode_thresholds(grown, module.name, found, *layer, batches_factory, config, device))
    return spec, {k: v.detach().cpu() for k, v in grown.state_dict().items()}


# --------------------------------------------------------------------------- the loop
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
) -> Construction:
    """Grow a network on the stem of ``reference`` following ``config.skeleton``.

    ``loader(dataset)`` gives the batches statistics are recorded over;
    ``trainer(model, layer_index)`` trains a prefix briefly (used when
    ``config.epochs_per_layer > 0``). With ``out_dir`` the statistics, clusters
    and progress are written there and an interrupted construction resumes.
    ``cluster_jobs``: worker processes of each layer's clustering (the same network for any number).

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
    result = Construction(spec=spec, records=records)
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
                                    largest_window=config.window, null=config.null))
        log.info(describe(records[-1]))
        spec, state = grow_step(spec, module, model, config, found, (stats, pooled), lambda: loader(train_data),
                                device, records[-1], config.seed + step)
        result.stats[stats.name] = stats
        result.clusterings[item] = found.clustering
        save_step(files, item, stats, found.clustering, spec, records, state)
    result.spec, result.records = spend_budget(config, spec, records, budget, input_hw)
    return result


def spend_budget(config: ConstructConfig, spec: NetworkSpec, records: list[dict[str, Any]], budget: float | None,
                 input_hw: tuple[int, int]) -> tuple[NetworkSpec, list[dict[str, Any]]]:
    """The grown network scaled as a whole to ``budget`` (`fit_to_total`) under the ``"data"`` split, or where the
    modules' ceilings left more than ``1 - SPENT`` of it unspent; the cost against the budget is logged."""
    total = network_macs(spec, input_hw)
    if budget is not None and (config.budget_split == "data" or total < SPENT * budget):
        spec, records = fit_to_total(spec, records, budget, input_hw, config.round_to)
        total = network_macs(spec, input_hw)
    log.info(describe_total(total, budget))
    return spec, records


def fit_to_total(spec: NetworkSpec, records: list[dict[str, Any]], budget: float, input_hw: tuple[int, int],
                 round_to: int | None) -> tuple[NetworkSpec, list[dict[str, Any]]]:
    """The ``"data"`` split: the grown network scaled as a whole to ``budget``; each record keeps the
    module as found (``found_spec``) beside the module as scaled (``spec``, ``macs``)."""
    scaled = fit_network_to_budget(spec, budget, input_hw, round_to)
    shapes = scaled.input_shapes(input_hw)
    by_name = {m.name: m for m in scaled.inception_modules()}
    out = []
    for record_ in records:
        module = by_name[record_["name"]]
        out.append(record_ | {"found_spec": record_.get("found_spec", record_["spec"]), "spec": module.to_dict(),
                              "macs": int(inception_macs(module, *shapes[module.name][1:]))})
    return scaled, out


def describe_total(total: float, budget: float | None) -> str:
    """One line on the discovered network's cost against its budget."""
    if budget is None:
        return f"discovered network: {total / 1e6:.2f}M multiply-adds (no budget: one unit per cluster)"
    return (f"discovered network: {total / 1e6:.1f}M multiply-adds against a budget of {budget / 1e6:.1f}M "
            f"({100 * (total / budget - 1):+.1f}%)")


def calibrate_batchnorm(model: nn.Module, batches: Any, max_batches: int, device: torch.device) -> None:
    """Set every BatchNorm's running statistics to the average over ``max_batches`` batches.

    A freshly initialised network in eval mode normalises with the initial
    running statistics (mean 0, variance 1), which leaves the activations of deep
    layers vanishingly small; statistics recorded then would call every unit
    dead. Calibrating first records the network as training would see it.
    """
    with calibrating([model]) as norms:
        if not norms:
            return
        was_training = model.training
        model.train()
        with torch.no_grad():
            forward_batches(model, batches, max_batches, device)
        model.train(was_training)


def forward_batches(model: nn.Module, batches: Any, max_batches: int, device: torch.device) -> None:
    """Pass the inputs of the first ``max_batches`` of ``batches`` through ``model`` (outputs discarded)."""
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        model((batch[0] if isinstance(batch, (list, tuple)) else batch).to(device))


def load_prefix(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy the weights of the layers ``model`` shares with ``state`` (the head is new)."""
    own = model.state_dict()
    shared = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and not k.startswith("fc.")}
    own.update(shared)
    model.load_state_dict(own)


# --------------------------------------------------------------------------- files
def clustering_to_dict(clustering: UnitClustering) -> dict[str, Any]:
    """The fitted clusters as JSON-able data (members as [channel, dy, dx])."""
    return {
        "method": clustering.method,
        "window": clustering.window,
        "n_clusters": int(clustering.n_clusters_),
        "kernel_counts": {str(k): int(v) for k, v in clustering.kernel_counts_.items()},
        "dead_units": [int(u) for u in clustering.dead_units_],
        "n_edges": int(clustering.n_edges_),
        "evidence": clustering.evidence_.to_dict(),
        "window_cuts": {"cut": int(clustering.n_window_cuts_), "of": int(clustering.n_candidates_),
                        "by_kernel": {str(k): int(v) for k, v in clustering.cut_kernel_counts_.items()}},
        "channel_order": [int(c) for c in clustering.channel_order_],
        "channel_labels": [int(c) for c in clustering.channel_labels_],
        "clusters": [
            {"kernel_size": int(c.kernel_size), "members": [list(map(int, m)) for m in c.members]}
            for c in clustering.clusters_
        ],
    }


def save_step(files: ConstructionFiles | None, name: str, stats: LayerStats, clustering: UnitClustering,
              spec: NetworkSpec, records: list[dict[str, Any]], state: dict[str, torch.Tensor]) -> None:
    """Write one module's statistics and clusters, the grown weights and the progress (rank 0 only).

    ``progress.json`` is written last and names the step; the weights of each
    step are a new file (``prefixN.pt``), so a kill at any moment leaves the
    step ``progress.json`` names whole, and `load_progress` resumes from it.
    """
    if files is None or dist_info.rank() != 0:
        return
    stats.save(files.stats(name))
    atomic_write_json(files.clusters(name), clustering_to_dict(clustering))
    prefix = files.prefix(len(records))  # a new file: the step progress.json names stays intact until replaced
    atomic_torch_save({"modules": len(records), "state": state}, prefix)
    atomic_write_json(files.progress, {"spec": spec.to_dict(), "records": records})  # the step is recorded
    for old in files.prefixes():
        if old != prefix:
            old.unlink()


def load_progress(files: ConstructionFiles | None, empty: NetworkSpec
                  ) -> tuple[NetworkSpec, list[dict[str, Any]], dict[str, torch.Tensor] | None]:
    """(spec, records, weights) of an interrupted construction, or ``(empty, [], None)`` to start afresh.

    A damaged progress or weights file is a one-line error naming it (`topo.files`), never a fresh start.
    """
    if files is None or not files.progress.is_file():
        return empty, [], None
    progress = read_progress(files.progress)  # damaged files are one-line errors naming them, never a restart
    modules = len(progress["records"])
    state = read_prefix(files.prefix(modules), modules)
    log.info("resuming construction after %d module(s)", modules)
    return progress["spec"], progress["records"], state
