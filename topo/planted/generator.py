"""Activations generated from a known sparse network: ground truth for clustering.

The model follows the random sparse networks of Arora, Bhaskara, Ge and Ma,
"Provable bounds for learning some deep representations" (2014), made
convolutional.

One hidden layer (:func:`generate`, :class:`PlantedConfig`):

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

A deep network (:func:`generate_deep`, :class:`DeepPlantedConfig`), generative
and top-down as in the paper. Layer 0 is observed (``num_channels`` maps of
``height x width``); hidden layers 1..L have ``widths[l - 1]`` binary units:

* every unit of layer l has a kernel class (split by that layer's kernel mix,
  by default from mostly 1x1 at layer 1 to mostly 5x5 at layer L) and a support
  of ``degrees[l - 1]`` distinct units of layer l - 1 at offsets inside its
  window, drawn as above; the supports are *balanced*: every unit of layer
  l - 1 belongs to the same number of supports (+-1), its parents;
* the top layer's units are on independently at every position, with
  probability ``top_density``, raised to ``top_density * class_boost`` for the
  units of the sample's class (see below);
* a unit v of a lower hidden layer is on at q when its parents drive it above
  ``threshold`` (``sum of w * h_u(q - o)`` over its memberships (v, o) in the
  supports of layer l + 1), or on its own with probability ``own_density``;
  with the default threshold 0.5 below the smallest weight 0.6, one parent on
  is enough;
* the observed layer is ``relu(drive - bias + noise)`` from layer 1, as in the
  one-layer model.

Offsets compose: a unit of layer l reaches ``2 l`` positions (each kernel's
radius, at most 2, adds up), so layer l's maps are generated padded by ``2 l``
on each side and each step down is a valid correlation; layer l's maps over
the observed positions are the centre crop (:meth:`DeepPlanted.layer_activations`).

Labels: a sample's class y is uniform over ``num_classes``; the top units are
split (seeded) into ``num_classes`` disjoint groups of ``widths[-1] //
num_classes`` units (left-over units belong to no class) and the units of
group y are the ones whose density is raised. Given the top layer, the Bayes
rule is "the group with the most on positions"; seen through the lower layers
the class is learnable but noisy.

Siblings (units of layer l - 1 in one support of layer l) fire together
whenever their shared parent is on, so the statistics of layer l - 1, and of
the observed layer below it, carry sibling correlations between different
supports beside the within-support ones (:func:`sibling_pairs`).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np

from topo.common.errors import UserError
from topo.common.writing import atomic_path

KERNEL_SIZES = (1, 3, 5)
#: How far one layer's offsets reach (the largest kernel's radius): the padding per layer.
LAYER_REACH = max(KERNEL_SIZES) // 2
#: Default kernel mixes (shares of 1x1, 3x3, 5x5) of the bottom and top hidden layers;
#: the layers between interpolate linearly.
BOTTOM_MIX = (0.6, 0.3, 0.1)
TOP_MIX = (0.1, 0.3, 0.6)

Member = tuple[int, int, int]
Pair = tuple[int, int, int, int]  # (i, j, dy, dx): unit i at p and unit j at p + (dy, dx)


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
        _check_mix(self.kernel_mix, self.degree if self.spatial else 2, "PlantedConfig")


def _check_mix(mix, degree: int, where: str) -> None:
    if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
        raise UserError(f"{where}: kernel_mix must be three non-negative shares for kernels 1, 3, 5, got {mix}")
    if degree < 2 and any(mix[1:]):
        raise UserError(f"{where}: kernels 3 and 5 need degree >= 2 to span their window")


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


def _split_kernels(mix, n: int, rng: np.random.Generator) -> list[int]:
    """Split ``n`` units over the kernel classes as evenly as the mix allows, in random order."""
    mix = np.asarray(mix, dtype=float) / sum(mix)
    counts = np.floor(mix * n).astype(int)
    for i in np.argsort(-(mix * n - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    classes = [k for k, c in zip(KERNEL_SIZES, counts) for _ in range(c)]
    return [classes[i] for i in rng.permutation(len(classes))]


def _kernel_classes(cfg: PlantedConfig, rng: np.random.Generator) -> list[int]:
    if not cfg.spatial:
        return [1] * cfg.num_hidden
    return _split_kernels(cfg.kernel_mix, cfg.num_hidden, rng)


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


def _place(kernels: list[int], chosen, rng: np.random.Generator) -> list[tuple[Member, ...]]:
    """Supports from each unit's chosen lower units, at offsets drawn for its kernel class."""
    supports = []
    for k, chans in zip(kernels, chosen):
        offs = _offsets(k, len(chans), rng)
        supports.append(tuple(sorted((int(c), dy, dx) for c, (dy, dx) in zip(chans, offs))))
    return supports


