"""``progress_bar``: the one progress bar of the toolkit (tqdm.auto: a widget in notebooks, text elsewhere)."""
from __future__ import annotations

from typing import Any, Iterable

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable, *, total: int | None = None, **options: Any) -> tqdm:
    """A tqdm.auto bar over ``iterable`` that iterates it exactly once.

    tqdm.auto's text bar calls ``iter()`` on an iterable as soon as it is made, and
    the loop over the bar calls it again: on a DataLoader with workers that starts
    a second set of worker processes, which read batches for nothing. The bar is
    therefore given an iterator; ``total`` defaults to ``len(iterable)`` where it has one.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return tqdm(iter(iterable), total=total, **options)
