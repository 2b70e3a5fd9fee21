"""``report.md``: the findings of a run in plain sentences, its tables and its figures.

`findings` computes the sentences from the layer records and comparison rows
(see `analysis.tables` for both); `write_report` composes the tables of
`analysis.tables` and the figures of `analysis.plots` into ``report.md``.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from analysis import plots
from analysis.tables import (
    COMPARISON_CAPTION,
    accuracy_fraction,
    as_dict,
    comparison_frame,
    depth_trend,
    human_count,
    is_missing,
    kernel_shares,
    layer_frame,
    layer_markdown,
    percent,
    to_markdown,
    write_comparison,
)
from topo.common.writing import atomic_write_text
from topo.controls.control import ControlSummary, verdict

# --------------------------------------------------------------------------- findings

#: The report of a folder (a run's, an analysis's) and its figures, by name inside it.
REPORT_FILE = "report.md"
FIGURES_DIR = "figures"


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
        reaches = "" if ref_top1 is None else f" and reaches {percent(ref_top1)} top-1"
        return (f"No discovered network was trained; {ref['network']} has {human_count(ref['params'])} parameters, "
                f"{human_count(ref['macs'])} multiply-adds{reaches}.")
    top1 = accuracy_fraction(mine.get("top1"), "top1", mine["network"])
    top5 = accuracy_fraction(mine.get("top5"), "top5", mine["network"])
    cost = f"{human_count(mine['params'])} parameters and {human_count(mine['macs'])} multiply-adds"
    if ref is None:
        if top1 is None:
            return f"The discovered network has {cost}; its accuracy was not measured and no reference was trained."
        acc = f"{percent(top1)} top-1" + (f" ({percent(top5)} top-5)" if top5 is not None else "")
        return f"The discovered network reaches {acc} with {cost}; no reference network was trained beside it."
    ref_top1 = accuracy_fraction(ref.get("top1"), "top1", ref["network"])
    ratio = (f"{human_count(mine['params'])} parameters against {human_count(ref['params'])} "
             f"({mine['params'] / ref['params']:.2f}x) and {human_count(mine['macs'])} multiply-adds against "
             f"{human_count(ref['macs'])} ({mine['macs'] / ref['macs']:.2f}x)")
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
        top5_part = f" (top-5 {percent(top5)} against {percent(ref_top5)})"
    return (f"The discovered network reaches {percent(top1)} top-1 against {percent(ref_top1)} for "
            f"{ref['network']}, {gap}{top5_part}, with {ratio}.")


def _depth_sentence(records: Sequence[Mapping[str, Any]]) -> str:
    """The depth trend over the modules whose largest window the data, not the map, set."""
    every = kernel_shares(records)
    shares = every[~every["window_forced"]].reset_index(drop=True)
    forced = every.loc[every["window_forced"], "module"].tolist()
    excluded = (f" ({', '.join(forced)} left out: {'its' if len(forced) == 1 else 'their'} maps were too small "
                "for a 5x5 window, so the map forced the kernel choice)") if forced else ""
    if shares.empty and forced:
        return f"Every module's kernel choice was forced by its map{excluded}, so the depth trend cannot be judged."
    if shares.empty:
        return "No clusters were recorded, so the share of 3x3 and 5x5 clusters by depth cannot be judged."
    if len(shares) == 1:
        row = shares.iloc[0]
        return (f"With a single module ({row['module']}, {percent(row['share35'])} of its clusters 3x3 or 5x5) "
                "the paper's expectation that larger kernels grow more common with depth cannot be judged.")
    trend = depth_trend(shares)
    assert trend is not None
    first, last = shares.iloc[0]["module"], shares.iloc[-1]["module"]
    numbers = (f"the share of 3x3 and 5x5 clusters goes from {percent(trend.first)} in {first} to "
               f"{percent(trend.last)} in {last} (least-squares slope {100 * trend.slope:+.1f} points per module; "
               f"mean {percent(trend.first_half)} in the shallower half, {percent(trend.second_half)} in the deeper half)")
    if trend.rises:
        verdict = "this run bears it out"
    elif trend.falls_or_flat:
        verdict = "this run does not bear it out"
    else:
        verdict = "this run does not clearly bear it out, the slope and the halves disagreeing"
    return f"The paper expects larger kernels to grow more common in higher layers: {numbers}{excluded}, so {verdict}."


def _fallback_sentence(records: Sequence[Mapping[str, Any]]) -> str:
    """Which modules found no clusters and were built by the fallback rule."""
    names = [str(r.get("name")) for r in records if r.get("fallback")]
    if not names:
        return ""
    return (f"{', '.join(names)} found no units that fire together; {'it was' if len(names) == 1 else 'they were'} "
            "built by the fallback rule (by default 1x1 units of the layer's principal dimension, "
            "docs/clustering.md).")


def _firing_sentence(records: Sequence[Mapping[str, Any]]) -> str:
    """The layers' mean firing rates: the sparse regime the Hebbian test is meant for, or not."""
    rates = [r["firing_rate"] for r in records if not is_missing(r.get("firing_rate"))]
    if not rates:
        return ""
    low, high = min(rates), max(rates)
    return (f"Units fired in {percent(low)} to {percent(high)} of the observations of their layer "
            f"({'sparse' if high <= 0.2 else 'not sparse'}: see the firing-rate column).")


