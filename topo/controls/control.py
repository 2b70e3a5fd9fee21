"""The control of every run: which properties of the discovered topology does the data cause?

A property of a topology is "discovered from the data" only if other inputs give
a different one. Beside the real construction, the run constructs (construction
only, no training) on:

* the real data again with other seeds: the spread between seeds, what any
  difference must beat;
* each control of ``kinds``: a null input of `topo.controls.nulls` ("phase"
  randomised, pixel-"shuffled", matched-moment "noise"), or "other", another
  real data set with other statistics (`topo.data.second_source`).

Every construction has its own seed (the run's seed, then the next integers), so
no control shares random numbers with the constructions it is compared with.

**Properties.** Each topology is compared property by property, module by
module (`profile` reads them from the layer records):

* ``units``: the number of clusters found, on a log scale, ``|log2(1 + n_a) -
  log2(1 + n_b)|`` (1 is a factor of about 2);
* ``kernel mix``: the L1 distance (0 to 2) of the 1x1/3x3/5x5 output shares,
  over the modules where both topologies found clusters (a module that found
  nothing has no kernel choice: it is counted on its own line, "found nothing",
  and never enters this distance);
* ``widths``: the module's output width, its 3x3 and its 5x5 reduction, each
  relative to the module's input, on a log scale, ``|log2((w_a + 1) / (in_a +
  1)) - log2((w_b + 1) / (in_b + 1))|``.

The distance of a property is its mean over modules (and widths).

**The test.** The construction is the unit: under the null hypothesis that the
control's input makes no difference, the real and the control's constructions
are exchangeable as wholes. The statistic is the mean real-control distance
minus the mean real-real distance; the p-value is the share of the ways to label
``n_real`` of the constructions "real" whose statistic is at least the observed
one (every labelling when they are at most ``permutations + 1``, else that many
drawn at random; the observed labelling counts once). It cannot go below
``1 / C(n_real + n_control, n_real)`` (`smallest_p`): 1/3 with 2 real
constructions and 1 control, the default, where the run reports distances and
ratios only. docs/clustering.md gives the constructions each level needs.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from topo.common.errors import SettingError, UserError
from topo.common.reading import UnexpectedShape
from topo.controls.nulls import KINDS as NULL_KINDS

#: Every control kind: the null inputs, and "other" (another real data set).
KINDS = NULL_KINDS + ("other",)
#: The controls a run constructs by default (the most informative pair within the default run's time:
#: docs/clustering.md); ``kinds=KINDS`` (``--control-kinds all``) runs every one.
DEFAULT_KINDS = ("phase", "other")
PROPERTIES = ("units", "kernel mix", "widths")
#: What a property must show against a control: a distance at least this many times the seed-to-seed
#: distance, at least MIN_DISTANCE, and a p-value below ALPHA that the design can reach.
SEED_MULTIPLE = 3.0
MIN_DISTANCE = 0.15
ALPHA = 0.01


@dataclass(frozen=True)
class ControlConfig:
    """Which controls a run constructs: their kinds, how many constructions on the data (the run's own
    included) and per control, and the most labellings the test enumerates."""

    kinds: tuple[str, ...] = DEFAULT_KINDS
    real_seeds: int = 2
    control_seeds: int = 1
    permutations: int = 9999

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(dict.fromkeys(self.kinds)))  # a saved list, once each
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise SettingError("kinds", f"control {unknown[0]!r} is unknown: use some of {', '.join(KINDS)}")
        if not self.kinds:
            raise SettingError("kinds", "no control kind given: name at least one, or turn the controls off")
        if self.real_seeds < 2:
            raise SettingError("real_seeds", "the control needs at least 2 constructions on the data to measure "
                                             f"their spread, not {self.real_seeds}")
        if self.control_seeds < 1 or self.permutations < 1:
            raise SettingError("control_seeds" if self.control_seeds < 1 else "permutations",
                               "the control needs at least one construction per control and one permutation")


# --------------------------------------------------------------------------- properties
def profile(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Per module of one construction: ``units`` (clusters), ``found`` (any cluster), ``shares`` (1x1, 3x3,
    5x5 output shares) and ``widths`` (log2 of the output width and the 3x3 and 5x5 reductions, each + 1, over
    the module's input channels + 1)."""
    units, shares, widths = [], [], []
    for r in records:
        spec = r["spec"]
        kernels = np.array([spec["ch1x1"], spec["ch3x3"], spec["ch5x5"]], dtype=np.float64)
        out = kernels.sum() + spec.get("pool_proj", 0)
        units.append(float(r.get("n_clusters", 0)))
        shares.append(kernels / kernels.sum() if kernels.sum() > 0 else kernels)
        inputs = float(r.get("in_channels", 0)) + 1.0
        widths.append(np.log2((np.array([out, spec.get("ch3x3red", 0), spec.get("ch5x5red", 0)]) + 1.0) / inputs))
    units_array = np.array(units)
    return {"units": units_array, "found": units_array > 0, "shares": np.array(shares).reshape(-1, 3),
            "widths": np.array(widths).reshape(-1, 3)}


