"""Independent jobs side by side, in worker processes that share the CPU.

One construction does not keep a multi-core CPU busy: its clustering runs on one
thread between the matrix products that use them all. A run's own construction
and its control's constructions are independent, so `run_jobs` runs them in
``processes`` spawned workers and returns their results in order. Each worker
keeps the parent's number of torch threads (so a job computes exactly what it
would compute alone, and the last job running still uses every core), with
OpenMP's threads waiting passively (``OMP_WAIT_POLICY=PASSIVE``) so that idle
threads of one worker leave the cores to the other. Each worker exits when its
parent dies (a killed run leaves no process writing into its folder). A job
that fails raises its error here, after the jobs already running have ended; a
worker that dies (out of memory, killed) ends them all, in one line naming the first job not done.
(`topo.forked` is the lighter tool for one computation's many small, pure tasks.)
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
from contextlib import contextmanager
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import torch

from topo import distributed as dist_info
from topo.data.loader import available_cpus
from topo.errors import UserError
from topo.progress import progress_bar

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
    clustering, `topo.forked`): with ``"auto"``, the cores the jobs' processes leave (all of them to a job that
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
