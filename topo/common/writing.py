"""Atomic file writing: a crash never leaves a half-written result behind.

Every file topo writes goes to a temporary file in the same directory
(``.NAME.XXXX.tmp``), is flushed and fsync'ed, and is then renamed over the
destination, which POSIX guarantees to be atomic. A process killed part-way
leaves at most such a temporary file, which no reader opens and
:func:`remove_temporaries` deletes. A write that fails (a full disk, a
read-only folder) raises :class:`WriteError`, one line naming the file, and
leaves the destination as it was.

Testing hook: with the environment variable ``TOPO_TEST_KILL_AT_WRITE=N`` the
process sends itself SIGKILL during its N-th atomic write, after the temporary
file is written and before it is renamed; ``N:PATTERN`` counts only the writes
of files whose name matches the shell pattern (``2:discovered.ckpt``: while the
second checkpoint of ``discovered`` is written). tests/test_kill.py kills runs
at chosen moments this way. Without the variable nothing changes.
"""
from __future__ import annotations

import contextlib
import fnmatch
import itertools
import json
import logging
import os
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

KILL_AT_WRITE = "TOPO_TEST_KILL_AT_WRITE"
TEMPORARY_SUFFIX = ".tmp"
_WRITES = itertools.count(1)  # atomic writes of this process, counted for the testing hook only


class WriteError(OSError):
    """A file could not be written (no space left, a read-only or missing folder); the message is one line."""


def _kill_if_asked(path: Path) -> None:
    """The testing hook: SIGKILL this process at the atomic write ``$TOPO_TEST_KILL_AT_WRITE`` names."""
    target = os.environ.get(KILL_AT_WRITE)
    if not target:
        return
    count, _, pattern = target.partition(":")
    if (not pattern or fnmatch.fnmatch(path.name, pattern)) and next(_WRITES) == int(count):
        os.kill(os.getpid(), signal.SIGKILL)


def _write_error(path: Path, error: OSError) -> WriteError:
    reason = error.strerror or str(error)
    return WriteError(
        error.errno, f"cannot write {path} ({reason}); every file written before is intact: free disk space or "
                     f"make {path.parent} writable, then run the command again (a run continues with --resume)"
    )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _kill_if_asked(path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        log.debug("wrote %s", path)
    except WriteError:
        raise
    except OSError as e:
        raise _write_error(path, e) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()



def remove_temporaries(root: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed process left under ``root`` (``.NAME.XXXX.tmp``); returns them."""
    left = [p for p in Path(root).rglob(f".*{TEMPORARY_SUFFIX}") if p.is_file()]
    for p in left:
        p.unlink()
    return left


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_create_text(path: str | os.PathLike, text: str) -> bool:
    """Write ``text`` to ``path`` unless it exists, atomically and exclusively (also between processes).

    True if this call wrote it. The file is staged beside ``path`` and hard-linked onto it: a link fails
    where ``path`` exists, on one machine and on a network file system.
    """
    path = Path(path)
    staged = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}")
    atomic_write_text(staged, text)
    try:
        os.link(staged, path)
        return True
    except FileExistsError:
        return False
    finally:
        staged.unlink(missing_ok=True)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically; a write that fails (a full disk) is a `WriteError`, the previous
    version of ``path`` intact."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)  # through a Python file, whose failed write torch reports as a RuntimeError
        except RuntimeError as e:
            failed = _error_behind(e)
            if failed is None:
                raise
            raise failed from None  # atomic_path makes an OSError a WriteError


def _error_behind(error: BaseException) -> OSError | KeyboardInterrupt | None:
    """The OSError or interrupt that ``error`` was raised while handling, if any: torch's zip writer turns a file
    write that failed (``[Errno 28] No space left on device``), and a Ctrl-C or SIGTERM raised inside it (the
    command line raises both as KeyboardInterrupt), into ``RuntimeError: [enforce fail at inline_container.cc]``."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, (OSError, KeyboardInterrupt)):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None