def property_distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], name: str) -> float:
    """The distance of two construction profiles in property ``name`` (see the module docstring); NaN for the
    kernel mix when no module found clusters in both."""
    if a["units"].shape != b["units"].shape:
        raise UserError(f"topologies of {len(a['units'])} and {len(b['units'])} modules cannot be compared; "
                        "use the same skeleton")
    if name == "units":
        return float(np.abs(np.log2(1 + a["units"]) - np.log2(1 + b["units"])).mean())
    if name == "kernel mix":
        both = a["found"] & b["found"]
        return float(np.abs(a["shares"][both] - b["shares"][both]).sum(axis=1).mean()) if both.any() else math.nan
    if name == "widths":
        return float(np.abs(a["widths"] - b["widths"]).mean())
    raise UserError(f"property {name!r} is unknown: use one of {', '.join(PROPERTIES)}")


def distance_matrix(profiles: Sequence[Mapping[str, np.ndarray]], name: str) -> np.ndarray:
    """Pairwise distances of ``profiles`` in property ``name`` (zeros on the diagonal)."""
    n = len(profiles)
    out = np.zeros((n, n))
    for i, j in itertools.combinations(range(n), 2):
        out[i, j] = out[j, i] = property_distance(profiles[i], profiles[j], name)
    return out


# --------------------------------------------------------------------------- the test
def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def group_distances(distances: np.ndarray, real: Sequence[int]) -> tuple[float, float]:
    """(mean real-control, mean real-real distance) when the constructions ``real`` are labelled real."""
    real = np.asarray(real)
    control = np.setdiff1d(np.arange(len(distances)), real)
    pairs = np.array(list(itertools.combinations(real, 2)))
    within = distances[pairs[:, 0], pairs[:, 1]] if len(pairs) else np.array([])
    return _mean(distances[np.ix_(real, control)].ravel()), _mean(within)


def statistic(distances: np.ndarray, real: Sequence[int]) -> float:
    """Mean real-control distance minus mean real-real distance."""
    between, within = group_distances(distances, real)
    return between - within


def labellings(n: int, n_real: int, permutations: int, seed: int) -> list[tuple[int, ...]]:
    """The labellings the test weighs, the observed one (the first ``n_real``) first: every one when there are
    at most ``permutations + 1``, else that many drawn at random beside the observed."""
    observed = tuple(range(n_real))
    if math.comb(n, n_real) <= permutations + 1:
        return list(itertools.combinations(range(n), n_real))
    rng = np.random.default_rng(seed)
    return [observed] + [tuple(sorted(rng.choice(n, n_real, replace=False))) for _ in range(permutations)]


def permutation_p(distances: np.ndarray, n_real: int, *, permutations: int, seed: int = 0) -> float:
    """The construction-wise permutation p-value of `statistic` (the first ``n_real`` constructions real)."""
    observed = statistic(distances, range(n_real))
    if math.isnan(observed):
        return math.nan
    values = np.array([statistic(distances, real) for real in labellings(len(distances), n_real, permutations, seed)])
    return float(np.mean(values >= observed - 1e-12))


def smallest_p(n_real: int, n_control: int, permutations: int) -> float:
    """The smallest p-value `permutation_p` can give: one labelling of C(n_real + n_control, n_real), and no
    fewer than one of ``permutations + 1`` draws."""
    return max(1.0 / math.comb(n_real + n_control, n_real), 1.0 / (permutations + 1))


