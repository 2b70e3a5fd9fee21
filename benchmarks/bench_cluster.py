"""Benchmark: cluster one layer of 832 channels with a 5x5 window, every method.

Target (issue 4): at most 60 s per method on 2 CPU cores. The statistics come
from planted data of that size (`topo.planted`), recorded with sampled
positions (8 per map by default); their recording time is printed apart, as it is not part of
clustering. Recovery against the planted truth is printed beside each time.

    python benchmarks/bench_cluster.py [--channels 832] [--window 5] [--samples 512]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import torch

from topo.cluster import UnitClustering, recovery_scores
from topo.planted import PlantedConfig, generate
from topo.stats import from_activations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=832)
    ap.add_argument("--hidden", type=int, default=None, help="hidden units (default channels / 4)")
    ap.add_argument("--degree", type=int, default=6)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--size", type=int, default=12, help="map height and width")
    ap.add_argument("--positions", type=int, default=8, help="sampled positions per map (statistics)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="arora,spectral,agglomerative,louvain")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    cfg = PlantedConfig(num_channels=args.channels, num_hidden=args.hidden or args.channels // 4,
                        degree=args.degree, num_samples=args.samples, height=args.size, width=args.size,
                        seed=args.seed)
    t0 = time.perf_counter()
    planted = generate(cfg)
    t_gen = time.perf_counter() - t0
    acts = torch.from_numpy(planted.activations)
    t0 = time.perf_counter()
    stats = from_activations(acts.split(32), max_offset=args.window - 1, positions=args.positions,
                             seed=args.seed)
    t_stats = time.perf_counter() - t0
    del acts
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"os.cpu_count() {os.cpu_count()}")
    print(f"planted: C={cfg.num_channels}, hidden={cfg.num_hidden}, degree={cfg.degree}, "
          f"N={cfg.num_samples}, map {cfg.height}x{cfg.width}; generate {t_gen:.1f} s; "
          f"statistics ({stats.count} observations, {args.positions} positions per map) {t_stats:.1f} s")
    print("| method | window | time (s) | clusters | per kernel (1/3/5) | truth (1/3/5) | best-match Jaccard |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    truth = planted.truth.kernel_counts
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        model = UnitClustering(method=method, window=args.window, random_state=args.seed, progress=False).fit(stats)
        dt = time.perf_counter() - t0
        score = recovery_scores(planted.truth, model)
        kc = model.kernel_counts_
        print(f"| {method} | {args.window} | {dt:.1f} | {model.n_clusters_} | {kc[1]}/{kc[3]}/{kc[5]} | "
              f"{truth[1]}/{truth[3]}/{truth[5]} | {score['jaccard']:.3f} |", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of the whole run (generation and statistics included): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
