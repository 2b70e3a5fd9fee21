"""The null topologies a discovered network is compared with, at its cost: random (random output shares and
reductions per module), uniform (equal shares) and shuffled (the discovered clusters with their kernel sizes
permuted). Each takes the discovered network's spec and plain numbers, and refits every module to the budget
the discovered module had (`refit`)."""
from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from builders.budget import OUTPUTS, fill_budget, fit_to_budget, round_width, scaled_widths
from builders.cost import inception_macs, network_macs
from builders.from_clusters import branch_of, from_clusters
from builders.spec import InceptionSpec, NetworkSpec
from topo.common.errors import StatsError

log = logging.getLogger(__name__)


DIRICHLET = 1.0               # concentration of the random output shares (1: uniform on the simplex)


REDUCTION = (0.25, 1.0)       # range of a random reduction, as a fraction of its branch's output


MAX_DRAWS = 20                # random topologies drawn until one meets the cost tolerance


PERMUTATIONS = tuple(itertools.permutations((1, 3, 5)))[1:]  # every reordering of the kernels but the identity


ModuleFor = Callable[[int, InceptionSpec, int, float, tuple[int, int]], InceptionSpec]


def refit(discovered: NetworkSpec, image_hw: tuple[int, int], module_for: ModuleFor, name: str) -> NetworkSpec:
    """``discovered`` with every Inception module replaced by ``module_for(index, module, in_channels, budget, hw)``.

    Stem, poolings and head stay. Module i's budget is what the discovered
    modules up to i cost, less what the new modules before it cost, so that a
    module left below its budget by rounding passes the rest on, as in the construction.
    """
    shapes = discovered.input_shapes(image_hw)
    channels = dataclasses.replace(discovered, stages=(), aux_heads=()).out_channels
    stages, target, spent, index = [], 0.0, 0.0, 0
    for layer in discovered.stages:
        if not isinstance(layer, InceptionSpec):
            stages.append(layer)
            continue
        hw = tuple(shapes[layer.name][1:])
        target += inception_macs(layer, *hw, kernel5x5=discovered.kernel5x5)
        module = module_for(index, layer, channels, target - spent, hw)
        spent += inception_macs(module, *hw, kernel5x5=discovered.kernel5x5)
        stages.append(module)
        channels, index = module.out_channels, index + 1
    return dataclasses.replace(discovered, stages=tuple(stages), name=name)


def proportions(shares: Sequence[float], ratios: Sequence[float]) -> dict[str, float]:
    """Unscaled widths: output shares of the 1x1, 3x3, 5x5 and pool branches, reductions as fractions of 3x3 and 5x5."""
    p1, p3, p5, pool = (float(s) for s in shares)
    r3, r5 = (float(r) for r in ratios)
    return {"ch1x1": p1, "ch3x3red": r3 * p3, "ch3x3": p3, "ch5x5red": r5 * p5, "ch5x5": p5, "pool_proj": pool}


#: The uniform arm: equal output shares, reductions at the middle of the random range.
UNIFORM = proportions([0.25] * 4, [sum(REDUCTION) / 2] * 2)


def draw_proportions(rng: np.random.Generator, modules: int) -> list[dict[str, float]]:
    """One random module shape per module: shares ~ Dirichlet(1, 1, 1, 1), reductions ~ U(0.25, 1) of their branch."""
    return [proportions(rng.dirichlet([DIRICHLET] * 4), rng.uniform(*REDUCTION, size=2)) for _ in range(modules)]


def proportions_module(shapes: Sequence[Mapping[str, float]], round_to: int, kernel5x5: int) -> ModuleFor:
    """Module i gets ``shapes[i]`` times the one scale factor that meets its budget (reductions capped at the input)."""
    def module_for(index: int, layer: InceptionSpec, in_channels: int, budget: float,
                   hw: tuple[int, int]) -> InceptionSpec:
        raw = shapes[index]

        def make(scale: float) -> InceptionSpec:
            widths = {key: round_width(value * scale, round_to, in_channels if key.endswith("red") else None)
                      for key, value in raw.items()}
            return InceptionSpec(in_channels, name=layer.name, **widths)

        return fill_budget(fit_to_budget(make, budget, *hw, kernel5x5=kernel5x5), raw, budget, hw, round_to,
                           kernel5x5)

    return module_for


