"""Network specs, the Inception module, GoogLeNet, and networks built from specs."""
from __future__ import annotations

from builders.from_clusters import from_clusters
from builders.googlenet import googlenet, googlenet_spec, scale_width
from builders.inception import ConvBlock, Inception, init_weights
from builders.network import AuxHead, Network, NetworkOutput, build
from builders.spec import (
    AuxHeadSpec,
    ConvSpec,
    HeadSpec,
    InceptionSpec,
    LayerSpec,
    LRNSpec,
    NetworkSpec,
    PoolSpec,
    layer_from_dict,
)

__all__ = [
    "AuxHead",
    "AuxHeadSpec",
    "ConvBlock",
    "ConvSpec",
    "HeadSpec",
    "Inception",
    "InceptionSpec",
    "LRNSpec",
    "LayerSpec",
    "Network",
    "NetworkOutput",
    "NetworkSpec",
    "PoolSpec",
    "build",
    "from_clusters",
    "googlenet",
    "googlenet_spec",
    "init_weights",
    "layer_from_dict",
    "scale_width",
]
