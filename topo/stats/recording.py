"""``record``: forward hooks that stream a model's layer activations into :class:`LayerStats`.

Layers are named as in ``model.named_modules()``. ``"inception3a"`` (or
``"inception3a:output"``) records what the module returns; ``"head:input"`` records
the tensor entering it (its first positional argument), which is how the
construction loop reads the output of the last stage through the head.

By default ``record`` estimates each unit's firing threshold (its
``fire_quantile``-quantile) in a calibration pass, then adds every activation to
the statistics: from copies the calibration pass kept, while they fit in
``replay_bytes`` (one forward pass in all), or else in a second pass that sees
the same batches in the same order (see :func:`record`). Positions per map are
chosen per layer from the model's counted forward multiply-adds
(``positions="auto"``, :func:`topo.stats.positions.choose_positions`).
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from topo.common import distributed as dist_info
from topo.common.batches import batch_input
from topo.common.devices import ACTIVATION_BYTES
from topo.common.errors import StatsError
from topo.common.progress import progress_bar
from topo.stats.layer_stats import LayerStats
from topo.stats.positions import (
    COST_MULTIPLE,
    DEFAULT_POSITIONS,
    PositionBudget,
    half_offsets,
    planned_offsets,
    recording_scale,
)
from topo.stats.sample import DEFAULT_FIRE_QUANTILE, ActivationSample, check_fire_quantile

log = logging.getLogger(__name__)

_WHERE = ("output", "input")



def parse_layer(layer: str) -> tuple[str, str]:
    """Split ``"name"`` / ``"name:output"`` / ``"name:input"`` into (module name, where)."""
    name, sep, where = layer.rpartition(":")
    if not sep:
        return layer, "output"
    if where not in _WHERE:
        raise StatsError(f"layer {layer!r}: unknown suffix ':{where}'; use 'name', 'name:output' or 'name:input'")
    return name, where


def forward_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-adds of one forward pass of ``model`` on ``example``, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2, as in ``builders.cost``:
    convolutions and matrix products). A deterministic count: the same on every machine."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return counter.get_total_flops() // 2


@dataclass
class _HookState:
    """Shared with the hooks of one pass: the current batch, and whether to send activations on."""

    batch_index: int = 0
    enabled: bool = True
    shapes: dict[str, tuple[int, ...]] | None = None  # each layer's activation shape, while probing


@dataclass
class _Pass:
    """What one pass over the data saw on this process."""

    images: int = 0
    failure: Exception | None = None


def record(
    model: nn.Module,
    data: Iterable[Any],
    layers: str | Sequence[str],
    *,
    max_offset: int | Mapping[str, int] = 4,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    threshold: float | None = None,
    fire_quantile: float | None = DEFAULT_FIRE_QUANTILE,
    positions: int | str | None = DEFAULT_POSITIONS,
    seed: int = 0,
    progress: bool = True,
    all_reduce: bool = True,
    replay_bytes: int = ACTIVATION_BYTES,
    forward_cost: int | None = None,
    names: Mapping[str, str] | None = None,
    cost_multiple: float = COST_MULTIPLE,
) -> dict[str, LayerStats]:
    """Run ``data`` through ``model`` and return the statistics of each layer in ``layers`` (keyed by those strings).

    ``data``: a DataLoader or any iterable of input tensors or (input, target, ...) tuples. The model runs in eval
    mode under ``torch.no_grad()`` (modes restored, hooks removed afterwards, also on error); inputs go to
    ``device`` (default: the model's), where the statistics accumulate. Firing: an explicit scalar ``threshold``
    wins (one pass; ``fire_quantile`` unused). Otherwise, with ``fire_quantile=q`` (default 0.9), a calibration pass
    over the same batches first estimates each unit's q-quantile from a bounded, seeded subsample; a unit fires
    above it (a ReLU unit whose quantile is 0 fires when positive). The global CPU RNG and the loader's generators
    are put back before the second pass, so both see the same batches (persistent loader workers keep their own
    random state: same images and order, other augmentations). Where the calibration pass's activations fit in
    ``replay_bytes`` (2 GiB, on the statistics' device) its copies of them are recorded instead: one pass, bitwise
    the same statistics (not with 0, nor under ``torch.distributed``). ``threshold=None, fire_quantile=None``:
    threshold 0, one pass.

    ``max_offset``: the farthest displacement stored, one for all or per layer (a mapping keyed like ``layers``);
    layers recorded at a smaller one are sampled as if they stored as far as the farthest (`PositionBudget.reach`).
    ``names``: some layers' statistics' ``name`` (in logs and errors), keyed like ``layers`` (default: the layer).
    ``positions``: ``"auto"`` (default) decides per layer from the model's forward multiply-adds (counted once, on
    one image; ``forward_cost`` instead, where ``data`` are activations a larger network computed) and the number of
    images (`topo.stats.positions.choose_positions`; logged, kept in ``positions_used`` / ``exact``), all the
    layers' products within ``cost_multiple`` forward passes (`recording_scale`; a one-line warning and
    ``pairs_short`` where that leaves fewer pairs than planned); an int samples that many anchor positions per map
    and image; ``None`` uses all. Under ``torch.distributed`` with ``all_reduce=True`` the statistics are summed
    over ranks (each with its own shard), thresholds come from every rank's samples, and when one rank fails (or saw
    nothing of a layer) every rank raises. See docs/statistics.md."""
    layer_names = [layers] if isinstance(layers, str) else list(layers)
    targets = _targets(model, layer_names)
    names = _names(names, layer_names)
    quantile = _checked_settings(threshold, fire_quantile, replay_bytes)
    offsets = _offsets_by_layer(max_offset, layer_names, positions, seed)
    run = _Run(model, data, targets, max_batches, device or _model_device(model), progress,
               all_reduce and dist_info.is_distributed(), replay_bytes, reach=_shared_reach(offsets),
               forward_macs=forward_cost, cost_multiple=cost_multiple)
    auto = positions == "auto"
    with _evaluating(model):
        thresholds = run.calibrate(quantile, seed, probe=auto) if quantile is not None else {}
        stats = {layer: LayerStats(max_offset=offsets[layer], threshold=thresholds.get(layer, threshold or 0.0),
                                   positions=positions, seed=seed, name=names[layer], fire_quantile=quantile)
                 for layer in layer_names}
        run.record(stats, auto=auto)
    return _finished(stats, run.distributed)


def _finished(stats: dict[str, LayerStats], distributed: bool) -> dict[str, LayerStats]:
    """``stats`` once recorded: scratch buffers freed, and summed over the processes under ``torch.distributed``."""
    for layer in stats.values():
        layer.release_buffers()
        if distributed:
            layer.all_reduce()
    return stats


def _names(names: Mapping[str, str] | None, layer_names: list[str]) -> dict[str, str]:
    """Each layer's statistics' name: ``names`` where given, else the layer string; a one-line error for a name
    given to a layer not recorded."""
    names = dict(names or {})
    if not set(names) <= set(layer_names):
        raise StatsError(f"names are given for {sorted(set(names) - set(layer_names))}, which are not among the layers "
                         f"recorded ({layer_names}); key names like the layers")
    return {layer: names.get(layer, layer) for layer in layer_names}


def _targets(model: nn.Module, layer_names: list[str]) -> dict[str, tuple[nn.Module, str]]:
    """Each layer string's module and where on it to read (`parse_layer`); a one-line error for none or a typo."""
    if not layer_names:
        raise StatsError("no layers given to record; pass module names from model.named_modules()")
    modules = dict(model.named_modules())
    return {layer: _find_module(model, modules, *parse_layer(layer)) for layer in layer_names}


