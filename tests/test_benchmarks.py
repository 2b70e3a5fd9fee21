"""Smoke runs of the benchmark scripts at tiny sizes, so that they do not rot between measurements.

Each script runs as a user runs it (a subprocess from the repository root) and
must print its comparison table with sensible figures. Timings are not checked
here: speed targets live in the benchmarks themselves (docs/benchmarks.md).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str, timeout: float = 240) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def table_rows(output: str, first_cell: str) -> list[list[str]]:
    """The cells of the markdown table rows of ``output`` whose first cell is ``first_cell``."""
    rows = []
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def ratio(cell: str) -> float:
    match = re.fullmatch(r"(\d+\.\d+)x", cell)
    assert match, f"not a ratio: {cell!r}"
    return float(match.group(1))


def test_bench_model_prints_both_models_and_their_ratio():
    out = run_benchmark(
        "bench_model.py", "--size", "32", "--batch", "2", "--steps", "1", "--rounds", "1", "--warmup", "0",
        "--threads", "1", "--only", "fp32,unfused",
    )
    assert "forward multiply-adds per image" in out
    for name in ("fp32", "unfused"):
        [row] = table_rows(out, name)
        tv_train, topo_train, train_ratio, tv_infer, topo_infer, infer_ratio = row[1:7]
        assert float(tv_train) > 0 and float(topo_train) > 0
        assert ratio(train_ratio) == pytest.approx(float(topo_train) / float(tv_train), rel=0.1)  # rounded figures
        assert ratio(infer_ratio) == pytest.approx(float(topo_infer) / float(tv_infer), rel=0.1)


def test_bench_stats_reports_the_overhead_ratio():
    out = run_benchmark(
        "bench_stats.py", "--size", "32", "--batch-size", "4", "--batches", "2", "--repeats", "1", "--skip-naive",
    )
    match = re.search(r"ratio (\d+\.\d+)x", out)
    assert match, out
    assert float(match.group(1)) > 1.0  # recording statistics costs something on top of the forward pass


def test_bench_cluster_recovers_a_small_planted_network():
    out = run_benchmark(
        "bench_cluster.py", "--channels", "48", "--samples", "128", "--size", "8", "--window", "3",
        "--threads", "1", "--methods", "arora,agglomerative",
    )
    for method in ("arora", "agglomerative"):
        [row] = table_rows(out, method)
        clusters, jaccard = int(row[3]), float(row[6])
        assert clusters > 0
        assert 0.0 <= jaccard <= 1.0
    assert float(table_rows(out, "arora")[0][6]) > 0.5  # Arora's method recovers planted structure


def test_bench_data_compares_loader_and_model(tmp_path):
    out = run_benchmark(
        "bench_data.py", "--images", "8", "--size", "32", "--batch-size", "2", "--steps", "1",
        "--workers", "0", "1", "--device", "cpu",
    )
    for workers in ("0", "1"):
        [row] = table_rows(out, workers)
        loader, model, loader_over_model, bottleneck = float(row[1]), float(row[2]), ratio(row[3]), row[4]
        assert loader > 0 and model > 0
        assert loader_over_model == pytest.approx(loader / model, rel=0.1)  # rounded figures
        assert bottleneck == ("model" if loader >= model else "loader")


def test_gpu_script_is_valid_bash_and_calls_existing_benchmarks():
    script = ROOT / "benchmarks" / "gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    called = re.findall(r"python (benchmarks/\S+\.py)", script.read_text())
    assert len(called) >= 3
    for path in called:
        assert (ROOT / path).is_file(), path
