"""Work in other processes: independent jobs side by side in spawned workers (`run_jobs`; `jobs_beside` while this
process does work of its own), and one computation's many small tasks in forked workers that inherit what they
share (`forked_map`).

Interruptions: workers start with Ctrl-C held (`signals_held`), so that they never take the terminal's Ctrl-C
(sent to every process of its group), and this process never takes a signal in the middle of starting them (in
an at-fork hook Python prints the exception and drops it; a DataLoader's iterator was left half-made); a worker
then ignores Ctrl-C. The command line raises Ctrl-C and SIGTERM as exceptions with `raised_on_signals` (once,
never inside a finalizer). On such an exception `run_jobs` sends each worker SIGTERM: a running job unwinds (its
temporary files removed, its own workers stopped) and no other starts, an idle worker exits, all without a
traceback; if a job has not unwound after `STOP_S`, the workers are killed.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from types import FrameType
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
#: How long (s) stopped `run_jobs` workers get to exit before they are killed.
STOP_S = 10.0
#: How soon (s) a signal that came where it must wait is sent again (`_postponed`).
RETRY_S = 0.1
#: The signals that stop a command: held while workers start, ignored (Ctrl-C) or handled (SIGTERM) in workers.
STOPPING = frozenset({signal.SIGINT, signal.SIGTERM})


@dataclass(frozen=True)
class Job:
    """One call, ``function(*args)``, named for progress and errors; ``function`` must be importable (a
    module-level function) and ``args`` picklable."""

    name: str
    function: Callable[..., Any]
    args: tuple = ()


def check_processes(requested: int | str, flag: str = "--jobs") -> int | str:
    """``requested`` as a number of processes (1 or more; digits are read as one) or ``"auto"``, else a one-line
    error naming ``flag``."""
    if isinstance(requested, str) and requested.isdigit():
        requested = int(requested)
    if isinstance(requested, bool) or not (requested == "auto" or (isinstance(requested, int) and requested >= 1)):
        raise UserError(f"{flag} {requested!r} is neither a number of processes (1 or more) nor 'auto'")
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


@contextmanager
def sharing_threads(processes: int) -> Iterator[int]:
    """torch's threads in this process divided among ``processes`` side-by-side processes (at least one each; the
    workers `jobs_beside` starts inside take this process's count), restored afterwards; yields the share."""
    threads = torch.get_num_threads()
    share = max(1, threads // max(1, processes))
    torch.set_num_threads(share)
    try:
        yield share
    finally:
        torch.set_num_threads(threads)


def run_jobs(jobs: Sequence[Job], processes: int, *, desc: str = "jobs", progress: bool = True) -> Iterator[Any]:
    """The results of ``jobs``, in order, each as soon as it and those before it are done; with ``processes`` > 1
    computed side by side in that many spawned workers (see the module docstring), else here, one after the other.
    On a job's error nothing new starts and the running jobs end; on Ctrl-C (a KeyboardInterrupt), or when the
    caller stops taking results, the running jobs are stopped at once (`_stop_workers`).
    Spawned workers import the caller's main module again: a script must call this under
    ``if __name__ == "__main__":``."""
    workers = processes if processes > 1 and len(jobs) > 1 else 0
    with jobs_beside(jobs, workers, desc=desc, progress=progress, take_over=False) as results:
        yield from results


@contextmanager
def jobs_beside(jobs: Sequence[Job], workers: int, *, desc: str = "jobs", progress: bool = True,
                take_over: bool = True) -> Iterator[Iterator[Any]]:
    """``jobs`` started in ``workers`` spawned workers as the block begins, side by side with the work this process
    does inside it; the block is given their results, in order (iterate it at the block's end). With
    ``take_over``, this process computes the jobs no worker has started when it asks for their results, so that it
    never waits idle while jobs queue. With no workers the jobs are computed here, in order, as their results are
    asked for. An exception in the block (Ctrl-C included) stops the workers as `run_jobs` does."""
    if workers < 1 or not jobs:
        yield _shown((job.function(*job.args) for job in jobs), desc=desc, total=len(jobs), disable=not progress)
        return
    root = logging.getLogger()
    threads = torch.get_num_threads()
    log.info("%d jobs side by side in %d worker process%s%s", len(jobs), workers, "es" if workers > 1 else "",
             " and this one" if take_over else "")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(os.getpid(), threads, root.level, _picklable_formatter(root),
                                       _picklable_warning_display())) as pool:
        futures: list[Future] = []
        try:
            _submit(pool, jobs, futures)
            yield _shown(_results(jobs, futures, take_over), desc=desc, total=len(jobs), disable=not progress)
        except (KeyboardInterrupt, GeneratorExit, SystemExit):  # Ctrl-C, SIGTERM, or a caller that stopped
            _stop_workers(pool, futures)
            raise
        finally:  # on an error: start nothing new, let the running jobs end
            for future in futures:
                future.cancel()