def _budget_sentence(records: Sequence[Mapping[str, Any]]) -> str:
    macs = [r.get("macs") for r in records]
    budget = [r.get("budget_macs") for r in records]
    if any(is_missing(m) for m in macs) or any(is_missing(b) for b in budget) or not records:
        return ""
    total, allowed = float(sum(macs)), float(sum(budget))
    if allowed <= 0:
        return ""
    return (f"The Inception modules alone cost {human_count(total)} multiply-adds against the {human_count(allowed)} "
            f"of their per-module budgets ({100 * (total / allowed - 1):+.1f}%: widths are rounded to whole "
            "multiples; the stem and the classifier, which reads the last module, take the rest of the "
            "network's budget).")


def _dead_sentence(records: Sequence[Mapping[str, Any]]) -> str:
    dead = [(str(r.get("name")), int(r["dead_units"])) for r in records if not is_missing(r.get("dead_units"))]
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
        _fallback_sentence(records),
        _firing_sentence(records),
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


def _figure_lines(root: Path, records: list[dict], rows: list[dict], histories: Mapping[str, pd.DataFrame],
                  corr_by_layer: Mapping[str, Any]) -> list[str]:
    """Draw every figure the data allows into ``root``'s figures folder; the report's lines for them."""
    figures = root / FIGURES_DIR
    lines: list[str] = []
    if records:
        lines += _figure_section(
            "Branch widths", plots.branch_widths(records, figures / "branch_widths"), root,
            "Per module, the discovered branch widths beside the reference's (hatched).")
        lines += _figure_section(
            "Kernel sizes by depth", plots.kernel_share_by_depth(records, figures / "kernel_share"), root,
            "Share of the clusters covered by 3x3 and 5x5 convolutions per module, with the least-squares trend.")
    if rows:
        lines += _figure_section(
            "Accuracy against multiply-adds", plots.accuracy_vs_macs(rows, figures / "accuracy_vs_macs"), root,
            "Top-1 accuracy of every trained network against its multiply-adds.")
    if histories:
        lines += _figure_section(
            "Learning curves", plots.learning_curves(histories, figures / "learning_curves"), root,
            "Validation top-1 and training loss per epoch.")
    for name, value in corr_by_layer.items():
        corr, order, labels = _correlation_inputs(value)
        stem = figures / f"correlation_{plots.safe_name(name)}"
        lines += _figure_section(
            f"Correlation at the input of {name}",
            plots.correlation_matrix(corr, order, labels, stem, title=f"{name}: unit correlation"), root,
            "Units reordered by cluster; lines mark cluster boundaries, unclustered units last.")
    return lines


