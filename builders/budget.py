"""Meeting a multiply-add budget with one scale factor on a module's widths."""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from builders.cost import inception_macs
from builders.spec import InceptionSpec
from topo.common.errors import StatsError

OUTPUTS = ("ch1x1", "ch3x3", "ch5x5", "pool_proj")
#: Widths are multiples of this unless told otherwise (1: any whole number of channels), in the library as in
#: the construction (`topo.construct.config.ConstructConfig.round_to`).
ROUND_TO = 1
"""The fields of `InceptionSpec` that are output channels of the module."""


def fit_to_budget(make: Callable[[float], InceptionSpec], budget: float, height: int, width: int,
                  *, kernel5x5: int = 5, steps: int = 40) -> InceptionSpec:
    """The largest ``make(scale)`` whose multiply-adds at ``height`` x ``width`` stay within ``budget``.

    ``make`` maps a scale factor to a spec and must grow with it; the scale is
    found by doubling, then bisection, on `builders.cost.inception_macs`.
    """
    def macs(scale: float) -> int:
        return inception_macs(make(scale), height, width, kernel5x5=kernel5x5)

    smallest = macs(1e-9)
    if budget < smallest:
        raise StatsError(
            f"budget {budget:.0f} multiply-adds is below the smallest module these widths allow ({smallest}); "
            "raise the budget or lower round_to"
        )
    return make(largest_scale(macs, budget, steps=steps))


def largest_scale(cost: Callable[[float], float], budget: float, *, steps: int = 40, smallest: float = 1e-9) -> float:
    """The largest scale (found by doubling from 1, then ``steps`` bisections) whose ``cost`` stays within
    ``budget``; ``cost`` must grow with the scale, and ``smallest`` is returned where nothing larger fits."""
    lo, hi = smallest, 1.0
    while cost(hi) <= budget and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    return lo


def round_width(width: float, round_to: int | None, cap: int | None = None) -> int:
    """``width`` rounded to a multiple of ``round_to``; a positive width never becomes 0, nor exceeds ``cap``."""
    if width <= 0:
        return 0
    w = max(1, int(round(width)))
    if round_to and round_to > 1:
        w = max(round_to, int(round(w / round_to)) * round_to)
    if cap is not None and w > cap:
        w = (cap // round_to) * round_to if round_to and round_to > 1 and cap >= round_to else cap
    return int(w)


def scaled_widths(spec: InceptionSpec, scale: float, round_to: int | None = ROUND_TO) -> InceptionSpec:
    """``spec`` with every width times ``scale``, rounded by `round_width`."""
    return InceptionSpec(spec.in_channels, *(round_width(w * scale, round_to) for w in spec.widths), name=spec.name)


def fill_budget(module: InceptionSpec, shape: Mapping[str, float], budget: float, hw: tuple[int, int],
                round_to: int | None, kernel5x5: int = 5) -> InceptionSpec:
    """Spend what rounding left of ``budget``: ``round_to`` output channels at a time to the branch furthest
    below its share of ``shape``'s outputs, while the module stays within ``budget``.

    One scale factor moves every width across a multiple of ``round_to`` at nearly the same scale (at once
    for equal shares), which can leave a module several percent below its budget; absent branches stay absent.
    """
    step, total = max(1, round_to or 1), sum(shape[key] for key in OUTPUTS)
    while True:
        out = module.out_channels + step
        fits = []
        for key in OUTPUTS:
            width = getattr(module, key)
            if not width:
                continue
            grown = dataclasses.replace(module, **{key: width + step})
            if inception_macs(grown, *hw, kernel5x5=kernel5x5) <= budget:
                fits.append((shape[key] / total * out - width, grown))
        if not fits:
            return module
        module = max(fits, key=lambda fit: fit[0])[1]
