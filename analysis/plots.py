"""Figures for a run: correlation matrices, branch widths, kernel sizes by depth, accuracy, learning curves.

Every function draws on its own ``matplotlib.figure.Figure`` (no pyplot, no
global state), saves it as ``<path_stem>.png`` and ``<path_stem>.pdf``
atomically and returns the paths written. A figure with nothing to show (no
accuracy measured, no history) is not written and the function returns ``[]``.
The inputs are those documented in :mod:`analysis.tables`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.tables import (
    BRANCHES,
    ReportError,
    accuracy_fraction,
    as_dict,
    branch_widths_of,
    depth_trend,
    kernel_shares,
)
from topo.common.errors import StatsError
from topo.common.writing import atomic_path
from topo.controls.control import PROPERTIES, property_distance

DISCOVERED_COLOR = "#1f77b4"
REFERENCE_COLOR = "#bdbdbd"
KERNEL_COLORS = {"3x3": "#ff7f0e", "5x5": "#d62728"}


def safe_name(name: str) -> str:
    """``name`` reduced to characters safe in a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "layer"


def save_figure(fig: Figure, path_stem: str | os.PathLike) -> list[Path]:
    """Save ``fig`` as ``path_stem``.png (150 dpi) and .pdf, each atomically; return both paths."""
    stem = Path(path_stem)
    paths = []
    for fmt, extra in (("png", {"dpi": 150, "metadata": {"Software": None}}),
                       ("pdf", {"metadata": {"CreationDate": None}})):
        path = stem.with_name(f"{stem.name}.{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, bbox_inches="tight", **extra)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- correlation


def cluster_order(labels: Sequence[int]) -> np.ndarray:
    """A permutation of the units that puts each cluster's units together.

    Clusters come in increasing id order, units inside a cluster in channel
    order, and unclustered units (label -1) last.
    """
    labels = np.asarray(labels, dtype=np.int64)
    key = np.where(labels < 0, np.iinfo(np.int64).max, labels)
    return np.argsort(key, kind="stable")


def cluster_boundaries(sorted_labels: Sequence[int]) -> np.ndarray:
    """Positions ``i`` (0 < i < C) where ``sorted_labels[i]`` starts a new cluster."""
    sorted_labels = np.asarray(sorted_labels)
    return np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1


def correlation_figure(
    corr: np.ndarray,
    order: Sequence[int] | None,
    labels: Sequence[int] | None,
    *,
    title: str = "Unit correlation, ordered by cluster",
) -> Figure:
    """The figure :func:`correlation_matrix` saves (for callers that want to adjust it)."""
    corr = np.asarray(corr, dtype=np.float64)
    if corr.ndim != 2 or corr.shape[0] != corr.shape[1] or corr.shape[0] == 0:
        raise StatsError(f"correlation matrix has shape {corr.shape}; pass a square C x C array")
    n = corr.shape[0]
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (n,):
            raise StatsError(f"labels have shape {labels.shape} for a {n} x {n} correlation; pass one label per channel")
    if order is None:
        order = cluster_order(labels) if labels is not None else np.arange(n)
    order = np.asarray(order, dtype=np.int64)
    if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
        raise StatsError(f"order is not a permutation of the {n} channels; pass e.g. cluster_order(labels)")

    fig = Figure(figsize=(6.0, 5.2))
    ax = fig.add_subplot()
    image = ax.imshow(corr[np.ix_(order, order)], cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    if labels is not None:
        for b in cluster_boundaries(labels[order]):
            ax.axhline(b - 0.5, color="black", linewidth=0.6)
            ax.axvline(b - 0.5, color="black", linewidth=0.6)
        n_clusters = len(np.unique(labels[labels >= 0]))
        unclustered = int((labels < 0).sum())
        ax.set_xlabel(f"unit, ordered by cluster ({n_clusters} clusters, {unclustered} unclustered)")
    else:
        ax.set_xlabel("unit")
    ax.set_ylabel("unit")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="correlation", shrink=0.85)
    return fig


def correlation_matrix(
    corr: np.ndarray,
    order: Sequence[int] | None,
    labels: Sequence[int] | None,
    path_stem: str | os.PathLike,
    *,
    title: str = "Unit correlation, ordered by cluster",
) -> list[Path]:
    """The C x C correlation matrix reordered by ``order``, lines between clusters, as PNG and PDF.

    ``labels`` gives each channel's cluster id (-1 for none); with
    ``order=None`` the order is :func:`cluster_order` of the labels. The
    colormap is diverging and fixed to [-1, 1].
    """
    return save_figure(correlation_figure(corr, order, labels, title=title), path_stem)


# --------------------------------------------------------------------------- construction


def branch_widths(records: Sequence[Any], path_stem: str | os.PathLike) -> list[Path]:
    """Per module, grouped bars of the six branch widths: discovered beside the reference (hatched)."""
    records = [as_dict(r) for r in records]
    if not records:
        return []
    ncols = min(3, len(records))
    nrows = -(-len(records) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 2.8 * nrows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    x = np.arange(len(BRANCHES))
    width = 0.4
    has_reference = False
    for ax, (i, record) in zip(axes, enumerate(records)):
        name = str(record.get("name", f"module{i}"))
        if record.get("spec") is None:
            raise ReportError(f"layer record {name!r} lacks 'spec'; every record needs the discovered InceptionSpec")
        found = branch_widths_of(record["spec"], name)
        reference = branch_widths_of(record.get("reference"), name)
        ax.bar(x - width / 2, [found[k] for k, _ in BRANCHES], width, color=DISCOVERED_COLOR, label="discovered")
        if reference is not None:
            has_reference = True
            ax.bar(x + width / 2, [reference[k] for k, _ in BRANCHES], width, color=REFERENCE_COLOR,
                   hatch="//", edgecolor="#636363", linewidth=0.5, label="reference")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(x, [label for _, label in BRANCHES], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("channels", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    for ax in axes[len(records):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=2 if has_reference else 1, frameon=False)
    return save_figure(fig, path_stem)


def kernel_share_by_depth(records: Sequence[Any], path_stem: str | os.PathLike) -> list[Path]:
    """Stacked shares of 3x3 and 5x5 clusters per module, in depth order, with a least-squares trend."""
    shares = kernel_shares(records)
    if shares.empty:
        return []
    x = shares["depth"].to_numpy(dtype=np.float64)
    share3 = 100 * shares["share3"].to_numpy()
    share5 = 100 * shares["share5"].to_numpy()
    fig = Figure(figsize=(max(4.5, 0.7 * len(shares) + 2.0), 3.6), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(x, share3, 0.6, color=KERNEL_COLORS["3x3"], label="3x3")
    ax.bar(x, share5, 0.6, bottom=share3, color=KERNEL_COLORS["5x5"], label="5x5")
    trend = depth_trend(shares)
    if trend is not None:
        y = 100 * shares["share35"].to_numpy()
        intercept = y.mean() - 100 * trend.slope * x.mean()
        ax.plot(x, intercept + 100 * trend.slope * x, color="black", linestyle="--", linewidth=1.0,
                label=f"trend ({100 * trend.slope:+.1f} points/module)")
    ax.set_xticks(x, shares["module"].tolist(), rotation=35, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("share of clusters (%)")
    ax.set_xlabel("module (input to output)")
    ax.set_title("3x3 and 5x5 clusters by depth")
    ax.legend(fontsize=8, frameon=False, loc="best")
    return save_figure(fig, path_stem)


# --------------------------------------------------------------------------- training


def accuracy_vs_macs(rows: Sequence[Any], path_stem: str | os.PathLike) -> list[Path]:
    """Top-1 accuracy against multiply-adds (log scale), one labelled point per network."""
    points = []
    for row in map(as_dict, rows):
        top1 = accuracy_fraction(row.get("top1"), "top1", row.get("network"))
        if top1 is not None and row.get("macs"):
            points.append((str(row["network"]), float(row["macs"]), 100 * top1))
    if not points:
        return []
    fig = Figure(figsize=(5.0, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for name, macs, top1 in points:
        color = DISCOVERED_COLOR if name == "discovered" else "#636363"
        ax.scatter([macs], [top1], s=40, color=color, zorder=3)
        ax.annotate(name, (macs, top1), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    macs = np.array([p[1] for p in points])
    ax.set_xlim(macs.min() / 2, macs.max() * 2)
    ax.margins(y=0.15)
    ax.set_xlabel("multiply-adds per image")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("Accuracy against cost")
    return save_figure(fig, path_stem)


def learning_curves(histories: Mapping[str, pd.DataFrame], path_stem: str | os.PathLike) -> list[Path]:
    """Validation top-1 (left) and training loss (right) per epoch, one line per network.

    A dashed line of the same colour shows the EMA weights' top-1 when the
    history has ``ema_val_top1``.
    """
    usable = {name: h for name, h in histories.items() if h is not None and len(h) and "epoch" in h}
    if not usable:
        return []
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    colors = [f"C{i}" for i in range(10)]
    for i, (name, history) in enumerate(usable.items()):
        color = colors[i % len(colors)]
        for column, ax, style, label in (("val_top1", acc_ax, "-", name),
                                         ("ema_val_top1", acc_ax, "--", f"{name} (EMA)"),
                                         ("train_loss", loss_ax, "-", name)):
            if column not in history:
                continue
            data = history[["epoch", column]].dropna()
            if data.empty:
                continue
            scale = 100.0 if column != "train_loss" else 1.0
            ax.plot(data["epoch"], scale * data[column], style, color=color, label=label, marker=".")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("validation top-1 (%)")
    acc_ax.set_title("Validation accuracy")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_title("Training loss")
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, frameon=False)
    return save_figure(fig, path_stem)


# --------------------------------------------------------------------------- control


def control_shares(summary: Any, path_stem: str | os.PathLike) -> list[Path]:
    """Per module, the 1x1/3x3/5x5 output shares of every construction of a `topo.controls.control.ControlSummary`:
    one stacked bar per construction, grouped by module, the data's seeds first."""
    bars = [(kind, i, p["shares"]) for kind, profiles in summary.profiles.items() for i, p in enumerate(profiles)]
    if not bars or not summary.modules:
        return []
    n_modules, n_bars = len(summary.modules), len(bars)
    width = 0.8 / n_bars
    colors = ("#1f77b4", KERNEL_COLORS["3x3"], KERNEL_COLORS["5x5"])
    hatches = {"real": None, "shuffled": "//", "noise": "..", "phase": "xx", "other": "\\\\"}
    fig = Figure(figsize=(max(5.0, 0.35 * n_bars * n_modules + 2.0), 3.8), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(n_modules, dtype=np.float64)
    for b, (kind, index, shares) in enumerate(bars):
        offset = x - 0.4 + (b + 0.5) * width
        bottom = np.zeros(n_modules)
        for k, label in enumerate(("1x1", "3x3", "5x5")):
            ax.bar(offset, 100 * shares[:, k], width * 0.9, bottom=bottom, color=colors[k],
                   alpha=1.0 if kind == "real" else 0.45, label=label if b == 0 else None,
                   hatch=hatches.get(kind, "++"))
            bottom += 100 * shares[:, k]
    ax.set_xticks(x, summary.modules, rotation=35, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("output share (%)")
    order = " | ".join(f"{kind} {index + 1}" for kind, index, _ in bars)
    ax.set_title(f"Output shares per module; bars left to right: {order}", fontsize=8)
    ax.legend(fontsize=8, frameon=False, loc="upper right")
    return save_figure(fig, path_stem)


def control_distances(summary: Any, path_stem: str | os.PathLike) -> list[Path]:
    """Per property (units, kernel mix, widths), the distance of every pair of constructions of a
    `topo.controls.control.ControlSummary`: the data's seeds among themselves, then each control against them."""
    real = summary.profiles.get("real", [])
    if len(real) < 2 or not summary.kinds:
        return []
    groups = ["seeds"] + summary.kinds
    fig = Figure(figsize=(3.2 * len(PROPERTIES) + 1.0, 3.6), layout="constrained")
    axes = fig.subplots(1, len(PROPERTIES))
    for ax, name in zip(axes, PROPERTIES):
        for g, group in enumerate(groups):
            if group == "seeds":
                values = [property_distance(a, b, name) for i, a in enumerate(real) for b in real[i + 1:]]
            else:
                values = [property_distance(a, c, name) for a in real for c in summary.profiles[group]]
            values = [v for v in values if np.isfinite(v)]
            spread = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(len(values))
            ax.scatter(g + spread, values, s=28, color="#636363" if group == "seeds" else f"C{g}", zorder=3)
            if group == "seeds" and values:
                ax.axhline(float(np.mean(values)), color="#636363", lw=0.8, ls="--")
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
        ax.set_title(name)
        ax.set_ylim(bottom=0)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("distance between two constructions")
    fig.suptitle("Control: distances per property (dashed: the seeds' mean)", fontsize=9)
    return save_figure(fig, path_stem)
