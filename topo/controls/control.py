"""The control of every run: is the discovered topology caused by the data?

A topology is "discovered from the data" only if other data would give a
different one. Beside the real construction, the run constructs (construction
only, no training) on:

* the real data again with other seeds (``seed + 1, ...``): the spread between
  seeds, what any difference must beat;
* each null input of `topo.controls.nulls` ("shuffled" pixels, matched-moment "noise")
  with the run's own seeds.

Each topology is summarised per module by its **output shares**: the fractions
of the module's 1x1, 3x3 and 5x5 output channels (the pooling projection is
not a kernel choice and is left out; a module without any is all zeros). The
**distance** between two topologies is the mean over modules of the L1
distance of their shares (0 to 2).

The **test** asks whether a control's topologies sit further from the real
ones than the real ones sit from each other. Its statistic is the mean over
modules of (mean real-control distance - mean real-real distance). Under the
null hypothesis that the data do not matter, every topology at a module is
exchangeable with every other, so the labels "real" and "control" are
permuted among the topologies, module by module (independently: a module's
choice is the unit of evidence), and the p-value is the share of permutations
whose statistic is at least the observed one (counting the observed labels
once, so it is never 0).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from topo.common.errors import SettingError, UserError
from topo.controls.nulls import KINDS

#: What the run's topology must show against each control: a distance at least this many times
#: the seed-to-seed distance, at least MIN_DISTANCE, and a p-value below ALPHA.
SEED_MULTIPLE = 3.0
MIN_DISTANCE = 0.15
ALPHA = 0.01


@dataclass(frozen=True)
class ControlConfig:
    """Which controls a run constructs: the null kinds, how many real and control seeds, the permutations."""

    kinds: tuple[str, ...] = KINDS
    real_seeds: int = 2
    control_seeds: int = 1
    permutations: int = 9999

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise SettingError("kinds", f"control {unknown[0]!r} is unknown: use {', '.join(KINDS)}")
        if self.real_seeds < 2:
            raise SettingError("real_seeds", "the control needs at least 2 real seeds to measure their spread, not "
                                             f"{self.real_seeds}")
        if self.control_seeds < 1 or self.permutations < 1:
            raise SettingError("control_seeds" if self.control_seeds < 1 else "permutations",
                               "the control needs at least one seed per control and one permutation")


def module_shares(spec: Mapping[str, Any]) -> np.ndarray:
    """(1x1, 3x3, 5x5) output shares of one module (an InceptionSpec dict); zeros where it has none."""
    widths = np.array([spec["ch1x1"], spec["ch3x3"], spec["ch5x5"]], dtype=np.float64)
    total = widths.sum()
    return widths / total if total > 0 else widths


def topology_shares(records: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """(modules, 3) output shares of a construction, from its layer records."""
    return np.array([module_shares(r["spec"]) for r in records]).reshape(-1, 3)


def module_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per module, the L1 distance of two topologies' shares."""
    if a.shape != b.shape:
        raise UserError(f"topologies of {len(a)} and {len(b)} modules cannot be compared; use the same skeleton")
    return np.abs(a - b).sum(axis=1)


def topology_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over modules of the L1 distance of two topologies' shares (0 to 2)."""
    return float(module_distances(a, b).mean())


def _mean_distance(group_a: list[np.ndarray], group_b: list[np.ndarray] | None = None) -> np.ndarray:
    """Per module, the mean distance between the groups' topologies (within ``group_a`` when ``group_b`` is None)."""
    if group_b is None:
        pairs = list(itertools.combinations(group_a, 2))
    else:
        pairs = [(a, b) for a in group_a for b in group_b]
    return np.mean([module_distances(a, b) for a, b in pairs], axis=0)


def statistic(real: list[np.ndarray], control: list[np.ndarray]) -> float:
    """Mean over modules of (mean real-control distance - mean real-real distance)."""
    return float((_mean_distance(real, control) - _mean_distance(real)).mean())


def permutation_p(real: list[np.ndarray], control: list[np.ndarray], *, permutations: int, seed: int = 0
                  ) -> float:
    """The module-wise permutation p-value of `statistic` (see the module docstring)."""
    stacked = np.stack(real + control)  # (topologies, modules, 3)
    n, n_real = len(stacked), len(real)
    observed = statistic(real, control)
    rng = np.random.default_rng(seed)
    at_least = 1  # the observed labelling
    for _ in range(permutations):
        order = np.argsort(rng.random((stacked.shape[1], n)), axis=1)  # a labelling per module
        shuffled = stacked[order.T, np.arange(stacked.shape[1])[None, :]]
        value = statistic(list(shuffled[:n_real]), list(shuffled[n_real:]))
        at_least += value >= observed - 1e-12
    return at_least / (permutations + 1)


