"""Deep recovery: a planted deep network recovered layer after layer by the main job's construction.

For each seed, ``load("planted", seed=s)`` (the generator's defaults: 16 observed
channels, hidden widths 12, 8, 8, degree 3, 16 x 16 maps, 409 training images)
is run through `topo.construct.construct` with three modules, no stem, Hebbian
decoding and no budget (every cluster one unit of the next layer), exact
statistics over all batches; module l is scored against planted layer l with
`topo.planted.recovery.layer_recovery` (best-match Jaccard in the decoded channels,
per-kernel counts, the share of true units some decoded channel reads). Also:

* ``--cli``: the same from the command line, ``topo-build construct --data
  planted --stem none --init hebbian --budget none --skeleton 3 --no-controls
  --seed s`` for each seed (its defaults otherwise: ``--positions auto``, 16
  statistics batches; with ``--decoders`` also with `BEST_FLAGS`),
  scored from the clusters it writes; and again with ``--data tensors`` on the
  same data saved by `topo.planted.generator.save_npz`. Three modules in one stage, so that
  module l meets layer l at the maps' resolution (the default skeleton pools
  after two); the controls do not change the real construction;
* each layer clustered from the *true* maps of the layer below, exact
  statistics, a unit firing when positive (``threshold=0``): the clustering
  alone, without the construction's firing rule (``fire_quantile`` 0.9, on
  standardised inputs at layer 1) and without its decoding, with and without
  strength tiers;
* ``--diagnose``: the construction with ``fire_quantile=None``;
* ``--decoders``: the construction with the threshold decoder (``decoder="threshold"``, `topo.construct.decoding`), with
  the default firing, and with units firing when positive tested against independence (``fire_quantile=None,
  null="none"``), with and without the pooling branch, beside the mean decoder without it;
* ``--overlap``: layer 1 as above, the units that share half their support with another unit against the rest;
* ``--sweep``: layer-1 recovery as above over depth, top density and degree.

    python benchmarks/bench_recovery.py [--seeds 5] [--cli] [--diagnose] [--decoders] [--overlap] [--sweep] [--threads 1]

Prints markdown tables (paste them into docs/clustering.md, "Deep recovery").
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

import builders
from topo.cluster import Cluster, UnitClustering, aligned_jaccard, recovery_scores
from topo.construct.config import ConstructConfig
from topo.construct.loop import BuiltLayers, construct
from topo.data import load, make_loader
from topo.data.tensors import PLANTED_DATA
from topo.planted.generator import DeepPlantedConfig, generate_deep, save_npz
from topo.planted.recovery import layer_recovery
from topo.stats.layer_stats import from_activations

MODULES = ("inception3a", "inception3b", "inception3c")


def construction(seed: int, **overrides) -> BuiltLayers:
    """The library call of the main job's construction on the planted data (as topo-build does it): what each
    layer measured."""
    bundle = load("planted", seed=seed)
    ref = builders.googlenet_spec("small", num_classes=bundle.num_classes, width_mult=0.25,
                                  in_channels=bundle.in_channels, input_size=16)
    cfg = ConstructConfig(skeleton="3", stem="none", init="hebbian", budget_macs="none", positions=None,
                          stats_batches=None, seed=seed, **overrides)
    loader = lambda d: make_loader(d, batch_size=64, train=True, seed=seed, workers=0, device="cpu",
                                   distributed=False)
    built = BuiltLayers()
    construct(ref, bundle.train, cfg, input_hw=(16, 16), loader=loader, progress=False, on_layer=built)
    return built


def share_big(counts: dict) -> float:
    """Share of 3x3 and 5x5 among the kernel counts."""
    total = sum(counts.values())
    return (counts.get(3, 0) + counts.get(5, 0)) / total if total else float("nan")


def rows_for(sample, clusterings, source: str, seed: int) -> list[dict]:
    rows = []
    for r in layer_recovery(sample, clusterings):
        t, f = r["true_counts"], r["found_counts"]
        rows.append({"source": source, "seed": seed, "layer": r["layer"], "jaccard": r["jaccard"],
                     "precision": r["precision_jaccard"], "true 1/3/5": "/".join(str(t[k]) for k in (1, 3, 5)),
                     "found 1/3/5": "/".join(str(f[k]) for k in (1, 3, 5)),
                     "count error": r["max_count_error"], "true 3+5 share": share_big(t),
                     "found 3+5 share": share_big(f), **unmatched_columns(r), "units decoded": r["units_decoded"]})
    return rows


def unmatched_columns(scores: dict) -> dict:
    """The found clusters equal to no true support (`topo.cluster.metrics.unmatched_clusters`): how many, their
    3+5 share and mean size. A cluster equal to a support has the support's kernel, so these carry the excess."""
    return {"unmatched": scores["n_unmatched"], "unmatched 3+5 share": share_big(scores["unmatched_counts"]),
            "unmatched size": scores["unmatched_mean_size"]}


