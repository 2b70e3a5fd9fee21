"""Recovery of planted structure: the table and the density/degree sweep in docs/clustering.md.

For several seeds and sizes inside the theory's regime (sparse hidden activity,
degree small next to C), every method is scored against the planted truth:
mean best-match Jaccard of the true supports (translation-aligned), the same
for the found clusters against the truth (precision), and the worst relative
error of the per-kernel counts. A non-spatial table gives the adjusted Rand
index of the hard methods. A sweep over hidden density and degree shows where
recovery breaks down. The tables replace the marked blocks of docs/clustering.md.

    python benchmarks/recovery_report.py [--seeds 3] [--quick] [--no-write]
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import pandas as pd
import torch

from topo.cluster import METHODS, UnitClustering, adjusted_rand, recovery_scores
from topo.common.writing import atomic_write_text
from topo.planted.generator import PlantedConfig, generate
from topo.stats.layer_stats import from_activations

DOC = Path(__file__).resolve().parents[1] / "docs" / "clustering.md"


def score_case(cfg: PlantedConfig, methods, seed: int) -> list[dict]:
    planted = generate(cfg)
    stats = from_activations(torch.from_numpy(planted.activations), positions=None)
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        model = UnitClustering(method=method, window=5, random_state=seed, progress=False).fit(stats)
        elapsed = time.perf_counter() - t0
        s = recovery_scores(planted.truth, model)
        row = {"method": method, "seed": cfg.seed, "jaccard": s["jaccard"], "precision": s["precision_jaccard"],
               "count_error": s["max_count_error"], "found": s["n_found"], "true": s["n_true"],
               "time_s": elapsed}
        if not cfg.spatial:
            row["ari"] = adjusted_rand(planted.truth.labels, model.channel_labels_)
        rows.append(row)
    return rows


def summarise(df: pd.DataFrame, by: list[str], cols: list[str]) -> pd.DataFrame:
    g = df.groupby(by, sort=False)
    out = pd.DataFrame(index=g.size().index)
    for col in cols:
        mean, lo = g[col].mean(), g[col].min()
        hi = g[col].max()
        out[col] = [f"{m:.3f} ({a:.2f}-{b:.2f})" for m, a, b in zip(mean, lo, hi)]
    out["seeds"] = g.size()
    return out.reset_index()


def recovery_table(seeds, sizes) -> str:
    rows = []
    for C in sizes:
        for seed in seeds:
            cfg = PlantedConfig(num_channels=C, num_hidden=C // 4, degree=5, density=0.03, num_samples=64,
                                height=12, width=12, seed=seed)
            for r in score_case(cfg, METHODS, seed):
                rows.append({"C": C, "hidden": C // 4, **r})
    df = pd.DataFrame(rows)
    table = summarise(df, ["C", "hidden", "method"], ["jaccard", "precision", "count_error", "time_s"])
    return table.to_markdown(index=False)


def flat_table(seeds) -> str:
    rows = []
    for seed in seeds:
        cfg = PlantedConfig(num_channels=128, num_hidden=32, degree=4, density=0.05, num_samples=3000,
                            spatial=False, disjoint=True, seed=seed)
        rows += score_case(cfg, METHODS, seed)
    df = pd.DataFrame(rows)
    return summarise(df, ["method"], ["ari", "jaccard", "count_error"]).to_markdown(index=False)


def sweep_table(seed: int, densities, degrees, methods) -> str:
    rows = []
    for density in densities:
        for degree in degrees:
            cfg = PlantedConfig(num_channels=128, num_hidden=32, degree=degree, density=density, num_samples=64,
                                height=12, width=12, seed=seed)
            for r in score_case(cfg, methods, seed):
                parents = cfg.num_hidden * degree / cfg.num_channels
                rows.append({"density": f"{density:g}", "degree": str(degree),
                             "parents/channel": f"{parents:.1f}", **r})
    df = pd.DataFrame(rows)
    wide = df.pivot_table(index=["density", "degree", "parents/channel"], columns="method",
                          values=["jaccard", "count_error"], sort=False)
    wide.columns = [f"{m} {v.replace('_', ' ')}" for v, m in wide.columns]
    wide = wide[[f"{m} {v}" for m in methods for v in ("jaccard", "count error")]]
    return wide.reset_index().to_markdown(index=False, floatfmt=".2f")


def replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC} has no {start} ... {end} block")
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes, one seed (a smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    torch.set_num_threads(2)
    seeds = list(range(1 if args.quick else args.seeds))
    sizes = (64,) if args.quick else (64, 128, 256)
    densities = (0.03, 0.3) if args.quick else (0.01, 0.03, 0.1, 0.2, 0.3)
    degrees = (4, 16) if args.quick else (3, 6, 12, 24)
    blocks = {
        "recovery-table": recovery_table(seeds, sizes),
        "flat-table": flat_table(seeds),
        "sweep-table": sweep_table(0, densities, degrees, METHODS),
    }
    for name, body in blocks.items():
        print(f"## {name}\n{body}\n")
    if not args.no_write:
        text = DOC.read_text(encoding="utf-8")
        for name, body in blocks.items():
            text = replace_block(text, name, body)
        atomic_write_text(DOC, text)
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
