"""Activations generated from a known sparse network: ground truth for clustering.

The model follows the random sparse networks of Arora, Bhaskara, Ge and Ma,
"Provable bounds for learning some deep representations" (2014), made
convolutional:

* ``num_hidden`` hidden units, each with a binary map that is on independently
  at every position with probability ``density`` (sparse hidden activity);
* every hidden unit has a kernel class k (1, 3 or 5) and a *support*: ``degree``
  distinct observed channels, each at an offset inside the k x k window. The
  support's footprint really needs the k x k window (its extent is larger than
  the next smaller kernel);
* observed channel c at position q receives ``w * h_u(q - o)`` for every
  support member (c, o) of every hidden unit u, plus Gaussian noise, and fires
  through a ReLU after a bias: ``x = relu(sum - bias + noise)``.

So the members of one support fire together whenever their hidden unit is on,
and a clustering stage that recovers the supports (up to translation) has
recovered the hidden layer. With ``spatial=False`` the model is the plain
(N, C) version: every support sits at offset (0, 0) and all kernels are 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from topo.errors import UserError

KERNEL_SIZES = (1, 3, 5)


@dataclass(frozen=True)
class PlantedConfig:
    """Parameters of a planted sparse network (see the module docstring)."""

    num_channels: int = 64
    num_hidden: int = 12
    degree: int = 5
    kernel_mix: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    density: float = 0.03
    num_samples: int = 128
    height: int = 12
    width: int = 12
    spatial: bool = True
    disjoint: bool = False
    weight_range: tuple[float, float] = (0.6, 1.4)
    noise: float = 0.1
    bias: float = 0.3
    seed: int = 0

    def validate(self) -> None:
        if self.degree < 1 or self.num_hidden < 1 or self.num_channels < 1:
            raise UserError("PlantedConfig: num_channels, num_hidden and degree must be >= 1")
        if self.degree > self.num_channels:
            raise UserError(
                f"PlantedConfig: degree {self.degree} exceeds num_channels {self.num_channels}; "
                "lower degree or raise num_channels"
            )
        if self.disjoint and self.num_hidden * self.degree > self.num_channels:
            raise UserError(
                f"PlantedConfig: disjoint supports need num_hidden*degree <= num_channels "
                f"({self.num_hidden}*{self.degree} > {self.num_channels}); lower one or set disjoint=False"
            )
        if not 0.0 < self.density < 1.0:
            raise UserError(f"PlantedConfig: density must lie in (0, 1), got {self.density}")
        if len(self.kernel_mix) != 3 or min(self.kernel_mix) < 0 or sum(self.kernel_mix) <= 0:
            raise UserError("PlantedConfig: kernel_mix must be three non-negative shares for kernels 1, 3, 5")
        if self.spatial and self.degree < 2 and any(self.kernel_mix[1:]):
            raise UserError("PlantedConfig: kernels 3 and 5 need degree >= 2 to span their window")


@dataclass(frozen=True)
class PlantedTruth:
    """The known structure: one support and kernel class per hidden unit.

    ``supports[u]`` is a tuple of ``(channel, dy, dx)``, offsets relative to the
    centre of the hidden unit's window; ``labels`` gives, per observed channel,
    the hidden unit with the largest weight onto it (-1 if none), which is the
    ground-truth partition when supports are disjoint.
    """

    supports: tuple[tuple[tuple[int, int, int], ...], ...]
    kernel_sizes: tuple[int, ...]
    weights: tuple[tuple[float, ...], ...]
    labels: np.ndarray = field(repr=False)

    @property
    def kernel_counts(self) -> dict[int, int]:
        return {k: sum(1 for s in self.kernel_sizes if s == k) for k in KERNEL_SIZES}


@dataclass(frozen=True)
class Planted:
    """Generated activations and the truth that produced them."""

    activations: np.ndarray  # (N, C, H, W) or (N, C), float32
    truth: PlantedTruth
    config: PlantedConfig


def _kernel_classes(cfg: PlantedConfig, rng: np.random.Generator) -> list[int]:
    """Split the hidden units over the kernel classes as evenly as the mix allows."""
    if not cfg.spatial:
        return [1] * cfg.num_hidden
    mix = np.asarray(cfg.kernel_mix, dtype=float) / sum(cfg.kernel_mix)
    counts = np.floor(mix * cfg.num_hidden).astype(int)
    for i in np.argsort(-(mix * cfg.num_hidden - counts), kind="stable")[: cfg.num_hidden - counts.sum()]:
        counts[i] += 1
    classes = [k for k, n in zip(KERNEL_SIZES, counts) for _ in range(n)]
    return [classes[i] for i in rng.permutation(len(classes))]


def _offsets(kernel: int, size: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``size`` offsets inside the kernel's window whose extent needs that kernel."""
    r = kernel // 2
    if kernel == 1:
        return [(0, 0)] * size
    while True:
        off = rng.integers(-r, r + 1, size=(size, 2))
        extent = (off.max(axis=0) - off.min(axis=0)).max() + 1
        if extent > kernel - 2:  # larger than the next smaller kernel
            return [(int(a), int(b)) for a, b in off]


