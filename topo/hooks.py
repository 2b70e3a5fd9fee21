"""``record``: forward hooks that stream a model's layer activations into :class:`LayerStats`.

Layers are named as in ``model.named_modules()``. ``"inception3a"`` (or
``"inception3a:output"``) records what the module returns; ``"head:input"`` records
the tensor entering it (its first positional argument), which is how the
construction loop reads the output of the last stage through the head.
"""
from __future__ import annotations

import difflib
import itertools
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from topo.distributed import every_rank, is_distributed
from topo.errors import StatsError
from topo.progress import progress_bar
from topo.stats import DEFAULT_POSITIONS, LayerStats

_WHERE = ("output", "input")


def parse_layer(spec: str) -> tuple[str, str]:
    """Split ``"name"`` / ``"name:output"`` / ``"name:input"`` into (module name, where)."""
    name, sep, where = spec.rpartition(":")
    if not sep:
        return spec, "output"
    if where not in _WHERE:
        raise StatsError(f"layer {spec!r}: unknown suffix ':{where}'; use 'name', 'name:output' or 'name:input'")
    return name, where


def record(
    model: nn.Module,
    data: Iterable[Any],
    layers: str | Sequence[str],
    *,
    max_offset: int = 4,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    threshold: float = 0.0,
    positions: int | str | None = DEFAULT_POSITIONS,
    seed: int = 0,
    progress: bool = True,
    all_reduce: bool = True,
) -> dict[str, LayerStats]:
    """Run ``data`` through ``model`` and return the statistics of each layer in ``layers``.

    ``data`` is a DataLoader or any iterable of input tensors or (input, target, ...)
    tuples. The model runs in eval mode under ``torch.no_grad()``; its train/eval
    modes are restored and the hooks removed afterwards, also on error. Inputs are
    moved to ``device`` (default: the device of the model's parameters; the model
    itself is not moved), and the statistics accumulate there. ``positions`` random
    anchor positions per map and image are used (``None`` = all, exact). Under
    ``torch.distributed`` with ``all_reduce=True`` the statistics are summed over
    ranks, each of which should see its own shard of the data; when one rank's shard
    gave a layer nothing, or one rank fails (e.g. a NaN in its shard), every rank
    raises. Keys of the result are the strings given in ``layers``.
    """
    specs = [layers] if isinstance(layers, str) else list(layers)
    if not specs:
        raise StatsError("no layers given to record; pass module names from model.named_modules()")
    modules = dict(model.named_modules())
    targets = {spec: _find_module(model, modules, *parse_layer(spec)) for spec in specs}
    if device is None:
        device = _model_device(model)
    stats = {
        spec: LayerStats(max_offset=max_offset, threshold=threshold, positions=positions, seed=seed, name=spec)
        for spec in specs
    }
    batch_index = [0]
    modes = {m: m.training for m in model.modules()}
    total = _length(data, max_batches)
    batches = data if max_batches is None else itertools.islice(data, max_batches)
    handles = []
    reduce = all_reduce and is_distributed()
    failure: Exception | None = None
    try:
        for spec, (module, where) in targets.items():
            handles.append(_attach(module, where, stats[spec], batch_index))
        model.eval()
        with torch.no_grad():
            for index, batch in enumerate(progress_bar(batches, total=total, desc="record", unit="batch", disable=not progress)):
                batch_index[0] = index
                model(_inputs(batch).to(device, non_blocking=True))
    except Exception as error:
        if not reduce:
            raise
        failure = error  # raised after the other ranks have heard of it: they would wait for this one forever
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    _check_outcome(stats, reduce, failure)
    if reduce:
        for layer in stats.values():
            layer.all_reduce()
    return stats


def _check_outcome(stats: dict[str, LayerStats], distributed: bool, failure: Exception | None) -> None:
    """Raise ``failure``, or a StatsError for the first layer that saw nothing. With ``distributed``,
    every rank first learns every rank's outcome (one collective), so that all of them raise when one
    fails, the failed rank its own error and the others a StatsError naming it."""
    counts = [layer.count for layer in stats.values()]
    message = None if failure is None else f"{type(failure).__name__}: {failure}"
    per_rank = every_rank((counts, message)) if distributed else [(counts, message)]
    if failure is not None:
        raise failure
    failed = [(rank, text) for rank, (_, text) in enumerate(per_rank) if text is not None]
    if failed:
        rank, text = failed[0]
        raise StatsError(f"rank {rank} of {len(per_rank)} failed while recording, so this one stops too: {text}")
    for index, spec in enumerate(stats):
        empty = [rank for rank, (seen, _) in enumerate(per_rank) if seen[index] == 0]
        if not empty:
            continue
        if not distributed:
            raise StatsError(
                f"layer {spec!r} saw no activations: the data was empty or the module was never called in forward"
            )
        ranks = f"rank{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))}"
        raise StatsError(
            f"layer {spec!r} saw no activations on {ranks} of {len(per_rank)} processes: their shard of the data "
            "was empty or the module was never called in forward; give every process a non-empty shard "
            "(more data or fewer processes)"
        )


def _attach(module: nn.Module, where: str, stats: LayerStats, batch_index: list[int]):
    if where == "input":

        def pre_hook(_module, args):
            stats.update(_first_tensor(args, stats.name), batch_index=batch_index[0])

        return module.register_forward_pre_hook(pre_hook)

    def hook(_module, _args, output):
        stats.update(_first_tensor(output, stats.name), batch_index=batch_index[0])

    return module.register_forward_hook(hook)


def _first_tensor(value: Any, name: str | None) -> torch.Tensor:
    """The tensor itself, or the first tensor of a tuple / list / namedtuple."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
    raise StatsError(f"layer {name!r} produced {type(value).__name__}, not a tensor; record a module that returns one")


def _find_module(model: nn.Module, modules: dict[str, nn.Module], name: str, where: str) -> tuple[nn.Module, str]:
    if name in modules and name != "":
        return modules[name], where
    candidates = [n for n in modules if n]
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}" if close else f"available: {', '.join(candidates[:8])}, ..."
    raise StatsError(
        f"layer {name!r} not found in {type(model).__name__} ({hint}); use a name from model.named_modules()"
    )


def _model_device(model: nn.Module) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _inputs(batch: Any) -> torch.Tensor:
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise StatsError(
            f"a data batch is {type(batch).__name__}; pass an iterable of tensors or (input, target) pairs"
        )
    return batch


def _length(data: Any, max_batches: int | None) -> int | None:
    try:
        total = len(data)
    except TypeError:
        return max_batches
    return total if max_batches is None else min(total, max_batches)
