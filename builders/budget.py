"""Meeting a multiply-add budget with one scale factor on a module's widths."""
from __future__ import annotations

from typing import Callable

from builders.spec import InceptionSpec
from topo.errors import StatsError


def fit_to_budget(make: Callable[[float], InceptionSpec], budget: float, height: int, width: int,
                  *, kernel5x5: int = 5, steps: int = 40) -> InceptionSpec:
    """The largest ``make(scale)`` whose multiply-adds at ``height`` x ``width`` stay within ``budget``.

    ``make`` maps a scale factor to a spec and must grow with it; the scale is
    found by doubling, then bisection, on `analysis.inception_macs`.
    """
    from analysis.cost import inception_macs

    def macs(scale: float) -> int:
        return inception_macs(make(scale), height, width, kernel5x5=kernel5x5)

    smallest = macs(1e-9)
    if budget < smallest:
        raise StatsError(
            f"budget {budget:.0f} multiply-adds is below the smallest module these widths allow ({smallest}); "
            "raise the budget or lower round_to"
        )
    lo, hi = 1e-9, 1.0
    while macs(hi) <= budget and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(steps):
        mid = (lo + hi) / 2
        if macs(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return make(lo)


def scaled_widths(spec: InceptionSpec, scale: float, round_to: int | None = 8) -> InceptionSpec:
    """``spec`` with every width times ``scale``, rounded to a multiple of ``round_to`` (a branch never vanishes)."""
    def one(w: int) -> int:
        if w == 0:
            return 0
        value = max(1, round(w * scale))
        if round_to and round_to > 1:
            value = max(round_to, round(value / round_to) * round_to)
        return int(value)

    return InceptionSpec(spec.in_channels, *(one(w) for w in spec.widths), name=spec.name)
