"""Network specs: plain data that round-trips through JSON and is validated on creation.

A :class:`NetworkSpec` is a stem (fixed layers), a sequence of stages (Inception
modules and pooling layers, what the construction loop grows), a classifier
head, optional auxiliary heads and a few variant switches. Every spec is a
frozen dataclass; ``to_dict``/``from_dict`` and ``to_json``/``from_json`` are
exact inverses. An invalid spec raises :class:`topo.common.errors.SpecError` (also a
``ValueError``) whose one-line message names the offending field and value.

Layer dictionaries carry a ``"type"`` tag: ``"conv"``, ``"pool"``, ``"lrn"`` or
``"inception"``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import keyword
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

from topo.common.errors import SpecError
from topo.common.reading import SHAPE_ERRORS, error_reason, read_text

NORMS = ("none", "lrn", "batchnorm")
POOL_MODES = ("max", "avg")
AUX_POOLS = ("adaptive", "avg")
# Attribute names the built network uses itself; layers may not take them.
RESERVED_NAMES = frozenset({"avgpool", "dropout", "fc", "spec", "input_scale", "input_shift"})


# --------------------------------------------------------------------------- checks
def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecError(f"{owner}.{name} = {value!r} is not an integer: give a whole number >= {minimum}")
    if value < minimum:
        raise SpecError(f"{owner}.{name} = {value} is below {minimum}: give a whole number >= {minimum}")


def _check_float(owner: str, name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise SpecError(f"{owner}.{name} = {value!r} is not a number in [{low}, {high}]")


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise SpecError(f"{owner}.{name} = {value!r} is not a boolean: use true or false")


def _check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(f"{owner}.{name} = {value!r} is unknown: use one of {', '.join(map(repr, choices))}")


def _check_name(owner: str, value: Any, *, required: bool) -> None:
    if not isinstance(value, str):
        raise SpecError(f"{owner}.name = {value!r} is not a string")
    if value == "" and not required:
        return
    if not value.isidentifier() or keyword.iskeyword(value):
        raise SpecError(
            f"{owner}.name = {value!r} is not a valid layer name: use letters, digits and '_' (e.g. 'inception3a')"
        )


def _fields_from_dict(cls: type, data: Any, owner: str) -> dict[str, Any]:
    """The constructor arguments of dataclass ``cls`` from ``data``; unknown or missing keys raise."""
    if not isinstance(data, dict):
        raise SpecError(f"{owner} = {data!r} is not a JSON object")
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known) - {"type"})
    if unknown:
        raise SpecError(f"{owner} has unknown key {unknown[0]!r}: valid keys are {', '.join(known)}")
    for name, f in known.items():
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if name not in data and not has_default:
            raise SpecError(f"{owner} is missing key {name!r}")
    return {k: v for k, v in data.items() if k != "type"}


class _JsonMixin:
    """``to_json``/``from_json`` on top of ``to_dict``/``from_dict``."""

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)  # type: ignore[attr-defined]

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"{cls.__name__} JSON is malformed: {e}") from None
        return cls.from_dict(data)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class ConvSpec(_JsonMixin):
    """A convolution followed by the network's normalisation and a ReLU.

    ``padding=None`` means "same" padding (``kernel_size // 2``).
    """

    name: str
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int | None = None
    type: ClassVar[str] = "conv"

    def __post_init__(self) -> None:
        owner = f"ConvSpec {self.name!r}"
        _check_name("ConvSpec", self.name, required=False)
        _check_int(owner, "out_channels", self.out_channels, 1)
        _check_int(owner, "kernel_size", self.kernel_size, 1)
        _check_int(owner, "stride", self.stride, 1)
        if self.padding is not None:
            _check_int(owner, "padding", self.padding, 0)

    @property
    def resolved_padding(self) -> int:
        return self.kernel_size // 2 if self.padding is None else self.padding

    def out_channels_for(self, in_channels: int) -> int:
        return self.out_channels

    def out_size(self, size: int) -> int:
        return (size + 2 * self.resolved_padding - self.kernel_size) // self.stride + 1

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConvSpec:
        return cls(**_fields_from_dict(cls, data, "ConvSpec"))


@dataclass(frozen=True)
class PoolSpec(_JsonMixin):
    """Max or average pooling (``ceil_mode`` as in Caffe and torchvision's GoogLeNet)."""

    name: str
    kernel_size: int
    stride: int
    padding: int = 0
    ceil_mode: bool = True
    mode: str = "max"
    type: ClassVar[str] = "pool"

    def __post_init__(self) -> None:
        owner = f"PoolSpec {self.name!r}"
        _check_name("PoolSpec", self.name, required=False)
        _check_int(owner, "kernel_size", self.kernel_size, 1)
        _check_int(owner, "stride", self.stride, 1)
        _check_int(owner, "padding", self.padding, 0)
        if 2 * self.padding > self.kernel_size:
            raise SpecError(f"{owner}.padding = {self.padding} exceeds half the kernel size {self.kernel_size}")
        _check_bool(owner, "ceil_mode", self.ceil_mode)
        _check_choice(owner, "mode", self.mode, POOL_MODES)

    def out_channels_for(self, in_channels: int) -> int:
        return in_channels

    def out_size(self, size: int) -> int:
        """Output length along one axis, by PyTorch's pooling rule."""
        span = size + 2 * self.padding - self.kernel_size
        if span < 0:
            return 0
        if not self.ceil_mode:
            return span // self.stride + 1
        out = math.ceil(span / self.stride) + 1
        if (out - 1) * self.stride >= size + self.padding:  # last window must start inside the input
            out -= 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PoolSpec:
        return cls(**_fields_from_dict(cls, data, "PoolSpec"))


@dataclass(frozen=True)
class LRNSpec(_JsonMixin):
    """Local response normalisation across channels (Caffe's defaults, as in the paper)."""

    name: str
    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 1.0
    type: ClassVar[str] = "lrn"

    def __post_init__(self) -> None:
        owner = f"LRNSpec {self.name!r}"
        _check_name("LRNSpec", self.name, required=False)
        _check_int(owner, "size", self.size, 1)
        _check_float(owner, "alpha", self.alpha, 0.0, math.inf)
        _check_float(owner, "beta", self.beta, 0.0, math.inf)
        _check_float(owner, "k", self.k, 0.0, math.inf)

    def out_channels_for(self, in_channels: int) -> int:
        return in_channels

    def out_size(self, size: int) -> int:
        return size

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LRNSpec:
        return cls(**_fields_from_dict(cls, data, "LRNSpec"))


@dataclass(frozen=True)
class InceptionSpec(_JsonMixin):
    """An Inception module's widths, with torchvision's field names.

    Branches: ``ch1x1`` (1x1); ``ch3x3red`` -> ``ch3x3`` (1x1 reduction, then 3x3);
    ``ch5x5red`` -> ``ch5x5`` (1x1 reduction, then the '5x5' kernel); 3x3 max pool
    -> ``pool_proj`` (1x1 projection). A width of 0 removes its branch; a branch
    and its reduction are both 0 or both positive; at least one branch is present.
    """

    in_channels: int
    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int
    name: str = ""
    type: ClassVar[str] = "inception"
    WIDTHS: ClassVar[tuple[str, ...]] = ("ch1x1", "ch3x3red", "ch3x3", "ch5x5red", "ch5x5", "pool_proj")

    def __post_init__(self) -> None:
        owner = f"InceptionSpec {self.name!r}" if self.name else "InceptionSpec"
        _check_name("InceptionSpec", self.name, required=False)
        _check_int(owner, "in_channels", self.in_channels, 1)
        for width in self.WIDTHS:
            _check_int(owner, width, getattr(self, width), 0)
        for red, out in (("ch3x3red", "ch3x3"), ("ch5x5red", "ch5x5")):
            r, o = getattr(self, red), getattr(self, out)
            if (r == 0) != (o == 0):
                raise SpecError(
                    f"{owner}.{red} = {r} with {out} = {o}: a branch and its reduction must both be 0 or both positive"
                )
        if self.out_channels == 0:
            raise SpecError(f"{owner} has all branch widths 0: give at least one branch a positive width")

    @property
    def out_channels(self) -> int:
        return self.ch1x1 + self.ch3x3 + self.ch5x5 + self.pool_proj

    @property
    def widths(self) -> tuple[int, ...]:
        """``(ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj)``."""
        return tuple(getattr(self, w) for w in self.WIDTHS)

    def out_channels_for(self, in_channels: int) -> int:
        return self.out_channels

    def out_size(self, size: int) -> int:
        return size

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InceptionSpec:
        return cls(**_fields_from_dict(cls, data, "InceptionSpec"))


LayerSpec = Union[ConvSpec, PoolSpec, LRNSpec, InceptionSpec]
LAYER_TYPES: dict[str, type] = {c.type: c for c in (ConvSpec, PoolSpec, LRNSpec, InceptionSpec)}


def layer_from_dict(data: Any, owner: str = "layer") -> LayerSpec:
    """A layer spec from its dictionary, dispatching on ``data["type"]``."""
    if not isinstance(data, dict):
        raise SpecError(f"{owner} = {data!r} is not a JSON object")
    if "type" not in data:
        raise SpecError(f"{owner} is missing key 'type': use one of {', '.join(map(repr, LAYER_TYPES))}")
    kind = data["type"]
    if kind not in LAYER_TYPES:
        raise SpecError(f"{owner}.type = {kind!r} is an unknown layer type: use one of {', '.join(map(repr, LAYER_TYPES))}")
    return LAYER_TYPES[kind].from_dict(data)


# --------------------------------------------------------------------------- heads
@dataclass(frozen=True)
class HeadSpec(_JsonMixin):
    """The classifier: global average pool, dropout, linear layer."""

    num_classes: int = 1000
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_int("HeadSpec", "num_classes", self.num_classes, 1)
        _check_float("HeadSpec", "dropout", self.dropout, 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadSpec:
        return cls(**_fields_from_dict(cls, data, "HeadSpec"))


@dataclass(frozen=True)
class AuxHeadSpec(_JsonMixin):
    """An auxiliary classifier on the output of layer ``after`` (training mode only).

    pool -> 1x1 conv (``conv_channels``) -> fc (``fc_channels``) + ReLU -> dropout -> fc.
    ``pool="adaptive"``: adaptive average pool to ``pool_size`` x ``pool_size``
    (torchvision); ``pool="avg"``: average pool ``pool_size`` / ``pool_stride`` (the
    paper's 5x5/3), whose output size follows from the network's ``input_size``.
    """

    name: str
    after: str
    pool: str = "adaptive"
    pool_size: int = 4
    pool_stride: int = 3
    conv_channels: int = 128
    fc_channels: int = 1024
    dropout: float = 0.7

    def __post_init__(self) -> None:
        owner = f"AuxHeadSpec {self.name!r}"
        _check_name("AuxHeadSpec", self.name, required=True)
        if not isinstance(self.after, str) or not self.after:
            raise SpecError(f"{owner}.after = {self.after!r} is not a layer name: name the layer to attach to")
        _check_choice(owner, "pool", self.pool, AUX_POOLS)
        _check_int(owner, "pool_size", self.pool_size, 1)
        _check_int(owner, "pool_stride", self.pool_stride, 1)
        _check_int(owner, "conv_channels", self.conv_channels, 1)
        _check_int(owner, "fc_channels", self.fc_channels, 1)
        _check_float(owner, "dropout", self.dropout, 0.0, 1.0)

    def pooled_size(self, size: int) -> int:
        if self.pool == "adaptive":
            return self.pool_size
        return PoolSpec("pool", self.pool_size, self.pool_stride, ceil_mode=False, mode="avg").out_size(size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuxHeadSpec:
        return cls(**_fields_from_dict(cls, data, "AuxHeadSpec"))


# --------------------------------------------------------------------------- network
@functools.lru_cache(maxsize=1)
def _module_attributes() -> frozenset[str]:
    """Names a layer may not take: they would shadow a ``torch.nn.Module`` attribute."""
    import torch.nn as nn

    return frozenset(dir(nn.Module)) | frozenset(vars(nn.Module()))


@dataclass(frozen=True)
class NetworkSpec(_JsonMixin):
    """A whole network: stem, stages, head, auxiliary heads and variant switches.

    Switches: ``norm`` ("none", "lrn": LRN layers allowed, "batchnorm": BatchNorm
    after every convolution); ``kernel5x5``, the kernel of the Inception '5x5'
    branch (3 in torchvision's GoogLeNet); ``conv_bias``; ``bn_eps``;
    ``transform_input`` (torchvision's re-normalisation of ImageNet inputs, 3
    channels only); ``fused`` (run an Inception module's three input 1x1
    convolutions as one; an implementation choice with identical results).
    ``input_size`` is the nominal square input size: layer shapes are checked at
    it, and the paper's average-pooled auxiliary heads are sized for it.

    Any prefix of ``stages`` is a valid network. An auxiliary head whose ``after``
    layer is not (yet) among the layers is not attached (see :meth:`attached_aux_heads`).
    """

    stem: tuple[LayerSpec, ...]
    stages: tuple[LayerSpec, ...] = ()
    head: HeadSpec = field(default_factory=HeadSpec)
    aux_heads: tuple[AuxHeadSpec, ...] = ()
    in_channels: int = 3
    norm: str = "batchnorm"
    kernel5x5: int = 5
    conv_bias: bool = False
    bn_eps: float = 1e-3
    transform_input: bool = False
    input_size: int = 224
    fused: bool = True
    name: str = ""

    def __post_init__(self) -> None:
        for name in ("stem", "stages", "aux_heads"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise SpecError(f"NetworkSpec.{name} = {value!r} is not a list")
            object.__setattr__(self, name, tuple(value))
        for where in ("stem", "stages"):
            for i, layer in enumerate(getattr(self, where)):
                if not isinstance(layer, tuple(LAYER_TYPES.values())):
                    raise SpecError(f"NetworkSpec.{where}[{i}] = {layer!r} is not a layer spec")
                if not layer.name:
                    raise SpecError(f"NetworkSpec.{where}[{i}] has no name: give every layer a unique name")
        if not isinstance(self.head, HeadSpec):
            raise SpecError(f"NetworkSpec.head = {self.head!r} is not a HeadSpec")
        for i, aux in enumerate(self.aux_heads):
            if not isinstance(aux, AuxHeadSpec):
                raise SpecError(f"NetworkSpec.aux_heads[{i}] = {aux!r} is not an AuxHeadSpec")
        _check_int("NetworkSpec", "in_channels", self.in_channels, 1)
        _check_choice("NetworkSpec", "norm", self.norm, NORMS)
        _check_int("NetworkSpec", "kernel5x5", self.kernel5x5, 1)
        if self.kernel5x5 % 2 == 0:
            raise SpecError(f"NetworkSpec.kernel5x5 = {self.kernel5x5} is even: use an odd kernel size (3 or 5)")
        _check_bool("NetworkSpec", "conv_bias", self.conv_bias)
        _check_float("NetworkSpec", "bn_eps", self.bn_eps, 0.0, math.inf)
        _check_bool("NetworkSpec", "transform_input", self.transform_input)
        if self.transform_input and self.in_channels != 3:
            raise SpecError(
                f"NetworkSpec.transform_input = True needs in_channels = 3, not {self.in_channels}: set it to false"
            )
        _check_int("NetworkSpec", "input_size", self.input_size, 1)
        _check_bool("NetworkSpec", "fused", self.fused)
        _check_name("NetworkSpec", self.name, required=False)
        self._check_names()
        self._check_layers()

    # -- validation ---------------------------------------------------------
    def _check_names(self) -> None:
        seen: set[str] = set()
        for name in [layer.name for layer in self.layers] + [aux.name for aux in self.aux_heads]:
            if name in RESERVED_NAMES:
                raise SpecError(f"layer name {name!r} is reserved for the head: rename the layer")
            if name in seen:
                raise SpecError(f"layer name {name!r} is used twice: give every layer a unique name")
            seen.add(name)
        module_attrs = _module_attributes()
        for name in seen:
            if name in module_attrs or name.startswith("_"):
                raise SpecError(
                    f"layer name {name!r} clashes with a torch.nn.Module attribute or starts with '_': rename the layer"
                )

    def _check_layers(self) -> None:
        channels, size = self.in_channels, self.input_size
        for where in ("stem", "stages"):
            for i, layer in enumerate(getattr(self, where)):
                owner = f"NetworkSpec.{where}[{i}] ({layer.name!r})"
                if isinstance(layer, InceptionSpec) and layer.in_channels != channels:
                    raise SpecError(
                        f"{owner}.in_channels = {layer.in_channels} but the previous layer gives {channels} channels"
                    )
                if isinstance(layer, LRNSpec) and self.norm != "lrn":
                    raise SpecError(f"{owner} is an LRN layer but norm = {self.norm!r}: set norm to 'lrn' or drop it")
                channels = layer.out_channels_for(channels)
                size = layer.out_size(size)
                if size < 1:
                    raise SpecError(f"{owner} has an empty output at input_size {self.input_size}: use fewer poolings")
        sizes = {n: hw[0] for n, (_, hw, _) in self._shapes(self.input_size).items()}
        for aux in self.aux_heads:
            if aux.after in sizes and aux.pooled_size(sizes[aux.after]) < 1:
                raise SpecError(
                    f"AuxHeadSpec {aux.name!r}.pool_size = {aux.pool_size} exceeds the {sizes[aux.after]}-pixel map "
                    f"after {aux.after!r} at input_size {self.input_size}"
                )

    # -- queries ------------------------------------------------------------
    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        """Stem and stages, in order."""
        return self.stem + self.stages

    @property
    def out_channels(self) -> int:
        """Channels entering the head."""
        channels = self.in_channels
        for layer in self.layers:
            channels = layer.out_channels_for(channels)
        return channels

    def inception_modules(self) -> list[InceptionSpec]:
        return [layer for layer in self.layers if isinstance(layer, InceptionSpec)]

    def attached_aux_heads(self) -> tuple[AuxHeadSpec, ...]:
        """The auxiliary heads whose attach point is among the layers."""
        names = {layer.name for layer in self.layers}
        return tuple(aux for aux in self.aux_heads if aux.after in names)

    def _shapes(self, input_size: int | tuple[int, int]) -> dict[str, tuple[int, tuple[int, int], tuple[int, int]]]:
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        channels, out = self.in_channels, {}
        for layer in self.layers:
            hw_in = (h, w)
            channels, h, w = layer.out_channels_for(channels), layer.out_size(h), layer.out_size(w)
            out[layer.name] = (channels, (h, w), hw_in)
        return out

    def feature_shapes(self, input_size: int | tuple[int, int] | None = None) -> dict[str, tuple[int, int, int]]:
        """Each layer's output shape ``(C, H, W)`` for a square or ``(H, W)`` input (default ``input_size``)."""
        shapes = self._shapes(self.input_size if input_size is None else input_size)
        return {name: (c, *hw) for name, (c, hw, _) in shapes.items()}

    def input_shapes(self, input_size: int | tuple[int, int] | None = None) -> dict[str, tuple[int, int, int]]:
        """Each layer's input shape ``(C, H, W)``."""
        shapes = self._shapes(self.input_size if input_size is None else input_size)
        out, channels = {}, self.in_channels
        for name, (c, _, hw_in) in shapes.items():
            out[name] = (channels, *hw_in)
            channels = c
        return out

    def output_shape(self, input_size: int | tuple[int, int] | None = None) -> tuple[int, int, int]:
        """The shape ``(C, H, W)`` entering the head."""
        shapes = self.feature_shapes(input_size)
        if shapes:
            return list(shapes.values())[-1]
        size = self.input_size if input_size is None else input_size
        h, w = (size, size) if isinstance(size, int) else size
        return (self.in_channels, h, w)

    # -- serialisation ------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("stem", "stages", "aux_heads"):
                value = [item.to_dict() for item in value]
            elif f.name == "head":
                value = value.to_dict()
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkSpec:
        kwargs = _fields_from_dict(cls, data, "NetworkSpec")
        for where in ("stem", "stages"):
            if where in kwargs:
                items = kwargs[where]
                if not isinstance(items, list):
                    raise SpecError(f"NetworkSpec.{where} = {items!r} is not a list")
                kwargs[where] = [layer_from_dict(d, f"NetworkSpec.{where}[{i}]") for i, d in enumerate(items)]
        if "head" in kwargs:
            kwargs["head"] = HeadSpec.from_dict(kwargs["head"])
        if "aux_heads" in kwargs:
            items = kwargs["aux_heads"]
            if not isinstance(items, list):
                raise SpecError(f"NetworkSpec.aux_heads = {items!r} is not a list")
            kwargs["aux_heads"] = [AuxHeadSpec.from_dict(d) for d in items]
        return cls(**kwargs)


def read_spec(path: str | os.PathLike) -> NetworkSpec:
    """A :class:`NetworkSpec` from a JSON file; a :class:`SpecError` naming the file otherwise."""
    fix = "give the path of a NetworkSpec .json file (e.g. a run's topology.json)"
    text = read_text(path, what="spec file", fix=fix, error=SpecError)
    path = Path(path).expanduser()
    try:
        return NetworkSpec.from_json(text)
    except SpecError as e:
        raise SpecError(f"spec file {path}: {e}") from None
    except SHAPE_ERRORS as e:
        raise SpecError(f"spec file {path} is not a NetworkSpec ({error_reason(e)}); {fix}") from None
