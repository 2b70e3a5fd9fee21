"""The network grown so far (the prefix): built with its weights, BatchNorm calibrated on the recording
batches, and its outputs on those batches carried from step to step (`CarriedOutputs`), so that each step
runs and calibrates only the layers it adds.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

import builders
from builders.network import is_head
from builders.spec import NetworkSpec
from topo.common.batches import batch_input
from topo.common.devices import ACTIVATION_BYTES

log = logging.getLogger(__name__)


def build_prefix(spec: NetworkSpec, state: dict[str, torch.Tensor] | None, seed: int,
                 device: torch.device) -> nn.Module:
    """The network so far, seeded, with the weights of ``state`` where the layers match."""
    torch.manual_seed(seed)
    model = builders.build(spec)
    if state is not None:
        load_prefix(model, state)
    return model.to(device)


def calibrate_batchnorm(model: nn.Module, batches: Any, max_batches: int, device: torch.device) -> None:
    """Set every BatchNorm's running statistics to the average over ``max_batches`` batches.

    A freshly initialised network in eval mode normalises with the initial
    running statistics (mean 0, variance 1), which leaves the activations of deep
    layers vanishingly small; statistics recorded then would call every unit
    dead. Calibrating first records the network as training would see it.
    """
    with calibrating([model]) as norms:
        if not norms:
            return
        was_training = model.training
        model.train()
        with torch.no_grad():
            forward_batches(model, batches, max_batches, device)
        model.train(was_training)


def forward_batches(model: nn.Module, batches: Any, max_batches: int, device: torch.device) -> None:
    """Pass the inputs of the first ``max_batches`` of ``batches`` through ``model`` (outputs discarded)."""
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        model(batch_input(batch).to(device))


def shared_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights of ``state`` that fit ``model`` (same name and shape), and the names of those that do not;
    the head is left out of both (a grown network's head is new)."""
    own = model.state_dict()
    body = {key: value for key, value in state.items() if not is_head(key)}
    shared = {key: value for key, value in body.items() if key in own and own[key].shape == value.shape}
    return shared, [key for key in body if key not in shared]


def load_prefix(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy the weights of the layers ``model`` shares with ``state`` (the head is new)."""
    own = model.state_dict()
    own.update(shared_weights(model, state)[0])
    model.load_state_dict(own)


def _inputs(batches: Iterable[Any], max_batches: int, device: torch.device) -> list[torch.Tensor]:
    """The input tensors of the first ``max_batches`` batches, on ``device``."""
    out = []
    for batch in batches:
        if len(out) >= max_batches:
            break
        out.append(batch_input(batch).to(device))
    return out


class CarriedOutputs:
    """The outputs after the first ``depth`` layers of the growing network on fixed batches (see the module's
    docstring); ``example`` is one raw input image, for counting the whole prefix's forward cost."""

    def __init__(self, data: Iterable[Any], null: Iterable[Any] | None, max_batches: int, device: torch.device,
                 max_bytes: int = ACTIVATION_BYTES) -> None:
        raw = _inputs(data, max_batches, device)
        self.example = raw[0][:1]
        self.train, self.eval = raw, raw
        self.null = None if null is None else _inputs(null, max_batches, device)
        self.depth, self.max_bytes = 0, max_bytes

    def advance(self, model: nn.Module, layer_names: list[str]) -> bool:
        """Run the layers of ``model`` named ``layer_names[depth:]`` on the carried outputs, calibrating their
        BatchNorms first as `calibrate_batchnorm` calibrates a whole network; False (nothing kept) where the new
        outputs would exceed ``max_bytes``."""
        new = [getattr(model, name) for name in layer_names[self.depth:]]
        with torch.no_grad():
            self.train = _in_mode(new, True, lambda: _calibrate(new, self.train))
            self.eval = _in_mode(new, False, lambda: [_run(new, x) for x in self.eval])
            self.null = None if self.null is None else _in_mode(new, False, lambda: [_run(new, x) for x in self.null])
        self.depth = len(layer_names)
        kept = sum(x.numel() * x.element_size() for x in self.train + self.eval + (self.null or []))
        if kept > self.max_bytes:
            log.info("the prefix's outputs (%.1f GiB) are no longer carried from module to module", kept / 2**30)
            return False
        return True


def _run(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _in_mode(layers: list[nn.Module], training: bool, compute: Callable[[], Any]) -> Any:
    """``compute()`` with every module of ``layers`` in train (or eval) mode; their modes are put back."""
    modules = [m for layer in layers for m in layer.modules()]
    modes = [m.training for m in modules]
    for m in modules:
        m.training = training
    try:
        return compute()
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode


@contextmanager
def calibrating(modules: Iterable[nn.Module]) -> Iterator[list[nn.Module]]:
    """Every BatchNorm in ``modules`` with its running statistics reset and averaged cumulatively (momentum None)
    over the batches run inside the block, which gets the list of them; their momenta are put back."""
    norms = [m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    try:
        yield norms
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


def _calibrate(layers: list[nn.Module], batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The (train-mode) outputs of ``layers`` on ``batches``, their BatchNorms calibrated on them (`calibrating`)."""
    with calibrating(layers):
        return [_run(layers, x) for x in batches]
