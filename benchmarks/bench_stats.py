"""Cost of recording activation statistics, measured side by side in one run.

(a) overhead: GoogLeNet's forward pass alone vs forward + ``topo.record`` of all
    nine Inception outputs with the default settings (max_offset=4, positions=DEFAULT_POSITIONS);
(b) against the naive way (keep every activation, then ``numpy.corrcoef`` on
    shifted copies for each offset) for one layer at growing numbers of images:
    time of the statistics and peak memory (each measurement in a fresh process).

    python benchmarks/bench_stats.py                       # CPU, small variant, 32x32
    python benchmarks/bench_stats.py --device cuda --size 224
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import time

import numpy as np
import torch

from topo.stats import DEFAULT_POSITIONS

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
    first (pending rows are flushed inside the timed part). A whole ``record``
    call, which also allocates the statistics, is timed once for comparison.
    """
    from topo.hooks import record
    from topo.stats import LayerStats

    model = make_model(args.size, args.device)
    batches = make_batches(args.batches, args.batch_size, args.size, args.device)
    positions = None if args.positions == "all" else int(args.positions) if args.positions else DEFAULT_POSITIONS
    stats = {name: LayerStats(positions=positions, name=name) for name in INCEPTION}
    enabled = [False]
    modules = dict(model.named_modules())

    def hook(module, _inputs, output):
        if enabled[0]:
            stats[names[module]].update(output)

    names = {modules[name]: name for name in INCEPTION}
    handles = [modules[name].register_forward_hook(hook) for name in INCEPTION]

    def timed(x, hooks: bool, flush: bool = False) -> float:
        enabled[0] = hooks
        _sync(args.device)
        start = time.perf_counter()
        model(x)
        if flush:
            for s in stats.values():
                s._flush()
        _sync(args.device)
        return time.perf_counter() - start

    with torch.no_grad():
        timed(batches[0], False), timed(batches[0], True, flush=True)  # warm-up, allocates the sums
        fwd, rec = [], []
        for repeat in range(args.repeats):
            for i, x in enumerate(batches):
                last = i == len(batches) - 1
                if (i + repeat) % 2:
                    rec.append(timed(x, True, flush=last)), fwd.append(timed(x, False))
                else:
                    fwd.append(timed(x, False)), rec.append(timed(x, True, flush=last))
    for handle in handles:
        handle.remove()
    state_mb = sum(t.numel() * t.element_size() for s in stats.values() for t in s._state.values()) / 2**20

    _sync(args.device)
    start = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            model(x)
    _sync(args.device)
    forward_once = time.perf_counter() - start
    start = time.perf_counter()
    record(model, batches, INCEPTION, positions=positions, progress=False)
    _sync(args.device)
    record_once = time.perf_counter() - start
    return {"forward_s": sum(fwd), "record_s": sum(rec), "ratio": sum(rec) / sum(fwd), "state_mb": state_mb,
            "forward_once_s": forward_once, "record_once_s": record_once, "positions": positions}


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
    from topo.stats import half_offsets

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
    from topo.stats import LayerStats

    torch.set_grad_enabled(False)
    model = make_model(size, "cpu")
    batches = make_batches(n_images // batch_size, batch_size, size, "cpu")
    stats = LayerStats(max_offset=max_offset, positions=positions, name=layer)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=32, help="input size: <=64 small variant, else torchvision")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--positions", default=None, help="override the default (an int or 'all')")
    parser.add_argument("--naive-layer", default="inception3a")
    parser.add_argument("--naive-images", type=int, nargs="*", default=[16, 32, 64])
    parser.add_argument("--naive-batch-size", type=int, default=8)
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    print(f"# bench_stats  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.machine()} "
          f"{platform.processor() or ''}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    res = overhead(args)
    print(f"(a) GoogLeNet {args.size}x{args.size}, {args.batches} x {args.batch_size} images x {args.repeats} repeats, "
          f"nine Inception outputs, max_offset=4, positions={res['positions']}, statistics {res['state_mb']:.0f} MB:")
    print(f"    steady state, interleaved: forward {res['forward_s']:.2f} s   forward + statistics "
          f"{res['record_s']:.2f} s   ratio {res['ratio']:.2f}x (target <= 1.5x)")
    print(f"    one record() call incl. allocating the statistics: forward {res['forward_once_s']:.2f} s   "
          f"record {res['record_once_s']:.2f} s   ratio {res['record_once_s'] / res['forward_once_s']:.2f}x")
    if args.skip_naive or args.device != "cpu":
        return
    print(f"(b) {args.naive_layer}: naive (keep activations, numpy.corrcoef of shifted copies) vs streaming "
          "(exact, and default positions), 41 offsets, same images. Time: spent in the hooks plus computing "
          "every offset's correlation (the forward pass, common to both, excluded); memory: peak RSS of the run "
          "above the RSS before it (forward pass included), each in a fresh process:")
    print("    images | naive s  peak MB | exact s  peak MB | default s  peak MB | speed-up exact  default")
    for row in naive_vs_stream(args):
        n, e, d = row["naive"], row["exact"], row["default"]
        print(f"    {row['images']:6d} | {n['stats_s']:7.2f} {n['peak_mb']:8.0f} | {e['stats_s']:7.2f} "
              f"{e['peak_mb']:8.0f} | {d['stats_s']:9.2f} {d['peak_mb']:8.0f} | "
              f"{n['stats_s'] / e['stats_s']:13.1f}x {n['stats_s'] / d['stats_s']:7.1f}x")


if __name__ == "__main__":
    main()