def _shown(results: Iterator[Any], **bar: Any) -> Iterator[Any]:
    """``results`` behind a progress bar that appears when the first is asked for, not before."""
    yield from progress_bar(results, **bar)


def _results(jobs: Sequence[Job], futures: Sequence[Future], take_over: bool) -> Iterator[Any]:
    """The jobs' results in order; with ``take_over``, while a result is not ready this process computes the last
    job that no worker has started (a pending future cancels)."""
    here: dict[int, Any] = {}
    for i, job in enumerate(jobs):
        while take_over and i not in here and not futures[i].done():
            waiting = next((k for k in reversed(range(i, len(jobs))) if k not in here and futures[k].cancel()), None)
            if waiting is None:
                break
            here[waiting] = jobs[waiting].function(*jobs[waiting].args)
        yield here.pop(i) if i in here else _result(job, futures[i])


def _submit(pool: ProcessPoolExecutor, jobs: Sequence[Job], futures: list[Future]) -> None:
    """Submit ``jobs`` to ``pool``, their futures added to ``futures``. The workers start (one per submission) with
    ``OMP_WAIT_POLICY=PASSIVE`` in their environment and Ctrl-C blocked; this process takes Ctrl-C and SIGTERM once
    they are started. SIGTERM is not blocked in them: until they handle it (`_stop_job`) it ends them at once, also
    while they import."""
    with _passive_openmp(), signals_held(blocked=frozenset({signal.SIGINT})):
        for job in jobs:
            futures.append(pool.submit(_call_job, job.function, job.args))


def _stop_workers(pool: ProcessPoolExecutor, futures: Sequence[Future]) -> None:
    """Stop ``pool``'s jobs now: nothing new starts, each worker gets SIGTERM (`_stop_job`), and once the running
    jobs have unwound (their futures done) the workers are left to exit; if some job has not after `STOP_S`, every
    worker still there is killed."""
    workers = list((getattr(pool, "_processes", None) or {}).values())  # no public handle before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        if worker.exitcode is None:
            worker.terminate()
    deadline = time.monotonic() + STOP_S
    while not all(future.done() for future in futures):  # done: unwound, failed or cancelled
        if time.monotonic() > deadline:
            for worker in workers:
                worker.kill()
                worker.join()
            return
        time.sleep(PARENT_POLL_S / 10)


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
    except (BrokenProcessPool, SystemExit):  # SystemExit: the worker was sent SIGTERM by someone else
        raise UserError(f"a worker process died (out of memory, or killed) before {job.name} was done; resume the "
                        "run, or run the jobs one at a time with --jobs 1 (a script of your own that runs jobs side "
                        "by side must start them under if __name__ == '__main__')") from None


def _picklable_formatter(root: logging.Logger) -> logging.Formatter | None:
    """The format of the last handler's lines (the command line adds its own last, after any a test runner or
    notebook set up), where it can travel to a worker (the command line's can)."""
    formatter = root.handlers[-1].formatter if root.handlers else None
    try:
        pickle.dumps(formatter)
    except Exception:
        return None
    return formatter