def constructions_for(alpha: float) -> tuple[int, int]:
    """The fewest constructions (on the data, per control) whose design can give p below ``alpha``, the data's
    at least the control's (the data's own seeds also serve every other control)."""
    for total in itertools.count(3):
        for n_control in range(1, total // 2 + 1):
            if 1.0 / math.comb(total, n_control) < alpha:
                return total - n_control, n_control
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- outcomes
@dataclass
class ControlOutcome:
    """One property of the real topologies against one control."""

    kind: str
    property: str
    distance: float        # mean real-control distance
    seed_distance: float   # mean real-real distance
    p_value: float
    min_p: float           # the smallest p-value the design can give (`smallest_p`)

    @property
    def ratio(self) -> float:
        if math.isnan(self.distance) or math.isnan(self.seed_distance):
            return math.nan
        if self.seed_distance > 0:
            return self.distance / self.seed_distance
        return math.inf if self.distance > 0 else math.nan  # 0 / 0: nothing to compare

    @property
    def testable(self) -> bool:
        """Whether the design can reach p < ALPHA at all."""
        return self.min_p < ALPHA

    @property
    def shown(self) -> bool:
        """The property differs from the control's: far against the seeds' spread, and significant."""
        return bool(self.ratio >= SEED_MULTIPLE and self.distance >= MIN_DISTANCE and self.p_value < ALPHA)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ratio": self.ratio, "testable": self.testable, "shown": self.shown}


@dataclass
class ControlSummary:
    """The control of a run: every construction's profile and each (control, property) outcome."""

    modules: list[str]
    profiles: dict[str, list[dict[str, np.ndarray]]]  # "real" and each kind -> one profile per construction
    outcomes: list[ControlOutcome] = field(default_factory=list)

    @property
    def kinds(self) -> list[str]:
        return [k for k in self.profiles if k != "real"]

    def found_nothing(self, kind: str) -> list[int]:
        """Per construction of ``kind`` ("real" or a control), the modules that found no cluster."""
        return [int((~p["found"]).sum()) for p in self.profiles[kind]]

    def outcome(self, kind: str, name: str) -> ControlOutcome:
        return next(o for o in self.outcomes if o.kind == kind and o.property == name)

    def shown(self, kind: str) -> list[str]:
        """The properties shown to differ from control ``kind``."""
        return [o.property for o in self.outcomes if o.kind == kind and o.shown]

    def to_dict(self) -> dict[str, Any]:
        return {
            "modules": self.modules,
            "profiles": {k: [{name: v.tolist() for name, v in p.items()} for p in ps]
                         for k, ps in self.profiles.items()},
            "found_nothing": {k: self.found_nothing(k) for k in self.profiles},
            "outcomes": [o.to_dict() for o in self.outcomes],
            "shown": {k: self.shown(k) for k in self.kinds},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ControlSummary:
        if "profiles" not in data:
            raise UnexpectedShape("is from an older version of the control (output shares only)")
        profiles = {k: [{name: np.asarray(v, dtype=bool if name == "found" else np.float64) for name, v in p.items()}
                        for p in ps] for k, ps in data["profiles"].items()}
        outcomes = [ControlOutcome(o["kind"], o["property"], o["distance"], o["seed_distance"], o["p_value"],
                                   o["min_p"]) for o in data["outcomes"]]
        return cls(list(data["modules"]), profiles, outcomes)


def summarise(modules: list[str], real: Sequence[Sequence[Mapping]], controls: Mapping[str, Sequence[Sequence[Mapping]]],
              *, permutations: int, seed: int = 0) -> ControlSummary:
    """The control's outcome from the layer records of every construction (one list of records each)."""
    summary = ControlSummary(modules, {"real": [profile(r) for r in real]})
    for kind, constructions in controls.items():
        summary.profiles[kind] = [profile(r) for r in constructions]
        group = summary.profiles["real"] + summary.profiles[kind]
        floor = smallest_p(len(real), len(constructions), permutations)
        for name in PROPERTIES:
            distances = distance_matrix(group, name)
            between, within = group_distances(distances, range(len(real)))
            p = permutation_p(distances, len(real), permutations=permutations, seed=seed)
            summary.outcomes.append(ControlOutcome(kind, name, between, within, p, floor))
    return summary


# --------------------------------------------------------------------------- sentences
KIND_PHRASES = {"phase": "phase-randomised images", "shuffled": "pixel-shuffled images",
                "noise": "matched-moment noise", "other": "another real data set"}


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def _ratio(value: float) -> str:
    return "n/a" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.1f}x")


def control_line(summary: ControlSummary, kind: str) -> str:
    """One control's result, property by property, and its found-nothing line."""
    parts = [f"{o.property} {_number(o.distance)} ({_ratio(o.ratio)} the seeds' {_number(o.seed_distance)}"
             + (f", p = {o.p_value:.2g}" if o.testable and not math.isnan(o.p_value) else "") + ")"
             for o in summary.outcomes if o.kind == kind]
    nothing = summary.found_nothing(kind)
    modules = len(summary.modules)
    shown = summary.shown(kind)
    claim = f"shown to differ: {', '.join(shown)}" if shown else "no property shown to differ"
    return (f"Against {KIND_PHRASES.get(kind, kind)}: {'; '.join(parts)}; found nothing in "
            f"{', '.join(f'{k}/{modules}' for k in nothing)} modules (the data: "
            f"{', '.join(f'{k}/{modules}' for k in summary.found_nothing('real'))}); {claim}.")


def verdict(summary: ControlSummary) -> str:
    """The report's first paragraph: what the control shows, property by property, and what its design allows."""
    n_real = len(summary.profiles["real"])
    counts = ", ".join(f"{len(summary.profiles[k])} on {KIND_PHRASES.get(k, k)}" for k in summary.kinds)
    floors = {o.min_p for o in summary.outcomes}
    if floors and min(floors) >= ALPHA:
        real_needed, control_needed = constructions_for(ALPHA)
        design = (f"With the construction as the unit, this design cannot give p below {min(floors):.2g}, so it "
                  f"reports distances and ratios only ({real_needed} constructions on the data and "
                  f"{control_needed} per control reach p < {ALPHA:g}: --control-seeds).")
    else:
        design = (f"A property is shown to differ at a distance of at least {SEED_MULTIPLE:g}x the seeds' and "
                  f"{MIN_DISTANCE:g}, with p < {ALPHA:g} (the construction the unit).")
    lines = [f"Control: {n_real} constructions on the data and {counts}. {design}"]
    lines += [control_line(summary, kind) for kind in summary.kinds]
    return " ".join(lines)
