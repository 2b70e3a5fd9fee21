"""A construction's files: their names, and each step's statistics, clusters, weights and progress written
and read back, so that an interrupted construction resumes where it stopped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from builders.spec import NetworkSpec
from topo.cluster import UnitClustering
from topo.common import distributed as dist_info
from topo.common.reading import (
    PathLike,
    UnexpectedShape,
    json_mapping,
    list_of_dicts,
    read_json,
    read_torch,
    tensor_dict,
)
from topo.common.writing import atomic_torch_save, atomic_write_json
from topo.stats.layer_stats import LayerStats

log = logging.getLogger(__name__)


def read_progress(path: PathLike) -> dict[str, Any]:
    """An interrupted construction's ``progress.json``: ``spec`` (a NetworkSpec of the modules so far), ``records``."""
    fix = ("restore it from a copy, or delete the construction folder to construct from the start "
           "(the statistics are recorded again)")
    return read_json(path, what="construction progress", fix=fix, parse=_check_progress)


def _check_progress(value: Any) -> dict[str, Any]:
    data = json_mapping(value, ("spec", "records"))
    records = list_of_dicts(data["records"])
    spec = NetworkSpec.from_dict(data["spec"])
    if len(records) != len(spec.inception_modules()):
        raise UnexpectedShape(f"records {len(records)} module(s) but its spec has {len(spec.inception_modules())}")
    return {**data, "spec": spec, "records": records}


def read_prefix(path: PathLike, modules: int) -> dict[str, torch.Tensor]:
    """The weights of the network grown so far, written after module ``modules``."""
    fix = ("restore it from a copy, or delete the construction folder to construct from the start "
           "(the statistics are recorded again)")

    def check(value: Any) -> dict[str, torch.Tensor]:
        data = json_mapping(value, ("modules", "state"))
        if data["modules"] != modules:
            raise UnexpectedShape(f"holds the weights after {data['modules']} module(s), not {modules}")
        return tensor_dict(data["state"])

    return read_torch(path, what="construction weights", fix=fix, parse=check)


def clustering_to_dict(clustering: UnitClustering) -> dict[str, Any]:
    """The fitted clusters as JSON-able data (members as [channel, dy, dx])."""
    return {
        "method": clustering.method,
        "window": clustering.window,
        "n_clusters": int(clustering.n_clusters_),
        "kernel_counts": {str(k): int(v) for k, v in clustering.kernel_counts_.items()},
        "dead_units": [int(u) for u in clustering.dead_units_],
        "n_edges": int(clustering.n_edges_),
        "evidence": clustering.evidence_.to_dict(),
        "window_cuts": {"cut": int(clustering.n_window_cuts_), "of": int(clustering.n_candidates_),
                        "by_kernel": {str(k): int(v) for k, v in clustering.cut_kernel_counts_.items()}},
        "channel_order": [int(c) for c in clustering.channel_order_],
        "channel_labels": [int(c) for c in clustering.channel_labels_],
        "clusters": [
            {"kernel_size": int(c.kernel_size), "members": [list(map(int, m)) for m in c.members]}
            for c in clustering.clusters_
        ],
    }


def save_step(files: ConstructionFiles | None, name: str, stats: LayerStats, clustering: UnitClustering,
              spec: NetworkSpec, records: list[dict[str, Any]], state: dict[str, torch.Tensor]) -> None:
    """Write one module's statistics and clusters, the grown weights and the progress (rank 0 only).

    ``progress.json`` is written last and names the step; the weights of each
    step are a new file (``prefixN.pt``), so a kill at any moment leaves the
    step ``progress.json`` names whole, and `load_progress` resumes from it.
    """
    if files is None or dist_info.rank() != 0:
        return
    stats.save(files.stats(name))
    atomic_write_json(files.clusters(name), clustering_to_dict(clustering))
    prefix = files.prefix(len(records))  # a new file: the step progress.json names stays intact until replaced
    atomic_torch_save({"modules": len(records), "state": state}, prefix)
    atomic_write_json(files.progress, {"spec": spec.to_dict(), "records": records})  # the step is recorded
    for old in files.prefixes():
        if old != prefix:
            old.unlink()


def load_progress(files: ConstructionFiles | None, empty: NetworkSpec
                  ) -> tuple[NetworkSpec, list[dict[str, Any]], dict[str, torch.Tensor] | None]:
    """(spec, records, weights) of an interrupted construction, or ``(empty, [], None)`` to start afresh.

    A damaged progress or weights file is a one-line error naming it (`topo.common.reading`), never a fresh start.
    """
    if files is None or not files.progress.is_file():
        return empty, [], None
    progress = read_progress(files.progress)  # damaged files are one-line errors naming them, never a restart
    modules = len(progress["records"])
    state = read_prefix(files.prefix(modules), modules)
    log.info("resuming construction after %d module(s)", modules)
    return progress["spec"], progress["records"], state


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

    def prefix(self, modules: int) -> Path:
        """The weights of the network grown so far, after ``modules`` modules (what a resume continues from).

        One file per step, so that the step ``progress.json`` names is intact until the next one is recorded.
        """
        return self.root / f"prefix{modules}.pt"

    def prefixes(self) -> list[Path]:
        """Every prefix file here (the current one, and an older one a kill left behind)."""
        return sorted(self.root.glob("prefix*.pt")) if self.root.is_dir() else []

    @property
    def records(self) -> Path:
        return self.root / "records.json"
