"""Kill -9 at chosen moments: a resumed run ends exactly where an uninterrupted one ends, and no file is
ever half-written.

The moments are drawn from a seed, not raced: `topo.common.writing`'s testing hook
(``TOPO_TEST_KILL_AT_WRITE=N:NAME``) makes the process SIGKILL itself while it
writes the N-th file called NAME, after the temporary file is written and
before it is renamed. One uninterrupted run lists every file it writes, in
order (``--verbose`` logs each write); a kill point is drawn in each phase of
the run; then one run directory is killed at the first point, resumed and
killed at the next, and so on, and resumed to the end. After each kill every
file in the directory must read back whole (the one being written is still a
temporary file, its destination intact); at the end the topology, the
construction records, every network's weights and metrics must equal the
uninterrupted run's bit for bit (one thread per process).

A study (a command that does not exist yet) is added the same way: its
command line, its resume command line and its phases (`Phase`, path patterns
of the files written in each) passed to `kill_chain`.
"""
from __future__ import annotations

import fnmatch
import random
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from run_folders import (
    FAST,
    assert_every_file_reads_back,
    assert_killed_mid_write,
    assert_same_results,
    temporaries,
    topo_build,
)

SEED = 16


@dataclass(frozen=True)
class Phase:
    """A stage of a command, by the files it writes (shell patterns on paths relative to the output folder)."""

    name: str
    patterns: tuple[str, ...]

    def owns(self, path: str) -> bool:
        return any(fnmatch.fnmatch(path, pattern) for pattern in self.patterns)


RUN_PHASES = (
    Phase("construction", ("construction/*", "topology.json")),
    Phase("training discovered", ("training/discovered*",)),
    Phase("training reference", ("training/reference*",)),
    Phase("report", ("comparison.*", "figures/*", "report.md")),
)


# --------------------------------------------------------------------------- running and killing
def written_files(stdout: str, root: Path) -> list[str]:
    """The files a ``--verbose`` run wrote, in order, relative to ``root`` (from `topo.common.writing`'s debug lines)."""
    return [str(Path(line[len("wrote "):]).relative_to(root)) for line in stdout.splitlines()
            if line.startswith("wrote ")]


def kill_points(sequence: list[str], phases: tuple[Phase, ...], seed: int) -> list[tuple[str, str, str]]:
    """One write per phase drawn with ``seed``: (phase, ``N:NAME`` for the hook, the path being written).

    Only files whose name no other phase writes are drawn, so that the N-th
    write of NAME in a resumed process is the same moment as in the
    uninterrupted one.
    """
    rng = random.Random(seed)
    points = []
    for phase in phases:
        names_elsewhere = {Path(p).name for p in sequence if not phase.owns(p)}
        candidates = [i for i, p in enumerate(sequence) if phase.owns(p) and Path(p).name not in names_elsewhere]
        assert candidates, f"the run wrote no file of phase {phase.name}"
        i = rng.choice(candidates)
        name = Path(sequence[i]).name
        occurrence = sum(Path(p).name == name for p in sequence[: i + 1])
        points.append((phase.name, f"{occurrence}:{name}", sequence[i]))
    return points


def kill_chain(start: list[str], resume: list[str], points: list[tuple[str, str, str]], root: Path) -> None:
    """Run ``start`` killed at the first point, then ``resume`` killed at each next one, then ``resume`` to the end;
    after every kill, check the folder (`assert_killed_mid_write`, `assert_every_file_reads_back`)."""
    argv = start
    for phase, kill, path in points:
        result = topo_build(argv, kill=kill)
        assert result.returncode == -signal.SIGKILL, f"not killed in {phase}:\n{result.stderr[-3000:]}"
        assert_killed_mid_write(root, path)
        assert_every_file_reads_back(root)
        argv = resume
    result = topo_build(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not temporaries(root), "a resumed run left a killed run's temporary files behind"


# --------------------------------------------------------------------------- the tests
def test_kill_points_are_drawn_in_every_phase_and_fixed_by_the_seed() -> None:
    sequence = ["config.json", "construction/a_stats.pt", "construction/progress.json", "construction/b_stats.pt",
                "construction/progress.json", "topology.json", "state.json", "training/discovered.ckpt",
                "training/discovered.ckpt", "state.json", "training/reference.ckpt", "state.json", "report.md"]
    points = kill_points(sequence, RUN_PHASES, SEED)
    assert [phase for phase, _, _ in points] == [p.name for p in RUN_PHASES]
    assert points == kill_points(sequence, RUN_PHASES, SEED)
    for phase, kill, path in points:
        count, name = kill.split(":")
        assert Path(path).name == name and name != "state.json"
        nth = [i for i, p in enumerate(sequence) if Path(p).name == name][int(count) - 1]
        assert sequence[nth] == path
    seeds = {tuple(kill_points(sequence, RUN_PHASES, seed)) for seed in range(20)}
    assert len(seeds) > 1  # the seed, not the code, picks the moments


@pytest.mark.slow
def test_a_run_killed_in_every_phase_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    result = topo_build([*FAST, "--verbose", "--out", whole])
    assert result.returncode == 0, result.stderr[-3000:]
    sequence = written_files(result.stdout, whole)
    assert sequence.count("training/discovered.ckpt") == 2  # one checkpoint per epoch
    points = kill_points(sequence, RUN_PHASES, SEED)
    kill_chain([*FAST, "--out", killed], ["--resume", killed], points, killed)
    assert_same_results(whole, killed)
