"""`topo-build`: construct a topology from activation statistics, train it beside GoogLeNet, compare.

    topo-build                                   # the whole job on the embedded patches data set (no download)
    topo-build --data imagenet --data-dir PATH   # ... on an ImageNet-style folder tree
    topo-build construct ...                     # construction only: topology.json
    topo-build train SPEC.json ...               # train a spec file
    topo-build analyze --weights FILE ...        # what the data suggests for a trained GoogLeNet
    topo-build report RUN_DIR                    # re-render report.md from a run directory
    topo-build export RUN_DIR --format onnx      # a trained network as safetensors, ONNX, TorchScript, pt2
    topo-build eval RUN_DIR                      # top-1/top-5, loss and images/s of a trained network
    topo-build train SPEC.json --config RUN_DIR/config.json   # settings from a file; flags override it

Every flag that sets a configuration field takes its default (and its choices)
from the configuration dataclass that owns the field (`RunConfig`,
`ConstructConfig`, `TrainConfig`), so the command line and the library cannot
drift apart. Progress lines go through `logging` (``--quiet``, ``--verbose``),
written to stdout beside the progress bars; results are printed to stdout.
A mistake in the input (a path, a flag, a data set, a file, a setting the data
cannot support) ends with one line naming it and the fix on stderr
(``topo-build: error: ...``), and exit status 2, before any work where it can
be known then; a file that cannot be written during a run (a full disk) ends
with one line and exit status 1, the files written before intact; Ctrl-C or
SIGTERM stops it at once with one line saying how to continue, exit status 130
or 143 (docs/errors.md lists every case).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import TextIO

# Only what stops a command is imported here; the rest (torch and all) is imported by `main` with Ctrl-C and
# SIGTERM noted (`noting_signals`), so that a command stopped while it starts ends with its one line too.
from topo.common.errors import SettingError, UserError
from topo.common.writing import WriteError

log = logging.getLogger(__name__)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``timeout``, ``kill``): the command stops as on Ctrl-C, with exit status 143."""

    status = 128 + signal.SIGTERM


class _TqdmHandler(logging.StreamHandler):
    """Writes records with ``tqdm.write``, so that log lines and progress bars do not tangle."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - a logging handler must never raise
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def configure_logging(verbosity: int) -> logging.Handler:
    """One handler on the root logger, at INFO (``-1``: WARNING, ``1``: DEBUG); other ranks log errors only.

    Returns the handler, for removal. Python warnings reach it through `warnings_as_lines`.
    """
    from topo.common import distributed as dist_info

    level = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[verbosity]
    if dist_info.rank() != 0:
        level = logging.ERROR
    handler = _TqdmHandler(sys.stdout)
    handler.setFormatter(_Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """`warnings.showwarning` of the command line: the message alone, logged (``warning: MESSAGE``); the
    source file, line and category are for developers (``python -W error`` shows them)."""
    logging.getLogger("py.warnings").warning("%s", str(message).strip())


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Python warnings (e.g. the clustering's) shown as ``warning: MESSAGE`` lines inside the block, through the
    logging handler; the display before it restored after it (nothing changes at import)."""
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        yield
    finally:
        warnings.showwarning = shown


def _interrupted(args: argparse.Namespace | None) -> str:
    """The line of a command stopped by Ctrl-C or SIGTERM: how to continue its work in its folder, where it has
    one."""
    how = getattr(args, "continue_with", None)
    return f"topo-build: interrupted; continue with {how}" if how else "topo-build: interrupted"


#: What each signal that stops a command raises (`topo.common.processes.raised_on_signals` while it works).
_STOPS = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}


@contextlib.contextmanager
def noting_signals() -> Iterator[list[int]]:
    """Inside the block Ctrl-C and SIGTERM are noted in the list it gives, not raised: the command starts, and
    raises them once it can stop cleanly (`_raise_noted`); an exception raised inside an import can be dropped by
    importlib (the run went on) or make Python end by SIGINT after all. The handlers before it are put back after
    it; nothing changes at import, outside the main thread (where Python runs no signal handler), nor for a
    signal the process was started to ignore."""
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return
    previous = {signum: signal.getsignal(signum) for signum in _STOPS}
    for signum, handler in previous.items():
        if handler != signal.SIG_IGN:
            signal.signal(signum, lambda received, frame: noted.append(received))
    try:
        yield noted
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)


def _raise_noted(noted: list[int]) -> None:
    """Raise what the first signal of ``noted`` (`noting_signals`) stops a command with, if any came."""
    if noted:
        raise _STOPS[noted[0]]()


def one_line(error: Exception) -> str:
    """The user-facing line of an error, also when a DataLoader worker re-raised it with its traceback."""
    text = str(error).strip()
    if "Original Traceback" in text:  # "Caught DataError in DataLoader worker process 0. ..."
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(type(error).__module__) else last
    return text


def _flag_of(error: UserError, args: argparse.Namespace | None) -> str:
    """`` (--flag)`` for a setting's error where this command has a flag for the setting (library code names
    settings, the command line names flags), else nothing."""
    from topo.cli.settings import flags_by_field

    flag = flags_by_field(args).get(error.setting) if isinstance(error, SettingError) and args is not None else None
    return f" ({flag})" if flag else ""


def main(argv: list[str] | None = None) -> int:
    """Entry point of `topo-build`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with noting_signals() as noted:
        return _command(argv, noted)


def _command(argv: list[str], noted: list[int]) -> int:
    """The command ``argv`` names, run: its exit status, and one line on stderr where it fails or is stopped (by
    a signal ``noted`` while it started, or one that comes while it works)."""
    handler, args, cleanup = None, None, None
    try:
        from topo.cli.commands import HANDLERS
        from topo.cli.parser import COMMANDS, build_parser
        from topo.cli.settings import parse
        from topo.common import distributed as dist_info
        from topo.common.processes import raised_on_signals
        from topo.train.trainer import deterministic_algorithms

        cleanup = dist_info.cleanup
        command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
        args = parse(command, argv)
        dist_info.init_from_env()
        handler = configure_logging(getattr(args, "verbosity", 0))
        if args.config_file.unused:
            log.info("%s does not use these settings of %s: %s", build_parser(command).prog, args.config,
                     ", ".join(args.config_file.unused))
        with raised_on_signals(_STOPS), deterministic_algorithms(getattr(args, "deterministic", False)), \
                warnings_as_lines():
            _raise_noted(noted)
            return HANDLERS[command](args)
    except UserError as e:
        print(f"topo-build: error: {one_line(e)}{_flag_of(e, args)}", file=sys.stderr)
        return 2
    except WriteError as e:  # a full disk or a read-only folder during the work: not a mistake in the input
        print(f"topo-build: error: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (`Terminated`)
        print(_interrupted(args), file=sys.stderr)
        return getattr(e, "status", 128 + signal.SIGINT)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
        if cleanup is not None:
            cleanup()
