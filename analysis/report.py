"""Comparison tables (CSV, Markdown, LaTeX), plain findings and ``report.md``.

The inputs are plain data, the same the construction loop and the trainer
write into a run directory:

* a **layer record** per constructed Inception module (:class:`LayerRecord`);
* a **comparison row** per trained network (:class:`ComparisonRow`);
* a **history** per trained network: a DataFrame with one row per epoch and
  the columns ``epoch, lr, train_loss, train_top1, val_loss, val_top1,
  val_top5`` (optionally ``ema_val_top1``).

Accuracies everywhere are fractions in [0, 1]; tables and figures show them
in percent. Records and rows may be mappings or dataclass instances.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, TypedDict

import numpy as np
import pandas as pd

from topo.errors import UserError
from topo.io import atomic_write_text

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


class ReportError(UserError, ValueError):
    """Records or rows that cannot be reported (a missing or malformed field)."""


class LayerRecord(TypedDict, total=False):
    """What the construction loop measured and decided for one module."""

    name: str                      # e.g. "inception3a"
    in_channels: int
    spatial_shape: list[int]       # [H, W] of the recorded map
    observations: int              # positions x images the statistics saw
    dead_units: int
    method: str                    # clustering method, e.g. "arora"
    n_clusters: int
    kernel_counts: dict[str, int]  # clusters per kernel size: {"1": .., "3": .., "5": ..}
    spec: dict[str, Any]           # the discovered InceptionSpec as a dict
    reference: dict[str, Any] | None  # the hand-designed module's InceptionSpec dict
    macs: int                      # multiply-adds of the discovered module
    budget_macs: int               # its share of the multiply-add budget


class ComparisonRow(TypedDict, total=False):
    """One trained network's cost and accuracy."""

    network: str                   # "discovered", "googlenet-small", ...
    params: int
    macs: int
    top1: float | None             # fraction in [0, 1]
    top5: float | None
    ema_top1: float | None
    train_time_s: float | None
    throughput: float | None       # training images per second


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


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def accuracy_fraction(value: Any, field: str, network: str) -> float | None:
    """An accuracy as a float in [0, 1], or None when it was not measured."""
    if _missing(value):
        return None
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ReportError(
            f"{field}={value} for network {network!r} is not a fraction in [0, 1]; "
            "pass accuracies as fractions (divide percentages by 100)"
        )
    return value


def _number(value: Any) -> float | None:
    return None if _missing(value) else float(value)


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
    all records), ``module``, ``clusters``, ``share1``, ``share3``, ``share5``
    and ``share35`` (3x3 plus 5x5).
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
        })
    columns = ["depth", "module", "clusters", "share1", "share3", "share5", "share35"]
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
    """The trend of ``share35`` over the modules of :func:`kernel_shares`; None below two modules."""
    if len(shares) < 2:
        return None
    y = shares["share35"].to_numpy(dtype=np.float64)
    x = np.arange(len(y), dtype=np.float64)
    slope = float(np.polyfit(x, y, 1)[0])
    half = len(y) // 2
    # With an odd count the middle module belongs to neither half.
    first_half, second_half = float(y[:half].mean()), float(y[len(y) - half:].mean())
    return DepthTrend(slope, first_half, second_half, float(y[0]), float(y[-1]))


# --------------------------------------------------------------------------- formatting


def _human(n: float) -> str:
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


