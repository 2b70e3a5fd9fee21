"""The accumulation kernels behind `LayerStats.update`: marginal sums, products at every offset (stacked,
cropped or sampled), co-firing counts, and the merge of two states. Float64 sums throughout.
"""
from __future__ import annotations

import math

import torch

from topo.stats.positions import inside_share

# Subsampled batches are gathered until this many anchor rows, then added in one product.
MIN_ROWS = 256


# Elements of the shifted stack (rows x D x C) built at a time by the exact path, in buffers reused
# from batch to batch: at most 12 bytes each (float64 values, 0/1 firing in int8 or float32), 384 MiB. A batch of
# 16 maps of 16 x 16 x 128 at 41 offsets (21.5 M elements) is one block: one product per batch.
_STACK_ELEMENTS = 2**25


# Fewer rows than this per block would make its products inefficient; then offsets are grouped instead.
_MIN_BLOCK_ROWS = 1024


# The exact path multiplies offset by offset, on crops of the map, when at most this share of its
# (position, offset) pairs stays inside the map (small maps: 0.32 for 5 x 5 at max_offset 4, 0.61 for
# 10 x 10, 0.79 for 20 x 20); docs/statistics.md has the measurements.
_CROPS_BELOW = 0.7


# int32 co-firing counts made at a time by `_add_int8_product` (4 MiB: a buffer that stays in cache).
_COUNT_ELEMENTS = 2**20


# Elements squared at a time by `_column_sums` (2 MiB of float64: a buffer that stays in cache).
_SQUARE_ELEMENTS = 2**18


STATE_KEYS = ("shift", "n", "sum_a", "sum_b", "sq_a", "sq_b", "prod", "fire_a", "fire_b", "joint")


def full_precision(device: torch.device):
    """No autocast while accumulating (a model recorded under AMP must not turn the sums into float16)."""
    return torch.autocast(device_type=device.type, enabled=False)


def empty_state(x: torch.Tensor, offsets: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    channels, n_off = x.shape[1], len(offsets)
    zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=x.device)
    per_unit = x.transpose(0, 1).reshape(channels, -1).to(torch.float64)
    state = {"shift": per_unit.mean(1), "n": zeros(n_off)}
    for key in ("sum_a", "sum_b", "sq_a", "sq_b", "fire_a", "fire_b"):
        state[key] = zeros(n_off, channels)
    state["prod"] = zeros(channels, n_off, channels)
    state["joint"] = torch.zeros(channels, n_off, channels, dtype=torch.float32, device=x.device)
    return state


def firing_dtype(device: torch.device) -> torch.dtype:
    """The dtype of 0/1 firing flags: int8 on the CPU, whose int8 products sum in int32 (exact, and 4-8x
    faster than float32 products there: docs/statistics.md); float32 elsewhere (not measured there)."""
    return torch.int8 if torch.device(device).type == "cpu" else torch.float32


def add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scratch: Scratch | None = None) -> None:
    """``out += a.T @ b``: in place when the dtypes agree; int8 flags by `_add_int8_product`; else a product
    in ``a``'s dtype, then added.

    0/1 co-firing counts are exact either way: int32 sums below 2**31 rows, float32 below 2**24,
    so they stay exact when added into float32 counts below 2**24 and into float64 counts after.
    """
    if a.dtype == torch.int8:
        _add_int8_product(out, a, b, scratch or Scratch())
    elif out.dtype == a.dtype:
        out.addmm_(a.T, b)
    else:
        out.add_(a.T @ b)


