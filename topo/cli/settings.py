"""A command's settings: the command line over the `--config` file over the defaults, and the
configuration dataclasses made from them.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from topo.cli.config_file import RUN_SECTIONS, FileSettings, config_defaults
from topo.cli.parser import Parser, build_parser, workers_value
from topo.common import distributed as dist_info
from topo.common.errors import UserError
from topo.construct.config import ConstructConfig
from topo.controls.control import ControlConfig
from topo.run.config import RunConfig
from topo.run.rundir import CONFIG_FILE, RunDir
from topo.train.config import TrainConfig, check_sync_bn


def flags_by_field(args: argparse.Namespace) -> dict[str, str]:
    """The flag of every configuration field the command has (``seed``: ``--seed``)."""
    flags = {field: flag for fields in args.config_fields.values() for field, flag in fields.items()}
    return {**flags, "seed": "--seed"} if hasattr(args, "seed") else flags


def group_fields(args: argparse.Namespace, group: str) -> dict[str, Any]:
    return {name: getattr(args, name) for name in args.config_fields.get(group, [])}


def construct_config(args: argparse.Namespace) -> ConstructConfig:
    return ConstructConfig(**group_fields(args, "construct"), seed=args.seed)


def train_config(args: argparse.Namespace) -> TrainConfig:
    fields = group_fields(args, "train")
    config = TrainConfig(**{**fields, "workers": workers_value(fields["workers"])}, seed=args.seed,
                         progress=args.progress)
    check_sync_bn(config)
    return config


def run_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of the parsed flags (the parts the command has; the rest at their defaults)."""
    parts: dict[str, Any] = {}
    if "construct" in args.config_fields:
        parts["construct"] = construct_config(args)
    if "train" in args.config_fields:
        parts["train"] = train_config(args)
    if "control" in args.config_fields:
        parts["control"] = ControlConfig(**group_fields(args, "control"))
    config = RunConfig(**group_fields(args, "data"), seed=args.seed, **parts)
    settings = getattr(args, "config_file", None)
    return _with_kept(config, settings.kept, args.config) if settings is not None else config


def _with_kept(config: RunConfig, kept: dict[str, Any], path: str) -> RunConfig:
    """``config`` with the settings of the ``--config`` file ``path`` that the command has no option for: a run's
    config.json given back is reproduced in full, its sections included."""
    if not kept:
        return config
    data = config.to_dict()
    for key, value in kept.items():
        data[key] = {**data[key], **value} if key in RUN_SECTIONS else value
    try:
        return RunConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise UserError(f"configuration file {path}: {e}") from None


def out_dir(args: argparse.Namespace, command: str) -> Path:
    if args.out:
        return Path(args.out)
    # under torchrun every process must use rank 0's name, whatever its own clock says
    return Path(dist_info.same_on_all_ranks(f"runs/{command}-{args.data}-{time.strftime('%Y%m%d-%H%M%S')}"))


def explicit_options(command: str, argv: list[str], args: argparse.Namespace) -> set[str]:
    """The ``dest`` of every option given on the command line (not left at its default)."""
    unset = object()  # not a string: argparse passes it through untouched
    probe = build_parser(command)
    probe.set_defaults(**{dest: unset for dest in vars(args)})
    return {dest for dest, value in vars(probe.parse_args(argv)).items() if value is not unset}


def _run_data_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """``eval`` of a run directory: the run's data settings and seed (which draws planted and fake data), so
    that the network is evaluated on the validation images it was evaluated on in training."""
    source = Path(parser.parse_known_args(argv)[0].source)
    if not (source / CONFIG_FILE).is_file():
        return {}
    saved = RunConfig.of_run(RunDir.existing(source))
    return {name: getattr(saved, name) for name in [*parser.get_default("config_fields")["data"], "seed"]}


def parse(command: str, argv: list[str]) -> argparse.Namespace:
    """The arguments of ``command``: the command line over the ``--config`` file over the defaults (``eval`` of
    a run directory: the run's data settings). ``explicit``: the options the command line or the file set away
    from their defaults; ``config_file``: the file's :class:`FileSettings`."""
    parser = build_parser(command)
    config_option = Parser(prog=parser.prog, add_help=False)
    config_option.add_argument("--config")
    path = config_option.parse_known_args(argv)[0].config
    settings = config_defaults(path, parser) if path else FileSettings()
    before = {dest: parser.get_default(dest) for dest in settings.values}
    if command == "eval":
        parser.set_defaults(**_run_data_defaults(parser, argv))
    parser.set_defaults(**settings.values)
    args = parser.parse_args(argv)
    args.explicit = explicit_options(command, argv, args) | {
        dest for dest, value in settings.values.items() if value != before[dest]}
    args.config_file = settings
    return args