def _supports(cfg: PlantedConfig, kernels: list[int], rng: np.random.Generator):
    if cfg.disjoint:
        channels = rng.permutation(cfg.num_channels)
        chosen = [channels[u * cfg.degree:(u + 1) * cfg.degree] for u in range(cfg.num_hidden)]
    else:
        chosen = [rng.choice(cfg.num_channels, size=cfg.degree, replace=False) for _ in kernels]
    return _place(kernels, chosen, rng)


def _strongest_parent(supports, weights, n_lower: int) -> np.ndarray:
    """Per lower unit, the unit with the largest weight onto it (-1 if none)."""
    labels = np.full(n_lower, -1, dtype=np.int64)
    best = np.zeros(n_lower)
    for u, (supp, ws) in enumerate(zip(supports, weights)):
        for (c, _, _), w in zip(supp, ws):
            if w > best[c]:
                best[c], labels[c] = w, u
    return labels


def _kernel_tensor(supports, weights, n_lower: int) -> np.ndarray:
    """``weight[c, u, R + dy, R + dx]``: unit u at p drives lower unit c at p + (dy, dx)."""
    R = LAYER_REACH
    kernel = np.zeros((n_lower, len(supports), 2 * R + 1, 2 * R + 1), dtype=np.float32)
    for u, (supp, ws) in enumerate(zip(supports, weights)):
        for (c, dy, dx), w in zip(supp, ws):
            kernel[c, u, R + dy, R + dx] += w
    return kernel


