"""Two-process test jobs with a time limit: a worker in two spawned processes of one gloo group
(`run_two`), or a command under torchrun (`torchrun`, `finish`).

Kept apart from conftest.py so that the spawned processes import only torch and the test module.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _in_group(rank: int, init_file: str, worker: Callable[..., None], args: tuple) -> None:
    """Process ``rank`` of two: join the gloo group, run ``worker(rank, *args)``, leave the group."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def run_two(worker: Callable[..., None], *args, init_file: str, timeout: float = 60.0) -> None:
    """Run the module-level ``worker(rank, *args)`` in two processes of a gloo group set up through
    ``init_file`` (a fresh path). A worker's exception fails the test, and so does a run still going
    after ``timeout`` seconds (a hung collective), whose processes are then killed."""
    context = mp.start_processes(_in_group, args=(init_file, worker, args), nprocs=2, start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
                process.join()
            pytest.fail(f"{worker.__name__} still running after {timeout:.0f} s: a collective hangs")


def torchrun(*args: str | os.PathLike) -> subprocess.Popen:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 ARGS`` (a script and its
    arguments, or ``-m module ...``), one thread per process, in a session of its own."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    scratch = tempfile.mkdtemp(prefix="torchrun-")  # the elastic agent's files, removed by `finish`
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": scratch}, start_new_session=True)
    process.scratch = scratch
    return process


def finish(process: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    """Exit status, standard output and standard error of a :func:`torchrun` job; past ``timeout``
    seconds it is killed together with its workers."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    finally:
        shutil.rmtree(process.scratch, ignore_errors=True)
    return process.returncode, stdout, stderr