def _offsets_by_layer(max_offset: int | Mapping[str, int], layer_names: list[str], positions, seed: int) -> dict[str, int]:
    """``max_offset`` for each layer of ``layer_names`` (one int for all, or a mapping that names each); a bad setting
    (of these or of ``positions``, ``seed``) fails here, before any pass."""
    if isinstance(max_offset, Mapping) and set(max_offset) != set(layer_names):
        raise StatsError(f"max_offset is given for {sorted(max_offset)}, but the layers recorded are {layer_names}; "
                         "give one int for every layer, or one per recorded layer")
    offsets = {layer: max_offset[layer] for layer in layer_names} if isinstance(max_offset, Mapping) else \
        dict.fromkeys(layer_names, max_offset)
    for reach in set(offsets.values()):
        LayerStats(max_offset=reach, positions=positions, seed=seed)
    return offsets


def _shared_reach(offsets: dict[str, int]) -> int | None:
    """The reach every layer's positions are planned for: the farthest, where the layers differ (else None)."""
    return max(offsets.values()) if len(set(offsets.values())) > 1 else None


def _checked_settings(threshold, fire_quantile, replay_bytes) -> float | None:
    """The firing quantile to calibrate (None with an explicit ``threshold``), once the settings are valid."""
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise StatsError(f"threshold={threshold!r} is invalid; record takes a number (or None to calibrate)")
    if isinstance(replay_bytes, bool) or not isinstance(replay_bytes, int) or replay_bytes < 0:
        raise StatsError(f"replay_bytes={replay_bytes!r} is invalid; pass a number of bytes >= 0 (0: two passes)")
    return check_fire_quantile(fire_quantile) if threshold is None else None


