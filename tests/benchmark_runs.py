"""Running a benchmark script of benchmarks/ as a user runs it (a subprocess from the repository root) and
reading the rows of the markdown tables it prints; shared by the benchmark smoke tests (test_benchmarks.py,
test_cluster_bench.py, test_recovery.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
