"""The run directory: where one `topo-build` run keeps everything it produces.

Layout (every file is written atomically through `topo.io`)::

    RUN_DIR/
      config.json        resolved configuration, library versions, git revision
      state.json         the stages completed so far (what --resume reads)
      construction/      per module: statistics (MODULE_stats.pt), clusters (MODULE_clusters.json);
                         records.json, progress.json, prefix.pt   (ConstructionFiles)
      topology.json      the discovered NetworkSpec
      training/          per network: spec (NAME.spec.json), checkpoint (NAME.ckpt), per-epoch metrics (NAME_metrics.csv),
                         tensorboard/NAME/   (TrainingFiles)
      comparison.{csv,md,tex}, figures/, report.md

Every file name is spelled here and nowhere else.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from topo.errors import UserError
from topo.io import atomic_write_json

STATE_FILE = "state.json"
CONFIG_FILE = "config.json"


def environment_info() -> dict[str, Any]:
    """Library versions, Python, platform and the git revision of the source tree."""
    import numpy
    import sklearn
    import torch
    import torchvision

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "git_revision": _git_revision(),
    }


def _git_revision() -> str | None:
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


@dataclass(frozen=True)
class ConstructionFiles:
    """The files of a construction folder: per module its statistics and clusters, and the progress."""

    root: Path

    def stats(self, module: str) -> Path:
        return self.root / f"{module}_stats.pt"

    def clusters(self, module: str) -> Path:
        return self.root / f"{module}_clusters.json"

    @property
    def progress(self) -> Path:
        return self.root / "progress.json"

    @property
    def prefix(self) -> Path:
        """The weights of the network grown so far (what a resumed construction continues from)."""
        return self.root / "prefix.pt"

    @property
    def records(self) -> Path:
        return self.root / "records.json"


@dataclass(frozen=True)
class TrainingFiles:
    """The files of a training folder: per network its checkpoint, metrics and TensorBoard log."""

    root: Path

    def checkpoint(self, name: str) -> Path:
        return self.root / f"{name}.ckpt"

    def networks(self) -> list[str]:
        """Names of the networks that have a checkpoint here, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name.removesuffix(".ckpt") for p in self.root.glob("*.ckpt"))

    def spec(self, name: str) -> Path:
        """The NetworkSpec the network was built from (what `topo.load_run` rebuilds it with)."""
        return self.root / f"{name}.spec.json"

    def metrics(self, name: str) -> Path:
        return self.root / f"{name}_metrics.csv"

    def tensorboard(self, name: str) -> Path:
        return self.root / "tensorboard" / name


@dataclass(frozen=True)
class AnalysisFiles:
    """The files ``topo-build analyze`` writes: per module its clusters, then the table and the figure."""

    root: Path

    def clusters(self, module: str) -> Path:
        return self.root / f"{module}_clusters.json"

    @property
    def records(self) -> Path:
        return self.root / "analysis.json"

    @property
    def table(self) -> Path:
        return self.root / "analysis.md"

    @property
    def branch_widths(self) -> Path:
        """The stem of the branch-width figure (``.png`` and ``.pdf``)."""
        return self.root / "branch_widths"


@dataclass
class RunDir:
    """Paths of a run directory and its record of completed stages."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @classmethod
    def existing(cls, path: str | Path) -> "RunDir":
        """Open a run directory to resume or report on; a clear error if it is not one."""
        root = Path(path)
        if not (root / CONFIG_FILE).is_file():
            raise UserError(
                f"{root} is not a topo-build run directory (no {CONFIG_FILE}); "
                "pass the --out directory of an earlier run"
            )
        return cls(root)

    # Paths ------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def construction(self) -> ConstructionFiles:
        return ConstructionFiles(self.root / "construction")

    @property
    def training(self) -> TrainingFiles:
        return TrainingFiles(self.root / "training")

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def topology(self) -> Path:
        return self.root / "topology.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    # Configuration and stages -----------------------------------------------
    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.config_path, {"config": config, "environment": environment_info()})

    def read_config(self) -> dict[str, Any]:
        return json.loads(self.config_path.read_text())["config"]

    def completed(self) -> dict[str, Any]:
        """Stages completed so far, each with the small result it produced."""
        path = self.root / STATE_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def mark_done(self, stage: str, result: Any = None) -> None:
        state = self.completed()
        state[stage] = result
        atomic_write_json(self.root / STATE_FILE, state)