def _add_int8_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scratch: Scratch) -> None:
    """``out += a.T @ b`` for int8 ``a``, ``b``: int32 products of a few columns of ``b`` at a time, into a
    reused buffer of `_COUNT_ELEMENTS` that stays in cache, each added into ``out`` at once (one product
    into a fresh C x D C matrix cost 3-5x as much, in the page faults and the add; docs/statistics.md)."""
    rows_out, cols = out.shape
    step = max(1, _COUNT_ELEMENTS // max(1, rows_out))
    buffer = scratch.get("counts", rows_out * min(step, cols), torch.int32, out.device)[0]
    for c0 in range(0, cols, step):
        c1 = min(cols, c0 + step)
        part = buffer[: rows_out * (c1 - c0)].view(rows_out, c1 - c0)
        out[:, c0:c1].add_(_int8_product(a.T, b[:, c0:c1], out=part))


def _int8_product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` for int8 matrices, int32 sums (`torch._int_mm`). It returned wrong sums (torch 2.14) for one
    row given as a transposed column (strides (1, 1): the anchors of a layer of one unit) and for a stride-0
    copy of a row, so one row is multiplied as two copies of it."""
    if a.shape[0] != 1:
        return torch._int_mm(a, b, out=out)
    product = torch._int_mm(a.repeat(2, 1), b)[:1]
    return product if out is None else out.copy_(product)


def column_counts(flags: torch.Tensor) -> torch.Tensor:
    """Column sums of 0/1 ``flags`` (rows, cols), float64. int8 flags: a product with a row of ones (int32 sums,
    exact), where a float64 or int32 reduction over the rows cost 30x as much (1,792 x 5,412: 18 ms against
    0.6 ms); float flags: summed in float64."""
    if flags.dtype != torch.int8:
        return flags.sum(0, dtype=torch.float64)
    ones = torch.ones(1, flags.shape[0], dtype=torch.int8, device=flags.device)
    return _int8_product(ones, flags)[0].to(torch.float64)


def _add_counts(state: dict[str, torch.Tensor], fired_a: torch.Tensor, fired_b: torch.Tensor,
                scratch: Scratch | None = None) -> None:
    """Add co-firing counts, ``fired_a`` (rows, C) against ``fired_b`` (rows, D*C), to ``joint``."""
    add_product(state["joint"].view(fired_a.shape[1], -1), fired_a, fired_b, scratch)


def add_dense(state: dict[str, torch.Tensor], x: torch.Tensor, threshold: float | torch.Tensor) -> None:
    """Add a batch of vectors (N, C): the single offset (0, 0)."""
    shifted = x.to(torch.float64) - state["shift"]
    fired = (x > threshold).to(firing_dtype(x.device))
    state["n"][0] += x.shape[0]
    for side in "ab":
        state[f"sum_{side}"][0] += shifted.sum(0)
        state[f"sq_{side}"][0] += (shifted * shifted).sum(0)
        state[f"fire_{side}"][0] += column_counts(fired)
    state["prod"][:, 0].addmm_(shifted.T, shifted)
    _add_counts(state, fired, fired)


def _reach(offsets: list[tuple[int, int]]) -> tuple[int, int]:
    """The largest ``dy`` and ``|dx|`` among the stored offsets (dy is never negative)."""
    return max(dy for dy, _ in offsets), max(abs(dx) for _, dx in offsets)


def _padded(shape: tuple[int, ...], offsets: list[tuple[int, int]], dtype: torch.dtype, device, scratch: Scratch):
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
                 threshold: float | torch.Tensor, scratch: Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's zero-padded channels-last maps (see `_padded`): shifted values (float64) and 0/1 firing
    (`firing_dtype`)."""
    maps = x.permute(0, 2, 3, 1)
    values, shifted = _padded(maps.shape, offsets, torch.float64, x.device, scratch)
    torch.sub(maps, state["shift"], out=shifted)
    flags, fired = _padded(maps.shape, offsets, firing_dtype(x.device), x.device, scratch)
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
                   spatial_shape: tuple[int, int], scratch: Scratch) -> None:
    """Add the pair counts and both sides' sums, sums of squares and firing counts at every offset, from
    the zero-padded shifted values and 0/1 firing (N, H + ry, W + 2 rx, C): per-position sums over the
    images (contiguous reductions), then the masks of the valid pairs on the map's own positions."""
    n_img, channels = values.shape[0], values.shape[3]
    (height, width), rx = spatial_shape, _reach(offsets)[1]
    sums = [*_column_sums(values.view(n_img, -1), scratch), column_counts(flags.view(n_img, -1))]
    per_position = torch.stack([t.view(values.shape[1:]) for t in sums], dim=2)  # (H + ry, W + 2 rx, 3, C)
    inside = per_position[:height, rx : rx + width].reshape(height * width, 3 * channels)
    masks = _valid_masks(offsets, spatial_shape, values.device)
    sums = (masks @ inside).view(2, len(offsets), 3, channels)
    state["n"] += n_img * masks[: len(offsets)].sum(1)
    for side, part in zip("ab", sums):
        state[f"sum_{side}"] += part[:, 0]
        state[f"sq_{side}"] += part[:, 1]
        state[f"fire_{side}"] += part[:, 2]


def _column_sums(x: torch.Tensor, scratch: Scratch) -> tuple[torch.Tensor, torch.Tensor]:
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


class Scratch:
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
                          anchors: torch.Tensor, shifts: torch.Tensor, scratch: Scratch) -> None:
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
            add_product(prod[:, cols], a, b)
            add_product(joint[:, cols], fa, fb, scratch)


def add_exact(state: dict[str, torch.Tensor], x: torch.Tensor, offsets: list[tuple[int, int]],
               threshold: float | torch.Tensor, scratch: Scratch) -> None:
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


def _add_cropped_products(prod: torch.Tensor, joint: torch.Tensor, values: torch.Tensor, flags: torch.Tensor,
                          offsets: list[tuple[int, int]], scratch: Scratch) -> None:
    """``prod``, ``joint`` (C, D, C) += the products of every offset ``d``, one at a time, over the positions
    whose target stays in the map: the map cropped to the anchors against the map cropped to their targets.

    ``values`` (float64) and ``flags`` (0/1, `firing_dtype`) are the maps, channels-last (N, H, W, C). No pair that
    leaves the map is multiplied, where the stacked product multiplies their padding zeros. The crops are
    copied into reused buffers (see `Scratch`).
    """
    height, width, channels = values.shape[1:]
    for k, (dy, dx) in enumerate(offsets):
        x0, x1 = max(0, -dx), width - max(0, dx)
        anchors = (slice(None), slice(0, height - dy), slice(x0, x1))
        targets = (slice(None), slice(dy, height), slice(x0 + dx, x1 + dx))
        for out, maps in ((prod, values), (joint, flags)):
            a, b = (_copied(maps[crop], name, scratch) for crop, name in ((anchors, "anchors"), (targets, "targets")))
            add_product(out[:, k], a, b, scratch)


def _copied(crop: torch.Tensor, name: str, scratch: Scratch) -> torch.Tensor:
    """``crop`` (N, h, w, C) copied into the reused buffer ``name`` as rows (N h w, C)."""
    buffer = scratch.get(name, crop.numel(), crop.dtype, crop.device)[0]
    return buffer.view(crop.shape).copy_(crop).view(-1, crop.shape[-1])


def gather_sampled(state: dict[str, torch.Tensor], x: torch.Tensor, offsets: list[tuple[int, int]],
                    sampled: tuple[torch.Tensor, ...], threshold: float | torch.Tensor, scratch: Scratch):
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
    chunk = max(MIN_ROWS, _STACK_ELEMENTS // (len(offsets) * channels))
    for r0 in range(0, len(rows), chunk):
        index = (rows[r0 : r0 + chunk, None] + shifts).reshape(-1)
        size = min(chunk, len(rows) - r0)
        # a chunk of MIN_ROWS rows or more is added at once (LayerStats.update), so it may use reused buffers
        out = [scratch.get("sampled", len(index) * channels, t.dtype, t.device)[0].view(-1, channels)
               if size >= MIN_ROWS else None for t in (values, flags)]
        stack, fired = (torch.index_select(t, 0, index, out=o) for t, o in zip((values, flags), out))
        yield stack.view(size, -1), fired.view(size, -1), valid[r0 : r0 + chunk]


def _gather_from_maps(state: dict[str, torch.Tensor], x: torch.Tensor, targets: torch.Tensor,
                      valid: torch.Tensor, threshold: float | torch.Tensor):
    """``(stack, fired, valid)`` of `gather_sampled`, gathered from the maps ``x`` themselves (few anchors):
    ``targets`` (N, K, D) are clamped into the map, and ``valid`` says where they did not need to be."""
    n_img, k, n_off = targets.shape
    image = torch.arange(n_img, device=x.device)[:, None]
    raw = x.flatten(2)[image, :, targets.to(x.device).reshape(n_img, -1)]  # (N, K D, C)
    inside = valid.to(x.device).reshape(n_img, -1, 1)
    stack = torch.sub(raw, state["shift"]).mul_(inside)
    fired = torch.gt(raw, threshold).logical_and_(inside).to(firing_dtype(x.device))
    return stack.view(n_img * k, -1), fired.view(n_img * k, -1), inside.view(n_img * k, n_off).to(torch.float64)


def add_gathered(state: dict[str, torch.Tensor], stack: torch.Tensor, fired: torch.Tensor, valid: torch.Tensor,
                  scratch: Scratch):
    """Add anchor rows and their targets at every offset: ``stack`` (rows, D*C) float64 and ``fired`` 0/1
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
    state["fire_b"] += column_counts(fired).view(n_off, channels)
    state["prod"].view(channels, -1).addmm_(a.T, stack)
    _add_counts(state, fa, fired, scratch)


def move_shift_(state: dict[str, torch.Tensor], shift: torch.Tensor) -> None:
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


def add_state_(state: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    """Add the sums of ``other`` into ``state`` (moved onto ``state``'s shift first)."""
    other = {k: v.clone() for k, v in other.items()}
    move_shift_(other, state["shift"])
    for key in STATE_KEYS[1:]:
        state[key] += other[key]
