"""The run directory: where one `topo-build` run keeps everything it produces.

Layout (every file is written atomically through `topo.io`)::

    RUN_DIR/
      config.json        resolved configuration, library versions, git revision
      state.json         the stages completed so far (what --resume reads)
      construction/      per-layer statistics (.pt), clusters (.json), records, progress
      topology.json      the discovered NetworkSpec
      training/          per network: checkpoint (NAME.ckpt) and per-epoch metrics (NAME_metrics.csv)
      comparison.{csv,md,tex}, figures/, report.md
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
    def construction(self) -> Path:
        return self.root / "construction"

    @property
    def training(self) -> Path:
        return self.root / "training"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def topology(self) -> Path:
        return self.root / "topology.json"

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
