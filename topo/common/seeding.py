"""Seeding and random-number-generator state: the basis of exact resume.

``seed_everything`` seeds Python's ``random``, NumPy's global generator and
torch (CPU and every CUDA device). ``capture_rng_state`` / ``restore_rng_state``
save and restore all of them; the captured state is made of tensors, ints and
tuples only, so it loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import random
import zlib
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed ``random``, NumPy and torch (CPU and all CUDA devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture_rng_state() -> dict[str, Any]:
    """The state of every global random-number generator, as plain data."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators captured by :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        cuda_states = list(state["cuda"])[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)


def derived_seed(seed: int, *names: int | str) -> int:
    """An independent seed for the stream that ``names`` (integers, or strings entering as their CRC-32, which
    never changes) name under ``seed``: NumPy's ``SeedSequence`` of them, as a non-negative 63-bit integer for
    ``torch.Generator.manual_seed``."""
    words = [seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF]
    words += [zlib.crc32(n.encode()) if isinstance(n, str) else int(n) for n in names]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))