def library_rows(seeds, label: str = "construct()", **overrides) -> list[dict]:
    rows = []
    for seed in seeds:
        t0 = time.perf_counter()
        res = construction(seed, **overrides)
        elapsed = time.perf_counter() - t0
        sample = generate_deep(PLANTED_DATA, seed=seed)
        for row in rows_for(sample, [res.clusterings[m] for m in MODULES], label, seed):
            rows.append({**row, "time_s": elapsed})
    return rows


def clustering_from_json(path: Path) -> SimpleNamespace:
    """The clusters a construction wrote (``MODULE_clusters.json``) as an object `layer_recovery` can score."""
    data = json.loads(path.read_text())
    clusters = [Cluster.from_dict(c) for c in data["clusters"]]
    counts = {int(k): int(v) for k, v in data["kernel_counts"].items()}
    return SimpleNamespace(clusters_=clusters, kernel_counts_=counts)


#: The best command line measured so far (docs/clustering.md, "Deep recovery"), beside the defaults.
BEST_FLAGS = ("--decoder", "threshold", "--fire-quantile", "none", "--null", "none", "--no-pool-branch")


def cli_rows(seeds, flags: tuple[str, ...] = ()) -> list[dict]:
    """``topo-build construct --seed s`` on ``--data planted`` and on the same data saved as ``.npz`` (``--data
    tensors``), with ``flags`` after the defaults' command line."""
    rows = []
    for seed in seeds:
        sample = generate_deep(PLANTED_DATA, seed=seed)
        with tempfile.TemporaryDirectory() as tmp:
            npz = Path(tmp) / "planted.npz"
            save_npz(sample, npz)
            for data in (["planted"], ["tensors", "--data-dir", str(npz)]):
                out = Path(tmp) / data[0]
                cmd = ["topo-build", "construct", "--data", *data, "--stem", "none", "--init", "hebbian",
                       "--budget", "none", "--skeleton", "3", "--no-controls", "--seed", str(seed), *flags,
                       "--out", str(out), "--no-progress", "--quiet"]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True)
                elapsed = time.perf_counter() - t0
                files = sorted((out / "construction").glob("*_clusters.json"), key=lambda p: p.stat().st_mtime)
                names = [p.name.replace("_clusters.json", "") for p in files]
                label = " ".join(["topo-build construct --data", data[0], *flags]) + " (" + ", ".join(names) + ")"
                rows += [{**r, "time_s": elapsed}
                         for r in rows_for(sample, [clustering_from_json(p) for p in files], label, seed)]
    return rows


def fit_layer(sample, layer: int, seed: int, tiers: bool = True):
    """Layer ``layer`` clustered from the true maps of the layer below: exact statistics, firing when
    positive, arora with window 5 (what a perfect decoding of the layers below would hand it)."""
    x = np.ascontiguousarray(sample.layer_activations(layer - 1))
    stats = from_activations(torch.from_numpy(x), threshold=0.0)
    return UnitClustering(method="arora", window=5, random_state=seed, progress=False, tiers=tiers).fit(stats)


def oracle_rows(cfg: DeepPlantedConfig, seeds, layers=None) -> list[dict]:
    """Per layer, `fit_layer` scored against that layer's truth, with and without strength tiers."""
    rows = []
    for seed in seeds:
        sample = generate_deep(cfg, seed=seed)
        for layer in layers or range(1, cfg.depth + 1):
            truth = sample.layer_truth(layer)
            s = recovery_scores(truth, fit_layer(sample, layer, seed))
            flat = recovery_scores(truth, fit_layer(sample, layer, seed, tiers=False))
            t, f = s["true_counts"], s["found_counts"]
            rows.append({"seed": seed, "layer": layer, "jaccard": s["jaccard"], "precision": s["precision_jaccard"],
                         "true 1/3/5": "/".join(str(t[k]) for k in (1, 3, 5)),
                         "found 1/3/5": "/".join(str(f[k]) for k in (1, 3, 5)),
                         "count error": s["max_count_error"], "jaccard (tiers=False)": flat["jaccard"],
                         "true 3+5 share": share_big(t), "found 3+5 share": share_big(f), **unmatched_columns(s)})
    return rows


def overlap_rows(cfg: DeepPlantedConfig, seeds) -> list[dict]:
    """Per true unit of layer 1: its best-match Jaccard (`fit_layer`), and whether it shares at least half its
    support (two of three members, at the same relative offsets) with another unit of the layer."""
    rows = []
    for seed in seeds:
        sample = generate_deep(cfg, seed=seed)
        found = [c.members for c in fit_layer(sample, 1, seed).clusters_]
        truth = sample.layer_truth(1).supports
        for i, support in enumerate(truth):
            shared = max(aligned_jaccard(support, other) for k, other in enumerate(truth) if k != i)
            rows.append({"seed": seed, "unit": i, "shares half its support": shared >= 0.5,
                         "jaccard": max((aligned_jaccard(c, support) for c in found), default=0.0)})
    return rows


