"""`forked_map`: one computation's many small, pure tasks side by side in forked worker processes.

The clustering's per-anchor search and its union check are hundreds of small NumPy problems over
data that every task reads (a layer's window graph, the candidates' codes). Forked workers inherit
that data from the process that forks them, so nothing is imported again or pickled but the tasks
and their results (spawned workers, `topo.parallel`, would import torch and receive a copy first,
which costs about as much as the work). Each worker's BLAS keeps one thread: the problems are small.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from typing import Any

from threadpoolctl import threadpool_limits

from topo.progress import progress_bar


def forked_map(function: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any], processes: int, *,
               desc: str = "tasks", progress: bool = False) -> list[Any]:
    """``[function(shared, item) for item in items]``, in order; with ``processes`` > 1 computed in that many
    forked workers, which inherit ``shared`` from this process instead of receiving a pickled copy (only the
    items and the results are pickled). Each worker's BLAS keeps one thread. Where the platform cannot fork,
    or for one process or item, computed here. ``function`` must be pure: the result must not depend on the
    process that computes it."""
    bar = {"desc": desc, "total": len(items), "disable": not progress}
    if processes <= 1 or len(items) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [function(shared, item) for item in progress_bar(items, **bar)]
    processes = min(processes, len(items))
    chunk = max(1, len(items) // (8 * processes))  # small enough to balance uneven tasks, large enough to batch
    with multiprocessing.get_context("fork").Pool(processes, initializer=_inherit, initargs=(function, shared)) \
            as pool:
        return list(progress_bar(pool.imap(_call_inherited, items, chunksize=chunk), **bar))


#: In a `forked_map` worker only: the function and the data it shares (set once, as the worker starts).
_INHERITED: dict[str, Any] = {}


def _inherit(function: Callable[[Any, Any], Any], shared: Any) -> None:
    _INHERITED.update(function=function, shared=shared)
    threadpool_limits(limits=1, user_api="blas")


def _call_inherited(item: Any) -> Any:
    return _INHERITED["function"](_INHERITED["shared"], item)
