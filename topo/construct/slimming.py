"""Widths chosen by training signal among the units the clusters propose (network slimming, Liu et al. 2017; the
cost-weighted penalty of MorphNet, Gordon et al. 2018).

The discovered network is built over-complete (every module's widths times ``over``), trained briefly with an L1
penalty on its BatchNorm scales, each weighted by the multiply-adds its channel costs, and then cut back to the
budget: the channels with the largest scales are kept, one threshold for the whole network (the highest number of
channels whose network fits). The clusters give the starting proportions; the training decides what stays.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

import builders
from builders.cost import inception_macs, network_macs
from builders.inception import Inception
from builders.spec import InceptionSpec, NetworkSpec
from topo.common.errors import UserError
from topo.construct.budget import scale_network

#: Each width's BatchNorm in an Inception module: (width field, the module's block holding it); the 1x1 blocks
#: that read the input are one fused block when ``Inception.fused`` (`branch_norms` splits it).
BLOCKS = (("ch3x3", "branch2.1"), ("ch5x5", "branch3.1"), ("pool_proj", "branch4.1"))
INPUT_1X1 = ("ch1x1", "ch3x3red", "ch5x5red")
INPUT_BLOCKS = ("branch1", "branch2.0", "branch3.0")


@dataclasses.dataclass(frozen=True)
class SlimConfig:
    """``epochs`` of training of the network ``over`` times as wide as the clusters' at penalty ``penalty`` (on
    scales weighted to a mean of 1). The defaults live in `topo.construct.config.ConstructConfig` (``slim_*``)."""

    epochs: int
    over: float
    penalty: float


def _bn(module: nn.Module, path: str) -> nn.BatchNorm2d | None:
    """The BatchNorm of the block at ``path`` (None where the branch, its block or its norm is absent)."""
    try:
        return getattr(module.get_submodule(path), "bn", None)
    except AttributeError:
        return None


def branch_norms(module: Inception) -> dict[str, torch.Tensor]:
    """The BatchNorm scale parameter behind each width of ``module`` (a view for the fused 1x1 widths)."""
    norms = {}
    if module.fused1x1 is not None and module.fused1x1.bn is not None:
        pieces = torch.split(module.fused1x1.bn.weight, module._split_sizes)
        norms |= {field: piece for field, piece in zip(INPUT_1X1, pieces) if piece.numel()}
    else:
        for field, path in zip(INPUT_1X1, INPUT_BLOCKS):
            bn = _bn(module, path)
            if bn is not None:
                norms[field] = bn.weight
    for field, path in BLOCKS:
        bn = _bn(module, path)
        if bn is not None:
            norms[field] = bn.weight
    return norms


def channel_costs(spec: InceptionSpec, hw: tuple[int, int], kernel5x5: int = 5) -> dict[str, float]:
    """Multiply-adds one more channel of each present width adds to its module at ``hw``."""
    base = inception_macs(spec, *hw, kernel5x5=kernel5x5)
    return {field: float(inception_macs(dataclasses.replace(spec, **{field: getattr(spec, field) + 1}), *hw,
                                        kernel5x5=kernel5x5) - base)
            for field in InceptionSpec.WIDTHS if getattr(spec, field)}


def penalty_step(spec: NetworkSpec, input_hw: tuple[int, int], strength: float) -> Callable[[nn.Module], None]:
    """The L1 subgradient ``strength * cost * sign(scale)`` added to each Inception BatchNorm scale's gradient
    (for `topo.train.trainer.train`'s ``after_backward``), costs from `channel_costs` scaled to a mean of 1."""
    shapes = spec.input_shapes(input_hw)
    terms = []
    for layer in spec.inception_modules():
        costs = channel_costs(layer, shapes[layer.name][1:], spec.kernel5x5)
        terms += [(layer.name, field, cost) for field, cost in costs.items()]
    mean = float(np.mean([cost for *_, cost in terms])) if terms else 1.0
    weights = {(name, field): cost / mean for name, field, cost in terms}

    def step(trained: nn.Module) -> None:
        for name in (layer.name for layer in spec.inception_modules()):
            for field, scale in branch_norms(getattr(trained, name)).items():
                grad = _grad_slice(getattr(trained, name), field, scale)
                if grad is not None:
                    grad.add_(strength * weights.get((name, field), 0.0) * torch.sign(scale.detach()))

    return step


def _grad_slice(module: Inception, field: str, scale: torch.Tensor) -> torch.Tensor | None:
    """The gradient of ``scale``: for the input 1x1 widths of a fused module, its piece of the fused block's."""
    if field in INPUT_1X1 and module.fused1x1 is not None:
        grad = module.fused1x1.bn.weight.grad
        return None if grad is None else torch.split(grad, module._split_sizes)[INPUT_1X1.index(field)]
    return scale.grad


def scales_of(model: nn.Module, spec: NetworkSpec) -> dict[tuple[str, str], np.ndarray]:
    """|BatchNorm scale| of every channel, by (module, width field)."""
    out = {}
    for layer in spec.inception_modules():
        for field, scale in branch_norms(getattr(model, layer.name)).items():
            out[(layer.name, field)] = scale.detach().abs().cpu().numpy().astype(np.float64)
    return out


def kept_widths(spec: NetworkSpec, scales: dict[tuple[str, str], np.ndarray], threshold: float) -> NetworkSpec:
    """``spec`` with each width the number of its channels whose scale is at least ``threshold``; a branch keeps a
    reduction channel while it keeps an output, and loses both otherwise; channels re-chained. A module that
    would keep nothing keeps its strongest output channel."""
    channels, stages = dataclasses.replace(spec, stages=()).out_channels, []
    for layer in spec.stages:
        if isinstance(layer, InceptionSpec):
            layer = _module_at(layer, scales, threshold, channels)
            channels = layer.out_channels
        stages.append(layer)
    return dataclasses.replace(spec, stages=tuple(stages))


def _module_at(layer: InceptionSpec, scales, threshold: float, in_channels: int) -> InceptionSpec:
    count = {f: int((scales.get((layer.name, f), np.zeros(0)) >= threshold).sum()) for f in InceptionSpec.WIDTHS}
    for red, out in (("ch3x3red", "ch3x3"), ("ch5x5red", "ch5x5")):
        count[red] = max(count[red], 1) if count[out] else 0
    if not any(count[f] for f in ("ch1x1", "ch3x3", "ch5x5", "pool_proj")):
        best = max(("ch1x1", "ch3x3", "ch5x5", "pool_proj"),
                   key=lambda f: scales.get((layer.name, f), np.zeros(1)).max(initial=-1.0))
        count[best] = 1
        if best in ("ch3x3", "ch5x5"):
            count[f"{best}red"] = 1
    return InceptionSpec(in_channels, *(count[f] for f in InceptionSpec.WIDTHS), name=layer.name)


def slim_threshold(spec: NetworkSpec, scales: dict[tuple[str, str], np.ndarray], budget: float,
                   input_hw: tuple[int, int]) -> float:
    """The lowest of the scales whose `kept_widths` network stays within ``budget`` (bisection: the network's cost
    falls as the threshold rises)."""
    levels = np.unique(np.concatenate([v for v in scales.values()] or [np.zeros(1)]))
    lo, hi = 0, len(levels) - 1  # keep all channels at levels[0]; the fewest at levels[-1]
    if network_macs(kept_widths(spec, scales, float(levels[hi])), input_hw) > budget:
        raise UserError(f"budget {budget:.0f} multiply-adds is below the slimmest network the scales allow; "
                        "raise --budget")
    while lo < hi:  # the smallest level whose network fits
        mid = (lo + hi) // 2
        fits = network_macs(kept_widths(spec, scales, float(levels[mid])), input_hw) <= budget
        lo, hi = (lo, mid) if fits else (mid + 1, hi)
    return float(levels[lo])


def slimmed(spec: NetworkSpec, scales: dict[tuple[str, str], np.ndarray], budget: float,
            input_hw: tuple[int, int]) -> NetworkSpec:
    """The widest `kept_widths` of ``spec`` within ``budget`` (at `slim_threshold`)."""
    return kept_widths(spec, scales, slim_threshold(spec, scales, budget, input_hw))


def slim(spec: NetworkSpec, budget: float, input_hw: tuple[int, int], config: SlimConfig,
         trainer: Callable[[nn.Module, Callable[[nn.Module], None]], nn.Module], seed: int) -> NetworkSpec:
    """The discovered network ``spec`` slimmed to ``budget`` (see the module docstring); ``trainer(model,
    after_backward)`` trains the over-complete network for ``config.epochs`` epochs and returns it."""
    over = scale_network(spec, config.over, None)
    torch.manual_seed(seed)
    model = builders.build(over)
    trained = trainer(model, penalty_step(over, input_hw, config.penalty))
    return dataclasses.replace(slimmed(over, scales_of(trained, over), budget, input_hw), name=spec.name)
