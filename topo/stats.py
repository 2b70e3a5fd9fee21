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
  units, is above ``threshold`` (the co-activation counts).

Shifting by a value close to the mean makes the final ``S - sum_a sum_b^T / n``
subtraction benign (the "shifted data" algorithm), so a large common offset (mean
1e4, standard deviation 1) costs no precision, and each batch is added with one
matrix product written straight into the running sums. Merging two statistics
moves one onto the other's shift first. Memory is O(C^2 x offsets), whatever the
number of images: no activation is kept.

To bound the cost, ``positions`` random anchor positions per map and image are used
(seeded); ``positions=None`` (or ``"all"``) uses every position and is exact. See
docs/statistics.md for the estimators, the default and its standard error.
"""
from __future__ import annotations

import math
import os
from typing import Iterable

import numpy as np
import torch

from topo.errors import StatsError
from topo.io import atomic_torch_save

#: A unit whose variance is at or below this is dead: correlation 0 with everything.
DEAD_EPS = 1e-12

#: Random anchor positions per map and image used by default (``None`` = all positions).
DEFAULT_POSITIONS = 1

_FORMAT = "topo.LayerStats"
_VERSION = 1
# Sums of 0/1 products are exact in float32 up to 2**24.
_FLOAT32_EXACT = 2**24
# Subsampled batches are gathered until this many anchor rows, then added in one product.
_MIN_ROWS = 256
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


def _parse_positions(positions: int | str | None) -> int | None:
    if positions is None or positions == "all":
        return None
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
        raise StatsError(f"positions={positions!r} is invalid; pass a positive int, or None / 'all' for every position")
    return positions


class LayerStats:
    """First and second moments of one layer's units, streamed batch by batch.

    Build one with :func:`from_activations` or :func:`topo.record`, or create it
    empty and call :meth:`update` with each batch. Query methods return float64
    NumPy arrays; ``[i, j]`` of a C x C result concerns unit ``i`` at position ``p``
    and unit ``j`` at position ``p + (dy, dx)``.
    """

    def __init__(
        self,
        *,
        max_offset: int = 4,
        threshold: float = 0.0,
        positions: int | str | None = DEFAULT_POSITIONS,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        if isinstance(max_offset, bool) or not isinstance(max_offset, int) or max_offset < 0:
            raise StatsError(f"max_offset={max_offset!r} is invalid; pass an int >= 0")
        self.name = name
        self.max_offset = max_offset
        self.threshold = float(threshold)
        self.positions = _parse_positions(positions)
        self.seed = seed
        self.num_channels: int | None = None
        self.spatial: bool | None = None
        self.spatial_shape: tuple[int, int] | None = None
        self._offsets: list[tuple[int, int]] = []
        self._state: dict[str, torch.Tensor] | None = None
        # Gathered anchor/target rows not yet added (few, bounded: see _MIN_ROWS).
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_rows = 0
        # Rows added to the co-activation counts so far; they are float32 (exact) below 2**24.
        self._counted = 0
        self._generator = torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------ streaming
    def update(self, activations: torch.Tensor, *, batch_index: int | None = None) -> "LayerStats":
        """Add one batch of activations, ``(N, C, H, W)`` or ``(N, C)``; returns ``self``."""
        x = activations.detach() if isinstance(activations, torch.Tensor) else torch.as_tensor(activations)
        where = f"batch {batch_index}" if batch_index is not None else "a batch"
        if x.dim() not in (2, 4):
            raise StatsError(
                f"{self._label()}: activations of shape {tuple(x.shape)} in {where}; expected (N, C, H, W) or (N, C)"
            )
        if not x.is_floating_point():
            x = x.float()
        if not _all_finite(x):
            raise StatsError(
                f"{self._label()}: activation contains NaN or Inf in {where}; check the model's weights and inputs"
            )
        if x.shape[0] == 0:
            return self
        self._check_layout(x, where)
        if self._state is None:
            self._state = _empty_state(x, self._offsets)
        exact = x.dim() == 2 or self.positions is None or self.positions >= x.shape[2] * x.shape[3]
        if not exact:
            gathered = _gather_sampled(x, self._offsets, self.positions, self._generator)
            self._pending.append(gathered)
            self._pending_rows += gathered[0].shape[0]
            if self._pending_rows >= _MIN_ROWS:
                self._flush()
            return self
        self._flush()
        self._count_rows(x.shape[0] * math.prod(x.shape[2:]))
        with _full_precision(x.device):
            if x.dim() == 2:
                _add_dense(self._state, x, self.threshold)
            else:
                _add_exact(self._state, x, self._offsets, self.threshold)
        return self

    def _check_layout(self, x: torch.Tensor, where: str) -> None:
        channels = x.shape[1]
        shape = tuple(x.shape[2:]) if x.dim() == 4 else None
        if self.num_channels is None:
            self.num_channels, self.spatial, self.spatial_shape = channels, x.dim() == 4, shape
            self._offsets = half_offsets(self.max_offset, shape)
            return
        if channels != self.num_channels or shape != self.spatial_shape:
            seen = (self.num_channels,) + (self.spatial_shape or ())
            raise StatsError(
                f"{self._label()}: {where} has (C, H, W) = {tuple(x.shape[1:])} but earlier batches had {seen}; "
                "record maps of one size per LayerStats"
            )

    def _flush(self) -> None:
        """Add the gathered rows still pending (one matrix product for several small batches)."""
        if not self._pending:
            return
        anchors, targets, valid = (torch.cat(parts) for parts in zip(*self._pending))
        self._pending, self._pending_rows = [], 0
        self._count_rows(anchors.shape[0])
        with _full_precision(anchors.device):
            _add_gathered(self._state, anchors, targets, valid, self.threshold)

    def _count_rows(self, rows: int) -> None:
        """Keep the co-activation counts exact: float64 once they could reach 2**24."""
        self._counted += rows
        if self._counted >= _FLOAT32_EXACT and self._state["joint"].dtype != torch.float64:
            self._state["joint"] = self._state["joint"].double()

    # ------------------------------------------------------------------ combining
    def merge(self, other: "LayerStats") -> "LayerStats":
        """Statistics of both sets of observations, as if seen in one pass (a new object)."""
        if not isinstance(other, LayerStats):
            raise TypeError(f"cannot merge LayerStats with {type(other).__name__}")
        if self._state is None or other._state is None:
            source = other if self._state is None else self
            return source._copy()
        if (self.num_channels, self.spatial_shape, self._offsets) != (
            other.num_channels,
            other.spatial_shape,
            other._offsets,
        ) or self.threshold != other.threshold:
            raise StatsError(
                f"{self._label()}: cannot merge statistics of C={self.num_channels}, map {self.spatial_shape}, "
                f"offsets <= {self.max_offset}, threshold {self.threshold} with C={other.num_channels}, "
                f"map {other.spatial_shape}, offsets <= {other.max_offset}, threshold {other.threshold}; "
                "record both with the same layer and settings"
            )
        other._flush()
        merged = self._copy()
        device = merged._state["n"].device
        merged._count_rows(other._counted)
        _add_state_(merged._state, {k: v.to(device) for k, v in other._state.items()})
        return merged

    def all_reduce(self) -> "LayerStats":
        """Sum the statistics over the ranks of ``torch.distributed``, in place; returns ``self``.

        Every rank must have recorded at least one batch of the same layer. Without an
        initialised process group (or with one process) this does nothing.
        """
        import torch.distributed as dist

        from topo.distributed import is_distributed

        if not is_distributed():
            return self
        st = self._require_state(min_count=1)
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

    def _copy(self) -> "LayerStats":
        self._flush()
        new = LayerStats(
            max_offset=self.max_offset,
            threshold=self.threshold,
            positions=self.positions,
            seed=self.seed,
            name=self.name,
        )
        new.num_channels, new.spatial, new.spatial_shape = self.num_channels, self.spatial, self.spatial_shape
        new._offsets = list(self._offsets)
        new._state = None if self._state is None else {k: v.clone() for k, v in self._state.items()}
        new._counted = self._counted
        new._generator.set_state(self._generator.get_state())
        return new

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
        """Fraction of observations in which each unit is above ``threshold``, shape (C,)."""
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
        """``(prob, lift)``, C x C: how often unit i at p and unit j at p + (dy, dx) are both above ``threshold``.

        ``prob[i, j] = P(x_i(p) > t and x_j(p + d) > t)`` over the pairs inside the map;
        ``lift = prob / (P(x_i(p) > t) P(x_j(p + d) > t))``, 0 where a marginal is 0.
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
            f"max_offset={self.max_offset}, positions={self.positions}, threshold={self.threshold})"
        )

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics to ``path`` (atomically; a torch file)."""
        self._flush()
        payload = {
            "format": _FORMAT,
            "version": _VERSION,
            "name": self.name,
            "max_offset": self.max_offset,
            "threshold": self.threshold,
            "positions": self.positions,
            "seed": self.seed,
            "num_channels": self.num_channels,
            "spatial": self.spatial,
            "spatial_shape": None if self.spatial_shape is None else list(self.spatial_shape),
            "offsets": [list(d) for d in self._offsets],
            "generator": self._generator.get_state(),
            "counted": self._counted,
            "state": None if self._state is None else {k: v.cpu() for k, v in self._state.items()},
        }
        atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> "LayerStats":
        """Read statistics written by :meth:`save`, onto ``device``."""
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
                f"{os.fspath(path)!r} has LayerStats format version {payload.get('version')}, expected {_VERSION}; record again"
            )
        stats = cls(
            max_offset=payload["max_offset"],
            threshold=payload["threshold"],
            positions=payload["positions"],
            seed=payload["seed"],
            name=payload["name"],
        )
        stats.num_channels, stats.spatial = payload["num_channels"], payload["spatial"]
        shape = payload["spatial_shape"]
        stats.spatial_shape = None if shape is None else tuple(shape)
        stats._offsets = [tuple(d) for d in payload["offsets"]]
        stats._generator.set_state(payload["generator"])
        stats._counted = payload["counted"]
        state = payload["state"]
        stats._state = None if state is None else {k: state[k].to(device) for k in _STATE_KEYS}
        return stats


def from_activations(
    batches: torch.Tensor | Iterable[torch.Tensor],
    *,
    max_offset: int = 4,
    threshold: float = 0.0,
    positions: int | str | None = DEFAULT_POSITIONS,
    seed: int = 0,
    name: str | None = None,
) -> LayerStats:
    """Statistics of raw activations: one tensor or an iterable of tensors, ``(N, C, H, W)`` or ``(N, C)``.

    ``positions`` random anchor positions per map and image are used (seeded by
    ``seed``); pass ``positions=None`` for the exact statistics over every position.
    """
    stats = LayerStats(max_offset=max_offset, threshold=threshold, positions=positions, seed=seed, name=name)
    if isinstance(batches, (torch.Tensor, np.ndarray)):
        batches = [batches]
    for index, batch in enumerate(batches):
        stats.update(batch, batch_index=index)
    if stats.count == 0:
        raise StatsError(f"{stats._label()}: no activations were given; pass at least one non-empty batch")
    return stats


# ---------------------------------------------------------------------- per-batch sums
# State layout, on the activations' device (D stored offsets, C units): shift (C,);
# n (D,); sum_*, sq_*, fire_* (D, C); prod (C, D, C) so that one (C x rows) @
# (rows x D*C) product adds a whole batch for every offset at once; joint (C, D, C)
# holds 0/1 counts, float32 while exact (below 2**24 rows), float64 after. The rest
# is float64.


def _full_precision(device: torch.device):
    """No autocast while accumulating (a model recorded under AMP must not turn the sums into float16)."""
    return torch.autocast(device_type=device.type, enabled=False)


def _all_finite(x: torch.Tensor) -> bool:
    """True when no element is NaN or +-Inf (one pass: min and max propagate NaN)."""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _empty_state(x: torch.Tensor, offsets: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    channels, n_off = x.shape[1], len(offsets)
    zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=x.device)  # noqa: E731
    per_unit = x.transpose(0, 1).reshape(channels, -1).to(torch.float64)
    state = {"shift": per_unit.mean(1), "n": zeros(n_off)}
    for key in ("sum_a", "sum_b", "sq_a", "sq_b", "fire_a", "fire_b"):
        state[key] = zeros(n_off, channels)
    state["prod"] = zeros(channels, n_off, channels)
    state["joint"] = torch.zeros(channels, n_off, channels, dtype=torch.float32, device=x.device)
    return state


def _add_pairs_(
    state: dict[str, torch.Tensor],
    index: int,
    a: torch.Tensor,
    b: torch.Tensor,
    fired_a: torch.Tensor,
    fired_b: torch.Tensor,
) -> None:
    """Add pairs at stored offset ``index``: shifted activations ``a``, ``b`` (rows, C) and their 0/1 firing."""
    state["n"][index] += a.shape[0]
    state["sum_a"][index] += a.sum(0)
    state["sum_b"][index] += b.sum(0)
    state["sq_a"][index] += (a * a).sum(0)
    state["sq_b"][index] += (b * b).sum(0)
    state["fire_a"][index] += fired_a.sum(0, dtype=torch.float64)
    state["fire_b"][index] += fired_b.sum(0, dtype=torch.float64)
    state["prod"][:, index].addmm_(a.T, b)
    state["joint"][:, index].addmm_(fired_a.T, fired_b)


def _add_dense(state: dict[str, torch.Tensor], x: torch.Tensor, threshold: float) -> None:
    shifted = x.to(torch.float64) - state["shift"]
    fired = (x > threshold).to(state["joint"].dtype)
    _add_pairs_(state, 0, shifted, shifted, fired, fired)


def _add_exact(state: dict[str, torch.Tensor], x: torch.Tensor, offsets: list[tuple[int, int]], threshold: float) -> None:
    """Every pair of positions inside the map, one offset at a time (slices of the map)."""
    channels, height, width = x.shape[1:]
    maps = x.permute(0, 2, 3, 1)  # channels last: a slice reshapes to (positions, C)
    shifted = maps.to(torch.float64) - state["shift"]
    fired = (maps > threshold).to(state["joint"].dtype)
    for index, (dy, dx) in enumerate(offsets):
        at = (slice(None), slice(max(0, -dy), height - max(0, dy)), slice(max(0, -dx), width - max(0, dx)))
        to = (slice(None), slice(max(0, dy), height + min(0, dy)), slice(max(0, dx), width + min(0, dx)))
        a, fa = shifted[at].reshape(-1, channels), fired[at].reshape(-1, channels)
        if (dy, dx) == (0, 0):
            b, fb = a, fa
        else:
            b, fb = shifted[to].reshape(-1, channels), fired[to].reshape(-1, channels)
        _add_pairs_(state, index, a, b, fa, fb)


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


def _gather_sampled(
    x: torch.Tensor, offsets: list[tuple[int, int]], positions: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activations at ``positions`` random anchors per image, (rows, C), and at every offset from them, (rows, D, C)."""
    n_img, channels, height, width = x.shape
    n_off, device = len(offsets), x.device
    anchors, targets, valid = sample_anchors(n_img, (height, width), offsets, positions, generator)
    anchors, targets, valid = anchors.to(device), targets.to(device), valid.to(device)
    rows = n_img * positions
    flat = x.flatten(2)  # (N, C, HW); indexing below gives (N, positions, C)
    image = torch.arange(n_img, device=device)[:, None]
    a_raw = flat[image, :, anchors].reshape(rows, channels)
    b_raw = flat[image, :, targets.reshape(n_img, -1)].reshape(rows, n_off, channels)
    return a_raw, b_raw, valid.reshape(rows, n_off)