def sweep_rows(seeds) -> list[dict]:
    base = DeepPlantedConfig()
    cases = {"default (12, 8, 8), degree 3, top 0.01": base,
             "depth 1 (12,), top 0.086": DeepPlantedConfig(widths=(12,), degrees=(3,), top_density=0.086,
                                                           num_classes=2, class_boost=1.0),
             "depth 2 (12, 8)": DeepPlantedConfig(widths=(12, 8), degrees=(3, 3)),
             "depth 4 (12, 8, 8, 8)": DeepPlantedConfig(widths=(12, 8, 8, 8), degrees=(3, 3, 3, 3)),
             "top density 0.005": DeepPlantedConfig(top_density=0.005),
             "top density 0.02": DeepPlantedConfig(top_density=0.02),
             "degree 2 (widths 12, 12, 8)": DeepPlantedConfig(widths=(12, 12, 8), degrees=(2, 2, 3)),
             "degree 4": DeepPlantedConfig(degrees=(4, 4, 4))}
    rows = []
    for name, cfg in cases.items():
        rows += [{"network": name, **r} for r in oracle_rows(cfg, seeds, layers=[1])]
    return rows


def summary(df: pd.DataFrame, by: list[str], cols: list[str]) -> pd.DataFrame:
    g = df.groupby(by, sort=False)
    out = pd.DataFrame(index=g.size().index)
    for col in cols:
        mean, lo, hi = g[col].mean(), g[col].min(), g[col].max()
        out[col] = [f"{m:.2f} ({a:.2f}-{b:.2f})" for m, a, b in zip(mean, lo, hi)]
    out["seeds"] = g.size()
    return out.reset_index()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--cli", action="store_true", help="also run topo-build construct (each seed), on --data planted and --data tensors")
    ap.add_argument("--sweep", action="store_true", help="layer-1 sweep over depth, density, degree")
    ap.add_argument("--diagnose", action="store_true",
                    help="also the construction with fire_quantile=None (a unit fires when positive)")
    ap.add_argument("--decoders", action="store_true",
                    help="also the construction with decoder='threshold' (topo.construct.decoding), with the default firing "
                         "and with fire_quantile=None")
    ap.add_argument("--overlap", action="store_true",
                    help="layer 1 from the observed maps: recovery of units that share half their support with "
                         "another unit, against the rest")
    ap.add_argument("--direct-only", action="store_true",
                    help="also the construction with direct_only=True (edges a translate explains dropped, "
                         "topo.cluster.window.through_translates)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {platform.processor() or platform.machine()}, "
          f"torch threads {args.threads}, python {sys.version.split()[0]}\n")
    rows = library_rows(seeds) + (cli_rows(seeds) if args.cli else [])
    if args.cli and args.decoders:
        rows += cli_rows(seeds, BEST_FLAGS)
    if args.direct_only:
        rows += library_rows(seeds, "construct(direct_only=True)", direct_only=True)
    if args.diagnose:
        rows += library_rows(seeds, "construct(fire_quantile=None)", fire_quantile=None)
    if args.decoders:
        rows += library_rows(seeds, 'construct(decoder="threshold")', decoder="threshold")
        sparse = {"fire_quantile": None, "null": "none"}
        rows += library_rows(seeds, 'construct(decoder="threshold", fire_quantile=None, null="none")',
                             decoder="threshold", **sparse)
        for decoder in ("threshold", "mean"):
            rows += library_rows(seeds, f'construct(decoder="{decoder}", fire_quantile=None, null="none", '
                                        'pool_branch=False)', decoder=decoder, pool_branch=False, **sparse)
    df = pd.DataFrame(rows)
    cols = ["jaccard", "precision", "count error", "true 3+5 share", "found 3+5 share", "unmatched",
            "unmatched 3+5 share", "unmatched size", "units decoded", "time_s"]
    print("## Per layer (mean, min-max over seeds)\n")
    print(summary(df, ["source", "layer"], cols).to_markdown(index=False), "\n")
    print("## Per seed\n")
    print(df.drop(columns=["time_s"]).to_markdown(index=False, floatfmt=".2f"), "\n")
    print("## Each layer from the true maps of the layer below (exact statistics, firing when positive)\n")
    oracle = pd.DataFrame(oracle_rows(PLANTED_DATA, seeds))
    print(summary(oracle, ["layer"], ["jaccard", "precision", "count error", "jaccard (tiers=False)",
                                      "true 3+5 share", "found 3+5 share", "unmatched", "unmatched 3+5 share",
                                      "unmatched size"]).to_markdown(index=False), "\n")
    print(oracle.to_markdown(index=False, floatfmt=".2f"), "\n")
    if args.overlap:
        overlap = pd.DataFrame(overlap_rows(PLANTED_DATA, seeds))
        print("## Layer 1: units that share half their support with another unit, against the rest\n")
        table = overlap.groupby("shares half its support")["jaccard"].agg(["count", "mean", "min", "max"])
        print(table.reset_index().to_markdown(index=False, floatfmt=".2f"), "\n")
    if args.sweep:
        sweep = pd.DataFrame(sweep_rows(seeds[:3]))
        print("## Where layer-1 recovery breaks down (from the observed maps, exact statistics, firing when positive)\n")
        print(summary(sweep, ["network"], ["jaccard", "precision", "count error", "jaccard (tiers=False)"])
              .to_markdown(index=False), "\n")


if __name__ == "__main__":
    main()
