"""Wall time of the default ``topo-build`` run (no arguments: the embedded patches) against the 3-minute target.

    python benchmarks/bench_default_run.py             # one run
    python benchmarks/bench_default_run.py --repeats 3

Runs the real command in a subprocess, in a temporary output directory, and
splits the wall time into stages by the moment each stage's first log line
appears: start-up and the constructions (the run's and the control's, side by
side with ``--jobs``), training the discovered network and the reference (side
by side with ``--jobs``), comparison and report.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time

TARGET_S = 180.0
STAGES = (("training discovered", "train both arms"),  # side by side since 2026-12-07 (one after the other before)
          ("| Network", "compare + report"))


def one_run(extra: list[str], keep: str | None = None) -> dict[str, float]:
    """Run ``topo-build`` once; seconds from launch to each stage's first line, and to exit.

    Its comparison table and the control's verdict are echoed; with ``keep`` the run folder is kept there.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = keep or os.path.join(tmp, "run")
        cmd = [sys.executable, "-m", "topo.cli", "--no-progress", "--out", out, *extra]
        start = time.perf_counter()
        marks = {"constructions": 0.0}
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(("|", "This run's topology")):
                    print(line.rstrip(), flush=True)
                for needle, stage in STAGES:
                    if stage not in marks and line.startswith(needle):
                        marks[stage] = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"topo-build exited with {proc.returncode}")
        marks["end"] = time.perf_counter() - start
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", metavar="DIR", help="keep the (last) run's folder in DIR")
    parser.add_argument("extra", nargs="*", help="extra topo-build flags (after --)")
    args = parser.parse_args()

    print(f"# default topo-build run, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    print("| run | start-up and constructions (s) | train both arms (s) | compare + report (s) | "
          "total (s) | total / 180 s target |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for run in range(1, args.repeats + 1):
        marks = one_run(args.extra, args.keep if run == args.repeats else None)
        order = ["constructions", *(stage for _, stage in STAGES), "end"]
        times = [marks.get(stage) for stage in order]
        spans = [f"{b - a:.1f}" if a is not None and b is not None else "-" for a, b in zip(times, times[1:])]
        print(f"| {run} | {' | '.join(spans)} | {marks['end']:.1f} | {marks['end'] / TARGET_S:.2f}x |")


if __name__ == "__main__":
    main()
