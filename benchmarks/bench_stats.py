"""Cost of recording activation statistics, measured side by side in one run.

(a) overhead: GoogLeNet's forward pass alone vs forward + ``topo.record`` of all
    nine Inception outputs with the default settings (max_offset=4, positions=2);
(b) against the naive way (keep every activation, then ``numpy.corrcoef`` on
    shifted copies for each offset) for one layer at growing numbers of images:
    time and peak memory (each measurement in a fresh process, peak RSS).

    python benchmarks/bench_stats.py                       # CPU, small variant, 32x32
    python benchmarks/bench_stats.py --device cuda --size 224
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import statistics
import time

import numpy as np
import torch

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
    """Median wall time of forward alone vs forward + record, interleaved."""
    from topo.hooks import record

    model = make_model(args.size, args.device)
    batches = make_batches(args.batches, args.batch_size, args.size, args.device)
    positions = None if args.positions == "all" else int(args.positions) if args.positions else None

    def forward() -> float:
        _sync(args.device)
        start = time.perf_counter()
        with torch.no_grad():
            for x in batches:
                model(x)
        _sync(args.device)
        return time.perf_counter() - start

    def recorded() -> float:
        options = {} if args.positions is None else {"positions": positions}
        _sync(args.device)
        start = time.perf_counter()
        record(model, batches, INCEPTION, progress=False, **options)
        _sync(args.device)
        return time.perf_counter() - start

    forward(), recorded()  # warm-up
    fwd, rec = [], []
    for _ in range(args.repeats):
        fwd.append(forward())
        rec.append(recorded())
    return {"forward_s": statistics.median(fwd), "record_s": statistics.median(rec),
            "ratio": statistics.median(r / f for r, f in zip(rec, fwd))}


# ---------------------------------------------------------------------- (b) naive vs streaming
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _naive_job(layer: str, n_images: int, batch_size: int, size: int, max_offset: int) -> tuple[float, float, float]:
    """Keep every activation of ``layer``, then corrcoef of shifted copies for each offset."""
    from topo.stats import half_offsets

    model = make_model(size, "cpu")
    batches = make_batches(n_images // batch_size, batch_size, size, "cpu")
    kept: list[np.ndarray] = []
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda _m, _i, out: kept.append(out.detach().numpy().copy()))
    base = _peak_rss_mb()
    start = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            model(x)
    handle.remove()
    x = np.concatenate(kept).astype(np.float64)
    del kept
    _, c, h, w = x.shape
    for dy, dx in half_offsets(max_offset, (h, w)):
        a = x[:, :, max(0, -dy): h - max(0, dy), max(0, -dx): w - max(0, dx)]
        b = x[:, :, max(0, dy): h + min(0, dy), max(0, dx): w + min(0, dx)]
        a = a.transpose(0, 2, 3, 1).reshape(-1, c)
        b = b.transpose(0, 2, 3, 1).reshape(-1, c)
        np.corrcoef(a.T, b.T)[:c, c:]
    return time.perf_counter() - start, base, _peak_rss_mb()


def _stream_job(layer: str, n_images: int, batch_size: int, size: int, max_offset: int,
                positions) -> tuple[float, float, float]:
    from topo.hooks import record

    model = make_model(size, "cpu")
    batches = make_batches(n_images // batch_size, batch_size, size, "cpu")
    base = _peak_rss_mb()
    start = time.perf_counter()
    stats = record(model, batches, [layer], max_offset=max_offset, positions=positions, progress=False)[layer]
    for dy, dx in stats.offsets:
        stats.cross_corr(dy, dx)
    return time.perf_counter() - start, base, _peak_rss_mb()


def _in_fresh_process(fn, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def naive_vs_stream(args) -> list[dict]:
    rows = []
    for n in args.naive_images:
        common = (args.naive_layer, n, args.naive_batch_size, args.size, 4)
        naive = _in_fresh_process(_naive_job, *common)
        exact = _in_fresh_process(_stream_job, *common, None)
        default = _in_fresh_process(_stream_job, *common, 2)
        rows.append({"images": n, "naive": naive, "exact": exact, "default": default})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=32, help="input size: <=64 small variant, else torchvision")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--positions", default=None, help="override the default (an int or 'all')")
    parser.add_argument("--naive-layer", default="inception3a")
    parser.add_argument("--naive-images", type=int, nargs="*", default=[8, 16, 32])
    parser.add_argument("--naive-batch-size", type=int, default=8)
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    print(f"# bench_stats  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.machine()} "
          f"{platform.processor() or ''}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    res = overhead(args)
    print(f"(a) GoogLeNet {args.size}x{args.size}, {args.batches} x {args.batch_size} images, nine Inception outputs, "
          f"positions={args.positions or 'default'}:")
    print(f"    forward {res['forward_s']:.3f} s   forward+record {res['record_s']:.3f} s   "
          f"ratio {res['ratio']:.2f}x (target <= 1.5x)")
    if args.skip_naive or args.device != "cpu":
        return
    print(f"(b) {args.naive_layer}, naive (keep activations + numpy.corrcoef per offset) vs streaming, 41 offsets, "
          "forward included, peak RSS of a fresh process (baseline = after building the model):")
    print("    images | naive s  peak MB | exact s  peak MB | default s  peak MB | speed-up exact  default")
    for row in naive_vs_stream(args):
        (tn, bn, pn), (te, be, pe), (td, bd, pd) = row["naive"], row["exact"], row["default"]
        print(f"    {row['images']:6d} | {tn:7.2f} {pn - bn:8.0f} | {te:7.2f} {pe - be:8.0f} | "
              f"{td:9.2f} {pd - bd:8.0f} | {tn / te:14.1f}x {tn / td:7.1f}x")


if __name__ == "__main__":
    main()
