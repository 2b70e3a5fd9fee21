"""`--config FILE`: settings from a JSON (or YAML) file laid out like a run's config.json, checked and
converted as the command line's text would be.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from topo.cli.parser import field_default
from topo.common.errors import UserError
from topo.common.reading import read_text
from topo.construct.config import ConstructConfig
from topo.controls.control import ControlConfig
from topo.run.config import RunConfig
from topo.run.study import StudyConfig
from topo.train.config import TrainConfig

#: The dataclass behind each group of flags (``config_fields`` of `build_parser`).
GROUP_CLASSES: dict[str, type] = {"data": RunConfig, "construct": ConstructConfig, "control": ControlConfig,
                                  "train": TrainConfig, "study": StudyConfig}


#: The sections of a RunConfig (its dataclass fields: construct, train, ...) and the dataclass of each.
RUN_SECTIONS: dict[str, type] = {f.name: type(field_default(RunConfig, f.name)) for f in dataclasses.fields(RunConfig)
                                 if dataclasses.is_dataclass(field_default(RunConfig, f.name))}


#: The dataclasses whose fields the keys of each section of a saved configuration are ("": the top level).
SECTIONS: dict[str, tuple[type, ...]] = {"": (RunConfig, StudyConfig), "run": (RunConfig,),
                                         **{name: (cls,) for name, cls in RUN_SECTIONS.items()}}


SUBSECTIONS = {"": ("run", *RUN_SECTIONS), "run": tuple(RUN_SECTIONS)}


DOCUMENT_KEYS = frozenset({"format", "topo_version", "command", "environment"})  # around config.json's "config"


NOT_SETTINGS = frozenset({"help", "config", "config_fields", "verbosity"})


CONFIG_FIX = "give a JSON (or YAML) file of settings laid out like a run's config.json"


def _read_yaml(path: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise UserError(f"configuration file {path} is YAML but PyYAML is not installed: give the settings as JSON "
                        "(e.g. a run's config.json), or pip install pyyaml") from None
    text = _text(path)
    try:
        return yaml.load(text, Loader=_unique_keys_loader(yaml, path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"configuration file {path} is not valid YAML ({getattr(e, 'problem', None) or e}{where}); "
                        f"{CONFIG_FIX}") from None


def _unique_keys_loader(yaml: Any, path: str) -> type:
    """PyYAML's safe loader, refusing (as `_unique_keys` does for JSON) a key that a mapping gives twice."""
    class UniqueKeySafeLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden by the keys beside it
                    continue
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise UserError(f"configuration file {path}: the key {key!r} is given twice in one mapping "
                                    f"(line {key_node.start_mark.line + 1}); keep one")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)
    return UniqueKeySafeLoader


def _text(path: str) -> str:
    """The text of the file ``path``, without a UTF-8 byte-order mark (as Windows editors write) at its start."""
    return read_text(path, what="configuration file", fix=CONFIG_FIX).removeprefix("\ufeff")


