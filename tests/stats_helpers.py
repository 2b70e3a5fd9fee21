"""Activation maps and float64 NumPy references shared by the LayerStats tests (test_stats*.py): maps with
cross-channel and spatial correlation, the pairs of unit vectors an offset joins, and their cross-correlation."""
from __future__ import annotations

import numpy as np


def correlated_maps(n=6, c=5, h=7, w=6, mean=0.0, seed=0, dtype=np.float64) -> np.ndarray:
    """Maps with cross-channel and spatial correlation (a smoothed random field)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c, h + 2, w + 2))
    smooth = z[:, :, :-2, :-2] + z[:, :, 1:-1, 1:-1] + z[:, :, 2:, 2:]
    mix = rng.normal(size=(c, c)) * 0.5 + np.eye(c)
    x = np.einsum("ij,njhw->nihw", mix, smooth) * rng.uniform(0.5, 2.0, size=(1, c, 1, 1))
    return (x + mean).astype(dtype)


def pairs(x: np.ndarray, dy: int, dx: int) -> tuple[np.ndarray, np.ndarray]:
    """All (unit vector at p, unit vector at p + d) pairs inside the map, as two (P, C) arrays."""
    _, c, h, w = x.shape
    a = x[:, :, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    b = x[:, :, max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)]
    return a.transpose(0, 2, 3, 1).reshape(-1, c), b.transpose(0, 2, 3, 1).reshape(-1, c)


def numpy_cross_corr(x, dy, dx):
    a, b = pairs(x, dy, dx)
    c = x.shape[1]
    return np.corrcoef(a.T, b.T)[:c, c:]
