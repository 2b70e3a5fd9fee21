"""Benchmark: cluster one layer with a 5x5 window, every method: planted (832 channels) or a dense real layer.

Targets: at most 60 s per method on 2 CPU cores for 832 planted channels
(docs/benchmarks/cluster.md); under 10 s per method for a dense layer of a real network.

``--case planted`` (default): the statistics come from planted data of that size
(`topo.planted`), recorded with sampled positions (8 per map by default); their
recording time is printed apart, as it is not part of clustering. Recovery
against the planted truth is printed beside each time.

``--case dense``: the statistics of a real, dense layer, built here from scratch
and deterministically: GoogLeNet "small" at width 0.25 on scikit-learn's digits
resized to 32 x 32, freshly initialised (seed 0), BatchNorm calibrated on the
batches, then ``topo.record`` of ``--layer`` (default "inception5a:input",
208 channels on an 8 x 8 map) over every position (``positions=None``,
``max_offset=4``) of 16 batches of 64 images, firing threshold 0 (the units fire
most of the time: the dense regime; ``--fire-quantile 0.9`` fires above each
unit's own 0.9-quantile instead). No truth: the table gives the clusters, the
Hebbian edges and how many candidates the window cut.

    python benchmarks/bench_cluster.py [--channels 832] [--window 5] [--samples 512]
    python benchmarks/bench_cluster.py --case dense [--layer inception4a:input] [--batches 16]
    python benchmarks/bench_cluster.py --case dense --stats FILE   # record once, then fit from FILE

Arora is timed in one process and in two (``--jobs 1,2``: `UnitClustering` ``n_jobs``, forked workers for the
per-anchor search and the union check; the same clusters), side by side in one run.

``--stats FILE`` (dense case) saves the recorded statistics there, and where
FILE exists reads them instead of recording (minutes): two versions of the
clustering can then be timed on the same numbers, one process each.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import time
import warnings

import numpy as np
import torch
from torch import nn

from topo.cluster import UnitClustering, recovery_scores
from topo.planted.generator import PlantedConfig, generate
from topo.stats.layer_stats import LayerStats, from_activations


def planted_stats(args):
    cfg = PlantedConfig(num_channels=args.channels, num_hidden=args.hidden or args.channels // 4,
                        degree=args.degree, num_samples=args.samples, height=args.size, width=args.size,
                        seed=args.seed)
    t0 = time.perf_counter()
    planted = generate(cfg)
    t_gen = time.perf_counter() - t0
    acts = torch.from_numpy(planted.activations)
    t0 = time.perf_counter()
    stats = from_activations(acts.split(32), max_offset=args.window - 1, positions=args.positions,
                             seed=args.seed, threshold=0.0)
    t_stats = time.perf_counter() - t0
    print(f"planted: C={cfg.num_channels}, hidden={cfg.num_hidden}, degree={cfg.degree}, "
          f"N={cfg.num_samples}, map {cfg.height}x{cfg.width}; generate {t_gen:.1f} s; "
          f"statistics ({stats.count} observations, {args.positions} positions per map) {t_stats:.1f} s")
    return stats, planted.truth


def calibrate_batchnorm(model: nn.Module, batches) -> None:
    """BatchNorm running statistics = the average over ``batches`` (as topo.construct does before recording)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    model.eval()


def dense_stats(args):
    """Statistics of a real layer of a freshly initialised, BatchNorm-calibrated GoogLeNet on digits."""
    import topo
    from builders import build, googlenet_spec
    from topo.data import load

    torch.manual_seed(args.seed)
    images = load("digits", image_size=32).train.tensors[0]
    batches = list(images[: args.batches * args.batch_size].split(args.batch_size))
    spec = googlenet_spec("small", num_classes=10, width_mult=0.25, in_channels=1, input_size=32, aux_logits=False)
    model = build(spec)
    t0 = time.perf_counter()
    calibrate_batchnorm(model, batches)
    firing = (dict(threshold=None, fire_quantile=args.fire_quantile) if args.fire_quantile is not None
              else dict(threshold=args.threshold))
    stats = topo.record(model, batches, args.layer, max_offset=args.window - 1, positions=None, progress=False,
                        **firing)[args.layer]
    t_stats = time.perf_counter() - t0
    rate = stats.firing_rate
    print(f"dense layer: {args.layer} of GoogLeNet small x0.25 on digits 32x32, {len(batches)} batches of "
          f"{args.batch_size}; C={stats.num_channels}, map {stats.spatial_shape}, {stats.count} observations, "
          f"{firing_text(args)}, median firing rate {float(np.median(rate)):.3f}; "
          f"statistics {t_stats:.1f} s")
    return stats, None


