"""Records and rows of a run, and the tables made from them (CSV, Markdown, LaTeX).

The inputs are plain data, the same the construction loop and the trainer
write into a run directory:

* a **layer record** per constructed Inception module (`topo.construct.records.LayerRecord`);
* a **comparison row** per trained network (:class:`ComparisonRow`);
* a **history** per trained network: a DataFrame with one row per epoch and
  the columns ``epoch, lr, train_loss, train_top1, val_loss, val_top1,
  val_top5`` (optionally ``ema_val_top1``).

Accuracies everywhere are fractions in [0, 1]; tables and figures show them
in percent. Records and rows may be mappings or dataclass instances. The
figures (`analysis.plots`) and the report (`analysis.report`) both read their
inputs through the helpers here.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, TypedDict

import numpy as np
import pandas as pd

from topo.common.errors import UserError
from topo.common.writing import atomic_write_text
from topo.construct.records import LayerRecord  # noqa: F401 - the records' type, declared by their producer

# The six widths of an Inception module, in the paper's table order.
BRANCHES: tuple[tuple[str, str], ...] = (
    ("ch1x1", "#1x1"),
    ("ch3x3red", "#3x3 reduce"),
    ("ch3x3", "#3x3"),
    ("ch5x5red", "#5x5 reduce"),
    ("ch5x5", "#5x5"),
    ("pool_proj", "pool proj"),
)
KERNEL_SIZES = (1, 3, 5)

#: What the comparison table's columns measure (printed under it in reports).
COMPARISON_CAPTION = (
    "Params and MACs are those of the network at inference (auxiliary heads excluded); MACs are "
    "multiply-adds per image (fvcore's 'flops'; FlopCounterMode counts 2 per multiply-add). Train time: "
    "seconds spent in the training passes of all epochs, evaluation excluded; throughput: training images "
    "per second of those passes."
)


class ReportError(UserError, ValueError):
    """Records or rows that cannot be reported (a missing or malformed field)."""


class ComparisonRow(TypedDict, total=False):
    """One trained network's cost and accuracy."""

    network: str                   # "discovered", "googlenet-small", ...
    params: int
    macs: int
    top1: float | None             # fraction in [0, 1]
    top5: float | None
    ema_top1: float | None
    train_time_s: float | None     # seconds in the training passes, evaluation excluded
    wall_time_s: float | None      # seconds of the whole training, evaluation included
    throughput: float | None       # training images per second of the training passes


# --------------------------------------------------------------------------- inputs


def as_dict(obj: Any) -> dict[str, Any]:
    """A record or row as a plain dict (accepts mappings and dataclasses)."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "to_dict"):
        return dict(obj.to_dict())
    raise ReportError(f"cannot report a {type(obj).__name__}; pass a dict or a dataclass instance")


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def accuracy_fraction(value: Any, field: str, network: str) -> float | None:
    """An accuracy as a float in [0, 1], or None when it was not measured."""
    if is_missing(value):
        return None
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ReportError(
            f"{field}={value} for network {network!r} is not a fraction in [0, 1]; "
            "pass accuracies as fractions (divide percentages by 100)"
        )
    return value


def _number(value: Any) -> float | None:
    return None if is_missing(value) else float(value)


def branch_widths_of(spec: Mapping[str, Any] | None, module: str) -> dict[str, int] | None:
    """The six branch widths of an InceptionSpec dict (None stays None)."""
    if spec is None:
        return None
    spec = as_dict(spec)
    missing = [key for key, _ in BRANCHES if key not in spec]
    if missing:
        raise ReportError(f"spec of module {module!r} lacks {', '.join(missing)}; pass an InceptionSpec dict")
    return {key: int(spec[key]) for key, _ in BRANCHES}


def kernel_counts_of(record: Mapping[str, Any]) -> dict[int, int]:
    """Clusters per kernel size (1, 3, 5) of a layer record; JSON string keys accepted."""
    counts = {k: 0 for k in KERNEL_SIZES}
    for key, n in (record.get("kernel_counts") or {}).items():
        size = int(key) if str(key).isdigit() else None
        if size not in counts:
            raise ReportError(f"module {record.get('name')!r} has kernel size {key!r}; expected 1, 3 or 5")
        counts[size] += int(n)
    return counts


def kernel_shares(records: Sequence[Any]) -> pd.DataFrame:
    """Per module (in depth order) the share of 1x1, 3x3 and 5x5 clusters.

    Shares are of all clusters of that module (the sum of its kernel counts);
    modules without clusters are left out. Columns: ``depth`` (position among
    all records), ``module``, ``clusters``, ``share1``, ``share3``, ``share5``,
    ``share35`` (3x3 plus 5x5) and ``window_forced`` (the map, not the data, set
    the largest window).
    """
    rows = []
    for depth, record in enumerate(map(as_dict, records)):
        counts = kernel_counts_of(record)
        total = sum(counts.values())
        if total == 0:
            continue
        rows.append({
            "depth": depth,
            "module": str(record.get("name", f"module{depth}")),
            "clusters": total,
            "share1": counts[1] / total,
            "share3": counts[3] / total,
            "share5": counts[5] / total,
            "share35": (counts[3] + counts[5]) / total,
            "window_forced": bool(record.get("window_forced", False)),
        })
    columns = ["depth", "module", "clusters", "share1", "share3", "share5", "share35", "window_forced"]
    return pd.DataFrame(rows, columns=columns)


@dataclasses.dataclass(frozen=True)
class DepthTrend:
    """How the share of 3x3+5x5 clusters changes with depth."""

    slope: float          # least-squares slope, share per module
    first_half: float     # mean share over the shallower half of the modules
    second_half: float    # mean share over the deeper half
    first: float          # share in the first module
    last: float           # share in the last module

    # Differences below this are rounding noise (a flat series must not "rise").
    tolerance = 1e-9

    @property
    def rises(self) -> bool:
        """Both the slope and the halves say the share grows with depth."""
        return self.slope > self.tolerance and self.second_half - self.first_half > self.tolerance

    @property
    def falls_or_flat(self) -> bool:
        """Neither the slope nor the halves say it grows."""
        return self.slope <= self.tolerance and self.second_half - self.first_half <= self.tolerance


def depth_trend(shares: pd.DataFrame) -> DepthTrend | None:
    """The trend of ``share35`` against the ``depth`` column of :func:`kernel_shares`; None below two modules."""
    if len(shares) < 2:
        return None
    y = shares["share35"].to_numpy(dtype=np.float64)
    x = shares["depth"].to_numpy(dtype=np.float64)
    slope = float(np.polyfit(x, y, 1)[0])
    half = len(y) // 2
    # With an odd count the middle module belongs to neither half.
    first_half, second_half = float(y[:half].mean()), float(y[len(y) - half:].mean())
    return DepthTrend(slope, first_half, second_half, float(y[0]), float(y[-1]))


# --------------------------------------------------------------------------- formatting


def human_count(n: float) -> str:
    """A count with three significant digits and a k/M/G suffix: 6.62M, 1.50G."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{_sig(n / scale)}{suffix}"
    return f"{n:.0f}"


