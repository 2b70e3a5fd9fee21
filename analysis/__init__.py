"""Comparison tables, figures and reports; GoogLeNet's Table 1 recomputed.

The accounting itself (``count_macs``, ``inception_macs``, ...) lives in
`builders.cost`, below the builders that budget with it; it is re-exported here
for convenience.
"""
from __future__ import annotations

from analysis.paper_table import googlenet_rows, googlenet_table, paper_comparison
from builders.cost import cost_table, count_macs, count_params, inception_macs, inception_params, reduction_factor

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
