"""A training's files: their names, and its checkpoints and metrics read back."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from topo.common.errors import UserError
from topo.common.reading import CHECKPOINT_PARTS, PathLike, read_csv, read_torch

log = logging.getLogger(__name__)


def read_checkpoint(path: PathLike, map_location: str | torch.device = "cpu", *,
                    resumable: bool = False) -> dict[str, Any]:
    """A trainer checkpoint (``weights_only``); with ``resumable`` every part a resume needs must be there."""
    fix = "restore it from a copy, or delete it to train the network again from its first epoch"
    checkpoint = read_torch(path, what="checkpoint", fix=fix, map_location=map_location)
    path = Path(path).expanduser()
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise UserError(f"checkpoint {path} is not a topo training checkpoint (it has no 'model' state dict)")
    missing = [part for part in CHECKPOINT_PARTS if part not in checkpoint] if resumable else []
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}, so training cannot resume from it; {fix}")
    if resumable and not (isinstance(checkpoint["epoch"], int) and isinstance(checkpoint["history"], list)
                          and len(checkpoint["history"]) == checkpoint["epoch"]):
        raise UserError(f"checkpoint {path} has an epoch count that does not match its history; {fix}")
    return checkpoint


def read_metrics(path: PathLike, columns: tuple[str, ...] = ("epoch",)) -> pd.DataFrame:
    """A network's per-epoch metrics CSV."""
    return read_csv(path, what="metrics file", fix="restore it from a copy, or delete it (topo.load_run then reads "
                                                    "the history from the checkpoint)", columns=columns)


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
