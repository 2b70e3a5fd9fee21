"""topo: build network topologies from activation statistics.

The public entry points are re-exported here lazily, so ``import topo`` stays
cheap and submodules import only what they use.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "record": "topo.stats",
    "LayerStats": "topo.stats",
    "UnitClustering": "topo.cluster",
    "UserError": "topo.common.errors",
    "load_run": "topo.run.load",
    "export": "topo.run.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'topo' has no attribute {name!r}")