def firing_text(args) -> str:
    if args.fire_quantile is not None:
        return f"per-unit thresholds at the {args.fire_quantile:g}-quantile"
    return f"threshold {args.threshold:g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("planted", "dense"), default="planted")
    ap.add_argument("--channels", type=int, default=832)
    ap.add_argument("--hidden", type=int, default=None, help="hidden units (default channels / 4)")
    ap.add_argument("--degree", type=int, default=6)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--size", type=int, default=12, help="map height and width")
    ap.add_argument("--positions", type=int, default=8, help="sampled positions per map (statistics)")
    ap.add_argument("--layer", default="inception5a:input", help="dense case: the layer to record")
    ap.add_argument("--batches", type=int, default=16, help="dense case: batches of digits")
    ap.add_argument("--batch-size", type=int, default=64, help="dense case: images per batch")
    ap.add_argument("--threshold", type=float, default=0.0, help="dense case: firing threshold")
    ap.add_argument("--fire-quantile", type=float, default=None,
                    help="dense case: fire above each unit's own quantile instead of --threshold")
    ap.add_argument("--stats", metavar="FILE", help="dense case: save the statistics here, or read them if it exists")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="arora,spectral,agglomerative,louvain")
    ap.add_argument("--jobs", type=lambda text: [int(j) for j in text.split(",")], default=[1, 2],
                    help="arora's worker processes (UnitClustering n_jobs), each timed in turn (default 1,2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"os.cpu_count() {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    if args.case == "dense" and args.stats and os.path.exists(args.stats):
        stats, truth = LayerStats.load(args.stats), None
        print(f"dense layer: statistics read from {args.stats}; C={stats.num_channels}, map {stats.spatial_shape}, "
              f"{stats.count} observations")
    else:
        stats, truth = planted_stats(args) if args.case == "planted" else dense_stats(args)
        if args.case == "dense" and args.stats:
            stats.save(args.stats)
    if truth is not None:
        print("| method | window | time (s) | clusters | per kernel (1/3/5) | truth (1/3/5) | best-match Jaccard |")
    else:
        print("| method | window | time (s) | clusters | per kernel (1/3/5) | Hebbian edges | window cuts |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    messages: set[str] = set()
    runs = [(method, jobs) for method in args.methods.split(",")
            for jobs in (args.jobs if method == "arora" else [1])]  # n_jobs acts on arora only
    for method, jobs in runs:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = UnitClustering(method=method, window=args.window, random_state=args.seed, n_jobs=jobs,
                                   progress=False).fit(stats)
        dt = time.perf_counter() - t0
        name = method if jobs == 1 else f"{method}, {jobs} processes"
        messages |= {str(w.message) for w in caught}
        kc = model.kernel_counts_
        if truth is not None:
            tc, jaccard = truth.kernel_counts, recovery_scores(truth, model)["jaccard"]
            last = f"{tc[1]}/{tc[3]}/{tc[5]} | {jaccard:.3f}"
        else:
            last = f"{model.n_edges_} | {model.n_window_cuts_} of {model.n_candidates_}"
        print(f"| {name} | {args.window} | {dt:.1f} | {model.n_clusters_} | {kc[1]}/{kc[3]}/{kc[5]} | {last} |",
              flush=True)
    for message in sorted(messages):
        print(f"warning: {message}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of the whole run (statistics included): {peak:.0f} MiB, "
          f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
