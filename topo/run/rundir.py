"""The run directory: where one `topo-build` run keeps everything it produces.

Layout (every file is written atomically through `topo.common.writing`)::

    RUN_DIR/
      config.json        resolved configuration, library versions, git revision
      state.json         the stages completed so far (what --resume reads)
      construction/      per module: statistics (MODULE_stats.pt), clusters (MODULE_clusters.json);
                         records.json, progress.json, prefixN.pt (the weights after N modules)   (ConstructionFiles)
      topology.json      the discovered NetworkSpec
      training/          per network: spec (NAME.spec.json), checkpoint (NAME.ckpt), per-epoch metrics (NAME_metrics.csv),
                         tensorboard/NAME/   (TrainingFiles)
      comparison.{csv,md,tex}, figures/, report.md

Every file name is spelled here and nowhere else; every file is read back
through `topo.common.reading`. ``config.json`` also records the run format and the
topo-build version that wrote the directory: a run is only continued by the
same ones (`RunDir.check_compatible`).

A command that writes a folder owns it while it works (`owned_folder`): an
exclusive ``flock`` on ``.topo-build.lock`` inside it, taken before
``config.json`` is written and released on exit, also on an error. A second
command on the folder fails at once, naming the first one's pid; the kernel
drops the lock of a process that died, so a lock file a killed run left behind
is taken over. The shards of a study share its folder (a shared lock) and each
owns its own shard lock.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not on a POSIX system: folders are not locked
    fcntl = None  # type: ignore[assignment]

from topo.common.errors import UserError
from topo.common.reading import read_config, read_state
from topo.common.writing import atomic_write_json
from topo.construct.files import ConstructionFiles
from topo.train.files import TrainingFiles

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


CONFIG_FILE = "config.json"


#: The layout of a run directory and of its files; a run of another format is not continued.
RUN_FORMAT = 1


NEW_RUN = "start a new run with another --out"


#: The lock file of a folder a command owns (`owned_folder`).
LOCK_FILE = ".topo-build.lock"


#: Tries to lock a lock file that another process may unlink between our open and our lock.
LOCK_TRIES = 20


class FolderInUse(UserError):
    """Another process owns the folder: two commands writing one folder would mix their files."""


def topo_version() -> str | None:
    """The installed topo-build version (None when run from a source tree that is not installed)."""
    try:
        return importlib.metadata.version("topo-build")
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_info() -> dict[str, Any]:
    """Library versions, Python, platform and the git revision of the source tree."""
    import numpy
    import sklearn
    import torch
    import torchvision

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "git_revision": _git_revision(),
    }


def _git_revision() -> str | None:
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _holder(path: Path) -> str:
    """`` (pid N)`` of the process that wrote its pid in the lock file ``path``, where it did."""
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _open_lock(path: Path, shared: bool) -> int | None:
    """The descriptor of ``path``, locked (``shared`` or exclusive) and still the file at ``path``; a
    `FolderInUse` where another process holds a lock that excludes it; None (a warning) where the file system
    cannot lock files."""
    for _ in range(LOCK_TRIES):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # its folder was removed by the owner that just left it
            continue
        except OSError as e:
            raise UserError(f"{path.parent} cannot be owned: its lock file {path.name} cannot be opened "
                            f"({e.strerror}); make it writable, or choose another folder") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(f"{path.parent} is in use: another topo-build process{_holder(path)} is using it; "
                              "wait for it to finish (or stop it), or choose another folder") from None
        except OSError as e:  # a file system without locks (some network file systems)
            os.close(fd)
            log.warning("%s cannot be locked (%s): a second topo-build on it would not be refused", path.parent,
                        e.strerror)
            return None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not unlinked by its last owner meanwhile
                return fd
        os.close(fd)
    raise FolderInUse(f"{path.parent} is in use: its lock file {path.name} keeps changing; try again")


def _release(fd: int, path: Path) -> None:
    """Unlock ``fd`` and close it; the lock file is removed where no other process holds it."""
    with contextlib.suppress(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no other holder (shards share the study's lock)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    fcntl.flock(fd, fcntl.LOCK_UN)  # also for worker processes forked with a copy of ``fd``
    os.close(fd)


def _missing(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, the deepest first."""
    return [p for p in (folder, *folder.parents) if not p.exists()]


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (the deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty: it holds the command's files
            return


@contextlib.contextmanager
def owned_folder(root: str | Path, *, lock: str = LOCK_FILE, shared: bool = False) -> Iterator[Path]:
    """Own the folder ``root`` (made if needed) inside the block: a lock on its file ``lock``, exclusive (this
    process's pid written in it) unless ``shared``; `FolderInUse` (one line, naming the folder and the owner's
    pid) where another process owns it. On leaving, also on an error, the lock is released and its file
    removed, and so are the folders this call made where they are left empty (a command that failed its
    checks leaves nothing behind). Forked workers inherit the lock; they do not release it."""
    root = Path(root)
    if fcntl is None:
        yield root
        return
    made, path, owner = _missing(root), root / lock, os.getpid()
    fd = _open_lock(path, shared)
    try:
        if fd is not None:
            os.ftruncate(fd, 0)  # a killed owner's pid goes; shared owners write none
            if not shared:
                os.write(fd, f"{owner}\n".encode())
        yield root
    finally:
        if os.getpid() == owner:
            if fd is not None:
                _release(fd, path)
            _remove_empty(made)


@dataclass(frozen=True)
class AnalysisFiles:
    """The files ``topo-build analyze`` writes: per module its clusters, then the table and the figure."""

    root: Path

    def clusters(self, module: str) -> Path:
        return self.root / f"{module}_clusters.json"

    @property
    def records(self) -> Path:
        return self.root / "analysis.json"

    @property
    def table(self) -> Path:
        return self.root / "analysis.md"

    @property
    def branch_widths(self) -> Path:
        """The stem of the branch-width figure (``.png`` and ``.pdf``)."""
        return self.root / "branch_widths"


@dataclass
class RunDir:
    """Paths of a run directory and its record of completed stages."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @classmethod
    def existing(cls, path: str | Path) -> "RunDir":
        """Open a run directory to resume or report on; a clear error if it is not one."""
        root = Path(path)
        if not (root / CONFIG_FILE).is_file():
            raise UserError(
                f"{root} is not a topo-build run directory (no {CONFIG_FILE}); "
                "pass the --out directory of an earlier run"
            )
        return cls(root)

    def check_writable(self) -> None:
        """A one-line error now, before any work, where the run directory cannot be created or written."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise UserError(f"output directory {root} is an existing file; give --out a folder (new or a run's)")
        existing = next(p for p in (root, *root.parents) if p.exists())
        if not existing.is_dir():
            raise UserError(f"output directory {root} cannot be made: {existing} is a file, not a folder; "
                            "choose another --out")
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as e:
            raise UserError(f"output directory {root} cannot be written ({e.strerror} in {existing}); "
                            "choose another --out or make it writable") from None

    def check_compatible(self, *commands: str) -> None:
        """Refuse (one line) a folder written in another run format, by another topo-build version, or by
        another command than ``commands``."""
        document = read_config(self.config_path)
        written = (document.get("format", 0), document.get("topo_version"))
        if written != (RUN_FORMAT, topo_version()):
            raise UserError(
                f"run {self.root} was written by topo-build {written[1] or 'unknown'} (run format {written[0]}), "
                f"this is topo-build {topo_version() or 'unknown'} (run format {RUN_FORMAT}): finish it with "
                f"that version, or {NEW_RUN}"
            )
        command = document.get("command", "run")
        if commands and command not in commands:
            raise UserError(f"{self.root} holds the output of topo-build {command}, not of {' or '.join(commands)}; "
                            f"{NEW_RUN}")

    # Paths ------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def construction(self) -> ConstructionFiles:
        return ConstructionFiles(self.root / "construction")

    @property
    def training(self) -> TrainingFiles:
        return TrainingFiles(self.root / "training")

    def control(self, name: str) -> ConstructionFiles:
        """The construction of one control (``real-seed1``, ``shuffled-seed0``, ...), resumable like the run's."""
        return ConstructionFiles(self.root / "controls" / name)

    @property
    def controls(self) -> Path:
        """The control's outcome (`topo.controls.control.ControlSummary`)."""
        return self.root / "controls" / "summary.json"

    @property
    def topology(self) -> Path:
        return self.root / "topology.json"

    # Configuration and stages -----------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    def write_config(self, config: dict[str, Any], *, command: str = "run") -> None:
        """Write ``config.json``: the configuration, the command, the run format, the topo-build version and the
        environment."""
        atomic_write_json(self.config_path, {"format": RUN_FORMAT, "topo_version": topo_version(), "command": command,
                                             "config": config, "environment": environment_info()})

    def read_config(self) -> dict[str, Any]:
        """The configuration saved in ``config.json`` (a one-line error if the file is damaged)."""
        return read_config(self.config_path)["config"]

    def completed(self) -> dict[str, Any]:
        """Stages completed so far, each with the small result it produced."""
        return read_state(self.state_path)

    def mark_done(self, stage: str, result: Any = None) -> None:
        state = self.completed()
        state[stage] = result
        atomic_write_json(self.state_path, state)


@dataclass(frozen=True)
class StudyFiles:
    """The files of a study folder (every name spelled here)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "study.json"

    @staticmethod
    def shard_lock(index: int, count: int) -> str:
        """The lock file (in the study's folder) that shard ``index`` of ``count`` owns (`owned_folder`)."""
        return f".topo-build.shard-{index}-of-{count}.lock"

    def unit(self, name: str) -> RunDir:
        return RunDir(self.root / "units" / name)

    def result(self, name: str) -> Path:
        """Written when the unit has finished: its row of study.csv."""
        return self.root / "units" / name / "result.json"

    @property
    def rows(self) -> Path:
        return self.root / "study.csv"

    @property
    def summary(self) -> Path:
        """Stem of study_summary.{csv,md,tex}."""
        return self.root / "study_summary"

    @property
    def tests(self) -> Path:
        """Stem of study_tests.{csv,md,tex}."""
        return self.root / "study_tests"

    @property
    def figure(self) -> Path:
        return self.root / "figures" / "study"

    @property
    def report(self) -> Path:
        return self.root / "report.md"
