"""`ConstructConfig`: every setting of the construction, its default and its valid values; the skeleton
(modules per stage, poolings) and the window each map allows.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from builders.budget import ROUND_TO
from builders.from_clusters import DATA_FALLBACK
from builders.spec import NetworkSpec, PoolSpec
from topo.cluster import METHODS, UnitClustering
from topo.common.errors import SettingError, UserError
from topo.construct.decoding import DECODERS
from topo.controls.nulls import KINDS as NULL_KINDS
from topo.stats.positions import COST_MULTIPLE, DEFAULT_POSITIONS
from topo.stats.sample import DEFAULT_FIRE_QUANTILE, check_fire_quantile

DEFAULT_SKELETON = "2,pool,5,pool,2"


INIT_MODES = ("random", "hebbian")


WINDOWS = (1, 3, 5)


STEMS = ("reference", "none")


#: ``budget_macs`` in words: the reference's multiply-adds, or no budget at all (one unit per cluster).
BUDGETS = ("reference", "none")


#: How the total budget is shared among the modules: ``"even"``, each module an equal share of what the
#: modules before it left; ``"data"``, every module as its clusters call for (one unit per cluster) and one
#: scale factor on the whole network (unstable where layers find few clusters: a narrow layer finds fewer
#: clusters still, docs/clustering.md); ``"reference"``, GoogLeNet's split where the skeleton matches.
SPLITS = ("even", "data", "reference")


#: What the Hebbian edges are tested against: independence, or the same prefix recorded on a null input.
NULLS = ("none",) + NULL_KINDS


#: What a layer without clusters becomes: its principal dimension as 1x1 units, or the reference's proportions.
FALLBACKS = (DATA_FALLBACK, "reference")

#: Batches of BatchNorm calibration where the statistics are recorded over every batch (``stats_batches=None``).
CALIBRATION_BATCHES = 16


@dataclass
class ConstructConfig:
    """How the construction loop measures, clusters and budgets.

    ``skeleton``: modules per stage and the stride-2 poolings between stages
    (GoogLeNet's "2,pool,5,pool,2"). ``stem``: the reference's stem, or
    ``"none"``: the first module reads the data's channels directly (the
    theory's first layer). ``budget_macs``: multiply-adds per image of the whole
    network: a number, ``"reference"`` (those of the reference), or ``"none"``:
    no budget, every cluster becomes exactly one unit of the next layer (no
    rescaling, no rounding, each reduction one channel per channel its clusters
    read), which is what recovering a planted network needs. ``window``: the largest
    window a candidate unit looks at (5: 1x1, 3x3 and 5x5 kernels; None: the largest of `WINDOWS` that fits
    each map); it shrinks to the map where a map is smaller. ``stats_batches``: batches of training data
    the statistics are recorded over; ``positions``: anchor positions per map
    and image (``None``: all; ``"auto"``: the rule of docs/statistics.md); ``stats_cost``: with ``"auto"``,
    the statistics of a prefix cost at most this many of its forward passes (docs/statistics.md);
    ``fire_quantile``: a unit fires above its own q-quantile (``None``: when
    positive). ``null``: test each pair against the same prefix recorded on a null
    input (`topo.controls.nulls`) instead of against independence. ``budget_split``: see
    `SPLITS`; ``fallback``: see `FALLBACKS`; ``max_units_per_cluster``: a module's
    share of the budget is a ceiling, its widths grow to at most this many
    channels per cluster (what is left goes to the later modules; None: no cap);
    where the ceilings leave more than 2% of the budget unspent (`SPENT`), the
    network is scaled as a whole to the budget at the end (`fit_to_total`).
    ``epochs_per_layer``: brief training of each prefix before its statistics are recorded (0: statistics of the random
    network). ``slim_epochs``, ``slim_over``, ``slim_penalty``: widths by training signal after the construction
    (`topo.construct.slimming`; 0 epochs: the clusters' widths).
    ``decoder``: with ``init="hebbian"`` and ``budget_macs="none"``, how a decoded unit fires:
    ``"mean"``, above its sum's mean (BatchNorm bias 0); ``"threshold"``, as often as its cluster's members
    fire together (`topo.construct.decoding`). ``pool_branch``: each module's pooling branch, one unit per cluster
    of its 3x3 max-pooled input (False: no pooling branch, as in the theory's layers).
    """

    skeleton: str = DEFAULT_SKELETON
    stem: str = "reference"
    method: str = "arora"
    window: int | None = None
    n_clusters: int | str = "auto"
    max_clusters: int | None = None
    budget_macs: int | str = "reference"
    budget_split: str = "even"
    round_to: int = ROUND_TO
    fallback: str = DATA_FALLBACK
    max_units_per_cluster: float | None = 8.0
    null: str = "noise"
    init: str = "random"
    epochs_per_layer: int = 0
    slim_epochs: int = 0
    slim_over: float = 2.0
    slim_penalty: float = 1e-4  # Liu et al.'s strength for their sparsity term
    stats_batches: int | None = 16
    positions: int | str | None = DEFAULT_POSITIONS
    stats_cost: float = COST_MULTIPLE
    fire_quantile: float | None = DEFAULT_FIRE_QUANTILE
    decoder: str = "mean"
    pool_branch: bool = True
    direct_only: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        parse_skeleton(self.skeleton)
        if self.init not in INIT_MODES:
            raise SettingError("init", f"init {self.init!r} is unknown: use one of {', '.join(INIT_MODES)}")
        if self.method not in METHODS:
            raise SettingError("method", f"method {self.method!r} is unknown: use one of {', '.join(METHODS)}")
        if self.window is not None and self.window not in WINDOWS:
            raise SettingError("window", f"window {self.window} is not supported: use 1, 3 or 5")
        check_fire_quantile(self.fire_quantile)
        for field, name, choices in (("budget_split", "budget split", SPLITS), ("null", "null", NULLS),
                                     ("fallback", "fallback", FALLBACKS), ("decoder", "decoder", DECODERS)):
            if getattr(self, field) not in choices:
                raise SettingError(field, f"{name} {getattr(self, field)!r} is unknown: use one of "
                                          f"{', '.join(choices)}")
        if self.decoder == "threshold" and (self.init != "hebbian" or self.budget_macs != "none"):
            raise SettingError("decoder", "decoder 'threshold' decodes one unit per cluster: use it with init "
                                          "'hebbian' and budget 'none', or the decoder 'mean'")
        if self.stem not in STEMS:
            raise SettingError("stem", f"stem {self.stem!r} is unknown: use one of {', '.join(STEMS)}")
        if self.max_units_per_cluster is not None and not self.max_units_per_cluster >= 1:
            raise SettingError("max_units_per_cluster", f"max units per cluster {self.max_units_per_cluster} is "
                                                        "below 1: use 1 or more, or none")
        if not self.stats_cost > 0:
            raise SettingError("stats_cost", f"statistics cost {self.stats_cost} is not positive: use a number of "
                                             "forward passes above 0")
        if self.slim_epochs < 0 or not self.slim_over >= 1 or not self.slim_penalty > 0:
            raise SettingError("slim_epochs", f"slimming needs epochs >= 0 ({self.slim_epochs}), a width factor >= 1 "
                                              f"({self.slim_over}) and a positive penalty ({self.slim_penalty})")
        if self.slim_epochs and self.budget_macs == "none":
            raise SettingError("slim_epochs", "slimming keeps the strongest channels within the budget: give a "
                                              "budget (a number or 'reference'), not 'none'")
        if self.epochs_per_layer < 0:
            raise SettingError("epochs_per_layer",
                               f"epochs per layer {self.epochs_per_layer} is negative: use 0 or more")
        if isinstance(self.budget_macs, str):
            if self.budget_macs not in BUDGETS:
                raise SettingError("budget_macs", f"budget {self.budget_macs!r} is neither a number of "
                                                  f"multiply-adds nor one of {', '.join(BUDGETS)}")
        elif isinstance(self.budget_macs, bool) or not self.budget_macs > 0:
            raise SettingError("budget_macs", f"budget {self.budget_macs} multiply-adds is not positive")

    @property
    def calibration_batches(self) -> int:
        """Batches a prefix's BatchNorm statistics (and the threshold decoder) are computed over: those the
        statistics are recorded over, or `CALIBRATION_BATCHES` where they are recorded over every batch."""
        return self.stats_batches or CALIBRATION_BATCHES

    @property
    def largest_window(self) -> int:
        """The largest window any map may get: ``window``, or the largest of `WINDOWS` where none is set."""
        return max(WINDOWS) if self.window is None else self.window

    @property
    def budgeted(self) -> bool:
        return self.budget_macs != "none"

    def clustering(self, window: int, *, progress: bool = True, n_jobs: int | None = None) -> UnitClustering:
        """The (unfitted) clustering estimator this configuration asks for, with ``window`` (``n_jobs``: its
        worker processes, which never change the clusters)."""
        return UnitClustering(method=self.method, window=window, n_clusters=self.n_clusters,
                              max_clusters=self.max_clusters, direct_only=self.direct_only,
                              random_state=self.seed, n_jobs=n_jobs, progress=progress)


def parse_skeleton(text: str) -> list[int | str]:
    """``"2,pool,5,pool,2"`` -> ``[2, "pool", 5, "pool", 2]``; a clear error otherwise."""
    items: list[int | str] = []
    for raw in str(text).split(","):
        token = raw.strip().lower()
        if token == "pool":
            items.append("pool")
        elif token.isdigit() and int(token) > 0:
            items.append(int(token))
        else:
            raise UserError(
                f"skeleton {text!r}: {raw.strip()!r} is neither a module count nor 'pool'; "
                "write it like '2,pool,5,pool,2'"
            )
    if not any(isinstance(item, int) for item in items):
        raise UserError(f"skeleton {text!r} has no modules: write it like '2,pool,5,pool,2'")
    return items


def skeleton_plan(skeleton: str, reference: NetworkSpec) -> list[PoolSpec | str]:
    """The stage plan: a `PoolSpec` for each pooling, and a module name (``inception3a``...) for each module.

    Modules are named as in GoogLeNet (stage numbers from 3, letters within a
    stage); poolings take the reference's pooling layers in order, or a 3x3/2 max
    pool where the reference has fewer.
    """
    reference_pools = [layer for layer in reference.stages if isinstance(layer, PoolSpec)]
    plan: list[PoolSpec | str] = []
    stage, pools = 3, 0
    for item in parse_skeleton(skeleton):
        if item == "pool":
            name = f"maxpool{stage}"
            if pools < len(reference_pools):
                plan.append(dataclasses.replace(reference_pools[pools], name=name))
            else:
                plan.append(PoolSpec(name, 3, 2))
            pools += 1
            stage += 1
        else:
            plan.extend(f"inception{stage}{chr(ord('a') + i)}" for i in range(item))
    return plan


def window_for(map_hw: tuple[int, int], largest: int) -> int:
    """The largest of 5, 3, 1 (up to ``largest``) that fits inside the map."""
    for window in (5, 3, 1):
        if window <= largest and window <= min(map_hw):
            return window
    return 1
