"""Cost of a construction at ImageNet width: `topo-build construct --data imagenet` on a small tree of real
photographs, per module.

    python benchmarks/bench_imagenet_width.py                    # 32 training images per class, 224 px
    python benchmarks/bench_imagenet_width.py --per-class 8 --modules 2 --image-size 64   # a smoke run

The tree holds random crops of scikit-learn's two sample photographs (`topo.data.sample_tree`, no download),
written at 256 x 256 so that the ImageNet transforms crop 224 px from them. The command runs in this process
(`topo.cli.main`) with `--no-controls`, the torchvision-width reference and every other default, so the
construction is what an ImageNet user starts with, on fewer images. Each step of the construction is timed where
the loop calls it: the prefix's forward passes and statistics (`record_step`: BatchNorm calibration, the
calibration pass, the statistics of the data and of the null), the clustering (`cluster_layer`, arora on the
module's input channels) and the building (the rest of the step: widths, growing the prefix). Peak resident
memory is read from the kernel (`ru_maxrss`) after each module. ``--modules`` builds the first modules of the
default skeleton only (`--skeleton`); each row is printed as its module is done.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch


SKELETON = (2, "pool", 5, "pool", 2)  # the default (`ConstructConfig.skeleton`)


def first_modules(count: int) -> str:
    """The default skeleton cut after ``count`` modules, e.g. 3 -> "2,pool,1"."""
    parts, left = [], count
    for item in SKELETON:
        if left <= 0:
            break
        if item == "pool":
            parts.append("pool")
            continue
        parts.append(str(min(item, left)))
        left -= min(item, left)
    return ",".join(parts)


def cpu_name() -> str:
    """`lscpu`'s model name and the flags that matter for these timings."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{fields.get('Model name', '?').strip()} ({', '.join(wanted) or 'no AVX2'})"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Timer:
    """Seconds spent in wrapped functions, by stage, for the module being built."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.current: dict[str, float] = {}
        self.rows: list[dict] = []
        self.step_start: float | None = None
        self.stats = self.found = None

    def wrap(self, stage: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            begin = time.perf_counter()
            if self.step_start is None:
                self.step_start = begin
            try:
                result = fn(*args, **kwargs)
            finally:
                self.current[stage] = self.current.get(stage, 0.0) + time.perf_counter() - begin
            if stage == "statistics":
                self.stats = result[1][0]
            elif stage == "clustering":
                self.found = result
            elif stage == "building":
                self.module_done(args[1].name)
            return result
        return timed

    def module_done(self, name: str) -> None:
        """One row per module, printed at once (after the prefix has grown by it)."""
        step = time.perf_counter() - self.step_start
        stats, found = self.stats, self.found
        row = {"module": name, "channels": stats.num_channels, "map": stats.spatial_shape,
               "positions": stats.positions_used, "exact": stats.exact,
               "clusters": len(found.clustering.clusters_), **self.current, "step": step, "peak_mb": peak_mb()}
        self.rows.append(row)
        stats_s, cluster_s = row.get("statistics", 0.0), row.get("clustering", 0.0)
        print(f"| {name} | {row['channels']} | {row['map'][0]}x{row['map'][1]} | "
              f"{row['positions']}{' (all)' if row['exact'] else ''} | {row['clusters']} | {stats_s:.1f} | "
              f"{cluster_s:.1f} | {step - stats_s - cluster_s:.1f} | {step:.1f} | {row['peak_mb']:.0f} |", flush=True)
        self.current, self.step_start = {}, time.perf_counter()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=32, help="training images per class (two classes)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--modules", type=int, default=9, help="build the first this many modules")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    from topo.cli.main import main as topo_build
    from topo.construct import loop
    from topo.data.sample_tree import write_sample_tree

    print(f"# bench_imagenet_width  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {cpu_name()}  "
          f"torch {torch.__version__}  threads {torch.get_num_threads()}")
    print(f"`topo-build construct --data imagenet --image-size {args.image_size} --no-controls`, torchvision-width "
          f"reference, {2 * args.per_class} training images (two classes of sample-photograph crops), batch "
          f"{args.batch_size}; seconds per module (statistics: BatchNorm calibration, calibration pass, the "
          "data's and the null's statistics):")
    print("| module | input channels | map | positions | clusters | statistics s | clustering s | building s "
          "| step s | peak MB |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    timer = Timer()
    stages = {"record_step": "statistics", "cluster_layer": "clustering", "grow_step": "building"}
    kept = {name: getattr(loop, name) for name in stages}
    for name, stage in stages.items():
        setattr(loop, name, timer.wrap(stage, kept[name]))
    with tempfile.TemporaryDirectory() as tmp:
        size = max(256, args.image_size)
        tree = write_sample_tree(os.path.join(tmp, "tree"), train_per_class=args.per_class, val_per_class=2,
                                 size=(size, size), special=False, suffixes=(".jpg",))
        argv = ["construct", "--data", "imagenet", "--data-dir", str(tree), "--image-size", str(args.image_size),
                "--no-controls", "--no-progress", "--batch-size", str(args.batch_size),
                "--skeleton", first_modules(args.modules), "--out", os.path.join(tmp, "run")]
        try:
            status = topo_build(argv)
        finally:
            for name, fn in kept.items():
                setattr(loop, name, fn)
    total = time.perf_counter() - timer.start
    print(f"{len(timer.rows)} modules in {total:.0f} s (exit {status}); peak {peak_mb():.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