def _sig(x: float, digits: int = 3) -> str:
    """``x`` with at least ``digits`` significant digits and never in exponent form."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def _time_unit(seconds: Sequence[float]) -> tuple[str, float]:
    longest = max(seconds, default=0.0)
    if longest >= 2 * 3600:
        return "h", 3600.0
    if longest >= 2 * 60:
        return "min", 60.0
    return "s", 1.0


# --------------------------------------------------------------------------- tables


def comparison_frame(rows: Sequence[Any]) -> pd.DataFrame:
    """One row per trained network: params (M), multiply-adds (M or G), accuracy (%), time, throughput.

    Numeric columns stay numeric (missing values are NaN); the unit is in the
    column name. The EMA column appears only when some network has one.
    """
    rows = [as_dict(r) for r in rows]
    for i, row in enumerate(rows):
        for key in ("network", "params", "macs"):
            if is_missing(row.get(key)):
                raise ReportError(f"comparison row {i} lacks {key!r}; every row needs network, params and macs")
    macs = [float(r["macs"]) for r in rows]
    mac_unit, mac_scale = ("G", 1e9) if max(macs, default=0.0) >= 1e9 else ("M", 1e6)
    times = [t for t in (_number(r.get("train_time_s")) for r in rows) if t is not None]
    time_unit, time_scale = _time_unit(times)

    def pct(row: Mapping[str, Any], key: str) -> float:
        value = accuracy_fraction(row.get(key), key, row["network"])
        return np.nan if value is None else 100.0 * value

    def scaled(row: Mapping[str, Any], key: str, scale: float) -> float:
        value = _number(row.get(key))
        return np.nan if value is None else value / scale

    frame = pd.DataFrame({
        "Network": [str(r["network"]) for r in rows],
        "Params (M)": [float(r["params"]) / 1e6 for r in rows],
        f"MACs ({mac_unit})": [m / mac_scale for m in macs],
        "Top-1 (%)": [pct(r, "top1") for r in rows],
        "Top-5 (%)": [pct(r, "top5") for r in rows],
        "EMA top-1 (%)": [pct(r, "ema_top1") for r in rows],
        f"Train time ({time_unit})": [scaled(r, "train_time_s", time_scale) for r in rows],
        "Throughput (img/s)": [scaled(r, "throughput", 1.0) for r in rows],
    })
    if frame["EMA top-1 (%)"].isna().all():
        frame = frame.drop(columns="EMA top-1 (%)")
    return frame


def _display(frame: pd.DataFrame, missing: str) -> pd.DataFrame:
    """``frame`` as strings for a printed table: sensible digits, ``missing`` for NaN."""
    out = pd.DataFrame(index=frame.index)
    for column in frame.columns:
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values):
            out[column] = values.astype(str)
            continue
        if "(%)" in column or column.startswith("Train time"):
            fmt = lambda x: f"{x:.1f}"  # noqa: E731
        elif column.startswith("Throughput"):
            fmt = lambda x: f"{x:.0f}" if abs(x) >= 100 else _sig(x)  # noqa: E731
        elif pd.api.types.is_integer_dtype(values):
            fmt = lambda x: f"{int(x)}"  # noqa: E731
        else:
            fmt = _sig
        out[column] = [missing if pd.isna(x) else fmt(x) for x in values]
    return out


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table, first column left-aligned, the others right-aligned."""
    shown = _display(frame, "–")
    align = ("left",) + ("right",) * (shown.shape[1] - 1)
    return shown.to_markdown(index=False, colalign=align, disable_numparse=True)