@contextmanager
def _evaluating(model: nn.Module):
    """Eval mode under ``torch.no_grad()``; every submodule's own train/eval flag is restored afterwards,
    also on error."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training


class _Tape:
    """Copies of the activations of one pass, in call order and grouped by batch, while they fit in ``capacity``
    bytes; past it, nothing (``full``), and what was kept is let go."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.used, self.full = capacity, 0, capacity <= 0
        self.batches: list[list[tuple[str, torch.Tensor]]] = []

    def keep(self, layer: str, x: torch.Tensor, batch_index: int) -> None:
        if self.full:
            return
        self.used += x.numel() * x.element_size()
        if self.used > self.capacity:
            self.full, self.batches = True, []
            return
        while len(self.batches) <= batch_index:
            self.batches.append([])
        self.batches[batch_index].append((layer, x.detach().clone()))  # a later in-place op must not change it


@dataclass
class _Taping:
    """A calibration sink that also hands each activation to a `_Tape`."""

    sink: Any
    layer: str
    tape: _Tape

    @property
    def name(self) -> str | None:
        return self.sink.name

    def update(self, x: torch.Tensor, *, batch_index: int) -> None:
        self.sink.update(x, batch_index=batch_index)
        self.tape.keep(self.layer, x, batch_index)


class _Run:
    """The passes of one :func:`record` call over the same data."""

    def __init__(self, model, data, targets, max_batches, device, progress, distributed, replay_bytes: int, *,
                 reach: int | None, forward_macs: int | None, cost_multiple: float = COST_MULTIPLE) -> None:
        self.model, self.data, self.targets, self.reach = model, data, targets, reach
        self.max_batches, self.device, self.progress, self.distributed = max_batches, device, progress, distributed
        self.images: int | None = None  # over all processes, once a pass has counted them
        self.forward_macs = forward_macs  # counted on the first batch where None
        self.cost_multiple = cost_multiple
        self.shapes: dict[str, tuple[int, ...]] | None = None  # each layer's activations, from the first batch
        self._generators = _generator_states(data)
        # under torch.distributed every rank runs the same forward passes (a model may synchronise in them)
        self._tape = _Tape(0 if distributed else replay_bytes)
        self._calibrated = _Pass()

    def calibrate(self, quantile: float, seed: int, probe: bool) -> dict[str, Any]:
        """The calibration pass: each layer's per-unit ``quantile``, the same on every rank (and, with
        ``probe``, the forward pass's multiply-adds); it keeps the activations for `record` where they fit."""
        samples = {layer: ActivationSample(seed=seed, stream=dist_info.rank(), name=layer) for layer in self.targets}
        sinks = {layer: _Taping(sample, layer, self._tape) for layer, sample in samples.items()}
        self._calibrated = self._pass(sinks, "calibrate", probe=probe)
        self.images = _check_outcome({s: x.count for s, x in samples.items()}, self._calibrated, self.distributed)
        if self.distributed:
            for sample in samples.values():
                sample.all_gather()
        return {layer: sample.quantile(quantile) for layer, sample in samples.items()}

    def record(self, stats: dict[str, LayerStats], auto: bool) -> None:
        """The recording pass (after a calibration pass: its kept activations, or the same batches again)."""
        def budget(x: torch.Tensor | None) -> None:
            images = self.images or _images_lower_bound(self.data, self.max_batches, x.shape[0])
            plan = PositionBudget(forward_macs=self.forward_macs, num_images=images, cost_multiple=self.cost_multiple,
                                  reach=self.reach)
            plan = dataclasses.replace(plan, scale=recording_scale(_layer_plans(stats, self.shapes, self.reach), plan))
            for layer in stats.values():
                layer.budget = plan

        if self.images is not None and not self._tape.full:
            if auto:
                budget(None)
            seen = self._replay(stats)
        else:
            if self.images is not None:
                _restore_generators(self._generators)
            seen = self._pass(stats, "record", probe=auto, on_first=budget if auto else None)
        _check_outcome({layer: layer.count for layer, layer in stats.items()}, seen, self.distributed)

    def _replay(self, stats: dict[str, LayerStats]) -> _Pass:
        """The kept activations into ``stats``, batch by batch, as the recording pass would send them."""
        batches, self._tape.batches = self._tape.batches, []
        for index in progress_bar(range(len(batches)), desc="record", unit="batch", disable=not self.progress):
            for layer, x in batches[index]:
                stats[layer].update(x, batch_index=index)
            batches[index] = []  # let each batch go once it is added
        return self._calibrated

    def _pass(self, sinks: dict[str, Any], desc: str, *, probe: bool, on_first=None) -> _Pass:
        """One pass of the data through the model, each layer's activations sent to ``sinks[layer]``."""
        seen, state = _Pass(), _HookState()
        handles = [_attach(module, where, sinks[layer], state, layer)
                   for layer, (module, where) in self.targets.items()]
        batches = self.data if self.max_batches is None else itertools.islice(self.data, self.max_batches)
        total = _length(self.data, self.max_batches)
        try:
            for index, batch in enumerate(progress_bar(batches, total=total, desc=desc, unit="batch",
                                                       disable=not self.progress)):
                x = _inputs(batch).to(self.device, non_blocking=True)
                if index == 0 and probe and self.shapes is None:
                    state.enabled, state.shapes = False, {}
                    if self.forward_macs is None:
                        self.forward_macs = forward_macs(self.model, x[:1])  # the shapes noted on the way
                    else:
                        self.model(x[:1])  # the shapes alone: the cost is given
                    self.shapes, state.enabled, state.shapes = state.shapes, True, None
                if index == 0 and on_first is not None:
                    on_first(x)
                state.batch_index = index
                self.model(x)
                seen.images += x.shape[0]
        except Exception as error:
            if not self.distributed:
                raise
            seen.failure = error  # raised after the other ranks have heard of it: they would wait for it forever
        finally:
            for handle in handles:
                handle.remove()
        return seen