#: Python's own display of warnings (before logging or a command line replaces it).
_PYTHON_SHOWWARNING = warnings.showwarning


def _picklable_warning_display() -> Callable[..., None] | None:
    """How this process shows warnings, where it is not Python's own and can travel to a worker (the command
    line's ``warning: MESSAGE`` can), so that a job's warnings look as the caller's do."""
    shown = warnings.showwarning
    if shown is _PYTHON_SHOWWARNING:
        return None
    try:
        pickle.dumps(shown)
    except Exception:
        return None
    return shown


def _start_worker(parent: int, threads: int, level: int, formatter: logging.Formatter | None,
                  show_warning: Callable[..., None] | None = None) -> None:
    """A worker's set-up: the parent's threads, log level and format, its display of warnings (else they are
    logged), the platform's start method, a watch on the parent, and its signals (Ctrl-C ignored, SIGTERM stops
    the job: `_stop_job`).

    A spawned process starts its own processes by spawning (CPython sets it so); put back, a job's DataLoaders
    start their workers as the parent's do (forked on Linux: no import of torch each pass, a watch on their
    parent that works, and semaphores that need no unlinking when the worker exits at once)."""
    multiprocessing.set_start_method(None, force=True)
    torch.set_num_threads(threads)
    handler = logging.StreamHandler(sys.stdout)
    if formatter is not None:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    if show_warning is not None:
        warnings.showwarning = show_warning
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="watch-parent").start()
    _take_signals(_stop_job)


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


#: The main thread's hold on Ctrl-C and SIGTERM (`signals_held`): how deep, and the signals kept back meanwhile.
_HOLD: dict[str, Any] = {"depth": 0, "kept": []}


@contextmanager
def signals_held(blocked: frozenset[int] = STOPPING) -> Iterator[None]:
    """Ctrl-C and SIGTERM held back inside the block and taken when it ends. ``blocked`` ones are blocked in this
    thread, so that processes started inside it inherit the mask and take none of them until they unblock them
    (`_take_signals`; a DataLoader's workers never do: their parent stops them); in the main thread this module's
    handlers also keep back the ones another thread received, or that are not blocked (`_postponed`)."""
    main = int(threading.current_thread() is threading.main_thread())
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if hasattr(signal, "pthread_sigmask") else None
    _HOLD["depth"] += main
    try:
        yield
    finally:
        _HOLD["depth"] -= main
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if main and not _HOLD["depth"]:
            kept, _HOLD["kept"] = _HOLD["kept"], []
            for signum in dict.fromkeys(kept):
                signal.raise_signal(signum)


