"""Work in other processes: independent jobs side by side in spawned workers (`run_jobs`), and one
computation's many small tasks in forked workers that inherit what they share (`forked_map`).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from threadpoolctl import threadpool_limits

from topo.common import distributed as dist_info
from topo.common.devices import available_cpus
from topo.common.errors import UserError
from topo.common.progress import progress_bar

log = logging.getLogger(__name__)


#: How often (s) a worker checks that the process that started it is still there.
PARENT_POLL_S = 0.5


@dataclass(frozen=True)
class Job:
    """One call, ``function(*args)``, named for progress and errors; ``function`` must be importable (a
    module-level function) and ``args`` picklable."""

    name: str
    function: Callable[..., Any]
    args: tuple = ()


def check_processes(requested: int | str) -> int | str:
    """``requested`` as a number of processes (1 or more; digits are read as one) or ``"auto"``, else a one-line
    error."""
    if isinstance(requested, str) and requested.isdigit():
        requested = int(requested)
    if isinstance(requested, bool) or not (requested == "auto" or (isinstance(requested, int) and requested >= 1)):
        raise UserError(f"--jobs {requested!r} is neither a number of processes (1 or more) nor 'auto'")
    return requested


def default_processes(requested: int | str, n_jobs: int, device: torch.device) -> int:
    """Workers for ``n_jobs`` jobs: ``requested`` (at most one per job), or for ``"auto"`` one per job up to the
    CPU's cores and torch's threads on the CPU, and 1 (this process) on an accelerator; 1 under
    ``torch.distributed``, where every rank must run the same jobs in step."""
    requested = check_processes(requested)
    if dist_info.is_distributed() or n_jobs <= 1:
        return 1
    if requested != "auto":
        return min(requested, n_jobs)
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(n_jobs, available_cpus(), torch.get_num_threads()))


def processes_within(requested: int | str, processes: int) -> int:
    """Worker processes each of ``processes`` side-by-side jobs may start for work of its own (a construction's
    clustering, `forked_map`): with ``"auto"``, the cores the jobs' processes leave (all of them to a job that
    runs alone); else 1, and 1 under ``torch.distributed`` (its processes share the machine's cores already)."""
    if requested != "auto" or dist_info.is_distributed():
        return 1
    return max(1, available_cpus() // processes)


def run_jobs(jobs: Sequence[Job], processes: int, *, desc: str = "jobs", progress: bool = True) -> Iterator[Any]:
    """The results of ``jobs``, in order, each as soon as it and those before it are done; with ``processes`` > 1
    computed side by side in that many spawned workers (see the module docstring), else here, one after the other.
    Spawned workers import the caller's main module again: a script must call this under
    ``if __name__ == "__main__":``."""
    if processes <= 1 or len(jobs) <= 1:
        for job in progress_bar(jobs, desc=desc, disable=not progress):
            yield job.function(*job.args)
        return
    root = logging.getLogger()
    threads = torch.get_num_threads()
    log.info("%d jobs side by side in %d processes", len(jobs), processes)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_start_worker,
                             initargs=(os.getpid(), threads, root.level, _picklable_formatter(root))) as pool:
        with _passive_openmp():  # the workers start (one per submission) with it in their environment
            futures = [pool.submit(job.function, *job.args) for job in jobs]
        try:
            for job, future in zip(jobs, progress_bar(futures, desc=desc, disable=not progress)):
                yield _result(job, future)
        finally:  # on an error, or when the caller stops early: start nothing new, let the running jobs end
            for future in futures:
                future.cancel()


@contextmanager
def _passive_openmp():
    """``OMP_WAIT_POLICY=PASSIVE`` in this process's environment (unless set), for the workers it starts."""
    given = os.environ.get("OMP_WAIT_POLICY")
    if given is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        yield
    finally:
        if given is None:
            del os.environ["OMP_WAIT_POLICY"]


def _result(job: Job, future) -> Any:
    try:
        return future.result()
    except BrokenProcessPool:
        raise UserError(f"a worker process died (out of memory, or killed) before {job.name} was done; resume the "
                        "run, or run the jobs one at a time with --jobs 1 (a script of your own that runs jobs side "
                        "by side must start them under if __name__ == '__main__')") from None


def _picklable_formatter(root: logging.Logger) -> logging.Formatter | None:
    """The format of the first handler's lines, where it can travel to a worker (the command line's can)."""
    formatter = root.handlers[0].formatter if root.handlers else None
    try:
        pickle.dumps(formatter)
    except Exception:
        return None
    return formatter


def _start_worker(parent: int, threads: int, level: int, formatter: logging.Formatter | None) -> None:
    """A worker's set-up: the parent's threads, log level and format, and a watch on the parent."""
    torch.set_num_threads(threads)
    handler = logging.StreamHandler(sys.stdout)
    if formatter is not None:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="watch-parent").start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


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