def _unique_keys(path: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A JSON object hook that refuses (one line naming the key and ``path``) a key an object gives twice:
    which of the two was meant cannot be told."""
    def mapping(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise UserError(f"configuration file {path}: the key {key!r} is given twice in one object; keep one")
            seen.add(key)
        return dict(pairs)
    return mapping


def _read_json(path: str) -> Any:
    """The JSON value of the ``--config`` file ``path``: a byte-order mark accepted, a key given twice refused."""
    text = _text(path)
    try:
        return json.loads(text, object_pairs_hook=_unique_keys(path))
    except json.JSONDecodeError as e:
        problem = ("is empty" if not text.strip()
                   else f"is truncated or not JSON ({e.msg}, line {e.lineno} column {e.colno})")
        raise UserError(f"configuration file {path} {problem}; {CONFIG_FIX}") from None


def read_config_file(path: str) -> dict[str, Any]:
    """The settings of a ``--config`` file: JSON, or YAML (``.yaml``/``.yml``) where PyYAML is installed.

    Either a configuration as a run's ``config.json`` holds it under ``"config"``
    (sections ``construct``, ``train``, ...; a study's ``run``), that whole file, or
    settings in that layout written by hand, where top-level keys may also name
    options (``epochs``, ``batch-size``; see :func:`config_defaults`).
    """
    yaml_file = Path(path).suffix.lower() in (".yaml", ".yml")
    data = _read_yaml(path) if yaml_file else _read_json(path)
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and set(data) - {"config"} <= DOCUMENT_KEYS:
        data = data["config"]
    if not isinstance(data, dict):
        raise UserError(f"configuration file {path} holds {type(data).__name__}, not a mapping of settings; "
                        f"{CONFIG_FIX}")
    return data


def _settings(data: dict[str, Any], path: str, section: str = "") -> Iterator[tuple[str, str, str, Any]]:
    """(key as written, section, field, value) of every setting in ``data``, sections flattened."""
    prefix = f"{section}." if section else ""
    for field, value in data.items():
        if field in SUBSECTIONS.get(section, ()):
            if not isinstance(value, dict):
                raise UserError(f"configuration file {path}: {prefix}{field} is {value!r}, not a mapping of settings")
            yield from ((f"{prefix}{key}", sub, name, v) for key, sub, name, v in _settings(value, path, field))
        else:
            yield f"{prefix}{field}", section, field, value


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _option_names(actions: dict[str, argparse.Action]) -> dict[str, str]:
    """Each option's ``dest`` by the names a file may give it: the ``dest`` and the long flag without its dashes
    (``batch_size``, ``batch-size``; ``--no-...`` flags left out)."""
    names = {dest: dest for dest in actions}
    for dest, action in actions.items():
        for flag in action.option_strings:
            if flag.startswith("--") and not flag.startswith("--no-"):
                names.update({flag[2:]: dest, flag[2:].replace("-", "_"): dest})
    return names


def _dest_of(section: str, field: str, groups: dict[str, dict[str, str]], names: dict[str, str]) -> str | None:
    """The option a setting gives its value to, None where this command has none. A field of a configuration
    dataclass goes only to the flag made from it; other top-level keys name options (see `_option_names`)."""
    # one flag sets the seed of every section (--seed) and the training's progress bars (--no-progress)
    if (field == "seed" and (section in ("", "run") or section in groups)) or (
            (field, section) == ("progress", "train") and section in groups):
        return field if field in names else None
    if section in RUN_SECTIONS:
        return field if field in groups.get(section, {}) else None
    owners = (("data", RunConfig),) if section == "run" else (("data", RunConfig), ("study", StudyConfig))
    for group, cls in owners:
        if field in _field_names(cls):
            return field if field in groups.get(group, {}) else None
    return names.get(field) if section == "" else None


def _known(section: str, field: str) -> bool:
    return any(field in _field_names(cls) for cls in SECTIONS[section])


def _allows_none(action: argparse.Action, groups: dict[str, dict[str, str]]) -> bool:
    """Whether an option may be None: its dataclass field's type says so, or (no such field) its default is."""
    for group, fields in groups.items():
        if action.dest in fields:
            field = next(f for f in dataclasses.fields(GROUP_CLASSES[group]) if f.name == action.dest)
            return "None" in str(field.type)
    return action.default is None


def _config_value(action: argparse.Action, key: str, value: Any, path: str, none_ok: bool) -> Any:
    """``value`` checked and converted as the option's command-line text would be."""
    flag = action.option_strings[0] if action.option_strings else action.dest
    where = f"configuration file {path}: {key} {value!r} ({flag})"
    if action.nargs == 0:  # on/off flags
        if not isinstance(value, bool):
            raise UserError(f"{where} is not true or false")
        return value
    if value is None and none_ok:
        return value
    if value is None or isinstance(value, (bool, dict)):
        raise UserError(f"{where} is not a value this setting takes; see topo-build --help")
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    if action.type is not None:
        try:
            value = action.type(text)
        except (argparse.ArgumentTypeError, ValueError, UserError) as e:
            raise UserError(f"{where}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where} is not one of {', '.join(map(str, action.choices))}")
    return value


@dataclasses.dataclass
class FileSettings:
    """What a ``--config`` file gives a command: option values by ``dest``; the RunConfig settings the command has
    no option for (``kept``, by section), which its configuration takes as they are; and the other settings
    (a study's, given to another command) away from their defaults (``unused``, ``key=value``, for a log line)."""

    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    kept: dict[str, Any] = dataclasses.field(default_factory=dict)
    unused: list[str] = dataclasses.field(default_factory=list)

    def keep(self, key: str, section: str, field: str, value: Any) -> None:
        if section in RUN_SECTIONS:
            self.kept.setdefault(section, {})[field] = value
        elif field in _field_names(RunConfig):
            self.kept[field] = value
        elif value != _field_default(section, field):
            self.unused.append(f"{key}={value!r}")


def config_defaults(path: str, parser: argparse.ArgumentParser) -> FileSettings:
    """What the ``--config`` file ``path`` sets for ``parser``'s command (see :class:`FileSettings`).

    An unknown key, a value the option would refuse, or two keys giving one option different values are
    one-line errors naming the key.
    """
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_SETTINGS}
    groups, names = parser.get_default("config_fields"), _option_names(actions)
    values: dict[str, tuple[str, Any]] = {}
    settings = FileSettings()
    for key, section, field, value in _settings(read_config_file(path), path):
        dest = _dest_of(section, field, groups, names)
        if dest is None:
            if not _known(section, field):
                raise UserError(f"configuration file {path}: unknown setting {key!r}; use the keys of a run's "
                                f"config.json or the options of {parser.prog} --help")
            settings.keep(key, section, field, value)
            continue
        value = _config_value(actions[dest], key, value, path, _allows_none(actions[dest], groups))
        if dest in values and values[dest][1] != value:
            other, was = values[dest]
            raise UserError(f"configuration file {path}: {other} {was!r} and {key} {value!r} set the same option "
                            f"({actions[dest].option_strings[0]}) to different values; keep one")
        values[dest] = (key, value)
    settings.values = {dest: value for dest, (_, value) in values.items()}
    return settings


def _field_default(section: str, field: str) -> Any:
    cls = next(cls for cls in SECTIONS[section] if field in _field_names(cls))
    return field_default(cls, field)