@contextmanager
def raised_on_signals(exceptions: Mapping[int, Callable[[], BaseException]]) -> Iterator[None]:
    """Inside the block the first signal of ``exceptions`` raises its exception here (the main thread), though not
    where it must wait (`_postponed`); later ones are ignored, the work is already stopping (``timeout`` sends
    SIGTERM twice). A signal this process was started to ignore stays ignored; the handlers before the block are
    put back after it. Outside the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in exceptions}
    raised: list[int] = []
    for signum in exceptions:
        if previous[signum] != signal.SIG_IGN:
            signal.signal(signum, partial(_raise_once, exceptions, raised))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if signum in _AGAIN:
                _AGAIN.pop(signum).cancel()  # not for the handler put back
            if handler is not None:
                signal.signal(signum, handler)


def _raise_once(exceptions: Mapping[int, Callable[[], BaseException]], raised: list[int], signum: int,
                frame: FrameType | None) -> None:
    """The handler of `raised_on_signals`."""
    if raised or _postponed(signum, frame):
        return
    raised.append(signum)
    raise exceptions[signum]()


def _postponed(signum: int, frame: FrameType | None) -> bool:
    """In a handler: whether ``signum`` must wait. While it is held (`signals_held`) it is kept for the end of the
    hold; where an exception must not be raised (`_uninterruptible`) it comes again `RETRY_S` later."""
    if _HOLD["depth"]:
        _HOLD["kept"].append(signum)
        return True
    if _uninterruptible(frame):
        signal_again(signum)
        return True
    return False


def _uninterruptible(frame: FrameType | None) -> bool:
    """Whether ``frame`` (where a signal came) runs where an exception must not be raised: in a ``__del__``
    method Python prints it and drops it, and the work goes on (a DataLoader's iterator joins its workers in one);
    in multiprocessing's resource sharer it cuts the hand-over of a batch's file descriptor (the DataLoader
    worker prints ConnectionResetError); in ``_sendback_result`` it cuts a job's result on its way to the parent."""
    return _inside(frame, ("__del__", "_sendback_result"), "resource_sharer.py")


def _inside(frame: FrameType | None, functions: tuple[str, ...], module: str | None = None) -> bool:
    """Whether ``frame`` runs inside a function named in ``functions``, or in a file named ``module``."""
    while frame is not None:
        code = frame.f_code
        if code.co_name in functions or (module is not None and code.co_filename.endswith(module)):
            return True
        frame = frame.f_back
    return False


#: The signals `signal_again` is to send, by number: one at a time each.
_AGAIN: dict[int, threading.Timer] = {}


def signal_again(signum: int) -> None:
    """Send ``signum`` to this process again in `RETRY_S` seconds (from a thread: a signal handler must return),
    unless it is to be sent again already."""
    if signum in _AGAIN and _AGAIN[signum].is_alive():
        return
    _AGAIN[signum] = timer = threading.Timer(RETRY_S, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


def _take_signals(sigterm: Callable[[int, Any], Any] | int) -> None:
    """In a worker started under `signals_held`: Ctrl-C ignored (the process that started it stops it), SIGTERM
    taken by ``sigterm``, neither held any longer."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, sigterm)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPPING)


#: In a `run_jobs` worker: whether a job is running, and whether SIGTERM stopped the worker (no job starts then).
_WORKER = {"job": False, "stopped": False}


def _call_job(function: Callable[..., Any], args: tuple) -> Any:
    """``function(*args)`` in a `run_jobs` worker, marked as running for `_stop_job`; none once it is stopped."""
    if _WORKER["stopped"]:
        raise SystemExit(128 + signal.SIGTERM)
    _WORKER["job"] = True
    try:
        return function(*args)
    finally:
        _WORKER["job"] = False


def _stop_job(signum: int, frame: FrameType | None) -> None:
    """SIGTERM in a `run_jobs` worker: the running job is unwound by SystemExit, once (its temporary files
    removed, its workers stopped; the parent takes it as the job's end) and no job starts after it; a worker
    without a job (starting, idle, exiting, or after its job unwound) exits at once. Neither where the signal must
    wait (`_postponed`)."""
    if _postponed(signum, frame):
        return
    if not _WORKER["job"]:
        os._exit(128 + signum)
    if _WORKER["stopped"]:
        return  # unwinding already; the parent kills a worker still there after STOP_S
    _WORKER["stopped"] = True
    raise SystemExit(128 + signum)


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
    with ExitStack() as stack:
        with signals_held():  # the workers (and the pool's threads) start with Ctrl-C and SIGTERM held
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(
                processes, initializer=_inherit, initargs=(function, shared, os.getpid())))
        return list(progress_bar(pool.imap(_call_inherited, items, chunksize=chunk), **bar))


#: In a `forked_map` worker only: the function and the data it shares (set once, as the worker starts).
_INHERITED: dict[str, Any] = {}


def _inherit(function: Callable[[Any, Any], Any], shared: Any, parent: int) -> None:
    """A `forked_map` worker's set-up: what it shares, one BLAS thread, a watch on the parent, and its signals
    (Ctrl-C ignored, SIGTERM ends it: the pool stops it so)."""
    _INHERITED.update(function=function, shared=shared)
    threadpool_limits(limits=1, user_api="blas")
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="watch-parent").start()
    _take_signals(signal.SIG_DFL)


def _call_inherited(item: Any) -> Any:
    return _INHERITED["function"](_INHERITED["shared"], item)
