"""The resume policy: what a continued run (or study, or a reused `--out`) may change, and the one-line
refusal of anything else.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

from topo.cli.settings import flags_by_field, group_fields, run_config
from topo.common import distributed as dist_info
from topo.common.errors import UserError
from topo.common.writing import remove_temporaries
from topo.run.config import RESUMABLE, RunConfig, same_data_dir, with_resumable_changes
from topo.run.rundir import NEW_RUN, RunDir
from topo.run.study import StudyConfig, load_study

log = logging.getLogger(__name__)


def _shown(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: "none"}[value]
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _setting(config: RunConfig, group: str, field: str) -> Any:
    return getattr({"construct": config.construct, "control": config.control, "train": config.train}.get(group, config),
                   field)


def differences(args: argparse.Namespace, saved: RunConfig, given: RunConfig,
                only: set[str] | None = None) -> list[str]:
    """``"--epochs 15, not 3"`` for every setting (of ``only``, if given) where ``given`` differs from ``saved``.

    The settings a run may change when continued (`topo.run.config.RESUMABLE`) are
    left out.
    """
    flags = flags_by_field(args)
    groups = {field: group for group, fields in args.config_fields.items() for field in fields}
    out = []
    for field, flag in flags.items():
        if field in RESUMABLE or (only is not None and field not in only):
            continue
        was, now = _setting(saved, groups.get(field, "data"), field), _setting(given, groups.get(field, "data"), field)
        if not _same(field, was, now):
            out.append(f"{flag} {_shown(was)}, not {_shown(now)}")
    return out


def _same(field: str, was: Any, now: Any) -> bool:
    """Whether a setting keeps its saved value; a ``data_dir`` where it names the same place."""
    return same_data_dir(was, now) if field == "data_dir" else was == now


def _refuse_other_settings(run: RunDir, changed: list[str], how: str) -> None:
    if changed:
        raise UserError(f"{run.root} was made with {'; '.join(changed)}: going on with other settings would mix "
                        f"two experiments; {how}, or {NEW_RUN}")


def reuse_out(args: argparse.Namespace, run: RunDir, config: RunConfig, command: str) -> None:
    """Check ``--out`` before any work: writable, and an earlier output there is of this command and settings."""
    run.check_writable()
    if not run.config_path.exists():
        return
    run.check_compatible(command)
    _refuse_other_settings(run, differences(args, RunConfig.of_run(run), config), "give the same flags to continue it")
    if dist_info.rank() == 0:
        remove_temporaries(run.root)


def resumed_run(args: argparse.Namespace) -> tuple[RunDir, RunConfig]:
    """The run directory of ``--resume`` and its saved configuration, with the changes a resume allows."""
    run = RunDir.existing(args.resume)
    if args.out and Path(args.out).resolve() != run.root.resolve():
        raise UserError(f"--out {args.out} and --resume {args.resume} are different folders: a resumed run goes on "
                        "in its own folder; drop --out")
    run.check_writable()
    run.check_compatible("run", "construct")
    saved, given = RunConfig.of_run(run), run_config(args)
    _refuse_other_settings(run, differences(args, saved, given, only=args.explicit),
                           "drop those flags to continue it as saved")
    if dist_info.rank() == 0:
        remove_temporaries(run.root)
    log.info("resuming %s with its saved configuration", run.root)
    return run, with_resumable_changes(saved, given, args.explicit)


def study_config(args: argparse.Namespace, out: Path) -> StudyConfig:
    """The flags' study, or with ``--resume`` the one saved in ``out`` (devices, workers, progress as given)."""
    given = StudyConfig(run=run_config(args), **group_fields(args, "study"))
    if not args.resume:
        return given
    saved = load_study(out)
    changed = sorted(set(args.explicit) - RESUMABLE - {"out", "resume", "shard", "verbosity"})
    if changed:
        raise UserError(f"--resume continues {out} with its saved settings; drop the other flags "
                        f"({', '.join(changed)}) or give the same ones without --resume")
    return dataclasses.replace(saved, run=with_resumable_changes(saved.run, given.run, args.explicit))
