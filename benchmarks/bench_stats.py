"""Cost of recording activation statistics, measured side by side in one run.

(a) overhead: GoogLeNet's forward pass alone vs forward + the statistics of all
    nine Inception outputs (max_offset=4, positions="auto" for a recording of
    ``--budget-images`` images unless ``--positions`` says otherwise);
(b) against the naive way (keep every activation, then ``numpy.corrcoef`` on
    shifted copies for each offset) for one layer at growing numbers of images:
    time of the statistics and peak memory (each measurement in a fresh process);
(c) one exact ``LayerStats.update`` against its bound: the same products done as
    one fused matrix multiply each (float64 sums, int8 co-firing counts on the CPU) on a
    shifted stack built beforehand, interleaved in one process;
(d) the exact update's two ways to multiply, side by side on the same batch: one stacked product
    for all offsets against offset by offset on crops of the map, over map sizes (the default takes
    the crops where at most 0.7 of the (position, offset) pairs stay inside the map; CPU only).

    python benchmarks/bench_stats.py                       # CPU, small variant, 32x32
    python benchmarks/bench_stats.py --device cuda --size 224
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import time
from dataclasses import replace

import numpy as np
import torch

from topo.stats.positions import (
    COST_MULTIPLE,
    DEFAULT_POSITIONS,
    PositionBudget,
    PositionChoice,
    choice_macs,
    half_offsets,
    recording_scale,
)

INCEPTION = ["inception3a", "inception3b", "inception4a", "inception4b", "inception4c",
             "inception4d", "inception4e", "inception5a", "inception5b"]


def make_model(size: int, device: str, width_mult: float = 1.0) -> torch.nn.Module:
    import builders

    variant = "small" if size <= 64 else "torchvision"
    torch.manual_seed(0)
    return builders.googlenet(variant=variant, num_classes=10 if variant == "small" else 1000,
                              width_mult=width_mult).to(device).eval()


def make_batches(n_batches: int, batch_size: int, size: int, device: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch_size, 3, size, size, generator=generator).to(device) for _ in range(n_batches)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def overhead(args) -> dict:
    """Forward alone vs forward + statistics, interleaved batch by batch.

    Steady state: the nine LayerStats are allocated by a warm-up batch, then each
    batch runs once without and once with the hooks, alternately, so both see the
    same machine load; the ratio is the sum of the second over the sum of the
    first (pending rows are flushed inside the timed part). With ``positions="auto"``
    each layer's choice is made for a recording of ``--budget-images`` images (the
    model's forward multiply-adds counted once) and the bound on the layers recorded together
    (``--cost-multiple``, `recording_scale`). The fused-GEMM bound of the same products (one float64 and one
    float32 matrix product per layer and batch, on stacks built beforehand, at the positions chosen) is timed
    beside it. Then a whole ``record`` call over the timed images (the default firing quantiles: a calibration
    pass, then the statistics; threshold 0 and one pass with an explicit ``--positions``), which also allocates
    the statistics, is timed against a forward pass over them, ``--record-repeats`` times alternately (median).
    """
    from topo.stats.recording import forward_macs
    from topo.stats.layer_stats import LayerStats

    model = make_model(args.size, args.device)
    batches = make_batches(args.batches, args.batch_size, args.size, args.device)
    positions = positions_arg(args.positions)
    budget = None
    if positions == "auto":
        with torch.no_grad():
            budget = PositionBudget(forward_macs(model, batches[0][:1]),
                                    args.budget_images or len(batches) * args.batch_size,
                                    cost_multiple=args.cost_multiple)
        budget = replace(budget, scale=recording_scale(_layer_plans(model, batches[0][:1]), budget))
    stats = {name: LayerStats(positions=positions, budget=budget, threshold=0.0, name=name) for name in INCEPTION}
    fwd, (rec,) = _interleaved(model, batches, [stats], args)
    state_mb = sum(t.numel() * t.element_size() for s in stats.values() for t in s._state.values()) / 2**20
    result = {"forward_s": sum(fwd), "record_s": sum(rec), "ratio": sum(rec) / sum(fwd), "state_mb": state_mb,
              "positions": positions, "budget": budget, "bound_s": _products_bound(stats, args) * args.repeats,
              "used": {name: (s.positions_used, s.exact) for name, s in stats.items()},
              "macs": sum(choice_macs(s.num_channels, s.spatial_shape, s._offsets,
                                      PositionChoice(s.positions_used, s.exact, "")) for s in stats.values())}
    once = (dict(positions=positions, threshold=0.0) if positions != "auto" else
            dict(cost_multiple=args.cost_multiple))
    result["once"] = [_record_once(model, batches, once, args) for _ in range(args.record_repeats)]
    result["used_once"] = [r.pop("used") for r in result["once"]][-1]
    return result


def _record_once(model, batches, settings: dict, args) -> dict:
    """A forward pass over ``batches``, then one whole ``record`` call over them (a fresh one each time)."""
    from topo.stats.recording import record

    times = []
    for work in (lambda: [model(x) for x in batches], lambda: record(model, batches, INCEPTION, progress=False,
                                                                      **settings)):
        _sync(args.device)
        start = time.perf_counter()
        out = work()
        _sync(args.device)
        times.append(time.perf_counter() - start)
    used = {name: (s.positions_used, s.exact) for name, s in out.items()}
    return {"forward_s": times[0], "record_s": times[1], "used": used}


def _layer_plans(model: torch.nn.Module, example: torch.Tensor) -> list[tuple]:
    """(channels, map, offsets, offsets) of the nine Inception outputs, for `recording_scale`."""
    shapes, modules = {}, dict(model.named_modules())
    handles = [modules[name].register_forward_hook(lambda m, i, out, name=name: shapes.__setitem__(name, out.shape))
               for name in INCEPTION]
    with torch.no_grad():
        model(example)
    for handle in handles:
        handle.remove()
    plans = []
    for name in INCEPTION:
        spatial = tuple(shapes[name][2:])
        plans.append((shapes[name][1], spatial, half_offsets(4, spatial), half_offsets(4, spatial)))
    return plans


def _products_bound(stats: dict, args) -> float:
    """Seconds the products of ``stats`` take as fused matrix products on stacks built beforehand, over
    ``--batches`` batches: per layer and batch, anchor rows (rows, C) against the stack (rows, D C) once in
    float64 (values) and once in `firing_dtype` (0/1 co-firing: int8 on the CPU); rows = batch x positions used,
    or `MIN_ROWS` where that is more (small batches of rows are pooled to that many before their product, as
    `LayerStats` does); median of 3."""
    from topo.stats.kernels import MIN_ROWS, add_product, firing_dtype

    total = 0.0
    for s in stats.values():
        per_batch = args.batch_size * s.positions_used
        rows, cols = max(per_batch, MIN_ROWS), len(s._offsets) * s.num_channels
        gen = torch.Generator().manual_seed(0)
        values = [torch.randn(rows, width, generator=gen, dtype=torch.float64).to(args.device)
                  for width in (s.num_channels, cols)]
        flags = [(torch.rand(rows, width, generator=gen) < 0.1).to(args.device, firing_dtype(args.device))
                 for width in (s.num_channels, cols)]
        outs = [torch.zeros(s.num_channels, cols, dtype=dtype, device=args.device)
                for dtype in (torch.float64, torch.float32)]
        times = []
        for _ in range(3):
            _sync(args.device)
            start = time.perf_counter()
            add_product(outs[0], *values)
            add_product(outs[1], *flags)
            _sync(args.device)
            times.append(time.perf_counter() - start)
        total += sorted(times)[1] * args.batches * per_batch / rows
    return total


def positions_arg(text: str | None):
    """``--positions``: None (the default, "auto"), "auto", "all" or an int."""
    if text in (None, "auto"):
        return DEFAULT_POSITIONS
    return None if text == "all" else int(text)


def _interleaved(model, batches, variants: list[dict], args) -> tuple[list[float], list[list[float]]]:
    """Each batch once without the statistics hooks and once with each variant's statistics, in an order that
    rotates from batch to batch (after a warm-up). Returns the forward times and each variant's."""
    active: list[dict | None] = [None]
    modules = dict(model.named_modules())
    names = {modules[name]: name for name in variants[0]}

    def hook(module, _inputs, output):
        if active[0] is not None:
            active[0][names[module]].update(output)

    handles = [modules[name].register_forward_hook(hook) for name in names.values()]

    def timed(x, variant: int | None, flush: bool = False) -> float:
        stats = None if variant is None else variants[variant]
        active[0] = stats
        _sync(args.device)
        start = time.perf_counter()
        model(x)
        if flush and stats is not None:
            for s in stats.values():
                s._flush()
        _sync(args.device)
        return time.perf_counter() - start

    try:
        with torch.no_grad():
            timed(batches[0], None)
            for k in range(len(variants)):
                timed(batches[0], k, flush=True)  # warm-up, allocates the sums
            fwd, rec = [], [[] for _ in variants]
            order = [None, *range(len(variants))]
            for repeat in range(args.repeats):
                for i, x in enumerate(batches):
                    last = i == len(batches) - 1
                    shift = (i + repeat) % len(order)
                    for variant in order[shift:] + order[:shift]:
                        spent = timed(x, variant, flush=last)
                        (fwd if variant is None else rec[variant]).append(spent)
    finally:
        for handle in handles:
            handle.remove()
    return fwd, rec


