"""``build(spec)``: a ``torch.nn.Module`` from a :class:`NetworkSpec`.

Every stem layer and stage becomes a top-level submodule named after its spec
(``conv1``, ``maxpool1``, ``inception3a``, ...), followed by the auxiliary heads
(``aux1``, ...) and the head (``avgpool``, ``dropout``, ``fc``): for GoogLeNet
the names and state-dict keys are torchvision's.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from builders.inception import ConvBlock, Inception, MaxPool2d, init_weights
from builders.spec import AuxHeadSpec, ConvSpec, InceptionSpec, LayerSpec, LRNSpec, NetworkSpec, PoolSpec

# torchvision's transform_input: ImageNet-normalised input -> the (x - 0.5) / 0.5 scaling of the original weights
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class NetworkOutput(NamedTuple):
    """What a network with auxiliary heads returns in training mode (``aux_logits`` in attach order)."""

    logits: torch.Tensor
    aux_logits: tuple[torch.Tensor, ...]


#: The classifier's name in every built network: its parameters are ``fc.weight`` and ``fc.bias``.
HEAD = "fc"


def is_head(key: str) -> bool:
    """Whether a state-dict key belongs to the classifier (which a grown or retargeted network replaces)."""
    return key.split(".", 1)[0] == HEAD


class AuxHead(nn.Module):
    """Auxiliary classifier: pool -> 1x1 conv -> fc + ReLU -> dropout -> fc (torchvision's ``InceptionAux``)."""

    def __init__(self, spec: AuxHeadSpec, in_channels: int, pooled_size: int, num_classes: int, **conv_options) -> None:
        super().__init__()
        if spec.pool == "adaptive":
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(spec.pool_size)
        else:
            self.pool = nn.AvgPool2d(spec.pool_size, spec.pool_stride)
        self.conv = ConvBlock(in_channels, spec.conv_channels, 1, **conv_options)
        self.fc1 = nn.Linear(spec.conv_channels * pooled_size * pooled_size, spec.fc_channels)
        self.fc2 = nn.Linear(spec.fc_channels, num_classes)
        self.dropout = nn.Dropout(spec.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(self.pool(x)), 1)
        return self.fc2(self.dropout(F.relu(self.fc1(x), inplace=True)))


class Network(nn.Module):
    """A network built from a spec; ``model.spec`` keeps the spec.

    Eval mode returns the logits. Training mode returns :class:`NetworkOutput`
    when auxiliary heads are attached, else the logits.
    """

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__()
        self.spec = spec
        conv_options = dict(batchnorm=spec.norm == "batchnorm", bias=spec.conv_bias, bn_eps=spec.bn_eps)
        channels = spec.in_channels
        for layer in spec.layers:
            self.add_module(layer.name, _layer_module(layer, channels, spec, conv_options))
            channels = layer.out_channels_for(channels)
        self._layer_names = tuple(layer.name for layer in spec.layers)

        shapes = spec.feature_shapes()
        aux_after: dict[str, tuple[str, ...]] = {}
        for aux in spec.attached_aux_heads():
            c, h, _ = shapes[aux.after]
            self.add_module(aux.name, AuxHead(aux, c, aux.pooled_size(h), spec.head.num_classes, **conv_options))
            aux_after[aux.after] = aux_after.get(aux.after, ()) + (aux.name,)
        self._aux_after = aux_after
        self._has_aux = bool(aux_after)

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(spec.head.dropout)
        self.fc = nn.Linear(channels, spec.head.num_classes)

        if spec.transform_input:
            # computed in float64 then rounded once, as torchvision's Python-float constants are
            mean, std = torch.tensor(_IMAGENET_MEAN, dtype=torch.float64), torch.tensor(_IMAGENET_STD, dtype=torch.float64)
            self.register_buffer("input_scale", (std / 0.5).float().view(1, 3, 1, 1), persistent=False)
            self.register_buffer("input_shift", ((mean - 0.5) / 0.5).float().view(1, 3, 1, 1), persistent=False)
        init_weights(self, batchnorm=spec.norm == "batchnorm")

    def forward(self, x: torch.Tensor) -> torch.Tensor | NetworkOutput:
        if self.spec.transform_input:
            x = x * self.input_scale + self.input_shift
        aux_logits = []
        for name in self._layer_names:
            x = getattr(self, name)(x)
            if self.training:
                for aux_name in self._aux_after.get(name, ()):
                    aux_logits.append(getattr(self, aux_name)(x))
        x = torch.flatten(self.avgpool(x), 1)
        logits = self.fc(self.dropout(x))
        if self.training and self._has_aux:
            return NetworkOutput(logits, tuple(aux_logits))
        return logits


def _layer_module(layer: LayerSpec, in_channels: int, spec: NetworkSpec, conv_options: dict) -> nn.Module:
    if isinstance(layer, ConvSpec):
        return ConvBlock(
            in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.resolved_padding, **conv_options
        )
    if isinstance(layer, PoolSpec):
        pool = MaxPool2d if layer.mode == "max" else nn.AvgPool2d
        return pool(layer.kernel_size, layer.stride, layer.padding, ceil_mode=layer.ceil_mode)
    if isinstance(layer, LRNSpec):
        return nn.LocalResponseNorm(layer.size, layer.alpha, layer.beta, layer.k)
    if isinstance(layer, InceptionSpec):
        return Inception(layer, kernel5x5=spec.kernel5x5, fused=spec.fused, **conv_options)
    raise TypeError(f"no module for layer spec {layer!r}")


def build(spec: NetworkSpec) -> Network:
    """The network described by ``spec``, initialised (seed with ``torch.manual_seed`` first)."""
    if not isinstance(spec, NetworkSpec):
        raise TypeError(f"build() needs a NetworkSpec, got {type(spec).__name__}")
    return Network(spec)
