"""`LayerStats`: streaming first and second moments, spatial cross-covariances and co-activation of one
layer, accumulated in float64, merged across processes, saved and read back.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict

import numpy as np
import torch

from topo.common.distributed import every_rank, is_distributed
from topo.common.errors import StatsError
from topo.common.reading import SHAPE_ERRORS, PathLike, error_reason, existing_file
from topo.common.writing import atomic_torch_save
from topo.stats.kernels import (
    MIN_ROWS,
    STATE_KEYS,
    Scratch,
    add_dense,
    add_exact,
    add_gathered,
    add_state_,
    empty_state,
    full_precision,
    gather_sampled,
    move_shift_,
)
from topo.stats.positions import (
    DEFAULT_POSITIONS,
    PositionBudget,
    PositionChoice,
    choose_positions,
    expected_pairs,
    half_offsets,
    parse_positions,
    planned_offsets,
    sample_anchors,
)
from topo.stats.sample import (
    DEFAULT_FIRE_QUANTILE,
    ActivationSample,
    check_fire_quantile,
    checked_batch,
    parse_threshold,
    row_count,
    where_text,
)

log = logging.getLogger(__name__)

# Sums of 0/1 products are exact in float32 up to 2**24.
FLOAT32_EXACT = 2**24



def read_stats(path: PathLike, *, device: str | torch.device = "cpu") -> LayerStats:
    """Statistics written by ``LayerStats.save``; a :class:`StatsError` naming the file otherwise."""
    fix = "restore it from a copy, or record the statistics again"
    path = existing_file(path, "statistics file", fix, StatsError)
    try:
        return LayerStats.load(path, device=device)
    except StatsError:  # already one line naming the file (and a ValueError: not to be caught below)
        raise
    except SHAPE_ERRORS as e:
        raise StatsError(f"statistics file {path} lacks part of what LayerStats.save writes "
                         f"({type(e).__name__}: {error_reason(e)}); {fix}") from None


#: A unit whose variance is at or below this is dead: correlation 0 with everything.
DEAD_EPS = 1e-12


_FORMAT = "topo.LayerStats"


_VERSION = 2


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
        self.threshold = parse_threshold(threshold)
        self.positions = parse_positions(positions)
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
        # Gathered anchor rows and their targets not yet added (few, bounded: see MIN_ROWS).
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_rows = 0
        # Rows added to the co-activation counts so far; they are float32 (exact) below 2**24.
        self._counted = 0
        self._generator = torch.Generator().manual_seed(seed)
        # Buffers of the shifted stacks, reused from batch to batch (at most 384 MiB; see release_buffers).
        self._scratch = Scratch()

    # ------------------------------------------------------------------ streaming
    def update(self, activations: torch.Tensor, *, batch_index: int | None = None) -> LayerStats:
        """Add one batch of activations, ``(N, C, H, W)`` or ``(N, C)``; returns ``self``."""
        x = checked_batch(activations, self._label(), batch_index)
        if x.shape[0] == 0:
            return self
        self._check_layout(x, where_text(batch_index))
        if self._state is None:
            self._state = empty_state(x, self._offsets)
        threshold = self._threshold_on(x.device)
        with full_precision(x.device):
            if not self.exact:
                self._update_sampled(x, threshold)
                return self
            self._flush()
            self._count_rows(row_count(x))
            if x.dim() == 2:
                add_dense(self._state, x, threshold)
            else:
                add_exact(self._state, x, self._offsets, threshold, self._scratch)
        return self

    def _update_sampled(self, x: torch.Tensor, threshold: float | torch.Tensor) -> None:
        """Gather the pairs of ``positions_used`` random anchors per image; add them once there are enough rows."""
        sampled = sample_anchors(x.shape[0], self.spatial_shape, self._offsets, self.positions_used, self._generator)
        for part in gather_sampled(self._state, x, self._offsets, sampled, threshold, self._scratch):
            if part[0].shape[0] >= MIN_ROWS:
                self._flush()  # a large part is added on its own (it may sit in reused buffers)
            self._pending.append(part)
            self._pending_rows += part[0].shape[0]
            if self._pending_rows >= MIN_ROWS:
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
            choice = choose_positions(self.num_channels, shape, self.planned_offsets(), self.budget)
        elif self.positions is None or self.positions >= shape[0] * shape[1]:
            choice = PositionChoice(shape[0] * shape[1], True, "every position (as requested)")
        else:
            choice = PositionChoice(self.positions, False,
                                    f"{self.positions} random positions per image (as requested)")
        self.positions_used, self.exact = choice.positions, choice.exact
        log.info("%s: %s statistics, %s", self._label(), "exact" if choice.exact else "sampled", choice.reason)
        short = self.pairs_short
        if short is not None:
            log.warning("%s: the statistics' cost bound (%s) leaves %s pairs per offset of the %s the Hebbian test "
                        "is planned for; record more images, or raise the bound (cost_multiple, --stats-cost)",
                        self._label(), self.budget.describe(), f"{short:,.0f}", f"{self.budget.min_pairs:,}")

    def planned_offsets(self) -> list[tuple[int, int]]:
        """The offsets ``positions="auto"`` plans for: the stored ones, or as far as ``budget.reach`` where that
        is farther (layers recorded together at different reaches share anchors)."""
        if self.budget is None or self.spatial_shape is None:
            return list(self._offsets)
        return planned_offsets(self.max_offset, self.budget.reach, self.spatial_shape)

    @property
    def pairs_short(self) -> float | None:
        """Pairs per offset expected at the farthest one where the statistics' cost bound (`PositionBudget.scale`)
        left fewer than the rule's target (``budget.min_pairs``); None where it did not."""
        budget = self.budget
        if (self.positions != "auto" or budget is None or budget.scale >= 1 or self.exact is not False
                or self.spatial_shape is None):
            return None
        if not choose_positions(self.num_channels, self.spatial_shape, self.planned_offsets(), budget).short:
            return None  # the bound did not cut below the target at the offsets planned
        pairs = expected_pairs(budget.num_images, self.positions_used, self.spatial_shape, self._offsets)
        return pairs if pairs < budget.min_pairs else None

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
        with full_precision(stack.device):
            add_gathered(self._state, stack, fired, valid, self._scratch)

    def _count_rows(self, rows: int) -> None:
        """Keep the co-activation counts exact: float64 once they could reach 2**24."""
        self._counted += rows
        if self._counted >= FLOAT32_EXACT and self._state["joint"].dtype != torch.float64:
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
        self._check_mergeable(other)
        other._flush()
        merged = self._copy()
        device = merged._state["n"].device
        merged._count_rows(other._counted)
        add_state_(merged._state, {k: v.to(device) for k, v in other._state.items()})
        if merged.positions_used != other.positions_used:
            merged.positions_used = None
        merged.exact = bool(self.exact and other.exact)
        return merged

    def _check_mergeable(self, other: LayerStats) -> None:
        """A one-line StatsError where ``other`` (with statistics) was recorded with another layout or other
        firing thresholds than these: what differs, and how to record them alike."""
        if (self.num_channels, self.spatial_shape, self._offsets) != (
            other.num_channels,
            other.spatial_shape,
            other._offsets,
        ):
            raise StatsError(
                f"{self._label()}: cannot merge statistics of C={self.num_channels}, map {self.spatial_shape}, "
                f"offsets <= {self.max_offset} with C={other.num_channels}, map {other.spatial_shape}, "
                f"offsets <= {other.max_offset}; record both with the same layer and settings"
            )
        if not np.array_equal(self.thresholds, other.thresholds):
            raise StatsError(
                f"{self._label()}: cannot merge statistics recorded with other firing thresholds "
                f"({_threshold_difference(self.threshold, other.threshold, self.num_channels)}); give every shard "
                "the same thresholds: calibrate them once (e.g. one shard's .thresholds) and pass them as threshold= "
                "to each shard's LayerStats or from_activations (topo.record shares them itself across the ranks of "
                "one torch.distributed group)"
            )

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
        move_shift_(st, shift)
        for key in STATE_KEYS[1:]:
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
        stats._state = None if state is None else {k: state[k].to(device) for k in STATE_KEYS}
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


def _threshold_difference(a: float | np.ndarray, b: float | np.ndarray, channels: int) -> str:
    """What differs between two firing thresholds of ``channels`` units: both values, or (per unit) how many units
    differ, which (the first five) and by how much at most."""
    if isinstance(a, float) and isinstance(b, float):
        return f"threshold {a:g} and threshold {b:g}"
    x, y = (np.broadcast_to(np.asarray(t, dtype=np.float64), (channels,)) for t in (a, b))
    differ = np.flatnonzero(x != y)
    units = ", ".join(map(str, differ[:5])) + (", ..." if len(differ) > 5 else "")
    return f"per-unit thresholds: {len(differ)} of {channels} units differ ({units}), by up to {np.abs(x - y).max():.3g}"


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