def _drive(hidden: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``drive[c, q] = sum_u sum_o kernel[c, u, o] h_u(q - o)``: a valid correlation with the flipped kernel."""
    return _correlate(hidden, kernel[:, :, ::-1, ::-1])


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
    labels = _strongest_parent(supports, weights, cfg.num_channels)

    if cfg.spatial:
        R = LAYER_REACH
        kernel = _kernel_tensor(supports, weights, cfg.num_channels)
        H, W = cfg.height, cfg.width
        hidden = (rng.random((cfg.num_samples, cfg.num_hidden, H + 2 * R, W + 2 * R)) < cfg.density)
        drive = _drive(hidden.astype(np.float32), kernel)
    else:
        W_mat = _kernel_tensor(supports, weights, cfg.num_channels)[:, :, LAYER_REACH, LAYER_REACH]
        hidden = (rng.random((cfg.num_samples, cfg.num_hidden)) < cfg.density).astype(np.float32)
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


# ----------------------------------------------------------------------------- deep network


@dataclass(frozen=True)
class DeepPlantedConfig:
    """Parameters of a planted deep sparse network (see the module docstring).

    ``widths`` and ``degrees`` list the hidden layers bottom (layer 1) to top
    (layer L = ``len(widths)``); ``kernel_mixes`` gives one (1x1, 3x3, 5x5)
    share triple per hidden layer, or None for the default trend
    (:func:`default_kernel_mixes`).
    """

    num_channels: int = 16
    widths: tuple[int, ...] = (12, 8, 8)
    degrees: tuple[int, ...] = (3, 3, 3)
    kernel_mixes: tuple[tuple[float, float, float], ...] | None = None
    top_density: float = 0.01
    own_density: float = 0.005
    threshold: float = 0.5
    num_classes: int = 4
    class_boost: float = 2.0
    num_samples: int = 512
    height: int = 16
    width: int = 16
    weight_range: tuple[float, float] = (0.6, 1.4)
    noise: float = 0.1
    bias: float = 0.3
    seed: int = 0

    @property
    def depth(self) -> int:
        """L, the number of hidden layers."""
        return len(self.widths)

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """Units per layer, observed (layer 0) first."""
        return (self.num_channels, *self.widths)

    def mixes(self) -> tuple[tuple[float, float, float], ...]:
        """The kernel mix of every hidden layer, bottom first."""
        return tuple(self.kernel_mixes) if self.kernel_mixes is not None else default_kernel_mixes(self.depth)

    def validate(self) -> None:
        name = "DeepPlantedConfig"
        if self.depth < 1 or len(self.degrees) != self.depth:
            raise UserError(f"{name}: widths and degrees need one entry per hidden layer, got "
                            f"{len(self.widths)} widths and {len(self.degrees)} degrees")
        if len(self.mixes()) != self.depth:
            raise UserError(f"{name}: kernel_mixes needs one (1x1, 3x3, 5x5) triple per hidden layer "
                            f"({self.depth}), got {len(self.mixes())}; or pass None for the default trend")
        if min(self.layer_sizes) < 1 or min(self.degrees) < 1:
            raise UserError(f"{name}: num_channels, widths and degrees must be >= 1")
        for layer, (below, units, degree, mix) in enumerate(
                zip(self.layer_sizes, self.widths, self.degrees, self.mixes()), start=1):
            _check_layer(layer, below, units, degree, mix)
        _check_densities(self)
        if not 2 <= self.num_classes <= self.widths[-1]:
            raise UserError(f"{name}: num_classes must lie in 2..{self.widths[-1]} (one top unit per class at "
                            f"least), got {self.num_classes}; change num_classes or widths[-1]")


def _check_layer(layer: int, below: int, units: int, degree: int, mix) -> None:
    where = f"DeepPlantedConfig layer {layer}"
    if degree > below:
        raise UserError(f"{where}: degree {degree} exceeds the {below} units of the layer below; lower it")
    if units * degree < below:
        raise UserError(f"{where}: {units} units of degree {degree} leave some of the {below} units below "
                        "without a parent; raise the width or the degree")
    _check_mix(mix, degree, where)


def _check_densities(cfg: DeepPlantedConfig) -> None:
    where = "DeepPlantedConfig"
    if not 0.0 < cfg.top_density < 1.0:
        raise UserError(f"{where}: top_density must lie in (0, 1), got {cfg.top_density}")
    if not 0.0 <= cfg.own_density < 1.0:
        raise UserError(f"{where}: own_density must lie in [0, 1), got {cfg.own_density}")
    if cfg.class_boost < 1.0 or cfg.top_density * cfg.class_boost >= 1.0:
        raise UserError(f"{where}: class_boost must be >= 1 with top_density * class_boost < 1, got "
                        f"{cfg.class_boost} * {cfg.top_density}")
    if cfg.threshold <= 0:
        raise UserError(f"{where}: threshold must be > 0 (a unit with no parent on stays off), got {cfg.threshold}")


def default_kernel_mixes(depth: int) -> tuple[tuple[float, float, float], ...]:
    """Kernel mixes from :data:`BOTTOM_MIX` at layer 1 to :data:`TOP_MIX` at layer ``depth``, linearly."""
    if depth == 1:
        return (BOTTOM_MIX,)
    steps = np.linspace(0.0, 1.0, depth)
    return tuple(tuple(float((1 - t) * b + t * u) for b, u in zip(BOTTOM_MIX, TOP_MIX)) for t in steps)


@dataclass(frozen=True)
class DeepPlanted:
    """A deep planted network's sample: observed activations, labels, every hidden layer and its truth.

    ``hidden[l - 1]`` holds layer l's binary maps padded by ``LAYER_REACH * l``,
    (N, m_l, H + 2 pad, W + 2 pad); ``truth[l - 1]`` the supports of layer l's
    units over layer l - 1's units (channels for l = 1); ``class_units[k]`` the
    top units whose density class k raises.
    """

    activations: np.ndarray  # (N, C, H, W), float32
    labels: np.ndarray  # (N,), int64
    hidden: tuple[np.ndarray, ...] = field(repr=False)
    truth: tuple[PlantedTruth, ...]
    class_units: tuple[tuple[int, ...], ...]
    config: DeepPlantedConfig

    def _require_layer(self, layer: int, lowest: int) -> None:
        if not lowest <= layer <= self.config.depth:
            raise UserError(f"DeepPlanted: layer {layer} does not exist; choose one of {lowest}..{self.config.depth}")

    def layer_truth(self, layer: int) -> PlantedTruth:
        """The truth of hidden layer ``layer`` (1..L): its supports over layer ``layer - 1``."""
        self._require_layer(layer, 1)
        return self.truth[layer - 1]

    def layer_activations(self, layer: int) -> np.ndarray:
        """Layer ``layer``'s maps over the observed positions, (N, m, H, W) float32; 0 is the observed layer.

        Unit u at position p of layer 1 drives observed channel c at p + (dy, dx)
        for a support member (c, dy, dx), so this is what a layer-wise decoder
        with same-padded kernels should output at p.
        """
        self._require_layer(layer, 0)
        if layer == 0:
            return self.activations
        pad = LAYER_REACH * layer
        maps = self.hidden[layer - 1]
        return maps[:, :, pad:maps.shape[2] - pad, pad:maps.shape[3] - pad].astype(np.float32)


def _balanced_choice(n_lower: int, n_units: int, degree: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each unit picks ``degree`` distinct lower units among the least used so far (random ties)."""
    used = np.zeros(n_lower, dtype=np.int64)
    chosen = []
    for _ in range(n_units):
        order = np.lexsort((rng.random(n_lower), used))  # least used first, random among equals
        pick = np.sort(order[:degree])
        used[pick] += 1
        chosen.append(pick)
    return chosen


def _deep_structure(cfg: DeepPlantedConfig, rng: np.random.Generator) -> tuple[PlantedTruth, ...]:
    """Kernel classes, balanced supports and weights of every hidden layer, bottom first."""
    lo, hi = cfg.weight_range
    truths = []
    for below, units, degree, mix in zip(cfg.layer_sizes, cfg.widths, cfg.degrees, cfg.mixes()):
        kernels = _split_kernels(mix, units, rng)
        supports = _place(kernels, _balanced_choice(below, units, degree, rng), rng)
        weights = [tuple(float(w) for w in rng.uniform(lo, hi, size=len(s))) for s in supports]
        truths.append(PlantedTruth(supports=tuple(supports), kernel_sizes=tuple(kernels),
                                   weights=tuple(weights), labels=_strongest_parent(supports, weights, below)))
    return tuple(truths)


def _class_groups(cfg: DeepPlantedConfig, rng: np.random.Generator) -> tuple[tuple[int, ...], ...]:
    size = cfg.widths[-1] // cfg.num_classes
    order = rng.permutation(cfg.widths[-1])
    return tuple(tuple(sorted(int(u) for u in order[k * size:(k + 1) * size])) for k in range(cfg.num_classes))


def _top_layer(cfg: DeepPlantedConfig, labels: np.ndarray, groups, rng: np.random.Generator) -> np.ndarray:
    """The top layer's maps: independent per position, the sample's class group at the raised density."""
    density = np.full((cfg.num_classes, cfg.widths[-1]), cfg.top_density)
    for k, units in enumerate(groups):
        density[k, list(units)] *= cfg.class_boost
    pad = LAYER_REACH * cfg.depth
    shape = (cfg.num_samples, cfg.widths[-1], cfg.height + 2 * pad, cfg.width + 2 * pad)
    return rng.random(shape) < density[labels][:, :, None, None]


def generate_deep(config: DeepPlantedConfig | None = None, **overrides) -> DeepPlanted:
    """Generate a labelled sample of a planted deep sparse network, top-down (seeded).

    ``generate_deep(DeepPlantedConfig(...))`` or ``generate_deep(widths=..., ...)``.
    """
    cfg = config if config is not None else DeepPlantedConfig()
    if overrides:
        cfg = DeepPlantedConfig(**{**cfg.__dict__, **overrides})
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    truths = _deep_structure(cfg, rng)
    groups = _class_groups(cfg, rng)
    labels = rng.integers(cfg.num_classes, size=cfg.num_samples).astype(np.int64)
    hidden = [_top_layer(cfg, labels, groups, rng)]
    for layer in range(cfg.depth, 1, -1):  # layer l drives layer l - 1
        t = truths[layer - 1]
        drive = _drive(hidden[0].astype(np.float32), _kernel_tensor(t.supports, t.weights, cfg.widths[layer - 2]))
        own = rng.random(drive.shape) < cfg.own_density
        hidden.insert(0, (drive > cfg.threshold) | own)
    t = truths[0]
    drive = _drive(hidden[0].astype(np.float32), _kernel_tensor(t.supports, t.weights, cfg.num_channels))
    noise = rng.standard_normal(drive.shape, dtype=np.float32) * cfg.noise
    acts = np.maximum(drive - cfg.bias + noise, 0.0).astype(np.float32)
    return DeepPlanted(activations=acts, labels=labels, hidden=tuple(hidden), truth=truths,
                       class_units=groups, config=cfg)


def save_npz(planted: DeepPlanted, path: str | os.PathLike) -> None:
    """Write the observed activations and labels as ``x`` (N, C, H, W) float32 and ``y`` (N,) int64.

    ``topo.data.load("tensors", path)`` then gives the same bundle as
    ``load("planted", seed=...)`` for the planted data set's configuration.
    """
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=planted.activations, y=planted.labels)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