def _pct(x: float) -> str:
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
            if _missing(row.get(key)):
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
    Out and Out (ref), Clusters, 3x3+5x5 share (%), Dead units, MACs (M), Budget (M).
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
        row["Dead units"] = record.get("dead_units")
        row["MACs (M)"] = None if _missing(record.get("macs")) else record["macs"] / 1e6
        row["Budget (M)"] = None if _missing(record.get("budget_macs")) else record["budget_macs"] / 1e6
        table.append(row)
    frame = pd.DataFrame(table)
    if frame.empty:
        return frame
    integer_columns = [c for c in frame.columns if c not in ("Module", "3x3+5x5 share (%)", "MACs (M)", "Budget (M)")]
    for column in integer_columns:
        frame[column] = pd.array(frame[column].tolist(), dtype="Int64")
    for column in ("3x3+5x5 share (%)", "MACs (M)", "Budget (M)"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


def _layer_markdown(frame: pd.DataFrame) -> str:
    """The layer table with each width shown as ``discovered (reference)``."""
    compact = pd.DataFrame({"Module": frame["Module"], "In": frame["In"]})
    for label in [label for _, label in BRANCHES] + ["Out"]:
        compact[label] = [
            f"{d}" if pd.isna(r) else f"{d} ({r})" for d, r in zip(frame[label], frame[f"{label} (ref)"])
        ]
    for column in ("Clusters", "3x3+5x5 share (%)", "Dead units", "MACs (M)", "Budget (M)"):
        compact[column] = frame[column]
    return to_markdown(compact)


# --------------------------------------------------------------------------- findings


def _pick_networks(rows: Sequence[Mapping[str, Any]], discovered: str) -> tuple[dict | None, dict | None]:
    """The discovered network's row and the reference's (a GoogLeNet if any, else the first other)."""
    mine = next((r for r in rows if r["network"] == discovered), None)
    others = [r for r in rows if r["network"] != discovered]
    reference = next((r for r in others if str(r["network"]).lower().startswith("googlenet")), None)
    if reference is None and others:
        reference = others[0]
    return mine, reference


def _accuracy_sentence(rows: Sequence[Mapping[str, Any]], discovered: str) -> str:
    mine, ref = _pick_networks(rows, discovered)
    if mine is None and ref is None:
        return "No network was trained, so there is no accuracy to compare."
    if mine is None:
        ref_top1 = accuracy_fraction(ref.get("top1"), "top1", ref["network"])
        reaches = "" if ref_top1 is None else f" and reaches {_pct(ref_top1)} top-1"
        return (f"No discovered network was trained; {ref['network']} has {_human(ref['params'])} parameters, "
                f"{_human(ref['macs'])} multiply-adds{reaches}.")
    top1 = accuracy_fraction(mine.get("top1"), "top1", mine["network"])
    top5 = accuracy_fraction(mine.get("top5"), "top5", mine["network"])
    cost = f"{_human(mine['params'])} parameters and {_human(mine['macs'])} multiply-adds"
    if ref is None:
        if top1 is None:
            return f"The discovered network has {cost}; its accuracy was not measured and no reference was trained."
        acc = f"{_pct(top1)} top-1" + (f" ({_pct(top5)} top-5)" if top5 is not None else "")
        return f"The discovered network reaches {acc} with {cost}; no reference network was trained beside it."
    ref_top1 = accuracy_fraction(ref.get("top1"), "top1", ref["network"])
    ratio = (f"{_human(mine['params'])} parameters against {_human(ref['params'])} "
             f"({mine['params'] / ref['params']:.2f}x) and {_human(mine['macs'])} multiply-adds against "
             f"{_human(ref['macs'])} ({mine['macs'] / ref['macs']:.2f}x)")
    if top1 is None or ref_top1 is None:
        if top1 is None and ref_top1 is None:
            missing = "neither network's accuracy was measured"
        else:
            missing = f"{'the discovered network' if top1 is None else ref['network']}'s accuracy was not measured"
        return f"Against {ref['network']}, the discovered network has {ratio}; {missing}."
    diff = 100 * (top1 - ref_top1)
    if round(diff, 1) == 0:
        gap = "the same to a tenth of a point"
    else:
        gap = f"{abs(diff):.1f} points {'higher' if diff > 0 else 'lower'}"
    top5_part = ""
    ref_top5 = accuracy_fraction(ref.get("top5"), "top5", ref["network"])
    if top5 is not None and ref_top5 is not None:
        top5_part = f" (top-5 {_pct(top5)} against {_pct(ref_top5)})"
    return (f"The discovered network reaches {_pct(top1)} top-1 against {_pct(ref_top1)} for "
            f"{ref['network']}, {gap}{top5_part}, with {ratio}.")


def _depth_sentence(records: Sequence[Mapping[str, Any]]) -> str:
    shares = kernel_shares(records)
    if shares.empty:
        return "No clusters were recorded, so the share of 3x3 and 5x5 clusters by depth cannot be judged."
    if len(shares) == 1:
        row = shares.iloc[0]
        return (f"With a single module ({row['module']}, {_pct(row['share35'])} of its clusters 3x3 or 5x5) "
                "the paper's expectation that larger kernels grow more common with depth cannot be judged.")
    trend = depth_trend(shares)
    assert trend is not None
    first, last = shares.iloc[0]["module"], shares.iloc[-1]["module"]
    numbers = (f"the share of 3x3 and 5x5 clusters goes from {_pct(trend.first)} in {first} to "
               f"{_pct(trend.last)} in {last} (least-squares slope {100 * trend.slope:+.1f} points per module; "
               f"mean {_pct(trend.first_half)} in the shallower half, {_pct(trend.second_half)} in the deeper half)")
    if trend.rises:
        verdict = "this run bears it out"
    elif trend.falls_or_flat:
        verdict = "this run does not bear it out"
    else:
        verdict = "this run does not clearly bear it out, the slope and the halves disagreeing"
    return f"The paper expects larger kernels to grow more common in higher layers: {numbers}, so {verdict}."


def _budget_sentence(records: Sequence[Mapping[str, Any]]) -> str:
    macs = [r.get("macs") for r in records]
    budget = [r.get("budget_macs") for r in records]
    if any(_missing(m) for m in macs) or any(_missing(b) for b in budget) or not records:
        return ""
    total, allowed = float(sum(macs)), float(sum(budget))
    if allowed <= 0:
        return ""
    return (f"The Inception modules alone cost {_human(total)} multiply-adds against the {_human(allowed)} "
            f"of their per-module budgets ({100 * (total / allowed - 1):+.1f}%: widths are rounded to whole "
            "multiples; the stem and the classifier, which reads the last module, take the rest of the "
            "network's budget).")


def _dead_sentence(records: Sequence[Mapping[str, Any]]) -> str:
    dead = [(str(r.get("name")), int(r["dead_units"])) for r in records if not _missing(r.get("dead_units"))]
    if not dead:
        return ""
    hit = [(name, n) for name, n in dead if n > 0]
    if not hit:
        return "No module input had dead units."
    where = ", ".join(f"{n} at the input of {name}" for name, n in hit)
    total = sum(n for _, n in hit)
    return f"{total} dead unit{'s' if total != 1 else ''} (no variance) {'were' if total != 1 else 'was'} found: {where}."


def findings(records: Sequence[Any], rows: Sequence[Any], *, discovered: str = "discovered") -> str:
    """One paragraph of plain findings computed from the layer records and comparison rows.

    It compares the discovered network with the reference (accuracy, params,
    multiply-adds), says whether the share of 3x3 and 5x5 clusters rises with
    depth (least-squares slope and shallow/deep halves must agree to "bear it
    out"), the cost against the budget, and dead units.
    """
    records = [as_dict(r) for r in records]
    rows = [as_dict(r) for r in rows]
    sentences = [
        _accuracy_sentence(rows, discovered),
        _depth_sentence(records) if records else "",
        _budget_sentence(records),
        _dead_sentence(records),
    ]
    return " ".join(s for s in sentences if s)


# --------------------------------------------------------------------------- report.md


def _flatten(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    items = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            items.extend(_flatten(value, f"{name}."))
        else:
            text = str(value)
            items.append((name, text if len(text) <= 80 else text[:77] + "..."))
    return items


def _config_markdown(config: Any) -> str:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    items = _flatten(config)
    if not items:
        return "(empty configuration)"
    frame = pd.DataFrame(items, columns=["Setting", "Value"])
    frame["Value"] = frame["Value"].str.replace("|", "\\|", regex=False)
    return frame.to_markdown(index=False)


def _correlation_inputs(value: Any) -> tuple[np.ndarray, Any, Any]:
    """``(corr, order, labels)`` from a mapping with those keys or a 3-tuple."""
    if isinstance(value, Mapping):
        return np.asarray(value["corr"]), value.get("order"), value.get("labels")
    corr, order, labels = value
    return np.asarray(corr), order, labels


def _figure_section(title: str, paths: Sequence[Path], run_dir: Path, caption: str) -> list[str]:
    png = next((p for p in paths if p.suffix == ".png"), None)
    if png is None:
        return []
    pdf = next((p for p in paths if p.suffix == ".pdf"), None)
    rel = png.relative_to(run_dir).as_posix()
    lines = [f"### {title}", "", f"![{title}]({rel})", "", caption]
    if pdf is not None:
        lines[-1] += f" ([PDF]({pdf.relative_to(run_dir).as_posix()}))"
    return lines + [""]


def write_report(
    run_dir: str | os.PathLike,
    records: Sequence[Any],
    rows: Sequence[Any],
    histories: Mapping[str, pd.DataFrame] | None,
    *,
    corr_by_layer: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Render every figure into ``run_dir/figures``, the comparison tables and ``run_dir/report.md``.

    ``corr_by_layer`` maps a module name to ``{"corr", "order", "labels"}``
    (or a ``(corr, order, labels)`` tuple). Parts without data (no records, no
    trained network, no history) are left out. Returns the path of report.md.
    """
    from analysis import plots

    run_dir = Path(run_dir)
    figures = run_dir / "figures"
    records = [as_dict(r) for r in records]
    rows = [as_dict(r) for r in rows]
    histories = dict(histories or {})

    lines = ["# topo-build report", ""]
    lines += ["## Findings", "", findings(records, rows), ""]

    if rows:
        write_comparison(rows, run_dir)
        lines += ["## Comparison", "", to_markdown(comparison_frame(rows)), "",
                  "Also as [comparison.csv](comparison.csv) and [comparison.tex](comparison.tex).", ""]
    if records:
        has_reference = any(r.get("reference") is not None for r in records)
        note = "Widths shown as discovered (reference)." if has_reference else "Discovered widths (no reference given)."
        lines += ["## Modules", "", note, "",
                  _layer_markdown(layer_frame(records)), ""]

    figure_lines: list[str] = []
    if records:
        figure_lines += _figure_section(
            "Branch widths", plots.branch_widths(records, figures / "branch_widths"), run_dir,
            "Per module, the discovered branch widths beside the reference's (hatched).")
        figure_lines += _figure_section(
            "Kernel sizes by depth", plots.kernel_share_by_depth(records, figures / "kernel_share"), run_dir,
            "Share of the clusters covered by 3x3 and 5x5 convolutions per module, with the least-squares trend.")
    if rows:
        figure_lines += _figure_section(
            "Accuracy against multiply-adds", plots.accuracy_vs_macs(rows, figures / "accuracy_vs_macs"), run_dir,
            "Top-1 accuracy of every trained network against its multiply-adds.")
    if histories:
        figure_lines += _figure_section(
            "Learning curves", plots.learning_curves(histories, figures / "learning_curves"), run_dir,
            "Validation top-1 and training loss per epoch.")
    for name, value in (corr_by_layer or {}).items():
        corr, order, labels = _correlation_inputs(value)
        stem = figures / f"correlation_{plots.safe_name(name)}"
        figure_lines += _figure_section(
            f"Correlation at the input of {name}",
            plots.correlation_matrix(corr, order, labels, stem, title=f"{name}: unit correlation"), run_dir,
            "Units reordered by cluster; lines mark cluster boundaries, unclustered units last.")
    if figure_lines:
        lines += ["## Figures", ""] + figure_lines

    if config is not None:
        lines += ["## Configuration", "", _config_markdown(config), ""]

    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