CONTROL_CAPTION = (
    "Distances (topo/controls/control.py): units, |log2 of (1 + clusters)| apart; kernel mix, L1 of the 1x1/3x3/5x5 "
    "output shares (0 to 2) over the modules where both found clusters; widths, |log2| of the output width and the "
    "3x3 and 5x5 reductions relative to the module's input. Each is a mean over modules; ratio: against the mean "
    "distance between the data's own seeds. p: the constructions permuted as wholes, given only where the design "
    "can reach p < 0.01 (smallest p: its floor).")


def _control_lines(summary: ControlSummary, root: Path) -> list[str]:
    """The control's section: per control and property, the distance against the seeds', p where the design
    allows one, and the modules that found nothing; the figures."""
    table = pd.DataFrame([{"control": o.kind, "property": o.property, "distance": o.distance,
                           "seed distance": o.seed_distance, "ratio": o.ratio,
                           "p": o.p_value if o.testable else math.nan, "smallest p": o.min_p,
                           "shown": "yes" if o.shown else "no"}
                          for o in summary.outcomes])
    modules = len(summary.modules)
    nothing = pd.DataFrame([{"constructions on": kind, "found nothing (modules of each)": ", ".join(
        f"{k}/{modules}" for k in summary.found_nothing(kind))} for kind in summary.profiles])
    lines = ["## Control: which properties depend on the data?", "", CONTROL_CAPTION, "",
             to_markdown(table.round(3)), "", to_markdown(nothing), ""]
    lines += _figure_section("Control distances", plots.control_distances(summary, root / FIGURES_DIR /
                                                                          "control_distances"), root,
                             "Per property, the distance of every pair of constructions: the data's seeds "
                             "against each other, and against each control.")
    lines += _figure_section("Control output shares", plots.control_shares(summary, root / FIGURES_DIR / "controls"),
                             root, "Per module, the 1x1/3x3/5x5 output shares of every construction: the data's "
                             "seeds beside each control (a module that found nothing is the fallback's).")
    return lines


def write_report(
    run_dir: str | os.PathLike,
    records: Sequence[Any],
    rows: Sequence[Any],
    histories: Mapping[str, pd.DataFrame] | None,
    *,
    corr_by_layer: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    controls: ControlSummary | None = None,
) -> Path:
    """Render every figure into the run's ``figures/``, the comparison tables and ``report.md``.

    ``corr_by_layer`` maps a module name to ``{"corr", "order", "labels"}``
    (or a ``(corr, order, labels)`` tuple). Parts without data (no records, no
    trained network, no history) are left out. Returns the path of report.md.
    """
    root = Path(run_dir)
    records = [as_dict(r) for r in records]
    rows = [as_dict(r) for r in rows]

    lines = ["# topo-build report", ""]
    if controls is not None:
        lines += [verdict(controls), ""]
    lines += ["## Findings", "", findings(records, rows), ""]
    if controls is not None:
        lines += _control_lines(controls, root)
    if rows:
        write_comparison(rows, root)
        lines += ["## Comparison", "", to_markdown(comparison_frame(rows)), "", COMPARISON_CAPTION, "",
                  "Also as [comparison.csv](comparison.csv) and [comparison.tex](comparison.tex).", ""]
    if records:
        has_reference = any(r.get("reference") is not None for r in records)
        note = "Widths shown as discovered (reference)." if has_reference else "Discovered widths (no reference given)."
        lines += ["## Modules", "", note, "", layer_markdown(layer_frame(records)), ""]
    figure_lines = _figure_lines(root, records, rows, dict(histories or {}), corr_by_layer or {})
    if figure_lines:
        lines += ["## Figures", ""] + figure_lines
    if config is not None:
        lines += ["## Configuration", "", _config_markdown(config), ""]
    atomic_write_text(root / REPORT_FILE, "\n".join(lines).rstrip() + "\n")
    return root / REPORT_FILE