# ----------------------------------------------------------------------------- pairs


def _canonical_pair(i: int, j: int, dy: int, dx: int) -> Pair:
    """One name for the pair (i at p, j at p + d) and (j at p, i at p - d)."""
    if (dy, dx) < (0, 0) or ((dy, dx) == (0, 0) and j < i):
        return (j, i, -dy, -dx)
    return (i, j, dy, dx)


def support_pairs(truth: PlantedTruth) -> set[Pair]:
    """Pairs ``(i, j, dy, dx)`` of members of one support: i at p and j at p + (dy, dx) fire together."""
    pairs = set()
    for support in truth.supports:
        for a, (i, ay, ax) in enumerate(support):
            for j, by, bx in support[a + 1:]:
                pairs.add(_canonical_pair(i, j, by - ay, bx - ax))
    return pairs


def sibling_pairs(lower: PlantedTruth, upper: PlantedTruth) -> set[Pair]:
    """Pairs of inputs of layer l (``lower``'s members) that co-fire only through a shared parent.

    Two units a, b of layer l in one support of layer l + 1 (``upper``), at
    offsets p_a and p_b, fire together whenever that parent is on; so member
    (i, o_i) of a and (j, o_j) of b fire together at the displacement
    ``(p_b + o_j) - (p_a + o_i)``. Pairs that are also :func:`support_pairs`
    of ``lower`` are left out.
    """
    pairs = set()
    for support in upper.supports:
        for a, (ua, ay, ax) in enumerate(support):
            for ub, by, bx in support[a + 1:]:
                for i, iy, ix in lower.supports[ua]:
                    for j, jy, jx in lower.supports[ub]:
                        dy, dx = by + jy - ay - iy, bx + jx - ax - ix
                        if i != j or (dy, dx) != (0, 0):
                            pairs.add(_canonical_pair(i, j, dy, dx))
    return pairs - support_pairs(lower)
