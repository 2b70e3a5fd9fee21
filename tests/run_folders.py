"""A run folder as the kill and interruption tests check it: the command line in a subprocess (one thread), the
flags of a fast run, and what every file of the folder must be after a kill (whole, no temporaries left) and after
a resume (the uninterrupted run's results, bit for bit)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from topo.common.reading import read_json
from topo.common.writing import KILL_AT_WRITE, TEMPORARY_SUFFIX
from topo.stats.layer_stats import read_stats
from topo.train.files import read_checkpoint

TIMINGS = ["epoch_time_s", "train_time_s"]
FAST = ["--skeleton", "1,pool,1", "--stats-batches", "2", "--epochs", "2", "--batch-size", "64", "--workers", "0",
        "--no-progress", "--data", "digits", "--no-controls"]


def topo_build(argv: list[str], *, kill: str | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    """``topo-build ARGV`` in a subprocess with one thread (bitwise-reproducible CPU work)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(KILL_AT_WRITE, None)
    if kill is not None:
        env[KILL_AT_WRITE] = kill
    return subprocess.run([sys.executable, "-m", "topo.cli", *map(str, argv)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def temporaries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(f".*{TEMPORARY_SUFFIX}") if p.is_file())


def assert_killed_mid_write(root: Path, path: str) -> None:
    """The kill came while ``path`` was written: its temporary file is there, and nothing else's."""
    target = root / path
    left = temporaries(root)
    assert [p.parent for p in left] == [target.parent] and left[0].name.startswith(f".{target.name}."), left


def _reads_back(path: Path) -> None:
    """Read ``path`` whole with the reader its kind has; raises where it is cut short or damaged."""
    if path.suffix == ".json":
        read_json(path, what="file", fix="-")
    elif path.suffix == ".ckpt":
        read_checkpoint(path, resumable=True)
    elif path.name.endswith("_stats.pt"):
        read_stats(path)
    elif path.suffix == ".pt":
        torch.load(path, weights_only=True)
    elif path.suffix == ".csv":
        pd.read_csv(path)
    elif path.suffix == ".png":
        with Image.open(path) as image:
            image.load()
    elif path.suffix == ".pdf":
        data = path.read_bytes()
        assert data.startswith(b"%PDF") and data.rstrip().endswith(b"%%EOF"), path
    else:
        path.read_text(encoding="utf-8")


def assert_every_file_reads_back(root: Path) -> None:
    """Every file but the temporary ones reads back whole: none is half-written."""
    temps = set(temporaries(root))
    # TensorBoard's event files are appended by TensorBoard itself, the one non-atomic writer (docs/errors.md)
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p not in temps and "tensorboard" not in p.parts]
    assert files
    for path in files:
        _reads_back(path)


def assert_same_results(want: Path, got: Path) -> None:
    """Topology, construction records, and every network's weights and metrics, bit for bit (timings aside)."""
    assert (got / "topology.json").read_text() == (want / "topology.json").read_text()
    records = "construction/records.json"
    assert json.loads((got / records).read_text()) == json.loads((want / records).read_text())
    for name in ("discovered", "reference"):
        a = read_checkpoint(want / "training" / f"{name}.ckpt")
        b = read_checkpoint(got / "training" / f"{name}.ckpt")
        assert a["epoch"] == b["epoch"] and a["model"].keys() == b["model"].keys()
        for key, value in a["model"].items():
            assert torch.equal(b["model"][key], value), f"{name}: {key} differs"
        metrics = f"training/{name}_metrics.csv"
        pd.testing.assert_frame_equal(pd.read_csv(got / metrics).drop(columns=TIMINGS),
                                      pd.read_csv(want / metrics).drop(columns=TIMINGS), check_exact=True)
    assert (got / "report.md").is_file()
