"""Smoke run of the dense-real-layer case of benchmarks/bench_cluster.py at a tiny size (no timings checked)."""
from __future__ import annotations

import pytest
from benchmark_runs import run_benchmark, table_rows


@pytest.mark.slow
def test_bench_cluster_dense_case_builds_its_statistics_and_clusters():
    out = run_benchmark("bench_cluster.py", "--case", "dense", "--batches", "1", "--batch-size", "16",
                        "--threads", "1", "--methods", "arora,louvain")
    assert "C=208, map (8, 8), 1024 observations" in out  # inception5a's input: 208 channels on 8 x 8
    for method in ("arora", "louvain"):
        [row] = table_rows(out, method)
        time_s, clusters, edges = float(row[2]), int(row[3]), int(row[5])
        cuts, candidates = (int(v) for v in row[6].split(" of "))
        assert time_s >= 0 and clusters >= 0 and edges > 0 and 0 <= cuts <= candidates
    assert "dense regime" in out  # the layer fires most of the time, and the run says so
    [alone], [apart] = table_rows(out, "arora"), table_rows(out, "arora, 2 processes")  # --jobs 1,2 by default
    assert apart[3:] == alone[3:]  # the same clusters, kernels, edges and cuts in two processes
