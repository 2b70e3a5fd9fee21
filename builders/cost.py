"""Parameter and multiply-add accounting of networks and Inception modules.

Multiply-adds are measured, not derived: the model runs once under
``torch.utils.flop_counter.FlopCounterMode`` and MACs = FLOPs / 2 (the counter
counts a multiply-add as two operations; fvcore's "flops" and ours are both
multiply-adds). Like the paper's "ops" column, this counts convolutions and
matrix products only (pooling, normalisation and ReLU are free).

This is what the builders and the construction loop budget with; the
reproduction of the paper's Table 1 lives in `analysis.paper_table`.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from builders.inception import Inception
from builders.network import build
from builders.spec import InceptionSpec, NetworkSpec


def _example_input(model: nn.Module, input_size: Sequence[int] | int) -> torch.Tensor:
    """A batch-of-one input for ``input_size`` = ``(C, H, W)`` or ``(N, C, H, W)``, on the model's device."""
    size = tuple(input_size) if not isinstance(input_size, int) else None
    if size is None or len(size) not in (3, 4):
        raise ValueError(f"input_size = {input_size!r}: give (C, H, W) or (N, C, H, W)")
    if len(size) == 3:
        size = (1, *size)
    tensor = next(iter(model.parameters()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    dtype = tensor.dtype if tensor is not None else torch.float32
    return torch.zeros(size, device=device, dtype=dtype)


def _measure(model: nn.Module, input_size, hooks: bool = False):
    """Run ``model`` once in eval mode under a flop counter; return (counter, output shapes by child)."""
    x = _example_input(model, input_size)
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    if hooks:
        for name, child in model.named_children():
            def record(_m, _inp, out, name=name):
                if isinstance(out, torch.Tensor):
                    shapes[name] = tuple(out.shape[1:])
            handles.append(child.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return counter, shapes


def count_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """Multiply-adds of one eval-mode forward pass at ``input_size`` (``(C, H, W)``: batch 1)."""
    counter, _ = _measure(model, input_size)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cost_table(model: nn.Module, input_size: Sequence[int]) -> pd.DataFrame:
    """One row per top-level submodule: type, output shape ``(C, H, W)``, params, MACs; then a total row.

    Runs in eval mode at batch 1, so auxiliary heads are not run: their rows have
    no output shape and MACs of ``<NA>``; the total row counts all parameters.
    """
    counter, shapes = _measure(model, input_size, hooks=True)
    flops = counter.get_flop_counts()
    root = type(model).__name__
    rows = []
    for name, child in model.named_children():
        per_op = flops.get(f"{root}.{name}", {})
        ran = name in shapes
        rows.append(
            {
                "layer": name,
                "type": type(child).__name__,
                "output": shapes.get(name),
                "params": count_params(child),
                "macs": sum(per_op.values()) // 2 if ran else pd.NA,
            }
        )
    rows.append(
        {
            "layer": "total",
            "type": "",
            "output": None,
            "params": count_params(model),
            "macs": counter.get_total_flops() // 2,
        }
    )
    table = pd.DataFrame(rows).set_index("layer")
    table["params"] = table["params"].astype("int64")
    table["macs"] = table["macs"].astype("Int64")
    return table


def _meta_inception(spec: InceptionSpec, kernel5x5: int, batchnorm: bool, bias: bool) -> Inception:
    with torch.device("meta"):
        return Inception(spec, kernel5x5=kernel5x5, batchnorm=batchnorm, bias=bias)


def inception_macs(spec: InceptionSpec, height: int, width: int, *, kernel5x5: int = 5) -> int:
    """Multiply-adds of one Inception module on a ``height`` x ``width`` map (built on the meta device)."""
    module = _meta_inception(spec, kernel5x5, batchnorm=False, bias=False)
    x = torch.empty(1, spec.in_channels, height, width, device="meta")
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() // 2


def inception_params(spec: InceptionSpec, *, kernel5x5: int = 5, bias: bool = False, batchnorm: bool = False) -> int:
    """Parameters of one Inception module (convolution weights only, by default)."""
    return count_params(_meta_inception(spec, kernel5x5, batchnorm=batchnorm, bias=bias))


def reduction_factor(a: int, b: int, c: int, k: int = 5) -> float:
    """The saving of reducing ``a`` channels to ``c`` with a 1x1 before a k x k convolution to ``b`` channels.

    ``k² a b / (a c + k² c b)``; e.g. ``reduction_factor(480, 128, 32)`` is about 13.
    """
    for name, value in (("a", a), ("b", b), ("c", c), ("k", k)):
        if value <= 0:
            raise ValueError(f"reduction_factor: {name} = {value} must be positive")
    return k * k * a * b / (a * c + k * k * c * b)


def module_macs(spec: NetworkSpec, input_hw: tuple[int, int]) -> list[int]:
    """Multiply-adds of each Inception module of ``spec``, at its own map size."""
    shapes = spec.input_shapes(input_hw)
    return [inception_macs(m, *shapes[m.name][1:], kernel5x5=spec.kernel5x5) for m in spec.inception_modules()]


def network_costs(spec: NetworkSpec, input_hw: tuple[int, int]) -> tuple[int, int]:
    """(parameters, multiply-adds per image) of the network ``spec`` describes, at inference (auxiliary heads
    excluded)."""
    model = build(spec).eval()
    aux = tuple(f"{a.name}." for a in spec.aux_heads)
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(aux))
    return params, count_macs(model, (1, spec.in_channels, *input_hw))


def network_macs(spec: NetworkSpec, input_hw: tuple[int, int]) -> int:
    """Multiply-adds per image of the network ``spec`` describes (eval mode, batch 1)."""
    return network_costs(spec, input_hw)[1]


def modules_macs(spec: NetworkSpec, input_hw: tuple[int, int]) -> int:
    """Multiply-adds of the Inception modules alone."""
    return sum(module_macs(spec, input_hw))
