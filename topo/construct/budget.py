"""The multiply-add budget of a construction: the total, each module's share of it, the checks made before
any work (a skeleton that leaves no map, a budget too small, a window too large), and the final fit of
the grown network to the total.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from builders.budget import largest_scale, scaled_widths
from builders.cost import inception_macs, modules_macs, network_macs
from builders.spec import InceptionSpec, NetworkSpec, PoolSpec
from topo.common.errors import UserError
from topo.construct.config import ConstructConfig, skeleton_plan, window_for

log = logging.getLogger(__name__)


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


def check_budget(config: ConstructConfig, reference: NetworkSpec, image_hw: tuple[int, int],
                 maps: list[tuple[str, tuple[int, int]]]) -> None:
    """A one-line error, before anything is recorded, for a budget the skeleton's modules cannot fit in.

    The stem, poolings and head cost what they cost; each module gets a share of
    the rest in proportion to its weight under the configured split (`topo.construct.budget.module_weights`) and
    must at least afford its narrowest form, every branch ``round_to`` wide. ``maps``: `module_maps`.
    """
    budget = total_budget(config, dataclasses.replace(reference, input_size=min(image_hw)), image_hw)
    if budget is None:
        return
    plan = skeleton_plan(config.skeleton, reference)
    pools = tuple(item for item in plan if isinstance(item, PoolSpec))
    base = discovered_base(config, reference, image_hw)
    fixed = head_macs(dataclasses.replace(base, stages=pools), image_hw)
    width = config.round_to or 1
    inputs = [base.out_channels] + [4 * width] * (len(maps) - 1)
    least = [_narrowest_module(c, hw, width) for c, (_, hw) in zip(inputs, maps)]
    weights = module_weights(plan, reference, image_hw, config.budget_split)
    per_unit = planned_shares(fixed + 1.0, fixed, weights)  # shares grow in proportion to what the rest leaves
    need = fixed + max(cost / share for cost, share in zip(least, per_unit))
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


#: Where the modules' ceilings (``max_units_per_cluster``) left more than this share of the budget unspent,
#: the grown network is scaled as a whole to the budget, so that it is compared with the reference at equal cost.
SPENT = 0.98


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


def planned_shares(budget: float, fixed: float, weights: list[float]) -> list[float]:
    """Each module's share of ``budget`` (`module_budget`) where the rest of the network costs ``fixed`` and
    every module spends exactly its share."""
    shares: list[float] = []
    for index in range(len(weights)):
        shares.append(module_budget(budget, fixed + sum(shares), weights, index))
    return shares


def step_budget(config: ConstructConfig, budget: float | None, spec: NetworkSpec, records: list[dict[str, Any]],
                weights: list[float], input_hw: tuple[int, int]) -> float | None:
    """The next module's share of ``budget`` (None: no budget, or the ``"data"`` split's one scale at the end)."""
    if budget is None or config.budget_split == "data":
        return None
    spent = head_macs(spec, input_hw) + sum(r["macs"] for r in records)
    return module_budget(budget, spent, weights, len(records))


def scale_network(spec: NetworkSpec, scale: float, round_to: int | None) -> NetworkSpec:
    """Every Inception module's widths times ``scale`` (`builders.budget.scaled_widths`), channels re-chained."""
    channels, stages = dataclasses.replace(spec, stages=()).out_channels, []
    for layer in spec.stages:
        if isinstance(layer, InceptionSpec):
            layer = dataclasses.replace(scaled_widths(layer, scale, round_to), in_channels=channels)
            channels = layer.out_channels
        stages.append(layer)
    return dataclasses.replace(spec, stages=tuple(stages))


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
    for found in records:
        module = by_name[found["name"]]
        out.append(found | {"found_spec": found.get("found_spec", found["spec"]), "spec": module.to_dict(),
                            "macs": int(inception_macs(module, *shapes[module.name][1:]))})
    return scaled, out


def describe_total(total: float, budget: float | None) -> str:
    """One line on the discovered network's cost against its budget."""
    if budget is None:
        return f"discovered network: {total / 1e6:.2f}M multiply-adds (no budget: one unit per cluster)"
    return (f"discovered network: {total / 1e6:.1f}M multiply-adds against a budget of {budget / 1e6:.1f}M "
            f"({100 * (total / budget - 1):+.1f}%)")
