"""Where the statistics look: the offsets a window reads, and how many anchor positions per map are
recorded (all of them, or a sample sized by the cost rule of docs/statistics.md).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from topo.common.errors import StatsError

#: Positions per map and image used by default: decided per layer (see :func:`choose_positions`).
DEFAULT_POSITIONS = "auto"


#: ``"auto"`` keeps every position while a layer's exact products cost at most this many forward passes, and the
#: products of all the layers recorded together at most this many, sampled or exact (fewer positions otherwise).
COST_MULTIPLE = 1.0


#: A recording whose products cost at most this many multiply-adds in all (over every image) is never cut: about
#: 7 s on a 2-core CPU (docs/statistics.md), about a command's own start; the bound is for large networks.
FREE_MACS = 2**38


#: Otherwise ``"auto"`` samples enough positions for this many position pairs at every stored offset.
MIN_PAIRS = 10_000


def half_offsets(max_offset: int, spatial_shape: tuple[int, int] | None) -> list[tuple[int, int]]:
    """The stored displacements: ``dy > 0``, or ``dy == 0`` and ``dx >= 0``; (0, 0) first.

    Displacements that cannot fit in a map of ``spatial_shape`` are left out; a
    fully connected layer (``spatial_shape=None``) has only (0, 0).
    """
    if spatial_shape is None:
        return [(0, 0)]
    height, width = spatial_shape
    ry, rx = min(max_offset, height - 1), min(max_offset, width - 1)
    return [(dy, dx) for dy in range(ry + 1) for dx in range(-rx, rx + 1) if dy > 0 or dx >= 0]


def parse_positions(positions: int | str | None) -> int | str | None:
    if positions is None or positions == "all":
        return None
    if positions == "auto":
        return "auto"
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
        raise StatsError(
            f"positions={positions!r} is invalid; pass a positive int, 'auto', or None / 'all' for every position"
        )
    return positions


@dataclass(frozen=True)
class PositionBudget:
    """What ``positions="auto"`` decides from: the model's forward cost and the number of images.

    ``forward_macs``: multiply-adds of the model's forward pass for one image
    (counted, see :func:`topo.stats.recording.forward_macs`); ``num_images``: the images the
    statistics will see (over all processes; a lower bound where unknown). ``reach``: plan the positions
    as for a layer storing offsets up to this reach where it stores fewer (None: its own), so that layers
    recorded together at different reaches are sampled at the same anchors (`topo.record`). ``scale``: the
    share of its positions each layer keeps so that the layers recorded together stay within the bound
    (`recording_scale`; 1: all).
    """

    forward_macs: int
    num_images: int
    cost_multiple: float = COST_MULTIPLE
    min_pairs: int = MIN_PAIRS
    reach: int | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        if (self.forward_macs < 0 or self.num_images < 1 or not self.cost_multiple >= 0 or self.min_pairs < 1
                or (self.reach is not None and self.reach < 0) or not 0 < self.scale <= 1):
            raise StatsError(f"{self} is invalid; need forward_macs >= 0, num_images >= 1, cost_multiple >= 0, "
                             "min_pairs >= 1, reach None or >= 0, 0 < scale <= 1")

    @property
    def allowed_macs(self) -> float:
        """Multiply-adds per image the products of a recording may cost: ``cost_multiple`` forward passes, or
        `FREE_MACS` spread over the images where that is more."""
        return max(self.cost_multiple * self.forward_macs, FREE_MACS / self.num_images)

    def describe(self) -> str:
        """The bound in words: what a recording's products may cost per image, and which term sets it."""
        by_forward = self.cost_multiple * self.forward_macs >= FREE_MACS / self.num_images
        which = (f"{self.cost_multiple:g} x the forward pass" if by_forward else
                 f"2**{math.log2(FREE_MACS):g} in all over {self.num_images:,} images")
        return f"{self.allowed_macs:,.0f} multiply-adds per image for the layers recorded together: {which}"


@dataclass(frozen=True)
class PositionChoice:
    """The outcome of the positions rule: anchor ``positions`` per map and image, ``exact`` if all;
    ``short``: the cost bound left fewer pairs per offset than the rule's target (``pairs`` expected at the
    farthest offset)."""

    positions: int
    exact: bool
    reason: str
    short: bool = False
    pairs: float | None = None


def exact_macs(channels: int, spatial_shape: tuple[int, int], offsets: Sequence[tuple[int, int]]) -> int:
    """Multiply-adds per image of the exact statistics: ``2 C^2 D H W`` (float64 moments, float32 counts)."""
    return 2 * channels * channels * len(offsets) * spatial_shape[0] * spatial_shape[1]


def choose_positions(
    channels: int,
    spatial_shape: tuple[int, int],
    offsets: Sequence[tuple[int, int]],
    budget: PositionBudget | None,
) -> PositionChoice:
    """The ``positions="auto"`` rule, by counted multiply-adds (the same on every machine).

    Every position when there is no ``budget`` (activations already in memory), or
    when the exact products cost at most ``budget.cost_multiple`` forward passes;
    otherwise the fewest random positions per image that give ``budget.min_pairs``
    expected pairs at the farthest stored offset over ``budget.num_images`` images
    (every position if that needs them all). Then, where ``budget.scale < 1`` (the layers recorded
    together would cost more than the bound: `recording_scale`), that share of the positions, at least one.
    """
    wanted = _wanted_positions(channels, spatial_shape, offsets, budget)
    if budget is None or budget.scale >= 1:
        return wanted
    every = spatial_shape[0] * spatial_shape[1]
    kept = max(1, math.floor(budget.scale * wanted.positions))
    if kept >= wanted.positions:
        return wanted
    pairs = expected_pairs(budget.num_images, kept, spatial_shape, offsets)
    bound = (f"the statistics' cost bound ({budget.describe()}) keeps {kept} of the {wanted.positions} positions per "
             f"image the rule wants, of {every}")
    return PositionChoice(kept, False, f"{kept} of {every} random positions per image: {bound}",
                          short=pairs < budget.min_pairs, pairs=pairs)