def _images_lower_bound(data: Any, max_batches: int | None, first_batch: int) -> int:
    """Images a pass will see, at least, from the number of batches and the first one's size (times the
    number of processes, each with its own shard); the first batch alone where the data has no length."""
    batches = _length(data, max_batches)
    per_process = first_batch if batches is None else (batches - 1) * first_batch + 1
    return max(1, per_process * dist_info.world_size())


def _generator_states(data: Any) -> list[tuple[torch.Generator | None, torch.Tensor]]:
    """The global CPU RNG and the data's own generators (a DataLoader's, its sampler's), with their states."""
    found = [getattr(data, "generator", None), getattr(getattr(data, "sampler", None), "generator", None)]
    unique = {id(g): g for g in found if isinstance(g, torch.Generator)}
    return [(None, torch.get_rng_state())] + [(g, g.get_state()) for g in unique.values()]


def _restore_generators(states: list[tuple[torch.Generator | None, torch.Tensor]]) -> None:
    for generator, state in states:
        if generator is None:
            torch.set_rng_state(state)
        else:
            generator.set_state(state)


def _check_outcome(counts: dict[str, int], seen: _Pass, distributed: bool) -> int:
    """Raise ``seen.failure``, or a StatsError for the first layer that saw nothing; else the number of
    images over all processes. With ``distributed``, every rank first learns every rank's outcome (one
    collective), so that all of them raise when one fails, the failed rank its own error and the others a
    StatsError naming it."""
    failure = seen.failure
    message = None if failure is None else f"{type(failure).__name__}: {failure}"
    per_rank = dist_info.every_rank((list(counts.values()), seen.images, message)) if distributed else [
        (list(counts.values()), seen.images, message)]
    if failure is not None:
        raise failure
    failed = [(rank, text) for rank, (_, _, text) in enumerate(per_rank) if text is not None]
    if failed:
        rank, text = failed[0]
        raise StatsError(f"rank {rank} of {len(per_rank)} failed while recording, so this one stops too: {text}")
    for index, layer in enumerate(counts):
        empty = [rank for rank, (seen_counts, _, _) in enumerate(per_rank) if seen_counts[index] == 0]
        if not empty:
            continue
        if not distributed:
            raise StatsError(
                f"layer {layer!r} saw no activations: the data was empty or the module was never called in forward"
            )
        ranks = f"rank{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))}"
        raise StatsError(
            f"layer {layer!r} saw no activations on {ranks} of {len(per_rank)} processes: their shard of the data "
            "was empty or the module was never called in forward; give every process a non-empty shard "
            "(more data or fewer processes)"
        )
    return sum(images for _, images, _ in per_rank)


