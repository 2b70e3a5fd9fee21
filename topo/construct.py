"""The construction loop: grow a network one Inception module at a time.

For each module of the skeleton (the procedure of "Going deeper with
convolutions", section 3):

1. build the network so far (stem and the modules found so far, with a head)
   and optionally train it briefly;
2. record the statistics of its last layer, and of that layer max-pooled 3x3
   (the parallel pooling path of the next module);
3. cluster the units that fire together (`topo.cluster.UnitClustering`) and map
   the clusters onto branch widths (`builders.from_clusters`) within this
   module's share of the multiply-add budget;
4. append the module (initialised at random or from its clusters) and repeat.

Progress is saved after every module, so an interrupted construction resumes
where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import builders
from builders.budget import fit_to_budget, scaled_widths
from builders.from_clusters import from_clusters
from analysis import count_macs, inception_macs
from builders.spec import InceptionSpec, NetworkSpec, PoolSpec
from topo import distributed as dist_info
from topo.cluster import UnitClustering
from topo.errors import UserError
from topo.hooks import record
from topo.io import atomic_torch_save, atomic_write_json
from topo.stats import LayerStats

DEFAULT_SKELETON = "2,pool,5,pool,2"
INIT_MODES = ("random", "hebbian")
PROBE = "pool_probe"  # the 3x3/1 max pool appended while recording: the next module's pooling path


@dataclass
class ConstructConfig:
    """How the construction loop measures, clusters and budgets.

    ``skeleton``: modules per stage and the stride-2 poolings between stages
    (GoogLeNet's "2,pool,5,pool,2"). ``budget_macs``: multiply-adds per image of
    the whole network (``None``: those of the reference). ``window``: the largest
    window a candidate unit looks at (5: 1x1, 3x3 and 5x5 kernels); it shrinks to
    the map where a map is smaller. ``stats_batches``: batches of training data
    the statistics are recorded over. ``epochs_per_layer``: brief training of
    each prefix before its statistics are recorded (0: statistics of the random
    network).
    """

    skeleton: str = DEFAULT_SKELETON
    method: str = "arora"
    window: int = 5
    n_clusters: int | str = "auto"
    max_clusters: int | None = None
    budget_macs: int | None = None
    round_to: int = 8
    init: str = "random"
    epochs_per_layer: int = 0
    stats_batches: int | None = 16
    positions: int | str | None = 16
    seed: int = 0

    def __post_init__(self) -> None:
        parse_skeleton(self.skeleton)
        if self.init not in INIT_MODES:
            raise UserError(f"init {self.init!r} is unknown: use one of {', '.join(INIT_MODES)}")
        if self.window not in (1, 3, 5):
            raise UserError(f"window {self.window} is not supported: use 1, 3 or 5")
        if self.epochs_per_layer < 0:
            raise UserError(f"epochs per layer {self.epochs_per_layer} is negative: use 0 or more")
        if self.budget_macs is not None and self.budget_macs <= 0:
            raise UserError(f"budget {self.budget_macs} multiply-adds is not positive")


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


def _head_macs(spec: NetworkSpec, input_hw: tuple[int, int]) -> int:
    """Multiply-adds of everything but the Inception modules (stem, poolings, head)."""
    total = count_macs(builders.build(spec).eval(), (1, spec.in_channels, *input_hw))
    shapes = spec.input_shapes(input_hw)
    return total - sum(inception_macs(m, *shapes[m.name][1:], kernel5x5=spec.kernel5x5) for m in spec.inception_modules())


def _module_budgets(plan: list, reference: NetworkSpec, input_hw: tuple[int, int]) -> list[float]:
    """Relative weights of the modules' budgets: the reference's own split when the counts match."""
    names = [item for item in plan if isinstance(item, str)]
    ref_modules = reference.inception_modules()
    if len(ref_modules) != len(names):
        return [1.0] * len(names)
    shapes = reference.input_shapes(input_hw)
    return [float(inception_macs(m, *shapes[m.name][1:], kernel5x5=reference.kernel5x5)) for m in ref_modules]


def window_for(map_hw: tuple[int, int], largest: int) -> int:
    """The largest of 5, 3, 1 (up to ``largest``) that fits inside the map."""
    for window in (5, 3, 1):
        if window <= largest and window <= min(map_hw):
            return window
    return 1


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
    log: Callable[[str], None] = print,
) -> Construction:
    """Grow a network on the stem of ``reference`` following ``config.skeleton``.

    ``loader(dataset)`` gives the batches statistics are recorded over;
    ``trainer(model, layer_index)`` trains a prefix briefly (used when
    ``config.epochs_per_layer > 0``). With ``out_dir`` the statistics, clusters
    and progress are written there and an interrupted construction resumes.

    Under ``torchrun`` every process runs the loop in step: each records its
    shard of the data, the statistics are summed over processes, so every
    process clusters the same numbers and grows the same network; only rank 0
    writes files.
    """
    out = Path(out_dir) if out_dir is not None else None
    device = torch.device(device)
    plan = skeleton_plan(config.skeleton, reference)
    # the discovered modules use true 5x5 kernels: their clusters were measured in 5x5 windows
    spec = dataclasses.replace(reference, stages=(), aux_heads=(), name="discovered", input_size=min(input_hw),
                               kernel5x5=5)

    budget = config.budget_macs or count_macs(builders.build(
        dataclasses.replace(reference, input_size=min(input_hw))).eval(), (1, reference.in_channels, *input_hw))
    weights = _module_budgets(plan, reference, input_hw)
    ref_modules = reference.inception_modules()

    done = _load_progress(out) if out is not None else None
    records: list[dict[str, Any]] = []
    state: dict[str, torch.Tensor] | None = None
    if done is not None:
        spec, records = done["spec"], done["records"]
        if out is not None and (out / "prefix.pt").is_file():
            state = torch.load(out / "prefix.pt", map_location="cpu", weights_only=True)
        log(f"resuming construction after {len(records)} module(s)")

    result = Construction(spec=spec, records=records)
    module_index = 0
    for step, item in enumerate(plan):
        if isinstance(item, PoolSpec):
            if step >= len(spec.stages):
                spec = dataclasses.replace(spec, stages=spec.stages + (item,))
            continue
        if step < len(spec.stages):  # built before the resume
            module_index += 1
            continue

        torch.manual_seed(config.seed + step)
        model = builders.build(spec)
        if state is not None:
            _load_prefix(model, state)
        model.to(device)
        if trainer is not None and config.epochs_per_layer > 0:
            model = trainer(model, module_index)
        else:
            calibrate_batchnorm(model, loader(train_data), config.stats_batches or 16, device)

        last = spec.layers[-1].name
        stats = _record(model, spec, last, train_data, loader, config, device, progress)
        layer_stats, pooled_stats = stats[last], stats[PROBE]
        window = window_for(layer_stats.spatial_shape or (1, 1), config.window)

        clustering = UnitClustering(
            method=config.method,
            window=window,
            n_clusters=config.n_clusters,
            max_clusters=config.max_clusters,
            random_state=config.seed,
            progress=progress,
        ).fit(layer_stats)

        in_channels = spec.out_channels
        map_hw = tuple(layer_stats.spatial_shape or (1, 1))
        spent = _head_macs(spec, input_hw) + sum(r["macs"] for r in records)
        remaining_weights = weights[module_index:]
        module_budget = max(1.0, (budget - spent)) * remaining_weights[0] / sum(remaining_weights)
        reference_module = ref_modules[module_index] if module_index < len(ref_modules) else None
        module = module_from_clustering(clustering, layer_stats, budget=module_budget, round_to=config.round_to,
                                        in_channels=in_channels, pool_stats=pooled_stats,
                                        reference=reference_module, name=item, log=log)
        macs = inception_macs(module, *map_hw)

        record_ = {
            "name": item,
            "in_channels": in_channels,
            "spatial_shape": list(map_hw),
            "observations": int(layer_stats.count),
            "dead_units": int(len(layer_stats.dead_units)),
            "method": config.method,
            "window": window,
            "n_clusters": int(clustering.n_clusters_),
            "kernel_counts": {str(k): int(v) for k, v in clustering.kernel_counts_.items()},
            "spec": module.to_dict(),
            "reference": reference_module.to_dict() if reference_module is not None else None,
            "macs": int(macs),
            "budget_macs": int(round(module_budget)),
            "fallback": not clustering.n_clusters_,
        }
        log(
            f"{item}: {layer_stats.num_channels} channels at {map_hw[0]}x{map_hw[1]}, "
            f"{clustering.n_clusters_} clusters {dict(clustering.kernel_counts_)} -> "
            f"1x1 {module.ch1x1}, 3x3 {module.ch3x3red}->{module.ch3x3}, "
            f"5x5 {module.ch5x5red}->{module.ch5x5}, pool {module.pool_proj}"
        )

        spec = dataclasses.replace(spec, stages=spec.stages + (module,))
        grown = builders.build(spec)  # the earlier layers keep their (possibly trained) weights
        _load_prefix(grown, model.state_dict())
        if config.init == "hebbian":
            from topo.hebbian import hebbian_init_

            hebbian_init_(getattr(grown, item), clustering, layer_stats)
        state = {k: v.detach().cpu() for k, v in grown.state_dict().items()}

        records.append(record_)
        result.stats[last] = layer_stats
        result.clusterings[item] = clustering
        if out is not None and dist_info.rank() == 0:
            _save_layer(out, item, layer_stats, clustering)
            atomic_torch_save(state, out / "prefix.pt")
            _save_progress(out, spec, records)
        module_index += 1

    total = count_macs(builders.build(spec).eval(), (1, spec.in_channels, *input_hw))
    log(f"discovered network: {total / 1e6:.1f}M multiply-adds against a budget of {budget / 1e6:.1f}M "
        f"({100 * (total / budget - 1):+.1f}%)")
    result.spec = spec
    result.records = records
    return result


def module_from_clustering(
    clustering: UnitClustering,
    stats: LayerStats,
    *,
    budget: float,
    round_to: int,
    in_channels: int,
    name: str,
    pool_stats: LayerStats | None = None,
    reference: InceptionSpec | None = None,
    log: Callable[[str], None] = print,
) -> InceptionSpec:
    """The module the clusters call for within ``budget``, named ``name``.

    Where the statistics hold no cluster at all (no units fire together more
    than chance allows, as in an untrained layer), the data suggests no shape:
    the module then keeps the reference module's proportions (GoogLeNet 3a's
    if there is none), scaled to the budget, and the record says so.
    """
    if clustering.n_clusters_:
        module = from_clusters(clustering, stats, budget=budget, round_to=round_to, in_channels=in_channels,
                               pool_stats=pool_stats)
    else:
        log(f"{name}: no clusters in the statistics (no units fire together); keeping the reference's proportions")
        shape = dataclasses.replace(reference or InceptionSpec(in_channels, 64, 96, 128, 16, 32, 32),
                                    in_channels=in_channels)
        module = fit_to_budget(lambda scale: scaled_widths(shape, scale, round_to), budget,
                               *(stats.spatial_shape or (1, 1)))
    return dataclasses.replace(module, name=name, in_channels=in_channels)


def _record(model, spec, last, dataset, loader, config, device, progress) -> dict[str, LayerStats]:
    """Statistics of the last layer and of its 3x3 max-pooled map, in one pass."""
    probe_spec = dataclasses.replace(spec, stages=spec.stages + (PoolSpec(PROBE, 3, 1, padding=1),))
    probe = builders.build(probe_spec)
    probe.load_state_dict(model.state_dict())
    probe.to(device)
    return record(
        probe,
        loader(dataset),
        [last, PROBE],
        max_batches=config.stats_batches,
        positions=config.positions,
        seed=config.seed,
        progress=progress,
    )


def calibrate_batchnorm(model: nn.Module, batches: Any, max_batches: int, device: torch.device) -> None:
    """Set every BatchNorm's running statistics to the average over ``max_batches`` batches.

    A freshly initialised network in eval mode normalises with the initial
    running statistics (mean 0, variance 1), which leaves the activations of deep
    layers vanishingly small; statistics recorded then would call every unit
    dead. Calibrating first records the network as training would see it.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(inputs.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


def _load_prefix(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy the weights of the layers ``model`` shares with ``state`` (the head is new)."""
    own = model.state_dict()
    shared = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and not k.startswith("fc.")}
    own.update(shared)
    model.load_state_dict(own)


# --------------------------------------------------------------------------- files
def _save_layer(out: Path, name: str, stats: LayerStats, clustering: UnitClustering) -> None:
    stats.save(out / f"{name}_stats.pt")
    atomic_write_json(out / f"{name}_clusters.json", clustering_to_dict(clustering))


def clustering_to_dict(clustering: UnitClustering) -> dict[str, Any]:
    """The fitted clusters as JSON-able data (members as [channel, dy, dx])."""
    return {
        "method": clustering.method,
        "window": clustering.window,
        "n_clusters": int(clustering.n_clusters_),
        "kernel_counts": {str(k): int(v) for k, v in clustering.kernel_counts_.items()},
        "dead_units": [int(u) for u in clustering.dead_units_],
        "channel_order": [int(c) for c in clustering.channel_order_],
        "channel_labels": [int(c) for c in clustering.channel_labels_],
        "clusters": [
            {"kernel_size": int(c.kernel_size), "members": [list(map(int, m)) for m in c.members]}
            for c in clustering.clusters_
        ],
    }


def _save_progress(out: Path, spec: NetworkSpec, records: list[dict[str, Any]]) -> None:
    atomic_write_json(out / "progress.json", {"spec": spec.to_dict(), "records": records})


def _load_progress(out: Path) -> dict[str, Any] | None:
    path = out / "progress.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return {"spec": NetworkSpec.from_dict(data["spec"]), "records": data["records"]}


def inception_names(spec: NetworkSpec) -> list[str]:
    return [m.name for m in spec.inception_modules() if isinstance(m, InceptionSpec)]
