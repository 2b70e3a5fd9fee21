"""GoogLeNet (Szegedy et al. 2014, Table 1) as a :class:`NetworkSpec`, in three variants.

``"paper"``
    Table 1 as printed: conv 7x7/2, max pool, LRN, conv 1x1 + 3x3, LRN, max pool,
    Inception 3a-3b, max pool, 4a-4e, max pool, 5a-5b, global average pool,
    dropout 0.4, linear. Convolution biases and a ReLU after every convolution, no
    BatchNorm, true 5x5 kernels. Auxiliary classifiers on 4a and 4d: average pool
    5x5/3, 1x1 conv (128) + ReLU, fc 1024 + ReLU, dropout 0.7, linear; their losses
    are weighted by 0.3 in training (the trainer's job). Built for 224x224 inputs.
``"torchvision"``
    ``torchvision.models.googlenet``: bias-free convolutions + BatchNorm (eps 1e-3),
    a 3x3 kernel in the '5x5' branch, a 2x2 max pool before 5a, dropout 0.2,
    adaptive 4x4 pooling in the auxiliary heads, optional ``transform_input``.
    Its state dicts load strictly and give the same logits.
``"small"``
    For 32x32 (CIFAR) and 8x8 (digits) inputs: the same Inception stages behind a
    stem that keeps the resolution (conv 3x3 64, conv 1x1 64, conv 3x3 192, stride
    1), BatchNorm, true 5x5 kernels, dropout 0.2. No auxiliary heads by default:
    they were added to push gradient into the middle of a deep network without
    BatchNorm; with BatchNorm and a 2x2 map at 4a on 8x8 inputs they add cost and
    little signal. ``aux_logits=True`` attaches torchvision-style heads anyway.

``width_mult`` scales every convolution width (and the auxiliary heads' widths):
``c * width_mult`` is rounded half-up to a multiple of 8, at least 8; widths of 0
stay 0 and ``width_mult=1`` gives the table's widths exactly.
"""
from __future__ import annotations

from builders.network import Network, build
from builders.spec import AuxHeadSpec, ConvSpec, HeadSpec, InceptionSpec, LRNSpec, NetworkSpec, PoolSpec
from topo.common.errors import SpecError

VARIANTS = ("paper", "torchvision", "small")

# Table 1: (name, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj); "maxpool" rows mark a pooling stage.
INCEPTION_TABLE: tuple[tuple[str, int, int, int, int, int, int], ...] = (
    ("inception3a", 64, 96, 128, 16, 32, 32),
    ("inception3b", 128, 128, 192, 32, 96, 64),
    ("inception4a", 192, 96, 208, 16, 48, 64),
    ("inception4b", 160, 112, 224, 24, 64, 64),
    ("inception4c", 128, 128, 256, 24, 64, 64),
    ("inception4d", 112, 144, 288, 32, 64, 64),
    ("inception4e", 256, 160, 320, 32, 128, 128),
    ("inception5a", 256, 160, 320, 32, 128, 128),
    ("inception5b", 384, 192, 384, 48, 128, 128),
)
_POOL_BEFORE = {"inception4a": "maxpool3", "inception5a": "maxpool4"}


def scale_width(channels: int, width_mult: float) -> int:
    """``channels * width_mult`` rounded half-up to a multiple of 8, at least 8 (0 stays 0)."""
    if width_mult == 1.0 or channels == 0:
        return channels
    return max(8, int(channels * width_mult / 8 + 0.5) * 8)


def googlenet_spec(
    variant: str = "paper",
    num_classes: int = 1000,
    aux_logits: bool | None = None,
    width_mult: float = 1.0,
    in_channels: int = 3,
    *,
    transform_input: bool = False,
    dropout: float | None = None,
    input_size: int | None = None,
    fused: bool = True,
) -> NetworkSpec:
    """The :class:`NetworkSpec` of GoogLeNet in ``variant`` "paper", "torchvision" or "small".

    ``aux_logits=None`` means the variant's default (on for "paper" and
    "torchvision", off for "small"). ``dropout`` overrides the head's dropout
    (0.4 paper, 0.2 otherwise); ``input_size`` the nominal input size (224, or 32
    for "small").
    """
    if variant not in VARIANTS:
        raise SpecError(f"googlenet variant {variant!r} is unknown: use one of {', '.join(map(repr, VARIANTS))}")
    if not (isinstance(width_mult, (int, float)) and width_mult > 0):
        raise SpecError(f"googlenet width_mult = {width_mult!r} is not a positive number")
    w = lambda c: scale_width(c, width_mult)  # noqa: E731

    if variant == "small":
        stem = [
            ConvSpec("conv1", w(64), 3),
            ConvSpec("conv2", w(64), 1),
            ConvSpec("conv3", w(192), 3),
        ]
    else:
        stem = [
            ConvSpec("conv1", w(64), 7, stride=2, padding=3),
            PoolSpec("maxpool1", 3, 2),
            *([LRNSpec("lrn1")] if variant == "paper" else []),
            ConvSpec("conv2", w(64), 1),
            ConvSpec("conv3", w(192), 3),
            *([LRNSpec("lrn2")] if variant == "paper" else []),
            PoolSpec("maxpool2", 3, 2),
        ]
    channels = stem[-1].out_channels if variant == "small" else w(192)

    stages: list = []
    for name, *widths in INCEPTION_TABLE:
        if name in _POOL_BEFORE:
            size = 2 if (variant == "torchvision" and name == "inception5a") else 3
            stages.append(PoolSpec(_POOL_BEFORE[name], size, 2))
        module = InceptionSpec(channels, *(w(c) for c in widths), name=name)
        stages.append(module)
        channels = module.out_channels

    aux_on = variant != "small" if aux_logits is None else aux_logits
    aux_heads: list[AuxHeadSpec] = []
    if aux_on:
        pool = dict(pool="avg", pool_size=5, pool_stride=3) if variant == "paper" else dict(pool="adaptive", pool_size=4)
        for aux_name, after in (("aux1", "inception4a"), ("aux2", "inception4d")):
            aux_heads.append(
                AuxHeadSpec(aux_name, after, conv_channels=w(128), fc_channels=w(1024), dropout=0.7, **pool)
            )

    return NetworkSpec(
        stem=stem,
        stages=stages,
        head=HeadSpec(num_classes, (0.4 if variant == "paper" else 0.2) if dropout is None else dropout),
        aux_heads=aux_heads,
        in_channels=in_channels,
        norm="lrn" if variant == "paper" else "batchnorm",
        kernel5x5=3 if variant == "torchvision" else 5,
        conv_bias=variant == "paper",
        bn_eps=1e-3,
        transform_input=transform_input,
        input_size=input_size if input_size is not None else (32 if variant == "small" else 224),
        fused=fused,
        name=f"googlenet_{variant}",
    )


def googlenet(
    variant: str = "paper",
    num_classes: int = 1000,
    aux_logits: bool | None = None,
    width_mult: float = 1.0,
    in_channels: int = 3,
    **options,
) -> Network:
    """``build(googlenet_spec(...))``: see :func:`googlenet_spec`."""
    return build(googlenet_spec(variant, num_classes, aux_logits, width_mult, in_channels, **options))
