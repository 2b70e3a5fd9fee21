"""Trained networks from a run directory, and an evaluation that also measures speed.

    model = topo.load_run("runs/run-digits-...")                      # the discovered network, eval mode
    model, spec, metrics = topo.load_run(run_dir, "reference", with_spec=True, with_metrics=True)
    timed_evaluate(model, bundle.val)    # {"loss", "top1", "top5", "count", "eval_time_s", "images_per_s"}

A network is rebuilt from the run's own files: its spec (``training/NAME.spec.json``,
else ``topology.json`` for the discovered network) and its checkpoint
(``training/NAME.ckpt``), whose weights must fit the spec exactly.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import builders
from builders.spec import NetworkSpec, read_spec
from topo.common.errors import SpecError, UserError
from topo.common.reading import state_mismatch
from topo.data import DataBundle
from topo.run.config import RunConfig, reference_spec
from topo.run.rundir import RunDir
from topo.train.config import TrainConfig
from topo.train.files import read_checkpoint, read_metrics
from topo.train.trainer import HISTORY_COLUMNS, evaluate

log = logging.getLogger(__name__)

def trained_networks(run_dir: str | Path | RunDir) -> list[str]:
    """Names of the networks ``run_dir`` holds a checkpoint for, sorted."""
    return _open(run_dir).training.networks()


def _open(run_dir: str | Path | RunDir) -> RunDir:
    return run_dir if isinstance(run_dir, RunDir) else RunDir.existing(run_dir)


def _checkpoint_of(run: RunDir, name: str) -> Path:
    path = run.training.checkpoint(name)
    if not path.is_file():
        have = trained_networks(run)
        listed = ", ".join(have) if have else "none yet (finish the run with topo-build --resume)"
        raise UserError(f"run {run.root} has no trained network {name!r} (no {path}); it has: {listed}")
    return path


# --------------------------------------------------------------------------- specs
def run_spec(run_dir: str | Path | RunDir, network: str = "discovered") -> NetworkSpec:
    """The :class:`NetworkSpec` network ``network`` of a run was trained with.

    Read from ``training/NETWORK.spec.json``; without that file, the discovered
    network's is ``topology.json`` and the reference's is rebuilt from
    ``config.json`` (runs that predate the spec files).
    """
    run = _open(run_dir)
    path = run.training.spec(network)
    if path.is_file():
        return read_spec(path)
    if network == "discovered" and run.topology.is_file():
        return read_spec(run.topology)
    if network == "reference" and run.topology.is_file():
        return _reference_from_config(run)
    raise UserError(
        f"run {run.root} has no spec for network {network!r}: write its NetworkSpec JSON to {path}"
    )


def _reference_from_config(run: RunDir) -> NetworkSpec:
    """The reference spec of a run without ``training/reference.spec.json``, from its configuration.

    The data's class count, channels and image size are those of the discovered
    spec, which the construction derives from the reference.
    """
    discovered = read_spec(run.topology)
    config = RunConfig.of_run(run)
    size = discovered.input_size
    shape = DataBundle(train=None, val=None, num_classes=discovered.head.num_classes,  # type: ignore[arg-type]
                       in_channels=discovered.in_channels, image_size=(size, size), class_names=[], name=config.data)
    log.info("run %s has no reference spec file: rebuilding the reference from config.json", run.root)
    return reference_spec(config, shape)


# --------------------------------------------------------------------------- checkpoints
def _weights(checkpoint: dict[str, Any], path: Path, ema: bool) -> dict[str, torch.Tensor]:
    if not ema:
        return checkpoint["model"]
    averaged = checkpoint.get("ema")
    if not averaged:
        raise UserError(f"checkpoint {path} has no EMA weights (trained without --ema); load it with ema=False")
    # torch.optim.swa_utils.AveragedModel keys: "module.<name>" plus its own "n_averaged" counter
    return {k[len("module."):]: v for k, v in averaged.items() if k.startswith("module.")}


def build_with_weights(spec: NetworkSpec, state: dict[str, torch.Tensor], *, source: str,
                       spec_source: str) -> nn.Module:
    """``builders.build(spec)`` with ``state`` loaded strictly; a one-line :class:`SpecError` if it does not fit."""
    model = builders.build(spec)
    try:
        model.load_state_dict(state, strict=True)  # the network's own loading maps e.g. fused onto unfused layouts
    except RuntimeError as e:
        raise SpecError(f"{spec_source} does not match the weights in {source} ({state_mismatch(model, state, e)})"
                        ) from None
    return model


def _warn_if_unfinished(checkpoint: dict[str, Any], path: Path, run: RunDir) -> None:
    planned = checkpoint.get("config", {}).get("epochs")
    epoch = checkpoint.get("epoch")
    if planned is not None and epoch is not None and epoch < planned:
        warnings.warn(
            f"checkpoint {path} holds epoch {epoch} of {planned}: its training did not finish "
            f"(topo-build --resume {run.root} finishes it)",
            UserWarning,
            stacklevel=3,
        )


def _metrics(run: RunDir, name: str, checkpoint: dict[str, Any]) -> pd.DataFrame:
    path = run.training.metrics(name)
    if path.is_file():
        return read_metrics(path)
    return pd.DataFrame(list(checkpoint.get("history", [])), columns=HISTORY_COLUMNS)


def load_run(
    run_dir: str | Path,
    network: str = "discovered",
    *,
    map_location: str | torch.device = "cpu",
    ema: bool = False,
    with_spec: bool = False,
    with_metrics: bool = False,
) -> nn.Module | tuple[Any, ...]:
    """The trained network ``network`` of a ``topo-build`` run, in eval mode on ``map_location``.

    ``ema=True`` loads the exponential moving average of the weights instead
    (runs trained with ``--ema-decay``). With ``with_spec`` / ``with_metrics``
    the result is a tuple ``(model, spec, metrics)`` of the requested parts, in
    that order: ``spec`` the network's :class:`NetworkSpec`, ``metrics`` its
    per-epoch history (a DataFrame, one row per epoch). A checkpoint of an
    unfinished training loads with a ``UserWarning``.
    """
    run = RunDir.existing(run_dir)
    path = _checkpoint_of(run, network)
    checkpoint = read_checkpoint(path)
    spec = run_spec(run, network)
    spec_path = run.training.spec(network)
    spec_source = str(spec_path) if spec_path.is_file() else f"the {network} spec of run {run.root}"
    model = build_with_weights(spec, _weights(checkpoint, path, ema), source=str(path), spec_source=spec_source)
    _warn_if_unfinished(checkpoint, path, run)
    model.to(map_location).eval()
    parts: tuple[Any, ...] = (model,)
    if with_spec:
        parts += (spec,)
    if with_metrics:
        parts += (_metrics(run, network, checkpoint),)
    return parts[0] if len(parts) == 1 else parts


# --------------------------------------------------------------------------- evaluation
def timed_evaluate(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    device: str | torch.device = "auto",
    batch_size: int = 256,
    config: TrainConfig | None = None,
) -> dict[str, float]:
    """:func:`topo.train.evaluate`'s metrics plus ``eval_time_s`` and ``images_per_s``.

    The time is the wall time of the whole evaluation (loader start-up
    included), measured after the results are on the host, so it includes
    every device computation.
    """
    start = time.perf_counter()
    metrics = evaluate(model, data, device=device, batch_size=batch_size, config=config)
    seconds = time.perf_counter() - start
    return {**metrics, "eval_time_s": seconds, "images_per_s": metrics["count"] / seconds if seconds > 0 else 0.0}