def _supports(cfg: PlantedConfig, kernels: list[int], rng: np.random.Generator):
    if cfg.disjoint:
        channels = rng.permutation(cfg.num_channels)
        chosen = [channels[u * cfg.degree:(u + 1) * cfg.degree] for u in range(cfg.num_hidden)]
    else:
        chosen = [rng.choice(cfg.num_channels, size=cfg.degree, replace=False) for _ in kernels]
    supports = []
    for k, chans in zip(kernels, chosen):
        offs = _offsets(k, cfg.degree, rng)
        supports.append(tuple(sorted((int(c), dy, dx) for c, (dy, dx) in zip(chans, offs))))
    return supports


def generate(config: PlantedConfig | None = None, **overrides) -> Planted:
    """Generate activations and truth from a planted sparse network (seeded).

    ``generate(PlantedConfig(...))`` or ``generate(num_channels=..., ...)``.
    Activations are float32 NumPy; ``torch.from_numpy`` makes them a tensor.
    """
    cfg = config if config is not None else PlantedConfig()
    if overrides:
        cfg = PlantedConfig(**{**cfg.__dict__, **overrides})
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    kernels = _kernel_classes(cfg, rng)
    supports = _supports(cfg, kernels, rng)
    lo, hi = cfg.weight_range
    weights = [tuple(float(w) for w in rng.uniform(lo, hi, size=len(s))) for s in supports]

    C, m = cfg.num_channels, cfg.num_hidden
    labels = np.full(C, -1, dtype=np.int64)
    best = np.zeros(C)
    for u, (supp, ws) in enumerate(zip(supports, weights)):
        for (c, _, _), w in zip(supp, ws):
            if w > best[c]:
                best[c], labels[c] = w, u

    if cfg.spatial:
        R = max(KERNEL_SIZES) // 2
        # weight[c, u, R + dy, R + dx]: hidden u at p drives channel c at p + (dy, dx)
        kernel = np.zeros((C, m, 2 * R + 1, 2 * R + 1), dtype=np.float32)
        for u, (supp, ws) in enumerate(zip(supports, weights)):
            for (c, dy, dx), w in zip(supp, ws):
                kernel[c, u, R + dy, R + dx] += w
        H, W = cfg.height, cfg.width
        hidden = (rng.random((cfg.num_samples, m, H + 2 * R, W + 2 * R)) < cfg.density).astype(np.float32)
        # x[c, q] = sum_u sum_o kernel[c, u, o] h_u(q - o): a correlation with the flipped kernel
        drive = _correlate(hidden, kernel[:, :, ::-1, ::-1])
        noise = rng.standard_normal(drive.shape, dtype=np.float32) * cfg.noise
    else:
        W_mat = np.zeros((C, m), dtype=np.float32)
        for u, (supp, ws) in enumerate(zip(supports, weights)):
            for (c, _, _), w in zip(supp, ws):
                W_mat[c, u] += w
        hidden = (rng.random((cfg.num_samples, m)) < cfg.density).astype(np.float32)
        drive = hidden @ W_mat.T
        noise = rng.standard_normal(drive.shape, dtype=np.float32) * cfg.noise
    acts = np.maximum(drive - cfg.bias + noise, 0.0).astype(np.float32)
    truth = PlantedTruth(
        supports=tuple(supports),
        kernel_sizes=tuple(kernels),
        weights=tuple(weights),
        labels=labels,
    )
    return Planted(activations=acts, truth=truth, config=cfg)


def _correlate(hidden: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Valid 2-D cross-correlation (N, m, H+2R, W+2R) x (C, m, K, K) -> (N, C, H, W)."""
    import torch

    with torch.no_grad():
        out = torch.nn.functional.conv2d(
            torch.from_numpy(np.ascontiguousarray(hidden)),
            torch.from_numpy(np.ascontiguousarray(kernel)),
        )
    return out.numpy()
