"""Jobs side by side (`topo.common.processes`): the same results as one after the other, errors as one line, and no
worker left behind by a killed parent."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from topo.common.errors import DataError, UserError
from topo.common.processes import forked_map
from topo.common.processes import (
    Job,
    check_processes,
    default_processes,
    jobs_beside,
    processes_within,
    run_jobs,
    sharing_threads,
)


def _fail(message: str) -> None:
    raise DataError(message)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _square_with_settings(x: int) -> tuple[int, int, int, str | None]:
    return x * x, torch.get_num_threads(), os.getpid(), os.environ.get("OMP_WAIT_POLICY")


def test_jobs_side_by_side_give_the_results_in_order_with_the_parents_threads(one_thread, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    torch.set_num_threads(3)
    jobs = [Job(f"square {x}", _square_with_settings, (x,)) for x in range(5)]
    here = list(run_jobs(jobs, 1, progress=False))
    assert [r[0] for r in here] == [0, 1, 4, 9, 16] and {r[2] for r in here} == {os.getpid()}
    apart = list(run_jobs(jobs, 2, progress=False))
    assert [r[0] for r in apart] == [0, 1, 4, 9, 16]
    assert {r[1] for r in apart} == {3}  # each worker computes as this process would
    assert {r[3] for r in apart} == {"PASSIVE"} and "OMP_WAIT_POLICY" not in os.environ  # put back here
    assert os.getpid() not in {r[2] for r in apart} and len({r[2] for r in apart}) <= 2


def test_a_failing_job_raises_its_own_error_and_a_dead_worker_is_one_line():
    jobs = [Job("fine", _square_with_settings, (3,)), Job("bad", _fail, ("data folder x is empty; fill it",))]
    with pytest.raises(DataError, match="data folder x is empty"):
        list(run_jobs(jobs, 2, progress=False))
    with pytest.raises(UserError, match="worker process died .* before the dying job was done") as info:
        list(run_jobs([Job("the dying job", _die), Job("fine", _square_with_settings, (3,))], 2, progress=False))
    assert "\n" not in str(info.value) and "--jobs 1" in str(info.value)


def _numbered_after(k: int, seconds: float) -> tuple[int, int]:
    time.sleep(seconds)
    return k, os.getpid()


def test_jobs_beside_run_while_this_process_works_and_it_takes_over_those_no_worker_started():
    """One worker and four jobs beside this process's own work: the results come in order, and this process
    computes the queued jobs no worker has started (without take-over the one worker computes them all)."""
    jobs = [Job(f"job {k}", _numbered_after, (k, 0.5)) for k in range(4)]
    with jobs_beside(jobs, 1, progress=False) as results:
        time.sleep(0.1)  # this process's own work
        shared = list(results)
    assert [k for k, _ in shared] == [0, 1, 2, 3]
    here = [pid == os.getpid() for _, pid in shared]
    assert any(here) and not all(here)
    with jobs_beside(jobs, 1, progress=False, take_over=False) as results:
        alone = list(results)
    assert [k for k, _ in alone] == [0, 1, 2, 3] and os.getpid() not in {pid for _, pid in alone}
    with jobs_beside(jobs, 0, progress=False) as results:  # no workers: computed here, in order
        assert list(results) == [(k, os.getpid()) for k in range(4)]


def test_process_counts():
    cpu = torch.device("cpu")
    assert default_processes(1, 4, cpu) == 1
    assert default_processes(3, 2, cpu) == 2  # never more workers than jobs
    assert default_processes("auto", 1, cpu) == 1
    assert 1 <= default_processes("auto", 4, cpu) <= max(1, torch.get_num_threads())
    assert default_processes("auto", 4, torch.device("cuda")) == 1  # one accelerator: one process
    assert check_processes("3") == 3 and check_processes("auto") == "auto"
    for bad in (0, -1, "two", True, 1.5):
        with pytest.raises(UserError, match="--jobs"):
            check_processes(bad)


def _scaled_with_blas_threads(shared: dict, x: int) -> tuple[int, int, int]:
    from threadpoolctl import threadpool_info

    blas = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    return shared["factor"] * x, os.getpid(), max(blas, default=1)


def test_forked_map_gives_the_results_in_order_from_workers_that_inherit_the_shared_data():
    """The shared data reaches the workers without pickling (a lock cannot be pickled), the results come back in
    order, each worker's BLAS keeps one thread; one process, or one item, computes here."""
    import threading

    shared = {"factor": 3, "lock": threading.Lock()}
    items = list(range(40))
    apart = forked_map(_scaled_with_blas_threads, shared, items, 2)
    assert [r[0] for r in apart] == [3 * x for x in items]
    assert os.getpid() not in {r[1] for r in apart} and len({r[1] for r in apart}) <= 2
    assert {r[2] for r in apart} == {1}
    here = forked_map(_scaled_with_blas_threads, shared, items, 1)
    assert [r[0] for r in here] == [r[0] for r in apart] and {r[1] for r in here} == {os.getpid()}
    assert forked_map(_scaled_with_blas_threads, shared, [5], 4)[0][:2] == (15, os.getpid())
    assert forked_map(_scaled_with_blas_threads, shared, [], 2) == []


def _forked_squares(n: int) -> list[tuple[int, int, int]]:
    return forked_map(_scaled_with_blas_threads, {"factor": 1}, list(range(n)), 2)