def _add_gathered(
    state: dict[str, torch.Tensor], a_raw: torch.Tensor, b_raw: torch.Tensor, valid: torch.Tensor, threshold: float
) -> None:
    """Add anchor rows ``a_raw`` (rows, C) paired with ``b_raw`` (rows, D, C) where ``valid`` (rows, D)."""
    rows, n_off, channels = b_raw.shape
    mask = valid.to(torch.float64)
    counts = state["joint"]
    fa = (a_raw > threshold).to(counts.dtype)
    fb = ((b_raw > threshold) & valid[:, :, None]).to(counts.dtype)
    shift = state["shift"]
    a = a_raw.to(torch.float64) - shift
    b = (b_raw.to(torch.float64) - shift).mul_(mask[:, :, None])
    state["n"] += mask.sum(0)
    state["sum_a"].addmm_(mask.T, a)
    state["sq_a"].addmm_(mask.T, a * a)
    state["fire_a"].addmm_(mask.T, fa.to(torch.float64))
    state["sum_b"] += b.sum(0)
    state["sq_b"] += (b * b).sum(0)
    state["fire_b"] += fb.sum(0, dtype=torch.float64)
    state["prod"].view(channels, n_off * channels).addmm_(a.T, b.view(rows, n_off * channels))
    counts.view(channels, n_off * channels).addmm_(fa.T, fb.view(rows, n_off * channels))


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