def expected_pairs(num_images: int, positions: int, spatial_shape: tuple[int, int],
                   offsets: Sequence[tuple[int, int]]) -> float:
    """Pairs expected at the farthest of ``offsets`` from ``positions`` random anchors per image."""
    return num_images * positions * _inside_farthest(spatial_shape, offsets) / (spatial_shape[0] * spatial_shape[1])


def _inside_farthest(spatial_shape: tuple[int, int], offsets: Sequence[tuple[int, int]]) -> int:
    """Anchors whose target stays inside the map at the farthest stored offset."""
    height, width = spatial_shape
    return min((height - abs(dy)) * (width - abs(dx)) for dy, dx in offsets)


def choice_macs(channels: int, spatial_shape: tuple[int, int], offsets: Sequence[tuple[int, int]],
                choice: PositionChoice) -> int:
    """Multiply-adds per image of the products ``choice`` makes over ``offsets`` (the layer's own)."""
    if choice.exact:
        return exact_macs(channels, spatial_shape, offsets)
    return 2 * channels * channels * len(offsets) * choice.positions


def recording_scale(layers: Sequence[tuple[int, tuple[int, int], Sequence[tuple[int, int]],
                                           Sequence[tuple[int, int]]]], budget: PositionBudget) -> float:
    """The share of its wanted positions each layer keeps so that the layers recorded together cost at most
    ``budget.allowed_macs`` per image (1: all fit). ``layers``: (channels, map, offsets planned, offsets stored)
    of each spatial layer, where the planned ones may reach farther (`PositionBudget.reach`)."""
    wanted = sum(choice_macs(c, shape, stored, _wanted_positions(c, shape, planned, budget))
                 for c, shape, planned, stored in layers)
    return 1.0 if wanted <= budget.allowed_macs else budget.allowed_macs / wanted


def _wanted_positions(
    channels: int,
    spatial_shape: tuple[int, int],
    offsets: Sequence[tuple[int, int]],
    budget: PositionBudget | None,
) -> PositionChoice:
    """The rule of `choose_positions` before the bound on the layers recorded together."""
    height, width = spatial_shape
    every = height * width
    if budget is None:
        return PositionChoice(every, True, "every position (no forward cost to weigh: activations in memory)")
    cost, allowed = exact_macs(channels, spatial_shape, offsets), budget.cost_multiple * budget.forward_macs
    if cost <= allowed:
        return PositionChoice(every, True, f"every position: the exact products, {cost:,} multiply-adds per "
                                           f"image, fit in {budget.cost_multiple:g} x the forward pass "
                                           f"({budget.forward_macs:,})")
    inside = _inside_farthest(spatial_shape, offsets)
    needed = -(-budget.min_pairs * every // (budget.num_images * inside))  # ceil, in integers
    target = f"{budget.min_pairs:,} pairs per offset over {budget.num_images:,} images"
    if needed >= every:
        return PositionChoice(every, True, f"every position: {target} need all {every} positions")
    return PositionChoice(needed, False, f"{needed} of {every} random positions per image for {target}: the exact "
                                         f"products, {cost:,} multiply-adds per image, exceed "
                                         f"{budget.cost_multiple:g} x the forward pass ({budget.forward_macs:,})")


def planned_offsets(max_offset: int, reach: int | None, spatial_shape: tuple[int, int]) -> list[tuple[int, int]]:
    """The offsets ``positions="auto"`` plans a layer storing ``max_offset`` for: its own, or as far as ``reach``
    where that is farther (layers recorded together at different reaches share anchors)."""
    return half_offsets(max_offset if reach is None else max(reach, max_offset), spatial_shape)


def inside_share(offsets: list[tuple[int, int]], spatial_shape: tuple[int, int]) -> float:
    """The share of (position, offset) pairs of a map whose target ``p + d`` is inside it."""
    height, width = spatial_shape
    inside = sum((height - abs(dy)) * (width - abs(dx)) for dy, dx in offsets)
    return inside / (len(offsets) * height * width)


def sample_anchors(
    n_images: int,
    spatial_shape: tuple[int, int],
    offsets: list[tuple[int, int]],
    positions: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random anchor positions and their targets: ``anchors`` (N, K), ``targets`` and ``valid`` (N, K, D).

    Positions are flat indices ``y * W + x``; each image gets ``positions`` distinct
    anchors. ``targets[n, k, d]`` is the anchor moved by offset ``d`` (clamped into
    the map), and ``valid`` says whether the move stayed inside. Drawn on the CPU
    from ``generator``, so a seed gives the same positions on every device.
    """
    height, width = spatial_shape
    anchors = torch.rand(n_images, height * width, generator=generator).topk(positions, dim=1).indices
    dys = torch.tensor([d[0] for d in offsets])
    dxs = torch.tensor([d[1] for d in offsets])
    ty = (anchors // width)[:, :, None] + dys
    tx = (anchors % width)[:, :, None] + dxs
    valid = (ty >= 0) & (ty < height) & (tx >= 0) & (tx < width)
    targets = ty.clamp(0, height - 1) * width + tx.clamp(0, width - 1)
    return anchors, targets, valid