def test_a_job_side_by_side_may_fork_workers_of_its_own():
    """On a machine with more cores than constructions, each construction (a `run_jobs` worker) clusters in
    forked workers of its own: a worker process may start them."""
    results = list(run_jobs([Job("a", _forked_squares, (10,)), Job("b", _forked_squares, (12,))], 2,
                            progress=False))
    assert [[r[0] for r in result] for result in results] == [list(range(10)), list(range(12))]
    assert os.getpid() not in {r[1] for result in results for r in result}


def test_each_constructions_clustering_gets_the_cores_the_constructions_leave(monkeypatch):
    import topo.common.processes as parallel

    monkeypatch.setattr(parallel, "available_cpus", lambda: 8)
    assert processes_within("auto", 1) == 8  # a construction alone: every core
    assert processes_within("auto", 2) == 4
    assert processes_within("auto", 16) == 1
    assert processes_within(1, 1) == processes_within(3, 1) == 1  # --jobs N: one each


@pytest.mark.slow
def test_a_killed_parent_leaves_no_worker_behind(tmp_path):
    """SIGKILL the process that runs the jobs: its workers notice within a second and exit."""
    pids = tmp_path / "pids.txt"
    script = textwrap.dedent(f"""
        import os, time
        from topo.common.processes import Job, run_jobs
        import test_parallel
        jobs = [Job(str(k), test_parallel._sleep_and_tell, ({str(pids)!r}, 60.0)) for k in range(2)]
        list(run_jobs(jobs, 2, progress=False))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.monotonic() + 60
    while (not pids.is_file() or len(pids.read_text().split()) < 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = [int(p) for p in pids.read_text().split()]
    assert len(workers) == 2
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers)


def _sleep_and_tell(path: str, seconds: float) -> None:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_constructions_side_by_side_equal_those_one_after_the_other(tmp_path, one_thread):
    """The run's construction and its control's, in two processes or in this one, and with "auto" (here one
    process, one thread: the clustering in forked workers on every core): the same files, bit for bit."""
    from topo.construct.config import ConstructConfig
    from topo.controls.control import ControlConfig
    from topo.run.config import RunConfig, load_data
    from topo.run.stages import constructions_stage
    from topo.run.rundir import RunDir
    from topo.train.config import TrainConfig

    outcomes = {}
    for jobs in (1, 2, "auto"):
        config = RunConfig(data="planted", jobs=jobs,
                           construct=ConstructConfig(skeleton="2", stem="none", budget_macs="none", stats_batches=2),
                           control=ControlConfig(real_seeds=2, control_seeds=1, permutations=99),
                           train=TrainConfig(progress=False, workers=0, batch_size=64))
        run = RunDir(tmp_path / f"jobs{jobs}")
        run.write_config(config.to_dict())
        spec, summary = constructions_stage(config, load_data(config), run)
        outcomes[jobs] = (spec.to_json(), run.topology.read_text(), run.construction.records.read_text(),
                          json.loads(run.controls.read_text()), summary.to_dict())
        assert constructions_stage(config, load_data(config), run)[1].to_dict() == summary.to_dict()  # read back
    assert outcomes[1] == outcomes[2] == outcomes["auto"]


def test_threads_are_shared_among_side_by_side_processes_and_put_back():
    torch.set_num_threads(4)
    try:
        with sharing_threads(2) as share:
            assert share == 2 == torch.get_num_threads()
            assert list(run_jobs([Job("threads", _square_with_settings, (2,))] * 2, 2, progress=False))[0][1] == 2
        assert torch.get_num_threads() == 4
        with sharing_threads(8) as share:
            assert share == 1 == torch.get_num_threads()  # at least one each
    finally:
        torch.set_num_threads(1)


@pytest.mark.slow
def test_trainings_side_by_side_equal_those_one_after_the_other(tmp_path, one_thread):
    """The run's two arms trained in two processes (one thread each) or one after the other on one thread: the
    same comparison rows and checkpoints, bit for bit; the rows are recorded as done by this process."""
    from builders.spec import ConvSpec, HeadSpec, NetworkSpec
    from topo.run.config import RunConfig, load_data
    from topo.run.rundir import RunDir
    from topo.run.stages import trainings_stage
    from topo.train.config import TrainConfig

    outcomes = {}
    for jobs in (1, 2):
        config = RunConfig(data="digits", jobs=jobs, train=TrainConfig(progress=False, workers=0, batch_size=64,
                                                                       epochs=2))
        bundle = load_data(config)
        arms = [(name, NetworkSpec(stem=(ConvSpec("conv1", width, 3),), head=HeadSpec(num_classes=10), in_channels=1,
                                   input_size=8)) for name, width in (("discovered", 4), ("reference", 6))]
        run = RunDir(tmp_path / f"jobs{jobs}")
        run.write_config(config.to_dict())
        trainings_stage(arms, config, bundle, run)
        done = run.completed()
        outcomes[jobs] = ([done[f"train:{name}"] for name, _ in arms],
                          [(run.training.root / f"{name}_metrics.csv").read_text() for name, _ in arms])
    rows1, rows2 = outcomes[1][0], outcomes[2][0]
    strip = lambda rows: [{k: v for k, v in r.items() if "time" not in k.lower() and "throughput" not in k.lower()}
                          for r in rows]
    assert strip(rows1) == strip(rows2) and [r["network"] for r in rows1] == ["discovered", "reference"]
    accuracy = lambda text: [line.split(",")[:7] for line in text.splitlines()]  # epochs, losses, accuracies
    assert [accuracy(t) for t in outcomes[1][1]] == [accuracy(t) for t in outcomes[2][1]]