@dataclass(frozen=True)
class FixedClusters:
    """Clusters as `builders.from_clusters` reads them from a fitted clustering."""

    clusters_: list[Any]


def shuffled_module(clusters: Mapping[str, Sequence[Any]], stats: Mapping[str, Any], rng: np.random.Generator,
                    round_to: int, kernel5x5: int) -> ModuleFor:
    """Module i: the discovered module's clusters (``clusters[name]``, `topo.cluster.Cluster`s) with their kernel
    sizes permuted (one random non-identity permutation of 1, 3, 5 per module), widths from
    `builders.from_clusters` at the budget and the module's input statistics (``stats[name]``).

    The pool branch keeps the discovered module's share; a module without clusters keeps its widths.
    What rounding leaves of the budget is filled as for the other arms (`fill_budget`).
    """
    def module_for(index: int, layer: InceptionSpec, in_channels: int, budget: float,
                   hw: tuple[int, int]) -> InceptionSpec:
        found = clusters[layer.name]
        if not found:
            shape = dataclasses.replace(layer, in_channels=in_channels)
            return fit_to_budget(lambda s: scaled_widths(shape, s, round_to), budget, *hw, kernel5x5=kernel5x5)
        order = dict(zip((1, 3, 5), PERMUTATIONS[int(rng.integers(len(PERMUTATIONS)))], strict=True))
        moved = [dataclasses.replace(c, kernel_size=order[branch_of(c)]) for c in found]
        pool_units = layer.pool_proj * len(moved) / max(1, layer.ch1x1 + layer.ch3x3 + layer.ch5x5)
        module = from_clusters(FixedClusters(moved), stats[layer.name], budget=budget,
                               round_to=round_to, in_channels=in_channels, pool_units=pool_units, name=layer.name)
        shape = {key: float(getattr(module, key)) for key in OUTPUTS}
        return fill_budget(module, shape, budget, hw, round_to, kernel5x5)

    return module_for


def deviation(spec: NetworkSpec, target_macs: int, image_hw: tuple[int, int]) -> float:
    """Relative difference of ``spec``'s multiply-adds from ``target_macs``."""
    return network_macs(spec, image_hw) / target_macs - 1.0


def random_topology(discovered: NetworkSpec, image_hw: tuple[int, int], rng: np.random.Generator, *, k: int,
                    round_to: int, tolerance: float) -> tuple[NetworkSpec, int]:
    """Random topology ``k`` (named ``random_k{k}``) and the number of draws it took: module shapes drawn from
    ``rng`` until the network's multiply-adds are within ``tolerance`` of the discovered network's (or the last
    draw that fits the module budgets)."""
    target = network_macs(discovered, image_hw)
    modules = len(discovered.inception_modules())
    spec, fitted = None, 0
    for draw in range(1, MAX_DRAWS + 1):
        module_for = proportions_module(draw_proportions(rng, modules), round_to, discovered.kernel5x5)
        try:
            spec = refit(discovered, image_hw, module_for, f"random_k{k}")
        except StatsError:  # a module budget below the smallest module these shares allow
            continue
        fitted = draw
        if abs(deviation(spec, target, image_hw)) <= tolerance:
            return spec, draw
    if spec is None:
        raise StatsError(f"random topology {k}: none of {MAX_DRAWS} draws fits the module budgets of the "
                         "discovered network (a module budget is below the smallest four-branch module); "
                         "lower --round-to")
    log.warning("random topology %d: no draw of %d met the %.1f%% cost tolerance; keeping draw %d",
                k, MAX_DRAWS, 100 * tolerance, fitted)
    return spec, fitted
