"""Cost accounting, comparison tables, figures and reports."""
from __future__ import annotations

from analysis.cost import (
    cost_table,
    count_macs,
    count_params,
    googlenet_rows,
    googlenet_table,
    inception_macs,
    inception_params,
    paper_comparison,
    reduction_factor,
)

__all__ = [
    "cost_table",
    "count_macs",
    "count_params",
    "googlenet_rows",
    "googlenet_table",
    "inception_macs",
    "inception_params",
    "paper_comparison",
    "reduction_factor",
]