# ---------------------------------------------------------------------- (b) naive vs streaming
def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return float(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak() -> float:
    """Reset the peak resident set size (Linux) and return the current one, in MB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _rss_mb("VmRSS")


def _timed_hook(module: torch.nn.Module, work, spent: list[float]):
    """A forward hook running ``work(output)`` and adding the time it takes to ``spent[0]``."""

    def hook(_module, _inputs, output):
        start = time.perf_counter()
        work(output)
        spent[0] += time.perf_counter() - start

    return module.register_forward_hook(hook)


def _naive_job(layer: str, n_images: int, batch_size: int, size: int, max_offset: int) -> dict:
    """Keep every activation of ``layer``, then corrcoef of shifted copies for each offset."""
    from topo.stats.positions import half_offsets

    torch.set_grad_enabled(False)
    model = make_model(size, "cpu")
    batches = make_batches(n_images // batch_size, batch_size, size, "cpu")
    kept: list[np.ndarray] = []
    spent = [0.0]
    handle = _timed_hook(dict(model.named_modules())[layer], lambda out: kept.append(out.numpy().copy()), spent)
    base = _reset_peak()
    for x in batches:
        model(x)
    handle.remove()
    start = time.perf_counter()
    x = np.concatenate(kept).astype(np.float64)
    kept.clear()
    _, c, h, w = x.shape
    with np.errstate(invalid="ignore", divide="ignore"):  # dead units give NaN here
        for dy, dx in half_offsets(max_offset, (h, w)):
            a = x[:, :, max(0, -dy): h - max(0, dy), max(0, -dx): w - max(0, dx)]
            b = x[:, :, max(0, dy): h + min(0, dy), max(0, dx): w + min(0, dx)]
            a = a.transpose(0, 2, 3, 1).reshape(-1, c)
            b = b.transpose(0, 2, 3, 1).reshape(-1, c)
            np.corrcoef(a.T, b.T)[:c, c:]
    spent[0] += time.perf_counter() - start
    return {"stats_s": spent[0], "peak_mb": _rss_mb("VmHWM") - base}


def _stream_job(layer: str, n_images: int, batch_size: int, size: int, max_offset: int, positions) -> dict:
    """Stream ``layer`` into a LayerStats (what ``record`` does), then query every offset."""
    from topo.stats.layer_stats import LayerStats

    torch.set_grad_enabled(False)
    model = make_model(size, "cpu")
    batches = make_batches(n_images // batch_size, batch_size, size, "cpu")
    budget = None
    if positions == "auto":  # planned for the images of this run, as record() would
        from topo.stats.recording import forward_macs

        budget = PositionBudget(forward_macs(model, batches[0][:1]), n_images)
    stats = LayerStats(max_offset=max_offset, positions=positions, budget=budget, threshold=0.0, name=layer)
    spent = [0.0]
    handle = _timed_hook(dict(model.named_modules())[layer], stats.update, spent)
    base = _reset_peak()
    for x in batches:
        model(x)
    handle.remove()
    start = time.perf_counter()
    for dy, dx in stats.offsets:  # flushes pending rows first
        stats.cross_corr(dy, dx)
    spent[0] += time.perf_counter() - start
    return {"stats_s": spent[0], "peak_mb": _rss_mb("VmHWM") - base}


def _in_fresh_process(fn, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def naive_vs_stream(args) -> list[dict]:
    rows = []
    for n in args.naive_images:
        common = (args.naive_layer, n, args.naive_batch_size, args.size, 4)
        rows.append({
            "images": n,
            "naive": _in_fresh_process(_naive_job, *common),
            "exact": _in_fresh_process(_stream_job, *common, None),
            "default": _in_fresh_process(_stream_job, *common, DEFAULT_POSITIONS),
        })
    return rows


# ---------------------------------------------------------------------- (c) exact update vs its bound
def shifted_stack(x: torch.Tensor, offsets, shift: torch.Tensor, dtype: torch.dtype):
    """The bound's inputs, built with plain torch: anchor rows (rows, C) of ``x - shift`` and the
    zero-padded shifted stack (rows, D*C) whose block d holds the map at p + d (0 outside the map)."""
    n, c, h, w = x.shape
    ry, rx = max(d[0] for d in offsets), max(abs(d[1]) for d in offsets)
    maps = x.permute(0, 2, 3, 1).to(dtype) - shift.to(dtype)
    padded = torch.zeros(n, h + ry, w + 2 * rx, c, dtype=dtype, device=x.device)
    padded[:, :h, rx : rx + w] = maps
    stack = torch.empty(n, h, w, len(offsets), c, dtype=dtype, device=x.device)
    for i, (dy, dx) in enumerate(offsets):
        stack[:, :, :, i] = padded[:, dy : dy + h, rx + dx : rx + dx + w]
    return maps.reshape(-1, c), stack.reshape(n * h * w, -1)


def exact_vs_bound(args) -> dict:
    """One exact ``LayerStats.update`` vs the same products as one fused matrix multiply each
    (float64 moments and 0/1 co-firing counts in `firing_dtype`, on shifted stacks built beforehand), interleaved."""
    from topo.stats.kernels import add_product, firing_dtype
    from topo.stats.layer_stats import LayerStats

    c, size, batch = args.bound_channels, args.bound_size, args.bound_batch
    x = torch.randn(batch, c, size, size, generator=torch.Generator().manual_seed(0)).relu().to(args.device)
    offsets = half_offsets(4, (size, size))
    stats = LayerStats(max_offset=4, positions=None, threshold=0.0).update(x)  # allocates the sums
    a, b = shifted_stack(x, offsets, stats._state["shift"], torch.float64)
    flag_dtype = firing_dtype(x.device)
    fa, fb = shifted_stack((x > 0).to(flag_dtype), offsets, torch.zeros(c, device=x.device, dtype=flag_dtype),
                           flag_dtype)
    out64 = torch.zeros(c, b.shape[1], dtype=torch.float64, device=x.device)
    out32 = torch.zeros(c, b.shape[1], device=x.device)

    def timed(work) -> float:
        _sync(args.device)
        start = time.perf_counter()
        work()
        _sync(args.device)
        return time.perf_counter() - start

    def bound():
        add_product(out64, a, b)
        add_product(out32, fa, fb)

    timed(bound), timed(lambda: stats.update(x))  # warm-up
    update_s, bound_s = [], []
    for repeat in range(args.bound_repeats):
        if repeat % 2:
            update_s.append(timed(lambda: stats.update(x))), bound_s.append(timed(bound))
        else:
            bound_s.append(timed(bound)), update_s.append(timed(lambda: stats.update(x)))
    return {"update_s": sum(update_s) / len(update_s), "bound_s": sum(bound_s) / len(bound_s),
            "ratio": sum(update_s) / sum(bound_s), "offsets": len(offsets), "rows": a.shape[0]}


def product_paths(args) -> list[dict]:
    """Per map size: one exact update with the stacked product vs the cropped products, interleaved (the two
    forced through ``topo.stats.kernels._CROPS_BELOW``, restored afterwards)."""
    import topo.stats.kernels as stats_module
    from topo.stats.layer_stats import LayerStats
    from topo.stats.positions import inside_share

    chosen = stats_module._CROPS_BELOW
    rows = []
    try:
        for size in args.paths_sizes:
            x = torch.randn(args.paths_batch, args.paths_channels, size, size,
                            generator=torch.Generator().manual_seed(size)).relu().to(args.device)
            times = {"stacked": [], "cropped": []}
            stats = {path: LayerStats(max_offset=4, positions=None, threshold=0.0) for path in times}
            for repeat in range(args.paths_repeats + 1):  # the first round allocates and is not counted
                for path in (("stacked", "cropped") if repeat % 2 else ("cropped", "stacked")):
                    stats_module._CROPS_BELOW = -1.0 if path == "stacked" else 1.0
                    _sync(args.device)
                    start = time.perf_counter()
                    stats[path].update(x)
                    _sync(args.device)
                    if repeat:
                        times[path].append(time.perf_counter() - start)
            share = inside_share(half_offsets(4, (size, size)), (size, size))
            rows.append({"size": size, "share": share, "default": "cropped" if share <= chosen else "stacked",
                         **{path: sum(t) / len(t) for path, t in times.items()}})
    finally:
        stats_module._CROPS_BELOW = chosen
    return rows


def print_paths(rows: list[dict], args) -> None:
    print(f"(d) one exact update, C={args.paths_channels}, batch {args.paths_batch}, 41 offsets (fewer on maps "
          f"under 5x5), {args.paths_repeats} interleaved repeats: stacked product vs cropped products")
    print("    map     | pairs inside | stacked s | cropped s | stacked / cropped | default")
    for r in rows:
        print(f"    {r['size']:2d} x {r['size']:2d} | {r['share']:12.2f} | {r['stacked']:9.4f} | {r['cropped']:9.4f} | "
              f"{r['stacked'] / r['cropped']:16.2f}x | {r['default']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=32, help="input size: <=64 small variant, else torchvision")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--positions", default=None, help="override the default 'auto' (an int or 'all')")
    parser.add_argument("--budget-images", type=int, default=10_000,
                        help="(a) with positions 'auto': plan for a recording of this many images (0: the ones timed)")
    parser.add_argument("--cost-multiple", type=float, default=COST_MULTIPLE,
                        help="(a) with positions 'auto': the statistics' bound, in forward passes (all layers)")
    parser.add_argument("--record-repeats", type=int, default=1,
                        help="(a) whole record() calls, each after a forward pass over the same batches")
    parser.add_argument("--naive-layer", default="inception3a")
    parser.add_argument("--naive-images", type=int, nargs="*", default=[16, 32, 64])
    parser.add_argument("--naive-batch-size", type=int, default=8)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--bound-channels", type=int, default=128)
    parser.add_argument("--bound-size", type=int, default=16)
    parser.add_argument("--bound-batch", type=int, default=16)
    parser.add_argument("--bound-repeats", type=int, default=8)
    parser.add_argument("--skip-bound", action="store_true")
    parser.add_argument("--paths-sizes", type=int, nargs="*", default=[5, 8, 10, 14, 16, 20],
                        help="(d) map sizes (none: skip (d))")
    parser.add_argument("--paths-channels", type=int, default=128)
    parser.add_argument("--paths-batch", type=int, default=64)
    parser.add_argument("--paths-repeats", type=int, default=4)
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    print(f"# bench_stats  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.machine()} "
          f"{platform.processor() or ''}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    if not args.skip_bound:
        print_bound(exact_vs_bound(args), args)
    if args.paths_sizes and args.device == "cpu":  # the cropped products run on the CPU only (topo.stats)
        print_paths(product_paths(args), args)
    print_overhead(overhead(args), args)
    if args.skip_naive or args.device != "cpu":
        return
    print(f"(b) {args.naive_layer}: naive (keep activations, numpy.corrcoef of shifted copies) vs streaming "
          "(exact, and positions 'auto' planned for these images), 41 offsets, same images. Time: spent in the hooks plus computing "
          "every offset's correlation (the forward pass, common to both, excluded); memory: peak RSS of the run "
          "above the RSS before it (forward pass included), each in a fresh process:")
    print("    images | naive s  peak MB | exact s  peak MB |    auto s  peak MB | speed-up exact     auto")
    for row in naive_vs_stream(args):
        n, e, d = row["naive"], row["exact"], row["default"]
        print(f"    {row['images']:6d} | {n['stats_s']:7.2f} {n['peak_mb']:8.0f} | {e['stats_s']:7.2f} "
              f"{e['peak_mb']:8.0f} | {d['stats_s']:9.2f} {d['peak_mb']:8.0f} | "
              f"{n['stats_s'] / e['stats_s']:13.1f}x {n['stats_s'] / d['stats_s']:7.1f}x")


def print_bound(res: dict, args) -> None:
    print(f"(c) one exact update, C={args.bound_channels}, {args.bound_size}x{args.bound_size} maps, batch "
          f"{args.bound_batch} ({res['rows']} rows), {res['offsets']} offsets, {args.bound_repeats} interleaved repeats:")
    print(f"    exact update {res['update_s']:.4g} s   fused-GEMM bound {res['bound_s']:.4g} s   "
          f"ratio {res['ratio']:.2f}x (target <= 1.5x)")


def print_overhead(res: dict, args) -> None:
    plan = ""
    if res["budget"] is not None:
        plan = (f" (planned for {res['budget'].num_images:,} images, forward {res['budget'].forward_macs:,} "
                "multiply-adds per image)")
    print(f"(a) GoogLeNet {args.size}x{args.size}, {args.batches} x {args.batch_size} images x {args.repeats} repeats, "
          f"nine Inception outputs, max_offset=4, positions={res['positions']}{plan}, "
          f"statistics {res['state_mb']:.0f} MB:")
    print("    positions used per image: " + ", ".join(
        f"{name} {used}{' (all)' if exact else ''}" for name, (used, exact) in res["used"].items()))
    forward = res["budget"].forward_macs if res["budget"] is not None else None
    counted = f" ({res['macs'] / forward:.2f} forward passes)" if forward else ""
    print(f"    products {res['macs']:,} multiply-adds per image{counted}")
    alone = res["record_s"] - res["forward_s"]
    print(f"    steady state, interleaved: forward {res['forward_s']:.2f} s   forward + statistics "
          f"{res['record_s']:.2f} s   ratio {res['ratio']:.2f}x   statistics alone {alone:.2f} s against their "
          f"fused-GEMM bound {res['bound_s']:.2f} s ({alone / res['bound_s']:.2f}x)")
    print("    record() chose: " + ", ".join(f"{name} {used}{' (all)' if exact else ''}"
                                            for name, (used, exact) in res["used_once"].items()))
    ratios = [r["record_s"] / r["forward_s"] for r in res["once"]]
    for r, ratio in zip(res["once"], ratios):
        print(f"    one record() call incl. allocating the statistics: forward {r['forward_s']:.2f} s   "
              f"record {r['record_s']:.2f} s   ratio {ratio:.2f}x")
    print(f"    one record() call over a forward pass, median of {len(ratios)}: {float(np.median(ratios)):.2f}x "
          "(issue 36's target <= 3x at full width)")


if __name__ == "__main__":
    main()
