"""Options of the construction compared by trained networks: one arm of several studies, paired by seed.

Each option is a `topo-build study` run with that option (for example ``--budget-split reference``, or
``--epochs-per-layer 1 --fresh-init``), the same seeds and the same threads; this reads their ``study.csv`` files
and compares the chosen arm (default ``discovered``) of every option with the first one's, seed by seed:

    python benchmarks/compare_options.py even=/tmp/even reference=/tmp/reference [--arm discovered]
    python benchmarks/compare_options.py GoogLeNet=/tmp/even:reference even=/tmp/even slim=/tmp/slim

``NAME=DIR:ARM`` takes that study's ``ARM`` (one of `ARMS`) instead of ``--arm``: the reference arm as the baseline.

Prints a markdown table: per option its top-1 mean, SD and 95% interval, and against the first option the mean
per-seed difference, its SD, the paired t-test's p and the exact sign-flip test's (`analysis.study_stats`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis.study_stats import mean_ci, paired_by_seed, paired_test
from topo.common.errors import UserError
from topo.run.study import ARMS


def option_rows(name: str, study_dir: Path, arm: str) -> list[dict]:
    """The ``arm`` units of one study, labelled with the option's ``name`` as their arm."""
    table = study_dir / "study.csv"
    if not table.is_file():
        raise UserError(f"{table} is missing: give the folder of a finished topo-build study (--out)")
    rows = pd.read_csv(table)
    rows = rows[rows["arm"] == arm]
    if rows.empty:
        raise UserError(f"{table} has no unit of the arm {arm!r}: run the study with --arms {arm}")
    return rows.assign(arm=name).to_dict("records")


def study_and_arm(text: str, arm: str) -> tuple[Path, str]:
    """``DIR`` or ``DIR:ARM`` (an arm of `ARMS` after the last colon) as (study folder, arm)."""
    head, _, tail = text.rpartition(":")
    return (Path(head), tail) if head and tail in ARMS else (Path(text), arm)


def compare(options: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per option: top-1 (points) mean, SD, interval, and its per-seed comparison with the first option."""
    names = list(options)
    rows = [row for name in names for row in options[name]]
    out = []
    for name in names:
        mean, sd, low, high = mean_ci([100 * r["top1"] for r in options[name]])
        row = {"option": name, "n": len(options[name]), "top-1 (%)": round(mean, 1), "SD": round(sd, 2),
               "95% CI": f"{low:.1f} - {high:.1f}"}
        if name != names[0]:
            test = paired_test(*reversed(paired_by_seed(rows, names[0], name)))
            row |= {"paired seeds": test["paired_n"],
                    f"minus {names[0]}": round(test.get("paired_difference", float("nan")), 2),
                    "SD of the differences": round(test.get("paired_sd", float("nan")), 2),
                    "paired t p": round(test.get("paired_t_p", float("nan")), 3),
                    "sign-flip p": round(test.get("paired_permutation_p", float("nan")), 3)}
        out.append(row)
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("options", nargs="+", help="NAME=STUDY_DIR or NAME=STUDY_DIR:ARM, the first the baseline")
    ap.add_argument("--arm", default="discovered", help="the arm compared (default discovered)")
    args = ap.parse_args(argv)
    try:
        pairs = [o.split("=", 1) for o in args.options]
        if any(len(p) != 2 for p in pairs) or len(pairs) < 2:
            raise UserError("give at least two options as NAME=STUDY_DIR, the first the baseline")
        table = compare({name: option_rows(name, *study_and_arm(d, args.arm)) for name, d in pairs})
    except UserError as err:
        print(f"compare_options: {err}", file=sys.stderr)
        return 2
    print(table.to_markdown(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
