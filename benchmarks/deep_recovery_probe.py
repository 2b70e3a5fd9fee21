"""Recovery of the bottom hidden layer of a planted deep network, and the lifts behind it.

For each network (the default deep one, a two-level one whose middle units
have exactly 3 parents each, and a one-level control with the same layer-1
supports and about the same layer-1 density but no parents, hence no
siblings) and seed: exact statistics of the observed layer
(``from_activations(x, max_offset=4, positions=None)``), every clustering
method with window 5, and the best-match Jaccard (recall), precision and found
kernel counts against layer 1's truth. Beside it, the co-activation lift of
the within-support pairs of layer 1 (``support_pairs``) and of the sibling
pairs (``sibling_pairs``: members of two layer-1 units that share a parent),
each at its displacement where that is within the recorded offsets. For the
networks with a layer 2, the same clustering of the *true* layer-1 maps
(``layer_activations(1)``) scored against layer 2's supports: what a perfect
layer-wise decoder would hand the next stage.

    python benchmarks/deep_recovery_probe.py [--seeds 3] [--threshold-zero]

``--threshold-zero`` passes ``threshold=0.0`` (a unit fires when positive)
instead of ``from_activations``' default firing rule.

Prints markdown tables; writes nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from topo.cluster import METHODS, UnitClustering, recovery_scores
from topo.planted.generator import DeepPlantedConfig, generate_deep, sibling_pairs, support_pairs
from topo.stats.layer_stats import from_activations

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery_report import summarise

MAX_OFFSET = 4


def networks() -> dict[str, DeepPlantedConfig]:
    deep = DeepPlantedConfig()
    layer1_density = float(generate_deep(deep).hidden[0].mean())
    return {
        "default deep (16; 12, 8, 8)": deep,
        "two-level, 3 parents (16; 12, 12)": DeepPlantedConfig(widths=(12, 12), degrees=(3, 3)),
        "one-level control (16; 12)": DeepPlantedConfig(widths=(12,), degrees=(3,), num_classes=2,
                                                        top_density=round(layer1_density, 3), class_boost=1.0),
    }


def pair_lifts(stats, pairs) -> np.ndarray:
    """Co-activation lift of each pair (i, j, dy, dx) whose displacement was recorded."""
    lifts = []
    for i, j, dy, dx in sorted(pairs):
        if max(abs(dy), abs(dx)) <= MAX_OFFSET:
            lifts.append(stats.coactivation(dy, dx)[1][i, j])
    return np.asarray(lifts)


def exact_stats(x: np.ndarray, firing: dict):
    return from_activations(torch.from_numpy(x), max_offset=MAX_OFFSET, positions=None, **firing)


def cluster_scores(x: np.ndarray, truth, seed: int, layer: int, firing: dict) -> list[dict]:
    """Every method on the exact statistics of ``x``, scored against ``truth``."""
    stats = exact_stats(x, firing)
    rows = []
    for method in METHODS:
        model = UnitClustering(method=method, window=5, random_state=seed, progress=False).fit(stats)
        s = recovery_scores(truth, model)
        rows.append({"layer": layer, "method": method, "seed": seed, "jaccard": s["jaccard"],
                     "precision": s["precision_jaccard"], "found": s["n_found"],
                     "found 1/3/5": "/".join(str(v) for v in s["found_counts"].values()),
                     "true 1/3/5": "/".join(str(v) for v in s["true_counts"].values())})
    return rows


def lift_summary(planted, seed: int, firing: dict) -> dict:
    stats = exact_stats(planted.activations, firing)
    truth = planted.layer_truth(1)
    within = pair_lifts(stats, support_pairs(truth))
    sib = pair_lifts(stats, sibling_pairs(truth, planted.layer_truth(2))) if planted.config.depth > 1 else []
    sib = np.asarray(sib, dtype=float)
    nan = float("nan")
    row = {"seed": seed, "x firing": (planted.activations > 0).mean(), "layer-1 density": planted.hidden[0].mean(),
           "within pairs": len(within), "within mean": within.mean(), "within median": np.median(within),
           "sibling pairs": len(sib), "sibling mean": sib.mean() if len(sib) else nan,
           "sibling median": np.median(sib) if len(sib) else nan}
    row["ratio of means"] = row["within mean"] / row["sibling mean"]
    row["ratio of medians"] = row["within median"] / row["sibling median"]
    row["ratio of mean excess (lift - 1)"] = (row["within mean"] - 1) / (row["sibling mean"] - 1)
    return {k: round(float(v), 3) if isinstance(v, float) else v for k, v in row.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threshold-zero", action="store_true", help="a unit fires when > 0")
    args = ap.parse_args()
    torch.set_num_threads(2)
    firing = {"threshold": 0.0} if args.threshold_zero else {}
    for name, cfg in networks().items():
        rows, lifts = [], []
        for seed in range(args.seeds):
            planted = generate_deep(cfg, seed=seed)
            rows += cluster_scores(planted.activations, planted.layer_truth(1), seed, 1, firing)
            if cfg.depth > 1:
                rows += cluster_scores(planted.layer_activations(1), planted.layer_truth(2), seed, 2, firing)
            lifts.append(lift_summary(planted, seed, firing))
        df = pd.DataFrame(rows)
        print(f"## {name}\n")
        print(summarise(df, ["layer", "method"], ["jaccard", "precision"]).to_markdown(index=False), "\n")
        print(df.to_markdown(index=False, floatfmt=".2f"), "\n")
        print(pd.DataFrame(lifts).to_markdown(index=False), "\n")


if __name__ == "__main__":
    main()
