"""Streaming activation statistics: means, covariances, spatial cross-covariances, co-activation.

A layer's activations arrive batch by batch as ``(N, C, H, W)`` maps or ``(N, C)``
vectors. Every (image, position) of a map is one observation of the C-vector of
unit activations. For each displacement ``d = (dy, dx)`` with ``|dy|, |dx| <=
max_offset`` the statistics cover the pairs (unit i at position p, unit j at
position p + d) with both positions inside the map (no padding). Only half of the
displacements are stored; the other half follow from ``cross(-d) = cross(d).T``.

Per stored displacement ``d`` a :class:`LayerStats` keeps, on the activations'
device, sums of the activations minus a fixed per-unit ``shift`` (the mean of the
first batch), in float64 (the 0/1 counts in float32 while that is exact, below
2**24 rows):

* ``n[d]``: the number of position pairs seen;
* ``sum_a[d]``, ``sum_b[d]``, ``sq_a[d]``, ``sq_b[d]``: sums and sums of squares of the
  anchor side (p) and the target side (p + d);
* ``prod[:, d, :]``: the C x C sums of products (anchor unit, target unit);
* ``fire_a[d]``, ``fire_b[d]``, ``joint[:, d, :]``: how often each side, and each pair of
  units, is above its unit's ``threshold`` (the co-activation counts).

Shifting by a value close to the mean makes the final ``S - sum_a sum_b^T / n``
subtraction benign (the "shifted data" algorithm), so a large common offset (mean
1e4, standard deviation 1) costs no precision. On large maps every stored offset
of a batch is added with ONE matrix product of the anchor rows against a
zero-padded, shifted stack of the map (rows x D C); on small maps, where most of
that stack's pairs would leave the map, offset by offset on crops of the map;
the marginal sums come from per-position sums and masks of the valid pairs.
Merging two statistics moves one onto the other's shift first. Memory is O(C^2 x
offsets), whatever the number of images: no activation is kept.

Positions: ``positions=None`` (or ``"all"``) uses every position and is exact; an
int uses that many random anchor positions per map and image (seeded);
``"auto"`` (the default of :class:`LayerStats` and :func:`topo.record`) decides per
layer by counted multiply-adds (:func:`choose_positions`). A unit "fires" above its
threshold: a scalar, or one per unit, e.g. its 0.9-quantile estimated by
:class:`ActivationSample` in a calibration pass (:func:`from_activations`,
:func:`topo.record`). See docs/statistics.md for the estimators, the rules and
their standard errors.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from topo.distributed import every_rank, is_distributed
from topo.errors import StatsError
from topo.io import atomic_torch_save

log = logging.getLogger(__name__)

#: A unit whose variance is at or below this is dead: correlation 0 with everything.
DEAD_EPS = 1e-12

#: Positions per map and image used by default: decided per layer (see :func:`choose_positions`).
DEFAULT_POSITIONS = "auto"

#: A unit fires above this quantile of its own activations, by default (``topo.record``, ``from_activations``).
DEFAULT_FIRE_QUANTILE = 0.9

#: ``"auto"`` keeps every position while a layer's exact products cost at most this many forward passes.
EXACT_COST_MULTIPLE = 1.0

#: Otherwise ``"auto"`` samples enough positions for this many position pairs at every stored offset.
MIN_PAIRS = 10_000

#: Observations (C-vectors) a calibration sample keeps, at most, to estimate the quantiles.
CALIBRATION_ROWS = 2**14

_FORMAT = "topo.LayerStats"
_VERSION = 2
# Sums of 0/1 products are exact in float32 up to 2**24.
_FLOAT32_EXACT = 2**24
# Subsampled batches are gathered until this many anchor rows, then added in one product.
_MIN_ROWS = 256
# Elements of the shifted stack (rows x D x C) built at a time by the exact path, in buffers reused
# from batch to batch: at most 12 bytes each (float64 values, float32 firing), 384 MiB. A batch of
# 16 maps of 16 x 16 x 128 at 41 offsets (21.5 M elements) is one block: one product per batch.
_STACK_ELEMENTS = 2**25
# Fewer rows than this per block would make its products inefficient; then offsets are grouped instead.
_MIN_BLOCK_ROWS = 1024
# The exact path multiplies offset by offset, on crops of the map, when at most this share of its
# (position, offset) pairs stays inside the map (small maps: 0.32 for 5 x 5 at max_offset 4, 0.61 for
# 10 x 10, 0.79 for 20 x 20); docs/statistics.md has the measurements.
_CROPS_BELOW = 0.7
# Elements squared at a time by `_column_sums` (2 MiB of float64: a buffer that stays in cache).
_SQUARE_ELEMENTS = 2**18
_STATE_KEYS = ("shift", "n", "sum_a", "sum_b", "sq_a", "sq_b", "prod", "fire_a", "fire_b", "joint")


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


def _parse_positions(positions: int | str | None) -> int | str | None:
    if positions is None or positions == "all":
        return None
    if positions == "auto":
        return "auto"
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
        raise StatsError(
            f"positions={positions!r} is invalid; pass a positive int, 'auto', or None / 'all' for every position"
        )
    return positions


def _parse_threshold(threshold) -> float | np.ndarray:
    """A scalar threshold as a float, a per-unit one as a float64 (C,) array."""
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.detach().cpu().numpy()
    values = np.asarray(threshold, dtype=np.float64) if threshold is not None else np.array(np.nan)
    if values.ndim > 1 or not np.isfinite(values).all():
        raise StatsError(
            f"threshold={threshold!r} is invalid; pass a finite number, or one finite number per unit (shape (C,))"
        )
    return float(values) if values.ndim == 0 else values.copy()


def check_fire_quantile(q: float | None) -> float | None:
    """``q`` itself when it is None or lies strictly between 0 and 1; a StatsError otherwise."""
    if q is None:
        return None
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < q < 1.0:
        raise StatsError(f"fire_quantile={q!r} is invalid; pass a number strictly between 0 and 1, or None")
    return float(q)


# ---------------------------------------------------------------------- the positions rule
@dataclass(frozen=True)
class PositionBudget:
    """What ``positions="auto"`` decides from: the model's forward cost and the number of images.

    ``forward_macs``: multiply-adds of the model's forward pass for one image
    (counted, see :func:`topo.hooks.forward_macs`); ``num_images``: the images the
    statistics will see (over all processes; a lower bound where unknown). ``reach``: plan the positions
    as for a layer storing offsets up to this reach where it stores fewer (None: its own), so that layers
    recorded together at different reaches are sampled at the same anchors (`topo.record`).
    """

    forward_macs: int
    num_images: int
    cost_multiple: float = EXACT_COST_MULTIPLE
    min_pairs: int = MIN_PAIRS
    reach: int | None = None

    def __post_init__(self) -> None:
        if (self.forward_macs < 0 or self.num_images < 1 or self.cost_multiple < 0 or self.min_pairs < 1
                or (self.reach is not None and self.reach < 0)):
            raise StatsError(f"{self} is invalid; need forward_macs >= 0, num_images >= 1, cost_multiple >= 0, "
                             "min_pairs >= 1, reach None or >= 0")


@dataclass(frozen=True)
class PositionChoice:
    """The outcome of the positions rule: anchor ``positions`` per map and image, ``exact`` if all."""

    positions: int
    exact: bool
    reason: str


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
    (every position if that needs them all).
    """
    height, width = spatial_shape
    every = height * width
    if budget is None:
        return PositionChoice(every, True, "every position (no forward cost to weigh: activations in memory)")
    cost, allowed = exact_macs(channels, spatial_shape, offsets), budget.cost_multiple * budget.forward_macs
    if cost <= allowed:
        return PositionChoice(every, True, f"every position: the exact products, {cost:,} multiply-adds per "
                                           f"image, fit in {budget.cost_multiple:g} x the forward pass "
                                           f"({budget.forward_macs:,})")
    inside = min((height - abs(dy)) * (width - abs(dx)) for dy, dx in offsets)  # anchors kept at the farthest
    needed = -(-budget.min_pairs * every // (budget.num_images * inside))  # ceil, in integers
    target = f"{budget.min_pairs:,} pairs per offset over {budget.num_images:,} images"
    if needed >= every:
        return PositionChoice(every, True, f"every position: {target} need all {every} positions")
    return PositionChoice(needed, False, f"{needed} of {every} random positions per image for {target}: the exact "
                                         f"products, {cost:,} multiply-adds per image, exceed "
                                         f"{budget.cost_multiple:g} x the forward pass ({budget.forward_macs:,})")


# ---------------------------------------------------------------------- batches
def _where(batch_index: int | None) -> str:
    return f"batch {batch_index}" if batch_index is not None else "a batch"


def checked_batch(activations, label: str, batch_index: int | None) -> torch.Tensor:
    """``activations`` as a floating-point ``(N, C, H, W)`` or ``(N, C)`` tensor; a StatsError naming
    ``label`` and the batch for another shape, NaN or Inf."""
    x = activations.detach() if isinstance(activations, torch.Tensor) else torch.as_tensor(activations)
    where = _where(batch_index)
    if x.dim() not in (2, 4):
        raise StatsError(f"{label}: activations of shape {tuple(x.shape)} in {where}; expected (N, C, H, W) or (N, C)")
    if not x.is_floating_point():
        x = x.float()
    if not _all_finite(x):
        raise StatsError(f"{label}: activation contains NaN or Inf in {where}; check the model's weights and inputs")
    return x


def _all_finite(x: torch.Tensor) -> bool:
    """True when no element is NaN or +-Inf (one pass: min and max propagate NaN)."""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _rows(x: torch.Tensor) -> int:
    """Observations in a batch: images x positions."""
    return x.shape[0] * math.prod(x.shape[2:])


# ---------------------------------------------------------------------- calibration
class ActivationSample:
    """A bounded, seeded, uniform subsample of a layer's observations, for per-unit quantiles.

    Every observation (the C-vector at one image and position, or one image of a
    dense layer) gets a random key from a CPU generator seeded by ``(seed,
    stream)``; the sample is the ``size`` observations with the smallest keys (a
    bottom-k sample: uniform without replacement, deterministic for a seed and a
    batch order, and mergeable across processes). Memory is ``size x C`` values.
    While at most ``size`` observations have been seen, the sample is all of them.
    """

    def __init__(self, *, size: int = CALIBRATION_ROWS, seed: int = 0, stream: int = 0, name: str | None = None):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise StatsError(f"size={size!r} is invalid; pass a positive int")
        self.size, self.seed, self.name = size, seed, name
        self.count = 0
        self.num_channels: int | None = None
        self._keys = torch.zeros(0, dtype=torch.float64)
        self._values: torch.Tensor | None = None
        state = np.random.SeedSequence([seed, stream, 0x51A7]).generate_state(1)[0]
        self._generator = torch.Generator().manual_seed(int(state))

    def update(self, activations, *, batch_index: int | None = None) -> ActivationSample:
        """Add one batch, ``(N, C, H, W)`` or ``(N, C)``; returns ``self``."""
        x = checked_batch(activations, self._label(), batch_index)
        rows = _rows(x)
        if rows == 0:
            return self
        if self.num_channels is None:
            self.num_channels = x.shape[1]
        elif x.shape[1] != self.num_channels:
            raise StatsError(f"{self._label()}: {_where(batch_index)} has {x.shape[1]} units but earlier batches "
                             f"had {self.num_channels}; record one layer per sample")
        keys = torch.rand(rows, generator=self._generator, dtype=torch.float64)
        keys, index = keys.topk(min(self.size, rows), largest=False)
        index = index.to(x.device)
        flat = x.flatten(2) if x.dim() == 4 else x[:, :, None]  # (N, C, positions)
        positions = flat.shape[2]
        values = flat[index // positions, :, index % positions]  # (k, C)
        self.count += rows
        if self._values is not None:
            keys, values = torch.cat([self._keys, keys]), torch.cat([self._values, values.to(self._values)])
        self._keep(keys, values)
        return self

    def _keep(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the ``size`` rows of ``values`` with the smallest ``keys``."""
        if len(keys) > self.size:
            keys, index = keys.topk(self.size, largest=False)
            values = values[index.to(values.device)]
        self._keys, self._values = keys, values

    @property
    def values(self) -> np.ndarray:
        """The sampled observations, (rows, C) float64."""
        if self._values is None:
            raise StatsError(f"{self._label()}: no activations were sampled; pass at least one non-empty batch")
        return self._values.detach().to("cpu", torch.float64).numpy().copy()

    def quantile(self, q: float) -> np.ndarray:
        """Each unit's ``q``-quantile over the sample (``numpy.quantile``, linear interpolation), shape (C,)."""
        return np.quantile(self.values, check_fire_quantile(q), axis=0)

    def all_gather(self) -> ActivationSample:
        """Replace the sample by the bottom-k sample of every process's observations, in place.

        The same on every rank (a collective: every rank must call it); without an
        initialised process group (or with one process) this does nothing.
        """
        if not is_distributed():
            return self
        mine = None if self._values is None else (self._keys, self._values.cpu())
        parts = every_rank((self.count, self.num_channels, mine))
        self.count = sum(count for count, _, _ in parts)
        self.num_channels = next((c for _, c, _ in parts if c is not None), None)
        samples = [part for _, _, part in parts if part is not None]
        if samples:
            device = self._values.device if self._values is not None else torch.device("cpu")
            keys = torch.cat([k for k, _ in samples])
            self._keep(keys, torch.cat([v for _, v in samples]).to(device))
        return self

    def _label(self) -> str:
        return f"layer {self.name!r}" if self.name is not None else "ActivationSample"


# ---------------------------------------------------------------------- the statistics
class LayerStats:
    """First and second moments of one layer's units, streamed batch by batch.

    Build one with :func:`from_activations` or :func:`topo.record`, or create it
    empty and call :meth:`update` with each batch. Query methods return float64
    NumPy arrays; ``[i, j]`` of a C x C result concerns unit ``i`` at position ``p``
    and unit ``j`` at position ``p + (dy, dx)``.

    ``threshold``: a unit fires when its activation is above it; a scalar, or one
    value per unit (shape (C,)). ``positions``: anchor positions per map and image,
    ``None``/``"all"`` for every one (exact), an int, or ``"auto"`` (the default):
    :func:`choose_positions` with ``budget``, every position without one. The
    decision is made at the first batch, logged once (INFO) and kept in
    ``positions_used`` and ``exact``. ``fire_quantile`` records the quantile the
    thresholds were estimated at, when they were (None: given).
    """

    def __init__(
        self,
        *,
        max_offset: int = 4,
        threshold: float | Sequence[float] | np.ndarray | torch.Tensor = 0.0,
        positions: int | str | None = DEFAULT_POSITIONS,
        seed: int = 0,
        name: str | None = None,
        budget: PositionBudget | None = None,
        fire_quantile: float | None = None,
    ) -> None:
        if isinstance(max_offset, bool) or not isinstance(max_offset, int) or max_offset < 0:
            raise StatsError(f"max_offset={max_offset!r} is invalid; pass an int >= 0")
        self.name = name
        self.max_offset = max_offset
        self.threshold = _parse_threshold(threshold)
        self.positions = _parse_positions(positions)
        self.budget = budget
        self.fire_quantile = check_fire_quantile(fire_quantile)
        self.seed = seed
        self.num_channels: int | None = None
        self.spatial: bool | None = None
        self.spatial_shape: tuple[int, int] | None = None
        #: Anchor positions per map and image in use (every one when ``exact``); None before the first batch.
        self.positions_used: int | None = None
        self.exact: bool | None = None
        self._offsets: list[tuple[int, int]] = []
        self._state: dict[str, torch.Tensor] | None = None
        # Gathered anchor rows and their targets not yet added (few, bounded: see _MIN_ROWS).
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_rows = 0
        # Rows added to the co-activation counts so far; they are float32 (exact) below 2**24.
        self._counted = 0
        self._generator = torch.Generator().manual_seed(seed)
        # Buffers of the shifted stacks, reused from batch to batch (at most 384 MiB; see release_buffers).
        self._scratch = _Scratch()

    # ------------------------------------------------------------------ streaming
    def update(self, activations: torch.Tensor, *, batch_index: int | None = None) -> LayerStats:
        """Add one batch of activations, ``(N, C, H, W)`` or ``(N, C)``; returns ``self``."""
        x = checked_batch(activations, self._label(), batch_index)
        if x.shape[0] == 0:
            return self
        self._check_layout(x, _where(batch_index))
        if self._state is None:
            self._state = _empty_state(x, self._offsets)
        threshold = self._threshold_on(x.device)
        with _full_precision(x.device):
            if not self.exact:
                self._update_sampled(x, threshold)
                return self
            self._flush()
            self._count_rows(_rows(x))
            if x.dim() == 2:
                _add_dense(self._state, x, threshold)
            else:
                _add_exact(self._state, x, self._offsets, threshold, self._scratch)
        return self

    def _update_sampled(self, x: torch.Tensor, threshold: float | torch.Tensor) -> None:
        """Gather the pairs of ``positions_used`` random anchors per image; add them once there are enough rows."""
        sampled = sample_anchors(x.shape[0], self.spatial_shape, self._offsets, self.positions_used, self._generator)
        for part in _gather_sampled(self._state, x, self._offsets, sampled, threshold, self._scratch):
            if part[0].shape[0] >= _MIN_ROWS:
                self._flush()  # a large part is added on its own (it may sit in reused buffers)
            self._pending.append(part)
            self._pending_rows += part[0].shape[0]
            if self._pending_rows >= _MIN_ROWS:
                self._flush()

    def release_buffers(self) -> LayerStats:
        """Free the scratch buffers kept between exact updates (once recording is done); returns ``self``."""
        self._scratch.clear()
        return self

    def _check_layout(self, x: torch.Tensor, where: str) -> None:
        channels = x.shape[1]
        shape = tuple(x.shape[2:]) if x.dim() == 4 else None
        if self.num_channels is None:
            if isinstance(self.threshold, np.ndarray) and self.threshold.shape != (channels,):
                raise StatsError(f"{self._label()}: {len(self.threshold)} thresholds for {channels} units; "
                                 "pass one threshold per unit (shape (C,)) or a scalar")
            self.num_channels, self.spatial, self.spatial_shape = channels, x.dim() == 4, shape
            self._offsets = half_offsets(self.max_offset, shape)
            self._choose_positions()
            return
        if channels != self.num_channels or shape != self.spatial_shape:
            seen = (self.num_channels,) + (self.spatial_shape or ())
            raise StatsError(
                f"{self._label()}: {where} has (C, H, W) = {tuple(x.shape[1:])} but earlier batches had {seen}; "
                "record maps of one size per LayerStats"
            )

    def _choose_positions(self) -> None:
        """Fix ``positions_used`` and ``exact`` from the first batch's layout; log the decision once."""
        shape = self.spatial_shape
        if shape is None:
            choice = PositionChoice(1, True, "one observation per image (a vector layer)")
        elif self.positions == "auto":
            planned = (self._offsets if self.budget is None or self.budget.reach is None
                       else half_offsets(max(self.budget.reach, self.max_offset), shape))
            choice = choose_positions(self.num_channels, shape, planned, self.budget)
        elif self.positions is None or self.positions >= shape[0] * shape[1]:
            choice = PositionChoice(shape[0] * shape[1], True, "every position (as requested)")
        else:
            choice = PositionChoice(self.positions, False,
                                    f"{self.positions} random positions per image (as requested)")
        self.positions_used, self.exact = choice.positions, choice.exact
        log.info("%s: %s statistics, %s", self._label(), "exact" if choice.exact else "sampled", choice.reason)

    def _threshold_on(self, device: torch.device) -> float | torch.Tensor:
        """The firing threshold in a form that broadcasts over channels-last activations."""
        if isinstance(self.threshold, float):
            return self.threshold
        return torch.as_tensor(self.threshold, dtype=torch.float64, device=device)

    def _flush(self) -> None:
        """Add the gathered rows still pending (one matrix product for several small batches)."""
        if not self._pending:
            return
        stack, fired, valid = (parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*self._pending))
        self._pending, self._pending_rows = [], 0
        self._count_rows(stack.shape[0])
        with _full_precision(stack.device):
            _add_gathered(self._state, stack, fired, valid, self._scratch)

    def _count_rows(self, rows: int) -> None:
        """Keep the co-activation counts exact: float64 once they could reach 2**24."""
        self._counted += rows
        if self._counted >= _FLOAT32_EXACT and self._state["joint"].dtype != torch.float64:
            self._state["joint"] = self._state["joint"].double()

    # ------------------------------------------------------------------ combining
    def merge(self, other: LayerStats) -> LayerStats:
        """Statistics of both sets of observations, as if seen in one pass (a new object).

        Both must have the same layer layout, offsets and thresholds. ``positions_used``
        of the result is theirs when they agree, None when they differ.
        """
        if not isinstance(other, LayerStats):
            raise TypeError(f"cannot merge LayerStats with {type(other).__name__}")
        if self._state is None or other._state is None:
            source = other if self._state is None else self
            return source._copy()
        if (self.num_channels, self.spatial_shape, self._offsets) != (
            other.num_channels,
            other.spatial_shape,
            other._offsets,
        ) or not _same_threshold(self.threshold, other.threshold):
            raise StatsError(
                f"{self._label()}: cannot merge statistics of C={self.num_channels}, map {self.spatial_shape}, "
                f"offsets <= {self.max_offset}, {_describe_threshold(self.threshold)} with C={other.num_channels}, "
                f"map {other.spatial_shape}, offsets <= {other.max_offset}, {_describe_threshold(other.threshold)}; "
                "record both with the same layer and settings"
            )
        other._flush()
        merged = self._copy()
        device = merged._state["n"].device
        merged._count_rows(other._counted)
        _add_state_(merged._state, {k: v.to(device) for k, v in other._state.items()})
        if merged.positions_used != other.positions_used:
            merged.positions_used = None
        merged.exact = bool(self.exact and other.exact)
        return merged

    def all_reduce(self) -> LayerStats:
        """Sum the statistics over the ranks of ``torch.distributed``, in place; returns ``self``.

        Every rank must have recorded at least one batch of the same layer, with the
        same thresholds (every rank raises the same StatsError otherwise). Without an
        initialised process group (or with one process) this does nothing.
        """
        import torch.distributed as dist

        if not is_distributed():
            return self
        st = self._require_state(min_count=1)
        thresholds = every_rank(self.threshold)
        if not all(_same_threshold(thresholds[0], t) for t in thresholds):
            raise StatsError(f"{self._label()}: the processes recorded with different firing thresholds; "
                             "give every rank the same threshold (topo.record calibrates them over all ranks)")
        counted = torch.tensor([float(self._counted)], dtype=torch.float64, device=st["n"].device)
        dist.all_reduce(counted)
        self._counted = 0
        self._count_rows(int(counted.item()))  # every rank makes the same float32/float64 choice
        shift = st["shift"].clone()
        dist.broadcast(shift, src=0)
        _move_shift_(st, shift)
        for key in _STATE_KEYS[1:]:
            dist.all_reduce(st[key])
        return self

    def _copy(self) -> LayerStats:
        self._flush()
        new = LayerStats(**self._settings())
        new.num_channels, new.spatial, new.spatial_shape = self.num_channels, self.spatial, self.spatial_shape
        new.positions_used, new.exact = self.positions_used, self.exact
        new._offsets = list(self._offsets)
        new._state = None if self._state is None else {k: v.clone() for k, v in self._state.items()}
        new._counted = self._counted
        new._generator.set_state(self._generator.get_state())
        return new

    def _settings(self) -> dict:
        """The constructor's arguments that made this object."""
        return {"max_offset": self.max_offset, "threshold": self.threshold, "positions": self.positions,
                "seed": self.seed, "name": self.name, "budget": self.budget, "fire_quantile": self.fire_quantile}

    # ------------------------------------------------------------------ queries
    @property
    def count(self) -> int:
        """Number of observations (image positions, or images for a dense layer)."""
        self._flush()
        return 0 if self._state is None else int(self._state["n"][0].item())

    @property
    def offsets(self) -> list[tuple[int, int]]:
        """Every displacement ``(dy, dx)`` that can be queried, both signs."""
        both = set(self._offsets) | {(-dy, -dx) for dy, dx in self._offsets}
        return sorted(both)

    @property
    def thresholds(self) -> np.ndarray:
        """Each unit's firing threshold, shape (C,) (a scalar ``threshold`` repeated)."""
        if self.num_channels is None:
            raise StatsError(f"{self._label()}: no activations recorded yet, so the number of units is unknown")
        return np.broadcast_to(np.asarray(self.threshold, dtype=np.float64), (self.num_channels,)).copy()

    @property
    def mean(self) -> np.ndarray:
        """Mean activation of each unit, shape (C,)."""
        st = self._require_state(min_count=1)
        return self._numpy(st["shift"] + st["sum_a"][0] / st["n"][0])

    @property
    def variance(self) -> np.ndarray:
        """Unbiased variance of each unit, shape (C,)."""
        st = self._require_state()
        n, sums = st["n"][0], st["sum_a"][0]
        m2 = self._numpy(st["sq_a"][0] - sums * sums / n).clip(min=0.0)
        return m2 / (self.count - 1)

    @property
    def dead_units(self) -> np.ndarray:
        """Indices of units whose variance is at or below :data:`DEAD_EPS`."""
        return np.flatnonzero(self.variance <= DEAD_EPS)

    @property
    def firing_rate(self) -> np.ndarray:
        """Fraction of observations in which each unit is above its threshold, shape (C,)."""
        st = self._require_state(min_count=1)
        return self._numpy(st["fire_a"][0]) / self.count

    def cov(self) -> np.ndarray:
        """C x C covariance matrix (unbiased, like ``numpy.cov``)."""
        return self.cross_cov(0, 0)

    def corr(self) -> np.ndarray:
        """C x C correlation matrix; dead units have correlation 0 (diagonal included)."""
        return self.cross_corr(0, 0)

    def cross_cov(self, dy: int, dx: int) -> np.ndarray:
        """C x C covariance of unit i at p with unit j at p + (dy, dx), over the pairs inside the map."""
        index, flip = self._offset_index(dy, dx)
        n = self._pairs(index, dy, dx)
        out = self._centred(index)[0] / (n - 1)
        return out.T.copy() if flip else out

    def cross_corr(self, dy: int, dx: int) -> np.ndarray:
        """C x C correlation of unit i at p with unit j at p + (dy, dx), over the pairs inside the map.

        Entries involving a dead unit, or a unit constant over the pairs used, are 0.
        """
        index, flip = self._offset_index(dy, dx)
        n = self._pairs(index, dy, dx)
        comoment, m2_a, m2_b = self._centred(index)
        live = self.variance > DEAD_EPS
        ok_a = live & (m2_a > DEAD_EPS * (n - 1))
        ok_b = live & (m2_b > DEAD_EPS * (n - 1))
        denom = np.sqrt(np.outer(np.where(ok_a, m2_a, 1.0), np.where(ok_b, m2_b, 1.0)))
        out = np.where(np.outer(ok_a, ok_b), comoment / denom, 0.0)
        np.clip(out, -1.0, 1.0, out=out)
        if index == 0:
            np.fill_diagonal(out, live.astype(np.float64))
        return out.T.copy() if flip else out

    def coactivation(self, dy: int = 0, dx: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(prob, lift)``, C x C: how often unit i at p and unit j at p + (dy, dx) are both above threshold.

        ``prob[i, j] = P(x_i(p) > t_i and x_j(p + d) > t_j)`` over the pairs inside the map;
        ``lift = prob / (P(x_i(p) > t_i) P(x_j(p + d) > t_j))``, 0 where a marginal is 0.
        """
        index, flip = self._offset_index(dy, dx)
        n = self._pairs(index, dy, dx)
        st = self._state
        prob = self._numpy(st["joint"][:, index]) / n
        rate_a, rate_b = self._numpy(st["fire_a"][index]) / n, self._numpy(st["fire_b"][index]) / n
        expected = np.outer(rate_a, rate_b)
        lift = np.divide(prob, expected, out=np.zeros_like(prob), where=expected > 0)
        return (prob.T.copy(), lift.T.copy()) if flip else (prob, lift)

    def _centred(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Co-moment (C x C) and the two sides' sums of squared deviations at stored offset ``index``."""
        st = self._state
        n = st["n"][index]
        sum_a, sum_b = st["sum_a"][index], st["sum_b"][index]
        comoment = st["prod"][:, index] - torch.outer(sum_a, sum_b) / n
        m2_a = st["sq_a"][index] - sum_a * sum_a / n
        m2_b = st["sq_b"][index] - sum_b * sum_b / n
        return self._numpy(comoment), self._numpy(m2_a).clip(min=0.0), self._numpy(m2_b).clip(min=0.0)

    def _offset_index(self, dy: int, dx: int) -> tuple[int, bool]:
        self._require_state()
        dy, dx = int(dy), int(dx)
        if (dy, dx) in self._offsets:
            return self._offsets.index((dy, dx)), False
        if (-dy, -dx) in self._offsets:
            return self._offsets.index((-dy, -dx)), True
        reach = max(abs(a) for pair in self._offsets for a in pair)
        raise StatsError(
            f"{self._label()}: offset ({dy}, {dx}) was not recorded (map {self.spatial_shape}, "
            f"|dy|, |dx| <= {reach}); record with a larger max_offset or query a smaller offset"
        )

    def _pairs(self, index: int, dy: int, dx: int) -> float:
        n = float(self._state["n"][index].item())
        if n < 2:
            raise StatsError(
                f"{self._label()}: only {int(n)} pair(s) of positions at offset ({dy}, {dx}); need at least two"
            )
        return n

    def _require_state(self, min_count: int = 2) -> dict[str, torch.Tensor]:
        count = self.count
        if self._state is None or count < min_count:
            raise StatsError(
                f"{self._label()}: {count} observation(s) recorded; need at least {min_count}, record more data"
            )
        return self._state

    def _label(self) -> str:
        return f"layer {self.name!r}" if self.name is not None else "LayerStats"

    @staticmethod
    def _numpy(t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float64).numpy().copy()

    def __repr__(self) -> str:
        shape = f", map={self.spatial_shape}" if self.spatial else ""
        return (
            f"LayerStats(name={self.name!r}, C={self.num_channels}, count={self.count}{shape}, "
            f"max_offset={self.max_offset}, positions={self.positions!r}, positions_used={self.positions_used}, "
            f"exact={self.exact}, {_describe_threshold(self.threshold)})"
        )

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics, thresholds and positions decision to ``path`` (atomically; a torch file)."""
        self._flush()
        threshold = self.threshold
        payload = {
            "format": _FORMAT,
            "version": _VERSION,
            **self._settings(),
            "threshold": threshold if isinstance(threshold, float) else torch.from_numpy(threshold),
            "budget": None if self.budget is None else asdict(self.budget),
            "num_channels": self.num_channels,
            "spatial": self.spatial,
            "spatial_shape": None if self.spatial_shape is None else list(self.spatial_shape),
            "positions_used": self.positions_used,
            "exact": self.exact,
            "offsets": [list(d) for d in self._offsets],
            "generator": self._generator.get_state(),
            "counted": self._counted,
            "state": None if self._state is None else {k: v.cpu() for k, v in self._state.items()},
        }
        atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> LayerStats:
        """Read statistics written by :meth:`save`, onto ``device``."""
        payload = _read_payload(path)
        budget = payload["budget"]
        stats = cls(
            max_offset=payload["max_offset"],
            threshold=payload["threshold"],
            positions=payload["positions"],
            seed=payload["seed"],
            name=payload["name"],
            budget=None if budget is None else PositionBudget(**budget),
            fire_quantile=payload["fire_quantile"],
        )
        stats.num_channels, stats.spatial = payload["num_channels"], payload["spatial"]
        shape = payload["spatial_shape"]
        stats.spatial_shape = None if shape is None else tuple(shape)
        stats.positions_used, stats.exact = payload["positions_used"], payload["exact"]
        stats._offsets = [tuple(d) for d in payload["offsets"]]
        stats._generator.set_state(payload["generator"])
        stats._counted = payload["counted"]
        state = payload["state"]
        stats._state = None if state is None else {k: state[k].to(device) for k in _STATE_KEYS}
        return stats


def _read_payload(path: str | os.PathLike) -> dict:
    """The dict a LayerStats file holds, or a StatsError saying why there is none."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StatsError(f"statistics file {os.fspath(path)!r} does not exist; check the path") from None
    except Exception as exc:  # a truncated or foreign file
        raise StatsError(
            f"cannot read statistics from {os.fspath(path)!r} ({type(exc).__name__}); was it written by LayerStats.save?"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise StatsError(f"{os.fspath(path)!r} is not a LayerStats file; write one with LayerStats.save")
    if payload.get("version") != _VERSION:
        raise StatsError(
            f"{os.fspath(path)!r} has LayerStats format version {payload.get('version')}, this topo reads version "
            f"{_VERSION} (per-unit thresholds and the positions decision were added); record the statistics again"
        )
    return payload


def _same_threshold(a: float | np.ndarray, b: float | np.ndarray) -> bool:
    return np.shape(a) == np.shape(b) and bool(np.array_equal(a, b))


def _describe_threshold(threshold: float | np.ndarray) -> str:
    if isinstance(threshold, float):
        return f"threshold {threshold:g}"
    return f"{len(threshold)} per-unit thresholds ({threshold.min():.3g} to {threshold.max():.3g})"


def from_activations(
    batches: torch.Tensor | np.ndarray | Iterable[torch.Tensor],
    *,
    max_offset: int = 4,
    threshold: float | Sequence[float] | np.ndarray | torch.Tensor | None = None,
    fire_quantile: float | None = DEFAULT_FIRE_QUANTILE,
    positions: int | str | None = None,
    seed: int = 0,
    name: str | None = None,
) -> LayerStats:
    """Statistics of raw activations: one tensor or an iterable of tensors, ``(N, C, H, W)`` or ``(N, C)``.

    Exact by default (``positions=None``: every position; ``"auto"`` is exact too,
    as there is no forward pass to weigh the cost against); an int uses that many
    random anchor positions per map and image, seeded by ``seed``. Firing: an
    explicit ``threshold`` (scalar or per unit) wins; otherwise, with
    ``fire_quantile=q`` (default 0.9), a first scan over ``batches`` estimates each
    unit's q-quantile (:class:`ActivationSample`), which becomes its threshold;
    ``threshold=None, fire_quantile=None`` means threshold 0. The calibration needs
    two scans: a tensor, a list or another re-iterable works, a one-shot iterator
    (a generator) raises StatsError.
    """
    if isinstance(batches, (torch.Tensor, np.ndarray)):
        batches = [batches]
    label = f"layer {name!r}" if name is not None else "from_activations"
    q = check_fire_quantile(fire_quantile) if threshold is None else None
    if q is not None:
        if isinstance(batches, Iterator):
            raise StatsError(
                f"{label}: fire_quantile={q:g} needs two scans of the activations but a one-shot iterator was given; "
                "pass a tensor or a list of tensors, or an explicit threshold="
            )
        sample = ActivationSample(seed=seed, name=name)
        for index, batch in enumerate(batches):
            sample.update(batch, batch_index=index)
        threshold = sample.quantile(q) if sample.count else 0.0
    stats = LayerStats(max_offset=max_offset, threshold=0.0 if threshold is None else threshold,
                       positions=positions, seed=seed, name=name, fire_quantile=q)
    for index, batch in enumerate(batches):
        stats.update(batch, batch_index=index)
    stats.release_buffers()
    if stats.count == 0:
        raise StatsError(f"{stats._label()}: no activations were given; pass at least one non-empty batch")
    return stats


# ---------------------------------------------------------------------- per-batch sums
# State layout, on the activations' device (D stored offsets, C units): shift (C,);
# n (D,); sum_*, sq_*, fire_* (D, C); prod (C, D, C) so that one (C x rows) @
# (rows x D*C) product adds a whole batch for every offset at once; joint (C, D, C)
# holds 0/1 counts, float32 while exact (below 2**24 rows), float64 after. The rest
# is float64. Activations are handled channels last: (..., C), so that a per-unit
# threshold of shape (C,) broadcasts.


def _full_precision(device: torch.device):
    """No autocast while accumulating (a model recorded under AMP must not turn the sums into float16)."""
    return torch.autocast(device_type=device.type, enabled=False)


def _empty_state(x: torch.Tensor, offsets: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    channels, n_off = x.shape[1], len(offsets)
    zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=x.device)
    per_unit = x.transpose(0, 1).reshape(channels, -1).to(torch.float64)
    state = {"shift": per_unit.mean(1), "n": zeros(n_off)}
    for key in ("sum_a", "sum_b", "sq_a", "sq_b", "fire_a", "fire_b"):
        state[key] = zeros(n_off, channels)
    state["prod"] = zeros(channels, n_off, channels)
    state["joint"] = torch.zeros(channels, n_off, channels, dtype=torch.float32, device=x.device)
    return state


def _addmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a.T @ b``: in place when the dtypes agree, else a product in ``a``'s dtype, then added.

    The 0/1 co-firing counts are float32 products, exact for fewer than 2**24 rows,
    so they stay exact when added into float64 counts.
    """
    if out.dtype == a.dtype:
        out.addmm_(a.T, b)
    else:
        out.add_(a.T @ b)


def _add_counts(state: dict[str, torch.Tensor], fired_a: torch.Tensor, fired_b: torch.Tensor) -> None:
    """Add co-firing counts, ``fired_a`` (rows, C) against ``fired_b`` (rows, D*C), to ``joint``."""
    _addmm_into(state["joint"].view(fired_a.shape[1], -1), fired_a, fired_b)


def _add_dense(state: dict[str, torch.Tensor], x: torch.Tensor, threshold: float | torch.Tensor) -> None:
    """Add a batch of vectors (N, C): the single offset (0, 0)."""
    shifted = x.to(torch.float64) - state["shift"]
    fired = (x > threshold).to(torch.float32)
    state["n"][0] += x.shape[0]
    for side in "ab":
        state[f"sum_{side}"][0] += shifted.sum(0)
        state[f"sq_{side}"][0] += (shifted * shifted).sum(0)
        state[f"fire_{side}"][0] += fired.sum(0, dtype=torch.float64)
    state["prod"][:, 0].addmm_(shifted.T, shifted)
    _add_counts(state, fired, fired)


def _reach(offsets: list[tuple[int, int]]) -> tuple[int, int]:
    """The largest ``dy`` and ``|dx|`` among the stored offsets (dy is never negative)."""
    return max(dy for dy, _ in offsets), max(abs(dx) for _, dx in offsets)


def _padded(shape: tuple[int, ...], offsets: list[tuple[int, int]], dtype: torch.dtype, device, scratch: _Scratch):
    """A zero-padded channels-last map for maps of ``shape`` (N, H, W, C): ``ry`` zero rows below and ``rx``
    zero columns on each side; returns (padded (N, H + ry, W + 2 rx, C), its interior, to be filled)."""
    n_img, height, width, channels = shape
    ry, rx = _reach(offsets)
    full = (n_img, height + ry, width + 2 * rx, channels)
    out, zero_padding = scratch.get("padded", math.prod(full), dtype, device, layout=full)
    out = out.view(full)
    if not zero_padding:  # the last use wrote only the interior of the same layout
        out.zero_()
    return out, out[:, :height, rx : rx + width]


def _padded_maps(state: dict[str, torch.Tensor], x: torch.Tensor, offsets: list[tuple[int, int]],
                 threshold: float | torch.Tensor, scratch: _Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's zero-padded channels-last maps (see `_padded`): shifted values (float64) and 0/1 firing
    (float32)."""
    maps = x.permute(0, 2, 3, 1)
    values, shifted = _padded(maps.shape, offsets, torch.float64, x.device, scratch)
    torch.sub(maps, state["shift"], out=shifted)
    flags, fired = _padded(maps.shape, offsets, torch.float32, x.device, scratch)
    torch.gt(maps, threshold, out=fired)
    return values, flags


def _stack_index(n_img: int, spatial_shape: tuple[int, int], offsets: list[tuple[int, int]], device):
    """Rows of the flattened padded maps: ``(anchors (rows,), shifts (D,))``.

    Anchor ``(n, y, x)`` sits at row ``anchors[r]``; its target at offset ``d`` at
    ``anchors[r] + shifts[d]``, a zero row of the padding where ``p + d`` leaves the map.
    """
    height, width = spatial_shape
    ry, rx = _reach(offsets)
    padded_w = width + 2 * rx
    n = torch.arange(n_img, device=device)[:, None, None] * (height + ry)
    y = torch.arange(height, device=device)[None, :, None]
    x = torch.arange(width, device=device)[None, None, :]
    anchors = ((n + y) * padded_w + x + rx).reshape(-1)
    shifts = torch.tensor([dy * padded_w + dx for dy, dx in offsets], device=device)
    return anchors, shifts


def _valid_masks(offsets: list[tuple[int, int]], spatial_shape: tuple[int, int], device) -> torch.Tensor:
    """float64 (2 D, H*W): rows ``d``: p + d is inside the map (anchors); rows ``D + d``: q - d is (targets)."""
    height, width = spatial_shape
    d = torch.tensor(offsets, device=device)
    dy, dx = torch.cat([d, -d]).T[:, :, None, None]
    y = torch.arange(height, device=device)[:, None] + dy
    x = torch.arange(width, device=device)[None, :] + dx
    inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
    return inside.reshape(2 * len(offsets), -1).to(torch.float64)


def _add_marginals(state, values: torch.Tensor, flags: torch.Tensor, offsets: list[tuple[int, int]],
                   spatial_shape: tuple[int, int], scratch: _Scratch) -> None:
    """Add the pair counts and both sides' sums, sums of squares and firing counts at every offset, from
    the zero-padded shifted values and 0/1 firing (N, H + ry, W + 2 rx, C): per-position sums over the
    images (contiguous reductions), then the masks of the valid pairs on the map's own positions."""
    n_img, channels = values.shape[0], values.shape[3]
    (height, width), rx = spatial_shape, _reach(offsets)[1]
    sums = [*_column_sums(values.view(n_img, -1), scratch), flags.view(n_img, -1).sum(0, dtype=torch.float64)]
    per_position = torch.stack([t.view(values.shape[1:]) for t in sums], dim=2)  # (H + ry, W + 2 rx, 3, C)
    inside = per_position[:height, rx : rx + width].reshape(height * width, 3 * channels)
    masks = _valid_masks(offsets, spatial_shape, values.device)
    sums = (masks @ inside).view(2, len(offsets), 3, channels)
    state["n"] += n_img * masks[: len(offsets)].sum(1)
    for side, part in zip("ab", sums):
        state[f"sum_{side}"] += part[:, 0]
        state[f"sq_{side}"] += part[:, 1]
        state[f"fire_{side}"] += part[:, 2]


def _column_sums(x: torch.Tensor, scratch: _Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and sums of squares of the columns of ``x`` (rows, cols), float64: two plain passes (one
    `torch.var_mean` pass cost as much as the batch's product), on the CPU the squares made a few rows at a
    time in a reused buffer that stays in cache (`_SQUARE_ELEMENTS`); on an accelerator in one kernel."""
    if not x.is_cpu:
        return x.sum(0, dtype=torch.float64), (x * x).sum(0, dtype=torch.float64)
    rows, cols = x.shape
    step = max(1, _SQUARE_ELEMENTS // cols)
    buffer = scratch.get("squares", min(rows, step) * cols, x.dtype, x.device)[0]
    squares = torch.zeros(cols, dtype=torch.float64, device=x.device)
    for r0 in range(0, rows, step):
        part = x[r0 : r0 + step]
        squares += torch.mul(part, part, out=buffer[: part.numel()].view_as(part)).sum(0)
    return x.sum(0, dtype=torch.float64), squares


class _Scratch:
    """Reusable scratch buffers, by name, dtype and device, grown on demand (fresh memory costs a page
    fault per page on the CPU, which for the exact path's stack is a large part of an update)."""

    def __init__(self) -> None:
        self._kept: dict[tuple[str, torch.dtype, torch.device], tuple[torch.Tensor, object]] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device, layout=None):
        """``(buffer, same)``: a flat tensor of at least ``numel`` elements, valid until the next call for its
        key, and whether its last use had the same ``layout`` (so what that use left in it is still there)."""
        key = (name, dtype, torch.device(device))
        kept, last = self._kept.get(key, (None, None))
        same = kept is not None and kept.numel() >= numel and layout is not None and last == layout
        if kept is None or kept.numel() < numel:
            kept = torch.empty(numel, dtype=dtype, device=device)
        self._kept[key] = (kept, layout)
        return kept[:numel], same

    def clear(self) -> None:
        self._kept.clear()


def _blocks(rows: int, n_off: int, channels: int) -> tuple[int, int]:
    """(rows, offsets) per block of the shifted stack, at most about ``_STACK_ELEMENTS`` elements: every
    offset in each block while that leaves ``_MIN_BLOCK_ROWS`` rows (or all of them), else groups of offsets."""
    full = _STACK_ELEMENTS // (n_off * channels)
    if full >= min(rows, _MIN_BLOCK_ROWS):
        return min(rows, full), n_off
    block_rows = min(rows, max(1, _STACK_ELEMENTS // channels))
    return block_rows, max(1, min(n_off, _STACK_ELEMENTS // (block_rows * channels)))


def _add_stacked_products(prod: torch.Tensor, joint: torch.Tensor, values: torch.Tensor, fired: torch.Tensor,
                          anchors: torch.Tensor, shifts: torch.Tensor, scratch: _Scratch) -> None:
    """``prod``, ``joint`` (C, D*C) += anchor rows against their targets at every offset, block by block.

    ``values`` and ``fired`` are the zero-padded maps flattened to (rows, C); a
    block's targets are gathered from them into one buffer (a shifted stack, rows x
    (offsets x C)), so each block is one product; padding rows are 0 and add nothing.
    Offset (0, 0) comes first, so the anchors are the first C columns of the first block.
    """
    channels, n_off = values.shape[1], len(shifts)
    block_rows, block_off = _blocks(len(anchors), n_off, channels)
    buffers = [scratch.get("stack", block_rows * block_off * channels, t.dtype, t.device)[0] for t in (values, fired)]
    for r0 in range(0, len(anchors), block_rows):
        rows = anchors[r0 : r0 + block_rows]
        for d0 in range(0, n_off, block_off):
            index = (rows[:, None] + shifts[None, d0 : d0 + block_off]).reshape(-1)
            b, fb = (torch.index_select(src, 0, index, out=buf[: len(index) * channels].view(-1, channels))
                     .view(len(rows), -1) for src, buf in zip((values, fired), buffers))
            if d0 == 0:
                a, fa = b[:, :channels], fb[:, :channels]
                if block_off < n_off:  # the buffers are about to be overwritten
                    a, fa = a.clone(), fa.clone()
            cols = slice(d0 * channels, d0 * channels + b.shape[1])
            _addmm_into(prod[:, cols], a, b)
            _addmm_into(joint[:, cols], fa, fb)


def _add_exact(state: dict[str, torch.Tensor], x: torch.Tensor, offsets: list[tuple[int, int]],
               threshold: float | torch.Tensor, scratch: _Scratch) -> None:
    """Every pair of positions inside the map: offset by offset on crops of the map when most pairs of a
    stacked product would leave it (`_add_cropped_products`), else all offsets at once (`_add_stacked_products`).
    The crossover was measured on the CPU; on an accelerator, where 82 small products cost more launches than
    one large one, the stacked product stays until measured there."""
    n_img, channels, height, width = x.shape
    values, flags = _padded_maps(state, x, offsets, threshold, scratch)
    _add_marginals(state, values, flags, offsets, (height, width), scratch)
    if x.is_cpu and inside_share(offsets, (height, width)) <= _CROPS_BELOW:
        rx = _reach(offsets)[1]
        interior = (slice(None), slice(0, height), slice(rx, rx + width))
        _add_cropped_products(state["prod"], state["joint"], values[interior], flags[interior], offsets,
                              scratch)
        return
    anchors, shifts = _stack_index(n_img, (height, width), offsets, x.device)
    _add_stacked_products(state["prod"].view(channels, -1), state["joint"].view(channels, -1),
                          values.view(-1, channels), flags.view(-1, channels), anchors, shifts, scratch)


def inside_share(offsets: list[tuple[int, int]], spatial_shape: tuple[int, int]) -> float:
    """The share of (position, offset) pairs of a map whose target ``p + d`` is inside it."""
    height, width = spatial_shape
    inside = sum((height - abs(dy)) * (width - abs(dx)) for dy, dx in offsets)
    return inside / (len(offsets) * height * width)


def _add_cropped_products(prod: torch.Tensor, joint: torch.Tensor, values: torch.Tensor, flags: torch.Tensor,
                          offsets: list[tuple[int, int]], scratch: _Scratch) -> None:
    """``prod``, ``joint`` (C, D, C) += the products of every offset ``d``, one at a time, over the positions
    whose target stays in the map: the map cropped to the anchors against the map cropped to their targets.

    ``values`` (float64) and ``flags`` (float32) are the maps, channels-last (N, H, W, C). No pair that
    leaves the map is multiplied, where the stacked product multiplies their padding zeros. The crops are
    copied into reused buffers (see `_Scratch`).
    """
    height, width, channels = values.shape[1:]
    for k, (dy, dx) in enumerate(offsets):
        x0, x1 = max(0, -dx), width - max(0, dx)
        anchors = (slice(None), slice(0, height - dy), slice(x0, x1))
        targets = (slice(None), slice(dy, height), slice(x0 + dx, x1 + dx))
        for out, maps in ((prod, values), (joint, flags)):
            a, b = (_copied(maps[crop], name, scratch) for crop, name in ((anchors, "anchors"), (targets, "targets")))
            _addmm_into(out[:, k], a, b)


def _copied(crop: torch.Tensor, name: str, scratch: _Scratch) -> torch.Tensor:
    """``crop`` (N, h, w, C) copied into the reused buffer ``name`` as rows (N h w, C)."""
    buffer = scratch.get(name, crop.numel(), crop.dtype, crop.device)[0]
    return buffer.view(crop.shape).copy_(crop).view(-1, crop.shape[-1])


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


def _gather_sampled(state: dict[str, torch.Tensor], x: torch.Tensor, offsets: list[tuple[int, int]],
                    sampled: tuple[torch.Tensor, ...], threshold: float | torch.Tensor, scratch: _Scratch):
    """Yield ``(stack, fired, valid)`` for the anchors of `sample_anchors` (``sampled``), in chunks of rows:
    the exact path's shifted stacks (rows, D*C; 0 where the target leaves the map) on those rows only.

    Few anchors (K D < H W) are gathered straight from ``x``; more from the zero-padded maps, as the exact
    path does (padding a batch costs about what gathering H W rows does).
    """
    n_img, channels, height, width = x.shape
    anchors, targets, valid = sampled
    if anchors.shape[1] * len(offsets) < height * width:
        yield _gather_from_maps(state, x, targets, valid, threshold)
        return
    values, flags = (t.view(-1, channels) for t in _padded_maps(state, x, offsets, threshold, scratch))
    ry, rx = _reach(offsets)
    image = torch.arange(n_img)[:, None] * (height + ry)
    rows = ((image + anchors // width) * (width + 2 * rx) + anchors % width + rx).reshape(-1).to(x.device)
    shifts = _stack_index(1, (height, width), offsets, x.device)[1]
    valid = valid.reshape(len(rows), -1).to(x.device, torch.float64)
    chunk = max(_MIN_ROWS, _STACK_ELEMENTS // (len(offsets) * channels))
    for r0 in range(0, len(rows), chunk):
        index = (rows[r0 : r0 + chunk, None] + shifts).reshape(-1)
        size = min(chunk, len(rows) - r0)
        # a chunk of _MIN_ROWS rows or more is added at once (LayerStats.update), so it may use reused buffers
        out = [scratch.get("sampled", len(index) * channels, t.dtype, t.device)[0].view(-1, channels)
               if size >= _MIN_ROWS else None for t in (values, flags)]
        stack, fired = (torch.index_select(t, 0, index, out=o) for t, o in zip((values, flags), out))
        yield stack.view(size, -1), fired.view(size, -1), valid[r0 : r0 + chunk]


def _gather_from_maps(state: dict[str, torch.Tensor], x: torch.Tensor, targets: torch.Tensor,
                      valid: torch.Tensor, threshold: float | torch.Tensor):
    """``(stack, fired, valid)`` of `_gather_sampled`, gathered from the maps ``x`` themselves (few anchors):
    ``targets`` (N, K, D) are clamped into the map, and ``valid`` says where they did not need to be."""
    n_img, k, n_off = targets.shape
    image = torch.arange(n_img, device=x.device)[:, None]
    raw = x.flatten(2)[image, :, targets.to(x.device).reshape(n_img, -1)]  # (N, K D, C)
    inside = valid.to(x.device).reshape(n_img, -1, 1)
    stack = torch.sub(raw, state["shift"]).mul_(inside)
    fired = torch.gt(raw, threshold).logical_and_(inside).to(torch.float32)
    return stack.view(n_img * k, -1), fired.view(n_img * k, -1), inside.view(n_img * k, n_off).to(torch.float64)


def _add_gathered(state: dict[str, torch.Tensor], stack: torch.Tensor, fired: torch.Tensor, valid: torch.Tensor,
                  scratch: _Scratch):
    """Add anchor rows and their targets at every offset: ``stack`` (rows, D*C) float64 and ``fired`` float32
    (offset (0, 0) first: the anchors; 0 where a target leaves the map) and ``valid`` (rows, D)."""
    n_off = valid.shape[1]
    channels = stack.shape[1] // n_off
    a, fa = stack[:, :channels], fired[:, :channels]
    state["n"] += valid.sum(0)
    anchor_sums = (valid.T @ torch.cat([a, a * a, fa.to(torch.float64)], dim=1)).view(n_off, 3, channels)
    state["sum_a"] += anchor_sums[:, 0]
    state["sq_a"] += anchor_sums[:, 1]
    state["fire_a"] += anchor_sums[:, 2]
    sums, squares = _column_sums(stack, scratch)
    state["sum_b"] += sums.view(n_off, channels)
    state["sq_b"] += squares.view(n_off, channels)
    state["fire_b"] += fired.sum(0).view(n_off, channels)  # float32 sums of 0/1, exact below 2**24 rows
    state["prod"].view(channels, -1).addmm_(a.T, stack)
    _add_counts(state, fa, fired)


def _move_shift_(state: dict[str, torch.Tensor], shift: torch.Tensor) -> None:
    """Re-express the sums of ``state`` about a new ``shift``, in place."""
    delta = state["shift"] - shift  # x - shift = (x - old shift) + delta
    n = state["n"][:, None]
    sum_a, sum_b = state["sum_a"].clone(), state["sum_b"].clone()
    # sum (a + delta)(b + delta)^T = prod + sum_a delta^T + delta (sum_b + n delta)^T
    state["prod"] += sum_a.T[:, :, None] * delta
    state["prod"] += delta[:, None, None] * (sum_b + n * delta)[None]
    state["sq_a"] += 2 * delta * sum_a + n * delta * delta
    state["sq_b"] += 2 * delta * sum_b + n * delta * delta
    state["sum_a"] += n * delta
    state["sum_b"] += n * delta
    state["shift"] = shift.clone()


def _add_state_(state: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    """Add the sums of ``other`` into ``state`` (moved onto ``state``'s shift first)."""
    other = {k: v.clone() for k, v in other.items()}
    _move_shift_(other, state["shift"])
    for key in _STATE_KEYS[1:]:
        state[key] += other[key]
