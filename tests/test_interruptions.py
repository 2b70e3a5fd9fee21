"""Interruptions and faults (issue 35): Ctrl-C and SIGTERM stop a command with one line, its workers quietly, its
files whole; a disk that fills inside ``torch.save`` is the documented one line; statistics of shards with other
firing thresholds say what differs.

Every subprocess runs in a session of its own (its workers in its process group, so that a signal to the group is
the terminal's Ctrl-C or a scheduler's SIGTERM and never reaches pytest), has a time limit, and whatever is left of
its group is killed when the test ends. In-process signal tests use SIGUSR1, never SIGINT or SIGTERM.
"""
from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from checks import one_line_error
from run_folders import (
    FAST,
    assert_every_file_reads_back,
    assert_same_results,
    temporaries,
    topo_build,
)

from builders.spec import ConvSpec, HeadSpec, NetworkSpec
from topo.cli.main import main
from topo.common import writing
from topo.common.errors import StatsError
from topo.common.processes import STOP_S, Job, raised_on_signals, run_jobs, signals_held
from topo.common.writing import KILL_AT_WRITE, WriteError, atomic_torch_save
from topo.stats.layer_stats import from_activations
from topo.train.files import read_checkpoint

ENV = {key: value for key, value in os.environ.items() if key != KILL_AT_WRITE} | {
    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CONSTRUCT = ["construct", "--jobs", "2", "--data", "digits", "--skeleton", "1,pool,1", "--stats-batches", "2",
             "--workers", "2", "--no-progress"]  # the run's construction and the control's three, two at a time


class Stopped(Exception):
    """What SIGUSR1 raises in the in-process tests."""


# --------------------------------------------------------------------------- processes of a test's own
@contextlib.contextmanager
def started(argv: list, folder: Path) -> Iterator[subprocess.Popen]:
    """``ARGV`` (``python`` and its arguments) started in a session of its own, stdout and stderr into
    ``folder/stdout.txt`` and ``folder/stderr.txt``; every process left in its group is killed at the end."""
    with open(folder / "stdout.txt", "w") as out, open(folder / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, *map(str, argv)], env=ENV, stdout=out, stderr=err,
                                start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               proc: subprocess.Popen | None = None) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` s, or when ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"the process ended (status {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def stopped_with_one_line(proc: subprocess.Popen, folder: Path, status: int) -> str:
    """``proc`` ended with ``status`` and one line on stderr, no traceback anywhere, and every process of its group
    (workers, DataLoader workers, multiprocessing's helpers) is gone; returns the line."""
    assert proc.wait(timeout=60) == status, (folder / "stderr.txt").read_text()[-3000:]
    wait_until(lambda: group_gone(proc.pid), 30, "end of the process group's last process")
    err, out = (folder / "stderr.txt").read_text(), (folder / "stdout.txt").read_text()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out, err[-3000:]
    return err.strip()


# --------------------------------------------------------------------------- 1. SIGTERM
@pytest.mark.slow
def test_sigterm_stops_a_run_with_one_line_and_resume_ends_it_as_an_uninterrupted_run(tmp_path: Path) -> None:
    """SIGTERM as ``timeout`` sends it (to the process, then to its group: the DataLoader workers too) once the
    run has written state.json: exit status 143, the line of Ctrl-C naming the folder, every file whole; the
    resumed run ends where an uninterrupted one ends."""
    flags = [*FAST, "--workers", "2"]
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert topo_build([*flags, "--out", whole]).returncode == 0
    with started(["-m", "topo.cli", *flags, "--out", run], tmp_path) as proc:
        wait_until((run / "state.json").is_file, 300, "state.json", proc)
        proc.send_signal(signal.SIGTERM)
        os.killpg(proc.pid, signal.SIGTERM)
        line = stopped_with_one_line(proc, tmp_path, 143)
    assert line == f"topo-build: interrupted; continue with topo-build --resume {run}"
    assert not temporaries(run) and not (run / ".topo-build.lock").exists()
    assert_every_file_reads_back(run)
    resumed = topo_build(["--resume", run])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_results(whole, run)


# --------------------------------------------------------------------------- 2. Ctrl-C with workers
MOMENTS = {  # when Ctrl-C comes: a test of what the run has printed, and a delay after it
    "while it imports": (lambda out: True, 0.3),
    "while the workers start": (lambda out: "jobs side by side" in out, 0.0),
    "while two constructions run": (lambda out: out.count("constructing on") >= 2, 0.0),
    "while second modules are built": (lambda out: "inception3a: " in out, 0.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_one_ctrl_c_stops_construct_with_jobs_with_one_line(moment: str, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) during ``construct --jobs 2`` with the
    control's constructions, each with DataLoader workers: exit status 130, one line, no traceback from any
    process, and no process of the run left."""
    printed, delay = MOMENTS[moment]
    out = tmp_path / "out"
    with started(["-m", "topo.cli", *CONSTRUCT, "--out", out], tmp_path) as proc:
        wait_until(lambda: printed((tmp_path / "stdout.txt").read_text()), 300, moment, proc)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        line = stopped_with_one_line(proc, tmp_path, 130)
    assert line.startswith("topo-build: interrupted"), line
    assert moment == "while it imports" or line.endswith(f"continue with the same command and --out {out}"), line
    if out.exists():
        assert not temporaries(out)


# The terminal's Ctrl-C at a chosen moment of a DataLoader's start: from an at-fork hook, right after its N-th
# worker is forked (where Python used to run the KeyboardInterrupt inside the hook, print it and drop it).
CTRL_C_AT_FORK = textwrap.dedent("""
    import os, signal, sys
    import torch
    from torch.utils.data import TensorDataset
    from topo.data.loader import make_loader

    assert os.getpgrp() == os.getpid()  # a group of its own: the Ctrl-C below reaches nothing else
    forks = [0]

    def ctrl_c_at_fork():
        forks[0] += 1
        if forks[0] == int(sys.argv[1]):
            os.killpg(0, signal.SIGINT)

    os.register_at_fork(after_in_parent=ctrl_c_at_fork)
    data = TensorDataset(torch.randn(256, 3, 8, 8), torch.zeros(256, dtype=torch.long))
    loader = make_loader(data, batch_size=64, train=True, workers=2, device="cpu")
    try:
        for epoch in range(3):
            loader.set_epoch(epoch)
            for batch in loader:
                pass
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    print("not interrupted", file=sys.stderr)
""")


@pytest.mark.parametrize("fork", [1, 2, 3])
def test_ctrl_c_while_dataloader_workers_start_stops_the_loop(fork: int, tmp_path: Path) -> None:
    """Ctrl-C right after a DataLoader forks its first or second worker, or the first of the next pass: the
    loop stops (it went on, or ended in 'DataLoader worker exited unexpectedly' and __del__ tracebacks), with
    nothing on stderr but the script's own line."""
    with started(["-c", CTRL_C_AT_FORK, fork], tmp_path) as proc:
        assert stopped_with_one_line(proc, tmp_path, 130) == "interrupted"


def _sleep_and_tell(marker: str, seconds: float) -> None:
    """A job that sleeps; ``marker`` says ``started PID``, then ``unwound`` from the job's ``finally``."""
    Path(marker).write_text(f"started {os.getpid()}\n")
    try:
        time.sleep(seconds)
    finally:
        with open(marker, "a") as f:
            f.write("unwound\n")


@pytest.mark.slow
def test_an_interrupted_run_jobs_unwinds_its_running_jobs_at_once(tmp_path: Path) -> None:
    """A KeyboardInterrupt in the process that runs jobs side by side stops the running ones at once (it waited
    for them to end), through their ``finally`` (temporary files are removed so); the waiting job never starts."""
    markers = [tmp_path / f"job{k}" for k in range(3)]
    jobs = [Job(f"job {k}", _sleep_and_tell, (str(marker), 60.0)) for k, marker in enumerate(markers)]
    sent = []

    def ctrl_c_once_both_run() -> None:
        wait_until(lambda: markers[0].is_file() and markers[1].is_file(), 120, "two running jobs")
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGUSR1)

    with raised_on_signals({signal.SIGUSR1: KeyboardInterrupt}):
        threading.Thread(target=ctrl_c_once_both_run, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            list(run_jobs(jobs, 2, progress=False))
    assert time.monotonic() - sent[0] < STOP_S / 2
    assert all(marker.read_text().endswith("unwound\n") for marker in markers[:2])
    assert not markers[2].exists()
    pids = [int(marker.read_text().split()[1]) for marker in markers[:2]]
    wait_until(lambda: not any(_alive(pid) for pid in pids), 30, "end of the workers")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class _SignalsItselfWhenDeleted:
    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.2)  # the handler runs in here, inside __del__


def test_a_signal_inside_a_finalizer_is_raised_after_it() -> None:
    """Raised inside ``__del__``, an interruption is printed and dropped by Python (a DataLoader's iterator joins
    its workers in one): it is raised a moment later, outside."""
    with raised_on_signals({signal.SIGUSR1: Stopped}), pytest.raises(Stopped):
        _SignalsItselfWhenDeleted()
        time.sleep(5)


def test_a_held_signal_is_raised_when_the_hold_ends() -> None:
    """A signal that comes while signals are held (a thread other than the main one may receive it) is raised
    where the hold ends, not inside it."""
    inside = False
    with raised_on_signals({signal.SIGUSR1: Stopped}), pytest.raises(Stopped):
        with signals_held():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.2)
            inside = True  # not raised in the block
        time.sleep(5)
    assert inside


# --------------------------------------------------------------------------- 3. a full disk inside torch.save
class _FullDisk(io.FileIO):
    """A file on a disk with ``room`` bytes left: a write beyond fails with ENOSPC."""

    def __init__(self, path: str, room: int) -> None:
        super().__init__(path, "wb")
        self.room = room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return super().write(data)


def _disk_with_room(room: int, *, after: int = 0) -> Callable[..., object]:
    """`open` for `topo.common.writing`: from the ``after+1``-th file opened to write bytes on (``torch.save``'s),
    the disk has ``room`` bytes left; every other file opens as usual."""
    opened = []

    def fake_open(file, mode="r", *args, **kwargs):
        if mode != "wb":
            return builtins.open(file, mode, *args, **kwargs)
        opened.append(file)
        return io.BufferedWriter(_FullDisk(file, room if len(opened) > after else 1 << 40))

    return fake_open


@pytest.mark.parametrize("room", [1000, 100_000, 199_000])
def test_a_full_disk_inside_torch_save_is_one_line_and_keeps_the_previous_file(room: int, tmp_path: Path,
                                                                               monkeypatch) -> None:
    """The disk fills at the start, in the middle or near the end of ``torch.save``'s 200 kB (past the file's
    buffer, so inside torch.save, which reports the failed write as a RuntimeError): a WriteError (the CLI's one
    line), the previous file as it was, no temporary file."""
    path = tmp_path / "net.ckpt"
    atomic_torch_save({"weight": torch.arange(10.0)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(writing, "open", _disk_with_room(room), raising=False)
    with pytest.raises(WriteError) as info:
        atomic_torch_save({"weight": torch.zeros(50_000)}, path)
    assert info.value.errno == errno.ENOSPC
    assert info.value.strerror.startswith(f"cannot write {path} (No space left on device); every file written")
    assert "\n" not in info.value.strerror
    assert path.read_bytes() == before and not temporaries(tmp_path)


def test_an_interrupt_inside_torch_save_stays_an_interrupt_and_keeps_the_previous_file(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    """Ctrl-C (or SIGTERM, raised as a KeyboardInterrupt) inside ``torch.save``, whose zip writer then reports
    ``RuntimeError: [enforce fail at inline_container.cc]`` on its way out (seen in a Ctrl-C test): the
    interrupt, not the RuntimeError; the previous file as it was, no temporary file."""
    path = tmp_path / "layer_stats.pt"
    atomic_torch_save({"weight": torch.arange(10.0)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def interrupted_save(obj, f):
        try:
            real_save(obj, f)
            raise KeyboardInterrupt  # as the signal handler raises it, in the middle of the writer
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 103744 vs 103632")

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"weight": torch.zeros(50_000)}, path)
    assert path.read_bytes() == before and not temporaries(tmp_path)


def test_a_full_disk_during_training_is_one_line_and_the_same_command_goes_on(tmp_path: Path, capsys,
                                                                              monkeypatch, one_thread) -> None:
    """``train`` whose second checkpoint meets a full disk inside ``torch.save``: exit status 1, the documented
    line naming the checkpoint, epoch 1's checkpoint and metrics intact; with room again the command goes on."""
    stem = (ConvSpec("conv1", 32, 3), ConvSpec("conv2", 32, 3))  # a checkpoint of 100 kB: torch.save meets the disk
    spec = NetworkSpec(stem=stem, head=HeadSpec(num_classes=10), in_channels=1, input_size=8)
    (tmp_path / "tiny.json").write_text(spec.to_json())
    out = tmp_path / "run"
    argv = ["train", str(tmp_path / "tiny.json"), "--epochs", "3", "--workers", "0", "--no-progress", "--data",
            "digits", "--out", str(out)]
    monkeypatch.setattr(writing, "open", _disk_with_room(20_000, after=1), raising=False)
    assert main(argv) == 1
    line = one_line_error(capsys)
    assert line.startswith(f"topo-build: error: cannot write {out / 'training' / 'tiny.ckpt'} (No space left on "
                           "device); every file written before is intact"), line
    assert read_checkpoint(out / "training" / "tiny.ckpt", resumable=True)["epoch"] == 1
    assert list(pd.read_csv(out / "training" / "tiny_metrics.csv")["epoch"]) == [1]
    assert not temporaries(out)
    monkeypatch.undo()
    assert main(argv) == 0
    assert list(pd.read_csv(out / "training" / "tiny_metrics.csv")["epoch"]) == [1, 2, 3]


# --------------------------------------------------------------------------- 4. shards with other thresholds
def test_merging_shards_with_other_thresholds_says_what_differs_and_how_to_share_them() -> None:
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((8, 6, 5, 5)).astype(np.float32))
    first = from_activations(x[:4], positions=None, name="inception3a")  # each calibrated on its own shard
    second = from_activations(x[4:], positions=None, name="inception3a")
    with pytest.raises(StatsError) as info:
        first.merge(second)
    message = str(info.value)
    differ = np.abs(first.thresholds - second.thresholds)
    assert "\n" not in message and message.startswith("layer 'inception3a': cannot merge")
    assert f"{np.count_nonzero(differ)} of 6 units differ" in message and f"by up to {differ.max():.3g}" in message
    assert "calibrate them once" in message and "threshold=" in message
    shared = from_activations(x[4:], positions=None, threshold=first.thresholds, name="inception3a")
    assert first.merge(shared).count == first.count + shared.count  # the fix the message gives
    thresholds = first.thresholds
    thresholds[2] += 0.5  # one unit differs: it is named
    one = from_activations(x[4:], positions=None, threshold=thresholds, name="inception3a")
    with pytest.raises(StatsError, match=r"1 of 6 units differ \(2\), by up to 0\.5"):
        first.merge(one)
    scalar = [from_activations(part, positions=None, threshold=t) for part, t in ((x[:4], 0.0), (x[4:], 0.25))]
    with pytest.raises(StatsError, match="threshold 0 and threshold 0.25"):
        scalar[0].merge(scalar[1])