def smallest_p(n_real: int, n_control: int, modules: int, permutations: int) -> float:
    """The smallest p-value `permutation_p` can give: one labelling among C(n, n_real) per module, and no
    fewer than one of ``permutations + 1`` draws. With 2 real seeds, 1 control and 9 modules: 3^-9."""
    labellings = float(math.comb(n_real + n_control, n_real)) ** modules
    return max(1.0 / labellings, 1.0 / (permutations + 1))


@dataclass
class ControlOutcome:
    """One control against the real topologies."""

    kind: str
    distance: float        # mean real-control distance
    seed_distance: float   # mean real-real distance
    p_value: float
    min_p: float = 0.0     # the smallest p-value the test could give here (`smallest_p`)

    @property
    def ratio(self) -> float:
        return self.distance / self.seed_distance if self.seed_distance > 0 else float("inf")

    @property
    def passes(self) -> bool:
        """The run's target: far from the control against the seeds' spread, and significant."""
        return self.ratio >= SEED_MULTIPLE and self.distance >= MIN_DISTANCE and self.p_value < ALPHA


@dataclass
class ControlSummary:
    """The control of a run: the real and control topologies' shares and each control's outcome."""

    modules: list[str]
    shares: dict[str, list[np.ndarray]]  # "real", "shuffled", "noise" -> one (modules, 3) array per seed
    outcomes: list[ControlOutcome] = field(default_factory=list)

    @property
    def depends_on_data(self) -> bool:
        return bool(self.outcomes) and all(o.passes for o in self.outcomes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "modules": self.modules,
            "shares": {k: [s.tolist() for s in v] for k, v in self.shares.items()},
            "outcomes": [o.__dict__ | {"ratio": o.ratio, "passes": o.passes} for o in self.outcomes],
            "depends_on_data": self.depends_on_data,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ControlSummary":
        outcomes = [ControlOutcome(o["kind"], o["distance"], o["seed_distance"], o["p_value"], o.get("min_p", 0.0))
                    for o in data["outcomes"]]
        shares = {k: [np.asarray(s, dtype=np.float64).reshape(-1, 3) for s in v] for k, v in data["shares"].items()}
        return cls(list(data["modules"]), shares, outcomes)


def summarise(modules: list[str], real: list[list[Mapping]], controls: Mapping[str, list[list[Mapping]]], *,
              permutations: int, seed: int = 0) -> ControlSummary:
    """The control's outcome from the layer records of every construction (lists of records per seed)."""
    shares = {"real": [topology_shares(r) for r in real]}
    summary = ControlSummary(modules, shares)
    seed_distance = float(_mean_distance(shares["real"]).mean())
    for kind, constructions in controls.items():
        shares[kind] = [topology_shares(r) for r in constructions]
        distance = float(_mean_distance(shares["real"], shares[kind]).mean())
        p = permutation_p(shares["real"], shares[kind], permutations=permutations, seed=seed)
        floor = smallest_p(len(real), len(constructions), len(modules), permutations)
        summary.outcomes.append(ControlOutcome(kind, distance, seed_distance, p, floor))
    return summary


def verdict(summary: ControlSummary) -> str:
    """The report's first sentence: does this run's topology depend on its data, by the control?"""
    parts = [f"{o.kind} {o.distance:.2f} ({o.ratio:.1f}x the seeds' {o.seed_distance:.2f}, p = {o.p_value:.2g})"
             for o in summary.outcomes]
    criteria = f"at least {SEED_MULTIPLE:g}x the seed-to-seed distance, at least {MIN_DISTANCE:g}, p < {ALPHA:g}"
    if summary.depends_on_data:
        return (f"This run's topology depends on its data: its distance to the controls ({'; '.join(parts)}) "
                f"meets the target ({criteria}).")
    weak = [o for o in summary.outcomes if o.min_p >= ALPHA]
    power = (f" With {len(summary.shares['real'])} seeds and {len(summary.modules)} modules the permutation test "
             f"cannot go below p = {weak[0].min_p:.2g}: add seeds or modules.") if weak else ""
    return (f"This run's topology is not shown to depend on its data: its distance to the controls "
            f"({'; '.join(parts)}) misses the target ({criteria}).{power}")