def to_latex(frame: pd.DataFrame) -> str:
    """A booktabs ``tabular`` (no float, so it can be ``\\input`` into any table)."""
    try:
        import jinja2  # noqa: F401  (pandas' to_latex renders through jinja2)
    except ImportError as exc:
        raise ReportError("writing LaTeX tables needs jinja2; install it (pip install jinja2)") from exc
    shown = _display(frame, "--")
    body = shown.to_latex(index=False, escape=True, column_format="l" + "r" * (shown.shape[1] - 1))
    return "% needs \\usepackage{booktabs}\n" + body


def write_comparison(rows: Sequence[Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``comparison.csv``, ``.md`` and ``.tex`` into ``out_dir`` atomically; return their paths."""
    frame = comparison_frame(rows)
    out_dir = Path(out_dir)
    paths = [out_dir / "comparison.csv", out_dir / "comparison.md", out_dir / "comparison.tex"]
    atomic_write_text(paths[0], frame.to_csv(index=False, float_format="%.10g"))
    atomic_write_text(paths[1], to_markdown(frame) + "\n")
    atomic_write_text(paths[2], to_latex(frame))
    return paths


def layer_frame(records: Sequence[Any]) -> pd.DataFrame:
    """Per module: the discovered branch widths beside the reference's, clusters and cost.

    Columns: Module, In, then for each branch its discovered width and
    ``<branch> (ref)`` (nullable integers: missing when there is no reference),
    Out and Out (ref), Clusters, 3x3+5x5 share (%), Firing (%) (the layer's mean firing rate), Rule (``fallback``
    where no cluster was found, ``map`` where the map forced a smaller window), Dead units, MACs (M), Budget (M).
    """
    table = []
    for i, record in enumerate(map(as_dict, records)):
        name = str(record.get("name", f"module{i}"))
        if record.get("spec") is None:
            raise ReportError(f"layer record {name!r} lacks 'spec'; every record needs the discovered InceptionSpec")
        spec = as_dict(record["spec"])
        found = branch_widths_of(spec, name)
        reference = branch_widths_of(record.get("reference"), name)
        counts = kernel_counts_of(record)
        total = sum(counts.values())
        row: dict[str, Any] = {"Module": name, "In": record.get("in_channels", spec.get("in_channels"))}
        for key, label in BRANCHES:
            row[label] = found[key]
            row[f"{label} (ref)"] = None if reference is None else reference[key]
        row["Out"] = found["ch1x1"] + found["ch3x3"] + found["ch5x5"] + found["pool_proj"]
        row["Out (ref)"] = None if reference is None else (
            reference["ch1x1"] + reference["ch3x3"] + reference["ch5x5"] + reference["pool_proj"])
        row["Clusters"] = total
        row["3x3+5x5 share (%)"] = 100 * (counts[3] + counts[5]) / total if total else None
        row["Firing (%)"] = None if is_missing(record.get("firing_rate")) else 100 * record["firing_rate"]
        row["Rule"] = ", ".join(tag for tag, on in (("fallback", record.get("fallback")),
                                                    ("map", record.get("window_forced"))) if on)
        row["Dead units"] = record.get("dead_units")
        row["MACs (M)"] = None if is_missing(record.get("macs")) else record["macs"] / 1e6
        row["Budget (M)"] = None if is_missing(record.get("budget_macs")) else record["budget_macs"] / 1e6
        table.append(row)
    frame = pd.DataFrame(table)
    if frame.empty:
        return frame
    floats = ("3x3+5x5 share (%)", "Firing (%)", "MACs (M)", "Budget (M)")
    integer_columns = [c for c in frame.columns if c not in ("Module", "Rule", *floats)]
    for column in integer_columns:
        frame[column] = pd.array(frame[column].tolist(), dtype="Int64")
    for column in floats:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


def layer_markdown(frame: pd.DataFrame) -> str:
    """The layer table with each width shown as ``discovered (reference)``."""
    compact = pd.DataFrame({"Module": frame["Module"], "In": frame["In"]})
    for label in [label for _, label in BRANCHES] + ["Out"]:
        compact[label] = [
            f"{d}" if pd.isna(r) else f"{d} ({r})" for d, r in zip(frame[label], frame[f"{label} (ref)"])
        ]
    for column in ("Clusters", "3x3+5x5 share (%)", "Dead units", "MACs (M)", "Budget (M)"):
        compact[column] = frame[column]
    return to_markdown(compact)