def _attach(module: nn.Module, where: str, sink: Any, state: _HookState, layer: str):
    """A hook sending the module's input or output to ``sink.update`` while ``state.enabled`` (and noting its
    shape under ``layer`` while ``state.shapes`` is a dict)."""

    def send(value: Any) -> None:
        if state.shapes is not None:
            state.shapes[layer] = tuple(_first_tensor(value, sink.name).shape)
        if state.enabled:
            sink.update(_first_tensor(value, sink.name), batch_index=state.batch_index)

    if where == "input":
        return module.register_forward_pre_hook(lambda _module, args: send(args))
    return module.register_forward_hook(lambda _module, _args, output: send(output))


def _layer_plans(stats: dict[str, LayerStats], shapes: dict[str, tuple[int, ...]] | None, reach: int | None):
    """(channels, map, offsets planned, offsets stored) of each spatial layer, for `recording_scale`, from the
    shapes the probe saw."""
    plans = []
    for layer, layer_stats in stats.items():
        shape = (shapes or {}).get(layer)
        if shape is None or len(shape) != 4:
            continue
        spatial = (shape[2], shape[3])
        plans.append((shape[1], spatial, planned_offsets(layer_stats.max_offset, reach, spatial),
                      half_offsets(layer_stats.max_offset, spatial)))
    return plans


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
    batch = batch_input(batch)
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
