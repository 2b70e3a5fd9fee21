"""Reading every file topo writes back: one loader per kind, each failure a one-line error naming the file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from topo.common.errors import UserError

PathLike = str | os.PathLike


#: The exceptions a shape check raises on content of the wrong shape (a missing key, a wrong type).
SHAPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)


#: The parts of a trainer checkpoint a resume needs (`topo.train` writes them all).
CHECKPOINT_PARTS = ("epoch", "model", "optimizer", "scheduler", "scaler", "ema", "rng", "config", "history")


CLUSTER_KEYS = ("method", "window", "n_clusters", "kernel_counts", "channel_order", "channel_labels", "clusters")


RESTORE = "restore it from a copy"


class UnexpectedShape(ValueError):
    """Content of the wrong shape, found by a check here; the message reads after the file's name."""


def error_reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def existing_file(path: PathLike, what: str, fix: str, error: type[UserError]) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise error(f"{what} {path} does not exist; {fix}")
    if not path.is_file():
        raise error(f"{what} {path} is not a file; {fix}")
    return path


def _parsed(value: Any, path: Path, what: str, fix: str, error: type[UserError],
            parse: Callable[[Any], Any] | None) -> Any:
    """``parse(value)``, with a shape problem turned into one line naming ``path``."""
    if parse is None:
        return value
    try:
        return parse(value)
    except UserError as e:
        raise error(f"{what} {path}: {e}") from None
    except UnexpectedShape as e:
        raise error(f"{what} {path} {e}; {fix}") from None
    except SHAPE_ERRORS as e:
        raise error(f"{what} {path} does not have the expected content ({type(e).__name__}: {error_reason(e)}); "
                    f"{fix}") from None


def read_text(path: PathLike, *, what: str, fix: str, error: type[UserError] = UserError) -> str:
    """The UTF-8 text of ``path``."""
    path = existing_file(path, what, fix, error)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text (a binary or damaged file); {fix}") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror or error_reason(e)}); {fix}") from None


def read_json(path: PathLike, *, what: str, fix: str, parse: Callable[[Any], Any] | None = None,
              error: type[UserError] = UserError) -> Any:
    """The JSON value in ``path``, passed through ``parse`` (a shape check) when given."""
    text = read_text(path, what=what, fix=fix, error=error)
    path = Path(path).expanduser()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        problem = ("is empty" if not text.strip()
                   else f"is truncated or not JSON ({e.msg}, line {e.lineno} column {e.colno})")
        raise error(f"{what} {path} {problem}; {fix}") from None
    return _parsed(value, path, what, fix, error, parse)


def read_torch(path: PathLike, *, what: str, fix: str, parse: Callable[[Any], Any] | None = None,
               error: type[UserError] = UserError, map_location: str | torch.device = "cpu") -> Any:
    """The object ``torch.save`` wrote to ``path`` (``weights_only``: tensors and plain data only)."""
    path = existing_file(path, what, fix, error)
    try:
        value = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch raises on a damaged or foreign file, the file is at fault
        raise error(f"{what} {path} is truncated or corrupt, or not written by torch.save ({type(e).__name__}); "
                    f"{fix}") from None
    return _parsed(value, path, what, fix, error, parse)


def read_csv(path: PathLike, *, what: str, fix: str, columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """The table in the CSV file ``path``, which must have ``columns``."""
    path = existing_file(path, what, fix, UserError)
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{what} {path} is truncated or not CSV ({error_reason(e)}); {fix}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{what} {path} lacks the column(s) {', '.join(missing)}; {fix}")
    return frame


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), f"a {type(value).__name__}")


def json_mapping(value: Any, keys: tuple[str, ...] = (), name: str = "an object") -> dict[str, Any]:
    """``value`` if it is a dict with ``keys``; what is wrong with it otherwise."""
    if not isinstance(value, dict):
        raise UnexpectedShape(f"holds {_kind(value)}, not {name}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise UnexpectedShape(f"lacks {', '.join(map(repr, missing))}")
    return value


def list_of_dicts(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise UnexpectedShape(f"holds {_kind(value)}, not a list of objects")
    return value


def tensor_dict(value: Any) -> dict[str, torch.Tensor]:
    """A state dict: names to tensors."""
    if not isinstance(value, dict) or not value or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
        raise UnexpectedShape("is not a state dict (names to tensors)")
    return value


def read_config(path: PathLike, parse: Callable[[dict[str, Any]], Any] | None = None) -> Any:
    """A run's ``config.json``: the whole document (``{"config": {...}, "environment": {...}, ...}``), or
    ``parse(document["config"])`` (e.g. ``RunConfig.from_dict``) with its problems named as the file's."""
    fix = "restore it from a copy, or start a new run with another --out"

    def check(value: Any) -> Any:
        document = json_mapping(value, ("config",))
        config = json_mapping(document["config"], name="a configuration")
        return document if parse is None else parse(config)

    return read_json(path, what="run configuration", fix=fix, parse=check)


def read_state(path: PathLike) -> dict[str, Any]:
    """A run's ``state.json`` (the stages completed, each with its result); ``{}`` where there is none yet."""
    if not Path(path).exists():
        return {}
    fix = "restore it from a copy, or delete it to redo every stage (finished checkpoints are kept and reused)"
    return read_json(path, what="stage record", fix=fix, parse=json_mapping)


def read_records(path: PathLike) -> list[dict[str, Any]]:
    """The construction's ``records.json``: one record per module."""
    return read_json(path, what="construction records", fix=RESTORE + ", or construct again into a new --out",
                     parse=list_of_dicts)


def read_clusters(path: PathLike) -> dict[str, Any]:
    """A module's fitted clusters as ``topo.construct.files.clustering_to_dict`` wrote them."""
    fix = "restore it from a copy, or construct again into a new --out"
    return read_json(path, what="clusters file", fix=fix, parse=_check_clusters)


def _check_clusters(value: Any) -> dict[str, Any]:
    data = json_mapping(value, CLUSTER_KEYS)
    if len(data["channel_order"]) != len(data["channel_labels"]):
        raise UnexpectedShape(f"has {len(data['channel_order'])} channels in its order but "
                          f"{len(data['channel_labels'])} labels")
    return data


def read_weights(path: PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pt``/``.pth`` file: a plain one, or the ``model`` of a trainer checkpoint."""
    fix = "give a state-dict .pt/.pth file (torch.save(model.state_dict(), path)) or a topo checkpoint"

    def check(value: Any) -> dict[str, torch.Tensor]:
        if isinstance(value, dict) and isinstance(value.get("model"), dict):
            value = value["model"]
        return tensor_dict(value)

    return read_torch(path, what="weights file", fix=fix, parse=check)


def state_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor], error: RuntimeError) -> str:
    """Why ``state`` did not load strictly into ``model`` (``load_state_dict`` raised ``error``), in a few words:
    the first weight of another shape, how many are missing and how many unexpected."""
    own = model.state_dict()
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(f"size mismatch for {k}: {tuple(state[k].shape)} given, {tuple(own[k].shape)} in the network"
                     + (f", and {len(wrong) - 1} more" if len(wrong) > 1 else ""))
    for count, kind, keys in ((len(missing), "missing", missing), (len(unexpected), "unexpected", unexpected)):
        if count:
            parts.append(f"{count} {kind} weight(s) such as {keys[0]}")
    return ", ".join(parts) or error_reason(error)
